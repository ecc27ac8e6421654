// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sockops: carries a redirected connection's original destination from the
 * client socket to the tunnel server's accepted socket, and drops every
 * record when its socket closes.
 *
 *  - TCP_CONNECT_CB (client, just before the SYN): the 4-tuple is known now;
 *    what connect4 kept under the socket's cookie moves into dnat_conns_v1
 *    under the tuple, and the socket asks for state callbacks so the entry
 *    can go when it closes.
 *  - PASSIVE_ESTABLISHED_CB (server, handshake done, before accept()): the
 *    entry is marked ACCEPTED where it is (no copy, no socket storage).
 *  - STATE_CB to CLOSE (client): drops the entry, taken or not. So the maps
 *    drain to zero when load stops.
 *
 * The client's CLOSE, not the accepted socket's, ends the entry: a client
 * reaches CLOSE after an abort (RST, refused, timed out) or once both sides
 * have closed (TIME_WAIT, LAST_ACK done), so a server that reads the
 * original destination while its peer is alive finds it, and accepted
 * sockets need no state callbacks (three fewer calls per connection).
 *
 * Every other TCP socket of the cgroup never asks for state callbacks: it
 * pays only the callbacks the kernel always makes (timeout and window init,
 * ECN, connect, established), each returning after the op check; at
 * TCP_CONNECT_CB and PASSIVE_ESTABLISHED_CB an address compare (and for the
 * node's own address a port lookup) tells it is not a connection to the
 * tunnel server.
 *
 * The accepted socket belongs to its listener's cgroup, so the server side
 * runs only where the tunnel server's listener lives.
 */
#include "netd_dnat.h"

/* The connection's key as the client socket sees it. */
static __always_inline struct dnat_tuple client_tuple(struct bpf_sock_ops *skops)
{
	struct dnat_tuple tuple = {
		.client_ip4 = skops->local_ip4,
		.server_ip4 = skops->remote_ip4,
		.client_port = (__u16)skops->local_port,
		.server_port = (__u16)bpf_ntohl(skops->remote_port),
	};
	return tuple;
}

/* The connection's key as the accepted socket sees it: the same key. */
static __always_inline struct dnat_tuple server_tuple(struct bpf_sock_ops *skops)
{
	struct dnat_tuple tuple = {
		.client_ip4 = skops->remote_ip4,
		.server_ip4 = skops->local_ip4,
		.client_port = (__u16)bpf_ntohl(skops->remote_port),
		.server_port = (__u16)skops->local_port,
	};
	return tuple;
}

static __always_inline void on_connect(struct bpf_sock_ops *skops)
{
	/* Redirected sockets dial the tunnel server; others need no cookie lookup. */
	if (!dnat_is_target(skops->remote_ip4, (__u16)bpf_ntohl(skops->remote_port)))
		return;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct dnat_orig *dialled = bpf_map_lookup_elem(&dnat_dialled_v1, &cookie);
	if (!dialled)
		return;
	struct dnat_orig orig = *dialled;
	bpf_map_delete_elem(&dnat_dialled_v1, &cookie);
	struct dnat_tuple tuple = client_tuple(skops);
	if (bpf_map_update_elem(&dnat_conns_v1, &tuple, &orig, BPF_ANY) != 0) {
		dnat_stat_inc(DNAT_STAT_HANDSHAKE_FULL);
		return;
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void on_passive_established(struct bpf_sock_ops *skops)
{
	/* Only the tunnel server's listeners take redirected connections. */
	if (!dnat_is_target(skops->local_ip4, (__u16)skops->local_port))
		return;
	struct dnat_tuple tuple = server_tuple(skops);
	struct dnat_orig *pending = bpf_map_lookup_elem(&dnat_conns_v1, &tuple);
	if (!pending || pending->side != DNAT_SIDE_CLIENT)
		return;
	pending->side = DNAT_SIDE_ACCEPTED;
	dnat_stat_inc(DNAT_STAT_ACCEPTED);
}

/* Only redirected clients ask for STATE_CB. */
static __always_inline void on_client_close(struct bpf_sock_ops *skops)
{
	struct dnat_tuple tuple = client_tuple(skops);
	bpf_map_delete_elem(&dnat_conns_v1, &tuple);
	/* The flag stays: a closed socket makes no more state changes unless it
	 * connects again, and then TCP_CONNECT_CB decides anew. */
}

SEC("sockops")
int dnat_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		on_connect(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_passive_established(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == NETD_TCP_CLOSE)
			on_client_close(skops);
		break;
	default:
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
