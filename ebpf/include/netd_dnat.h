/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Tunnel DNAT: the maps and record layouts every dnat_*.bpf.c shares.
 *
 * Each attach point is its own object; they share these maps through bpffs
 * (LIBBPF_PIN_BY_NAME: the loader points all objects at one pin directory,
 * the first creates a map, the others reuse it). A pinned map is reused
 * without any layout check, so every map name carries a layout version:
 * change a struct below and the suffix must change with it.
 *
 * The Rust mirror of each struct is in ebpf/src/dnat/abi.rs; both sides
 * assert the sizes.
 */
#ifndef NETD_DNAT_H
#define NETD_DNAT_H

#include "netd_bpf.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define SOL_IP 0
/* linux/netfilter_ipv4.h; the netfilter headers pull in too much for BPF. */
#define SO_ORIGINAL_DST 80
#define NETD_PAGE_SIZE 4096
/* include/net/tcp_states.h */
#define NETD_TCP_CLOSE 7

/* dnat_conf_v1[0].flags */
#define DNAT_ENABLED 1u
/* Also redirect sockets of other network namespaces (pods). */
#define DNAT_POD_NAMESPACES 2u

/* dnat_orig.side */
#define DNAT_SIDE_CLIENT 1 /* dnat_dialled_v1; in dnat_conns_v1: no server took it yet */
#define DNAT_SIDE_ACCEPTED 2 /* in dnat_conns_v1: the tunnel server's accepted socket holds it */

/* Indexes of dnat_stat_v1. */
#define DNAT_STAT_NO_STORAGE 0 /* a rule matched, but its record could not be written: not redirected */
#define DNAT_STAT_HANDSHAKE_FULL 1 /* the connection entry could not be written */
#define DNAT_STAT_ACCEPTED 2 /* accepted sockets that learned their original destination */
#define DNAT_STAT_COUNT 4

struct dnat_config {
	__u32 target_ip4;        /* tunnel server address, network order */
	__u32 flags;             /* DNAT_* */
	__u64 host_netns_cookie; /* where host-network sockets live */
};
_Static_assert(sizeof(struct dnat_config) == 16, "dnat_config layout");

struct dnat_rule {
	__u16 target_port; /* host order */
	__u16 reserved;
};
_Static_assert(sizeof(struct dnat_rule) == 4, "dnat_rule layout");

/* The destination a socket dialled before the rewrite. */
struct dnat_orig {
	__u32 ip4;  /* network order */
	__u16 port; /* host order */
	__u8 side;  /* DNAT_SIDE_* */
	__u8 reserved;
};
_Static_assert(sizeof(struct dnat_orig) == 8, "dnat_orig layout");

/* A redirected connection, as both of its sockets see it. */
struct dnat_tuple {
	__u32 client_ip4; /* network order */
	__u32 server_ip4; /* network order */
	__u16 client_port; /* host order */
	__u16 server_port; /* host order */
};
_Static_assert(sizeof(struct dnat_tuple) == 12, "dnat_tuple layout");

/* Dialled port (host order) -> rule. Looked up first: most connects stop here. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, struct dnat_rule);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dnat_ports_v1 SEC(".maps");

/*
 * Every rule's target port, as a bitmap: bit (port % 64) of word (port / 64)
 * (host order port). sockops and getpeername look at a connection's records
 * only when it is to one of these ports on the target address; every other
 * connection (the node's own traffic to its address too) stops here. An
 * array, so the verifier inlines the lookup: no call, one cache line. The
 * loader sets a port's bit before any rule points to it.
 */
#define DNAT_TARGET_PORT_WORDS 1024
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DNAT_TARGET_PORT_WORDS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dnat_target_ports_v1 SEC(".maps");

/* Edge node addresses (network order). Allocated as used: most clusters are small. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dnat_edges_v1 SEC(".maps");

/* An LPM trie key: an IPv4 prefix (address in network order). */
struct dnat_net_key {
	__u32 prefixlen;
	__u32 ip4;
};
_Static_assert(sizeof(struct dnat_net_key) == 8, "dnat_net_key layout");

/*
 * Edge pod subnets (and any other edge prefixes): looked up only when the
 * port matched and the address is no edge node, so node traffic pays one
 * hash lookup and unrelated traffic none of this.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct dnat_net_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dnat_edge_nets_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dnat_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dnat_conf_v1 SEC(".maps");

/* Redirected connections per dialled port. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dnat_hits_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DNAT_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dnat_stat_v1 SEC(".maps");

/*
 * The original destination travels without socket-local storage: creating
 * storage costs two memcg-charged allocations and an RCU free per socket
 * (~2 us of connect4's time when the client's was made there). Two
 * preallocated LRU hash maps instead; sockops deletes every entry by the
 * client socket's CLOSE, and LRU is only a last resort, for a socket whose
 * connect() failed between connect4 and its SYN.
 */

/*
 * Redirected client socket (its socket cookie) -> what it dialled, from
 * connect4/6 to the same connect()'s TCP_CONNECT_CB, which moves it into
 * dnat_conns_v1: the 4-tuple is not known before.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct dnat_orig);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dnat_dialled_v1 SEC(".maps");

/*
 * Redirected connection (the 4-tuple both of its sockets see) -> what its
 * client dialled, for the connection's life: written at the client's
 * TCP_CONNECT_CB (side CLIENT), marked ACCEPTED in place by the server's
 * PASSIVE_ESTABLISHED_CB, read by the client's getpeername, by
 * getsockopt(SO_ORIGINAL_DST) and TunnelDnat::original_dst on the accepted
 * socket, deleted at the client socket's CLOSE (see dnat_sockops).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct dnat_tuple);
	__type(value, struct dnat_orig);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dnat_conns_v1 SEC(".maps");

/* Is ip4:port (network order address, host order port) the tunnel server? */
static __always_inline int dnat_is_target(__u32 ip4, __u16 port)
{
	__u32 zero = 0;
	struct dnat_config *conf = bpf_map_lookup_elem(&dnat_conf_v1, &zero);
	if (!conf || ip4 != conf->target_ip4)
		return 0;
	__u32 word = port >> 6;
	__u64 *bits = bpf_map_lookup_elem(&dnat_target_ports_v1, &word);
	return bits && (*bits >> (port & 63)) & 1;
}

static __always_inline void dnat_stat_inc(__u32 index)
{
	__u64 *count = bpf_map_lookup_elem(&dnat_stat_v1, &index);
	if (count)
		*count += 1;
}

/*
 * The decision both connect hooks share: should a TCP connect() from this
 * socket to dst_ip4:port (network order address, host order port) go to the
 * tunnel server instead? On yes, records the original destination under the
 * socket's cookie, counts the rule and fills *target_ip4 / *target_port (network order).
 */
static __always_inline int dnat_redirect(struct bpf_sock_addr *ctx, __u32 dst_ip4, __u16 port,
					 __u32 *target_ip4, __u16 *target_port)
{
	struct dnat_rule *rule = bpf_map_lookup_elem(&dnat_ports_v1, &port);
	if (!rule)
		return 0;
	/* 127.0.0.0/8: never a node's address, whatever the edge set says. */
	if ((bpf_ntohl(dst_ip4) >> 24) == 127)
		return 0;
	if (!bpf_map_lookup_elem(&dnat_edges_v1, &dst_ip4)) {
		struct dnat_net_key key = { .prefixlen = 32, .ip4 = dst_ip4 };
		if (!bpf_map_lookup_elem(&dnat_edge_nets_v1, &key))
			return 0;
	}
	__u32 zero = 0;
	struct dnat_config *conf = bpf_map_lookup_elem(&dnat_conf_v1, &zero);
	if (!conf || !(conf->flags & DNAT_ENABLED) || conf->target_ip4 == 0)
		return 0;
	if (!(conf->flags & DNAT_POD_NAMESPACES) && bpf_get_netns_cookie(ctx) != conf->host_netns_cookie)
		return 0;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	/* connect() again on a connecting or connected socket (polling a
	 * non-blocking connect): the kernel answers EALREADY or EISCONN whatever
	 * the address, and the record was handed on at the first call. */
	if (sk->state == NETD_TCP_CLOSE) {
		__u64 cookie = bpf_get_socket_cookie(ctx);
		struct dnat_orig orig = { .ip4 = dst_ip4, .port = port, .side = DNAT_SIDE_CLIENT };
		if (bpf_map_update_elem(&dnat_dialled_v1, &cookie, &orig, BPF_ANY) != 0) {
			/* Without the original destination the server could not route it. */
			dnat_stat_inc(DNAT_STAT_NO_STORAGE);
			return 0;
		}
	}
	__u64 *hits = bpf_map_lookup_elem(&dnat_hits_v1, &port);
	if (hits)
		*hits += 1;
	*target_ip4 = conf->target_ip4;
	*target_port = bpf_htons(rule->target_port);
	return 1;
}

/*
 * What a connected socket dialled, if the DNAT redirected it: its real peer
 * (network order address, host order port) is then the tunnel server, and
 * its own address and port with that peer name the connection.
 */
static __always_inline struct dnat_orig *dnat_client_orig(struct bpf_sock_addr *ctx, __u32 peer_ip4,
							  __u16 peer_port)
{
	if (!dnat_is_target(peer_ip4, peer_port))
		return 0;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	struct dnat_tuple tuple = {
		.client_ip4 = sk->src_ip4,
		.server_ip4 = peer_ip4,
		.client_port = (__u16)sk->src_port,
		.server_port = peer_port,
	};
	return bpf_map_lookup_elem(&dnat_conns_v1, &tuple);
}

/* ::ffff:a.b.c.d, the form a dual-stack socket uses for IPv4 (words in network order). */
static __always_inline int dnat_is_v4_mapped(__u32 w0, __u32 w1, __u32 w2)
{
	return w0 == 0 && w1 == 0 && w2 == bpf_htonl(0xffff);
}

#endif /* NETD_DNAT_H */
