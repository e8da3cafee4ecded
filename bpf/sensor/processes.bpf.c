// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Processes (BTF tracepoints, every kernel from 5.10):
 *   tp_btf/sched_process_fork   --pid follows children; a child inherits its parent's
 *                               QPOINT_STRATEGY; fork events for per-process TLS probes.
 *   tp_btf/sched_process_exec   exe, argv and cgroup of short-lived programs; the new
 *                               program's QPOINT_STRATEGY (environment.h).
 *   tp_btf/sched_process_exit   the end of a process: its DNS flows, its entries.
 * exec and exit come in the full build and the bounded one (compat.h); the bounded exit
 * does not walk the table (no bpf_for_each_map_elem: UDP flows end when their socket is
 * released, socket_io.bpf.c).
 */
#include "conns.h"
#include "environment.h"
#include "tls.h"

SEC("tp_btf/sched_process_fork")
int BPF_PROG(on_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 parent_tgid = parent->tgid;
	__u32 child_tgid = child->tgid;
	__u8 one = 1;
	__u8 *strategy;

	if (parent_tgid == child_tgid)
		return 0;
	/* The child has its parent's environment, so its strategy too, until it execs. */
	strategy = bpf_map_lookup_elem(&strategies, &parent_tgid);
	if (strategy)
		bpf_map_update_elem(&strategies, &child_tgid, strategy, BPF_ANY);
	if (!cfg.filter_pids)
		return 0;
	if (!bpf_map_lookup_elem(&traced_pids, &parent_tgid))
		return 0;
	if (bpf_map_update_elem(&traced_pids, &child_tgid, &one, BPF_ANY))
		count(FT_CNT_PID_TABLE_FULL);
	if (cfg.notify_forks) {
		struct ft_fork_event *e = reserve(sizeof(*e), FT_EVENT_FORK);

		if (!e)
			return 0;
		e->task.pid = child_tgid;
		e->task.tid = child->pid;
		e->task.uid = (__u32)bpf_get_current_uid_gid();
		e->task.pad = 0;
		bpf_probe_read_kernel_str(e->task.comm, sizeof(e->task.comm), child->comm);
		e->parent_pid = parent_tgid;
		e->pad = 0;
		/* Rare, and its TLS probes should be in place before it does much: wake now. */
		bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
	}
	return 0;
}

/* A new program image, perhaps a new environment: its strategy is read again. */
static __always_inline void note_strategy(struct task_struct *task, const __u32 hook)
{
	__u32 tgid = task->tgid, zero = 0;
	__u8 strategy = strategy_from_environment(task, hook);

	if (strategy == FT_STRATEGY_OBSERVE) {
		bpf_map_delete_elem(&strategies, &tgid);
		return;
	}
	if (bpf_map_update_elem(&strategies, &tgid, &strategy, BPF_ANY)) {
		count(FT_CNT_STRATEGY_TABLE_FULL);
		return;
	}
	if (strategy == FT_STRATEGY_IGNORE) {
		__u32 *in_use = bpf_map_lookup_elem(&ignore_in_use, &zero);

		if (in_use)
			*in_use = 1;
	}
}

static __always_inline void exec_event(struct task_struct *task, struct linux_binprm *bprm,
				       const __u32 hook)
{
	struct ft_exec_event *e;
	unsigned long arg_start, arg_end, len;

	note_strategy(task, hook);
	if (!current_is_traced())
		return;
	e = reserve(sizeof(*e), FT_EVENT_EXEC);
	if (!e)
		return;
	fill_current_task(&e->task);
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), BPF_CORE_READ(bprm, filename));
	bpf_probe_read_kernel_str(e->cgroup_name, sizeof(e->cgroup_name),
				  BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, name));
	arg_start = BPF_CORE_READ(task, mm, arg_start);
	arg_end = BPF_CORE_READ(task, mm, arg_end);
	len = arg_end > arg_start ? arg_end - arg_start : 0;
	if (len > FT_ARGS_LEN)
		len = FT_ARGS_LEN;
	if (bpf_probe_read_user(e->args, len, (void *)arg_start))
		len = 0;
	e->args_length = len;
	submit_exec(e, sizeof(*e));
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(on_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	exec_event(task, bprm, FT_HOOK_BTF | FT_FULL);
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(on_exec_bounded, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	exec_event(task, bprm, FT_HOOK_BTF);
	return 0;
}

struct exit_ctx {
	__u32 tgid;
};

static __attribute__((unused)) long close_udp_of_process(struct bpf_map *map, __u64 *key,
							  struct ft_conn_state *state,
							  struct exit_ctx *ctx)
{
	if (state->conn.protocol == IPPROTO_UDP && state->task.pid == ctx->tgid)
		untrack_udp((const struct sock *)*key, state, FT_HOOK_BTF | FT_FULL);
	return 0;
}

/* A thread ends (every thread passes here); the process ends with its last one. */
static __always_inline void exit_event(struct task_struct *task, const bool walk_udp)
{
	struct ft_exit_event *e;
	__u32 tgid = task->tgid;
	__u32 tid = task->pid;
	bool last = BPF_CORE_READ(task, signal, live.counter) == 0;

	if (!have(FT_FEATURE_TASK_STORAGE))
		bpf_map_delete_elem(&ssl_calls_by_thread, &tid);
	if (walk_udp && last && bpf_map_lookup_elem(&udp_owners, &tgid)) {
		struct exit_ctx ctx = { .tgid = tgid };

		/* Its sockets are closed by exit, not by close(): end its DNS flows here. */
		bpf_for_each_map_elem(&conns, close_udp_of_process, &ctx, 0);
		bpf_map_delete_elem(&udp_owners, &tgid);
	}
	if (!last)
		return;
	bpf_map_delete_elem(&go_processes, &tgid);
	bpf_map_delete_elem(&strategies, &tgid);
	if (cfg.filter_pids) {
		bool traced = bpf_map_lookup_elem(&traced_pids, &tgid) != NULL;

		bpf_map_delete_elem(&traced_pids, &tgid);
		if (!traced)
			return;
	} else if (!current_is_traced()) {
		return;
	}
	e = reserve(sizeof(*e), FT_EVENT_EXIT);
	if (!e)
		return;
	fill_current_task(&e->task);
	submit(e, sizeof(*e));
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(on_exit, struct task_struct *task)
{
	exit_event(task, true);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(on_exit_bounded, struct task_struct *task)
{
	exit_event(task, false);
	return 0;
}
