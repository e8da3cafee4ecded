/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * One object for every kernel from 5.10 on. What this kernel offers is probed by
 * userspace before load (src/flowtap/loader/features.py) and written into cfg.features:
 * cfg is read-only data the verifier knows, so it never visits a branch that uses what
 * the running kernel lacks (a helper, a map type), and such code loads everywhere.
 * Program builds cover what a branch cannot hide: a kernel refuses, anywhere in a
 * program, a callback reference without bpf_loop (5.17) or bpf_for_each_map_elem (5.13)
 * and an atomic fetch or compare-and-swap before 5.12. Userspace loads the build its
 * kernel takes (src/flowtap/loader/hooks.py).
 */
#ifndef FLOWTAP_SENSOR_COMPAT_H
#define FLOWTAP_SENSOR_COMPAT_H

#include "common.h"

/*
 * How a hook sees its socket and what it may use (constants folded at compile time).
 * A program comes in a full build (bpf_loop, atomics, bpf_for_each_map_elem: 5.17 on)
 * and a bounded one (suffix _bounded) with none of them.
 */
#define FT_HOOK_BTF 1 /* sk is a BTF pointer (tp_btf, fentry): helpers may take it */
#define FT_HOOK_LOOP 2 /* bpf_loop may be used (5.17): else bounded loops, fewer steps */
#define FT_HOOK_ATOMICS 4 /* atomic fetch-and-add and compare-and-swap (5.12) */
#define FT_FULL (FT_HOOK_LOOP | FT_HOOK_ATOMICS)

static __always_inline bool have(__u32 feature)
{
	return cfg.features & feature;
}

/* The current task, as a pointer to read with CO-RE (a BTF one from 5.11 on). */
static __always_inline struct task_struct *current_task(void)
{
	if (have(FT_FEATURE_TASK_BTF))
		return bpf_get_current_task_btf();
	return (struct task_struct *)bpf_get_current_task();
}

/* The registers a syscall entered with: its number and the arguments flowtap reads. */
struct syscall_regs {
	long nr;
	__u64 si; /* second argument: the buffer, iovec or msghdr */
	__u64 dx; /* third: the count */
	__u64 r8; /* fifth: sendto's sockaddr */
	__u64 r14; /* Go's goroutine pointer on its syscall path */
};

static __always_inline void read_syscall_regs(struct syscall_regs *out)
{
	struct pt_regs *regs;

	if (have(FT_FEATURE_TASK_PT_REGS)) {
		regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
		out->nr = regs->orig_ax;
		out->si = regs->si;
		out->dx = regs->dx;
		out->r8 = regs->r8;
		out->r14 = regs->r14;
		return;
	}
	/* Before 5.15: the user registers are saved at the top of the task's kernel stack
	 * (x86_64's task_pt_regs(): no padding above them). */
	regs = (struct pt_regs *)(BPF_CORE_READ(current_task(), stack) + cfg.thread_size -
				  bpf_core_type_size(struct pt_regs));
	out->nr = BPF_CORE_READ(regs, orig_ax);
	out->si = BPF_CORE_READ(regs, si);
	out->dx = BPF_CORE_READ(regs, dx);
	out->r8 = BPF_CORE_READ(regs, r8);
	out->r14 = BPF_CORE_READ(regs, r14);
}

#ifdef FT_DEFINE_MAPS
/* Connection ids are unique for the life of the loaded object. */
__u64 next_conn_id = 0;
#else
extern __u64 next_conn_id;
#endif

/*
 * A new connection id: a counter in the full build; in the bounded one, the clock and
 * the CPU (one CPU never reads the same nanosecond twice).
 */
static __always_inline __u64 new_conn_id(const __u32 hook)
{
	if (hook & FT_HOOK_ATOMICS)
		return __sync_fetch_and_add(&next_conn_id, 1) + 1;
	return bpf_ktime_get_ns() << 6 | (bpf_get_smp_processor_id() & 63);
}

/*
 * Adds n to a byte counter and returns what it was (the position of these bytes in the
 * stream). Without fetch-and-add the total stays exact (a plain atomic add) and only two
 * sends on one socket at the same instant could be given one position.
 */
static __always_inline __u64 add_bytes(__u64 *counter, __u64 n, const __u32 hook)
{
	__u64 before;

	if (hook & FT_HOOK_ATOMICS)
		return __sync_fetch_and_add(counter, n);
	before = *(volatile __u64 *)counter;
	__sync_fetch_and_add(counter, n);
	return before;
}

/*
 * The identity of a socket, to tell a reused struct sock from the one tracked: its cookie
 * where a tracing program may ask for it (5.12), else its inode number (sockfs: unique
 * while the socket exists).
 */
static __always_inline __u64 socket_identity(const struct sock *sk, const __u32 hook)
{
	if ((hook & FT_HOOK_BTF) && have(FT_FEATURE_SOCKET_COOKIE))
		return bpf_get_socket_cookie((void *)sk);
	return BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
}

#endif /* FLOWTAP_SENSOR_COMPAT_H */
