// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/connect4: a TCP connect() to an edge node's redirected port goes to
 * the tunnel server instead; the dialled address is kept under the socket's
 * cookie.
 * Everything else passes untouched after one small hash lookup (the port).
 */
#include "netd_dnat.h"

SEC("cgroup/connect4")
int dnat_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return NETD_CONNECT_ALLOW;
	__u32 target_ip4;
	__u16 target_port;
	if (dnat_redirect(ctx, ctx->user_ip4, bpf_ntohs((__u16)ctx->user_port), &target_ip4, &target_port)) {
		ctx->user_ip4 = target_ip4;
		ctx->user_port = target_port;
	}
	return NETD_CONNECT_ALLOW;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
