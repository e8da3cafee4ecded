/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Per-process strategy from the environment (QPOINT_STRATEGY, as in the seed product):
 * "forward" sends the process's outbound TCP through the egress proxy (egress.bpf.c),
 * "ignore" keeps it out of all capture (conn.bpf.c), absent means observe only.
 *
 * The environment is read at exec, in the kernel, so a new process is covered from its
 * very first connect with no race against userspace reading /proc. Children inherit the
 * entry at fork (they inherit the environment). Both objects declare this map; the egress
 * object reuses the socket layer's map fd, so there is one table. The reading itself is in
 * sensor/environment.h, used by the socket layer only.
 */
#ifndef FLOWTAP_STRATEGY_H
#define FLOWTAP_STRATEGY_H

#include "flowtap.h"

/* Defined by the object that includes this with FT_SHARED empty (egress.bpf.c, the
 * socket layer's maps.bpf.c); an extern in the socket layer's other parts. */
#ifndef FT_SHARED
#define FT_SHARED
#endif

FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FT_MAX_STRATEGIES);
	__type(key, __u32); /* tgid */
	__type(value, __u8); /* enum ft_strategy, never FT_STRATEGY_OBSERVE */
} strategies SEC(".maps");

static __always_inline __u8 strategy_of(__u32 tgid)
{
	__u8 *strategy = bpf_map_lookup_elem(&strategies, &tgid);

	return strategy ? *strategy : FT_STRATEGY_OBSERVE;
}

#endif /* FLOWTAP_STRATEGY_H */
