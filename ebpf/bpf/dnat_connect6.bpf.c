// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/connect6: the connect4 rule for dual-stack sockets dialling an edge
 * node's IPv4 address in its v4-mapped form (::ffff:a.b.c.d). Real IPv6
 * destinations pass untouched: edge nodes are addressed by IPv4.
 */
#include "netd_dnat.h"

SEC("cgroup/connect6")
int dnat_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return NETD_CONNECT_ALLOW;
	if (!dnat_is_v4_mapped(ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2]))
		return NETD_CONNECT_ALLOW;
	__u32 target_ip4;
	__u16 target_port;
	if (dnat_redirect(ctx, ctx->user_ip6[3], bpf_ntohs((__u16)ctx->user_port), &target_ip4, &target_port)) {
		ctx->user_ip6[3] = target_ip4;
		ctx->user_port = target_port;
	}
	return NETD_CONNECT_ALLOW;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
