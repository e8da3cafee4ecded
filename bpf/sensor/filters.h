/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Whose work is traced: --pid trees, a --cgroup, and QPOINT_STRATEGY=ignore. */
#ifndef FLOWTAP_SENSOR_FILTERS_H
#define FLOWTAP_SENSOR_FILTERS_H

#include "common.h"
#include "strategy.h"

/* Processes traced under --pid (with their descendants). */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} traced_pids SEC(".maps");

/* The --cgroup directory; a task matches when it is in it or below it. */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} filter_cgroup SEC(".maps");

/* Index 0: set once any process has QPOINT_STRATEGY=ignore, so until then nobody pays
 * the strategies lookup. Written by the exec hook and by userspace's /proc scan. */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} ignore_in_use SEC(".maps");

static __always_inline bool ignored(__u32 tgid)
{
	__u32 zero = 0;
	__u32 *in_use = bpf_map_lookup_elem(&ignore_in_use, &zero);

	return in_use && *in_use && strategy_of(tgid) == FT_STRATEGY_IGNORE;
}

static __always_inline bool current_is_traced(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	if (tgid == cfg.self_tgid)
		return false;
	if (ignored(tgid))
		return false;
	if (cfg.filter_pids && !bpf_map_lookup_elem(&traced_pids, &tgid))
		return false;
	if (cfg.filter_cgroup && bpf_current_task_under_cgroup(&filter_cgroup, 0) != 1)
		return false;
	return true;
}

static __always_inline void fill_current_task(struct ft_task *task)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	task->pid = pid_tgid >> 32;
	task->tid = (__u32)pid_tgid;
	task->uid = (__u32)bpf_get_current_uid_gid();
	task->pad = 0;
	bpf_get_current_comm(task->comm, sizeof(task->comm));
}

#endif /* FLOWTAP_SENSOR_FILTERS_H */
