/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Shared prelude for every netd BPF program.
 *
 * Kernel UAPI types come from linux-libc-dev and the helper declarations from
 * libbpf-dev; nothing here depends on the running kernel's BTF, so one object
 * loads on every kernel >= 5.10 that netd supports.
 */
#ifndef NETD_BPF_H
#define NETD_BPF_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* cgroup/connect* programs: 1 lets connect() proceed, 0 fails it with EPERM. */
#define NETD_CONNECT_ALLOW 1

#endif /* NETD_BPF_H */
