// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/getsockopt: answers getsockopt(SOL_IP, SO_ORIGINAL_DST) on the
 * tunnel server's accepted sockets with the edge address the client dialled,
 * so software written for iptables REDIRECT works unchanged. Attached only
 * to the cgroup of the process that asks; everything else passes through.
 */
#include "netd_dnat.h"

struct netd_sockaddr_in {
	__u16 sin_family;
	__u16 sin_port; /* network order */
	__u32 sin_addr; /* network order */
	__u8 sin_zero[8];
};
_Static_assert(sizeof(struct netd_sockaddr_in) == 16, "sockaddr_in layout");

SEC("cgroup/getsockopt")
int dnat_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
		goto pass;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		goto pass;
	/* As an accepted socket: its peer is the client, its own address the server. */
	struct dnat_tuple tuple = {
		.client_ip4 = sk->dst_ip4,
		.server_ip4 = sk->src_ip4,
		.client_port = bpf_ntohs(sk->dst_port),
		.server_port = (__u16)sk->src_port,
	};
	/* The key is this socket's own connection: a hit means it is the
	 * server end of a redirected one, whichever side field it has. */
	struct dnat_orig *orig = bpf_map_lookup_elem(&dnat_conns_v1, &tuple);
	if (!orig)
		goto pass;
	struct netd_sockaddr_in *sin = ctx->optval;
	if ((void *)(sin + 1) > ctx->optval_end)
		goto pass;
	sin->sin_family = AF_INET;
	sin->sin_port = bpf_htons(orig->port);
	sin->sin_addr = orig->ip4;
	__builtin_memset(sin->sin_zero, 0, sizeof(sin->sin_zero));
	ctx->optlen = sizeof(*sin);
	/* The verifier takes ctx fields one by one: keep clang from merging
	 * these two adjacent 4-byte stores into one 8-byte store. */
	asm volatile("" ::: "memory");
	ctx->retval = 0;
	return 1;
pass:
	/* The kernel's answer stands; past a page the program sees only part of
	 * optval, and optlen 0 tells the kernel to use the caller's buffer as is. */
	if (ctx->optlen > NETD_PAGE_SIZE)
		ctx->optlen = 0;
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
