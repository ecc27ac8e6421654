// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Test-only program: counts IPv4 connect() calls per destination port for
 * every process in the cgroup it is attached to. It exists to prove the
 * build -> embed -> load -> attach -> map read-back pipeline end to end; it
 * never changes the outcome of a connect().
 */
#include "netd_bpf.h"

/*
 * When non-zero, only connects to this IPv4 address (network byte order) are
 * counted. Set by the loader; proves that `volatile const` settings reach the
 * kernel's copy of .rodata.
 */
volatile const __u32 count_only_addr4 = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);   /* destination port, host byte order */
	__type(value, __u64); /* connect() calls seen */
} CONNECT_COUNTS SEC(".maps");

SEC("cgroup/connect4")
int count_connect4(struct bpf_sock_addr *ctx)
{
	if (count_only_addr4 != 0 && ctx->user_ip4 != count_only_addr4)
		return NETD_CONNECT_ALLOW;

	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u64 *count = bpf_map_lookup_elem(&CONNECT_COUNTS, &port);
	if (count) {
		__sync_fetch_and_add(count, 1);
	} else {
		__u64 first = 1;
		/* BPF_NOEXIST: a racing first connect on another CPU wins; retry its slot. */
		if (bpf_map_update_elem(&CONNECT_COUNTS, &port, &first, BPF_NOEXIST) != 0) {
			count = bpf_map_lookup_elem(&CONNECT_COUNTS, &port);
			if (count)
				__sync_fetch_and_add(count, 1);
		}
	}
	return NETD_CONNECT_ALLOW;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
