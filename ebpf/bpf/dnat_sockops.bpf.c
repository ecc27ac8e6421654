// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sockops: carries a redirected connection's original destination from the
 * client socket to the tunnel server's accepted socket.
 *
 *  - TCP_CONNECT_CB (client, just before the SYN): the 4-tuple is known now;
 *    the original destination goes into dnat_shake_v1 under it, and the
 *    socket asks for state callbacks so the entry can go when it closes.
 *  - PASSIVE_ESTABLISHED_CB (server, handshake done, before accept()): the
 *    entry moves into the accepted socket's storage and leaves the map.
 *  - STATE_CB to CLOSE (client): drops the entry if the server never took it
 *    (refused, timed out), so the map drains to zero when load stops.
 *
 * The accepted socket belongs to its listener's cgroup, so the server side
 * runs only where the tunnel server's listener lives.
 */
#include "netd_dnat.h"

/* include/net/tcp_states.h */
#define NETD_TCP_CLOSE 7

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

SEC("sockops")
int dnat_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: {
		struct dnat_orig *orig = dnat_client_orig(skops->sk);
		if (!orig)
			break;
		struct dnat_tuple tuple = client_tuple(skops);
		if (bpf_map_update_elem(&dnat_shake_v1, &tuple, orig, BPF_ANY) != 0) {
			dnat_stat_inc(DNAT_STAT_HANDSHAKE_FULL);
			break;
		}
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	}
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: {
		struct dnat_tuple tuple = {
			.client_ip4 = skops->remote_ip4,
			.server_ip4 = skops->local_ip4,
			.client_port = (__u16)bpf_ntohl(skops->remote_port),
			.server_port = (__u16)skops->local_port,
		};
		struct dnat_orig *pending = bpf_map_lookup_elem(&dnat_shake_v1, &tuple);
		if (!pending)
			break;
		struct dnat_orig carried = *pending;
		bpf_map_delete_elem(&dnat_shake_v1, &tuple);
		struct bpf_sock *sk = skops->sk;
		if (!sk)
			break;
		struct dnat_orig *slot = bpf_sk_storage_get(&dnat_orig_v1, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!slot) {
			dnat_stat_inc(DNAT_STAT_NO_STORAGE);
			break;
		}
		*slot = carried;
		slot->side = DNAT_SIDE_ACCEPTED;
		dnat_stat_inc(DNAT_STAT_ACCEPTED);
		break;
	}
	case BPF_SOCK_OPS_STATE_CB: {
		if (skops->args[1] != NETD_TCP_CLOSE)
			break;
		if (!dnat_client_orig(skops->sk))
			break;
		struct dnat_tuple tuple = client_tuple(skops);
		bpf_map_delete_elem(&dnat_shake_v1, &tuple);
		break;
	}
	default:
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
