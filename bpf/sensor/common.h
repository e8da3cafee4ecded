/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * What every part of the socket-layer object shares: headers, constants, the settings
 * userspace writes before load, the ring buffer and the drop counters.
 *
 * The object is linked from one .bpf.c per concern (the .bpf.c files beside this one, `bpftool gen
 * object`). Each map and global is defined once, in maps.bpf.c (which defines
 * FT_DEFINE_MAPS before including the headers), and is an extern everywhere else.
 */
#ifndef FLOWTAP_SENSOR_COMMON_H
#define FLOWTAP_SENSOR_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "flowtap.h"

#ifdef FT_DEFINE_MAPS
#define FT_SHARED
#else
#define FT_SHARED extern
#endif

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define DNS_PORT 53
#define EAGAIN 11
#define EINTR 4
#define MSG_PEEK 2
#define BPF_F_NO_PREALLOC (1U << 0)

#ifdef FT_DEFINE_MAPS
const volatile struct ft_config cfg = {};
#else
extern const volatile struct ft_config cfg;
#endif

FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);
} events SEC(".maps");

FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FT_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &which);

	if (value)
		*value += 1;
}

static __always_inline void *reserve(__u64 size, __u32 kind)
{
	struct ft_header *hdr = bpf_ringbuf_reserve(&events, size, 0);

	if (!hdr) {
		count(FT_CNT_RINGBUF_FULL);
		return NULL;
	}
	hdr->kind = kind;
	hdr->pad = 0;
	hdr->timestamp_ns = bpf_ktime_get_ns();
	return hdr;
}

/*
 * Wakes the consumer only when the backlog crosses wakeup_bytes: a wake-up costs the
 * traced program microseconds, and the consumer polls every 50 ms anyway. Only the
 * record that crosses the mark wakes it; waking on every record above it costs far more.
 */
static __always_inline __u64 wakeup_flags(__u64 size)
{
	__u64 waiting = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	bool crossing = waiting >= cfg.wakeup_bytes && waiting < cfg.wakeup_bytes + size + 8;

	return crossing ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

static __always_inline void submit(void *event, __u64 size)
{
	bpf_ringbuf_submit(event, wakeup_flags(size));
}

/*
 * Set by userspace while its exec gate runs: programs are then probed before they run, and
 * exec events wait for the consumer's next poll like other records. Without the gate the
 * file an exec event names is probed from the event, so the event wakes the consumer at
 * once; a forced wake-up costs the exec'ing process about 15 us in a VM (an irq_work
 * self-IPI and a remote wake-up, measured as on_exec's run time with bpf_stats).
 */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} exec_gated SEC(".maps");

static __always_inline void submit_exec(void *event, __u64 size)
{
	__u32 zero = 0;
	__u32 *gated = bpf_map_lookup_elem(&exec_gated, &zero);

	bpf_ringbuf_submit(event, gated && *gated ? wakeup_flags(size) : BPF_RB_FORCE_WAKEUP);
}

#endif /* FLOWTAP_SENSOR_COMMON_H */
