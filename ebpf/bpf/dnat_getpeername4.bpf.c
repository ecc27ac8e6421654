// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/getpeername4: a redirected client sees the address it dialled, not
 * the tunnel server's. Accepted sockets keep their real peer.
 */
#include "netd_dnat.h"

SEC("cgroup/getpeername4")
int dnat_getpeername4(struct bpf_sock_addr *ctx)
{
	struct dnat_orig *orig = dnat_client_orig(ctx, ctx->user_ip4, bpf_ntohs((__u16)ctx->user_port));
	if (orig) {
		ctx->user_ip4 = orig->ip4;
		ctx->user_port = bpf_htons(orig->port);
	}
	/* getpeername hooks must return 1. */
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
