// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/getpeername6: getpeername4's answer for dual-stack sockets, in the
 * v4-mapped form they dialled.
 */
#include "netd_dnat.h"

SEC("cgroup/getpeername6")
int dnat_getpeername6(struct bpf_sock_addr *ctx)
{
	if (!dnat_is_v4_mapped(ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2]))
		return 1;
	struct dnat_orig *orig = dnat_client_orig(ctx, ctx->user_ip6[3], bpf_ntohs((__u16)ctx->user_port));
	if (orig) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = orig->ip4;
		ctx->user_port = bpf_htons(orig->port);
	}
	/* getpeername hooks must return 1. */
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
