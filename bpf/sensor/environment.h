/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * QPOINT_STRATEGY read from the environment of a process that has just exec'd: its
 * mm->env_start..env_end, one entry at a time with bpf_probe_read_user_str (which stops
 * at the entry's NUL), so each step is one helper call and a few compares: cheap to run
 * and cheap to verify, with bpf_loop or (before 5.17) in a bounded loop.
 */
#ifndef FLOWTAP_ENVIRONMENT_H
#define FLOWTAP_ENVIRONMENT_H

#include "compat.h"
#include "strategy.h"

#define FT_ENV_PIECE 64 /* bytes of a long entry skipped per step (63 and the NUL) */
#define FT_ENV_MAX_STEPS 2048 /* with bpf_loop: FT_ENV_MAX_BYTES of entries */
/* Without bpf_loop each step of a bounded loop is verified again: fewer, still enough for
 * a long entry across the whole FT_ENV_MAX_BYTES (an entry of up to 16 bytes takes one
 * step, a longer one one more per 63 bytes). */
#define FT_ENV_BOUNDED_STEPS 560

/* "QPOINT_STRATEGY=" as two little-endian words: no constant array in .rodata, which
 * clang 14 places where the kernel's BTF check refuses it. */
#define FT_STRATEGY_NAME_LO 0x535f544e494f5051ULL /* "QPOINT_S" */
#define FT_STRATEGY_NAME_HI 0x3d59474554415254ULL /* "TRATEGY=" */

/* Where the walk is; in a per-CPU map, so no buffer sits on the BPF stack. */
struct env_scan {
	__u64 at; /* the next byte to read */
	__u64 end;
	__u64 value; /* address of the value once the name is found */
	__u32 in_entry; /* at is inside an entry whose start was not the name */
	__u32 pad;
	char piece[FT_ENV_PIECE];
};

FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct env_scan);
} env_scratch SEC(".maps");

/* One step: an entry's first 16 bytes (is it the name?), or 63 more of a long entry. */
static __always_inline long env_scan_step(struct env_scan *scan)
{
	__u64 *words = (__u64 *)scan->piece;
	long n;

	if (scan->at >= scan->end)
		return 1;
	if (!scan->in_entry) {
		/* 17: the name's 16 bytes and the NUL the helper writes. */
		n = bpf_probe_read_user_str(scan->piece, FT_STRATEGY_NAME_LEN + 1, (void *)scan->at);
		if (n <= 0)
			return 1;
		if (n <= FT_STRATEGY_NAME_LEN) {
			scan->at += n; /* a short entry, NUL included */
			return 0;
		}
		if (words[0] == FT_STRATEGY_NAME_LO && words[1] == FT_STRATEGY_NAME_HI) {
			scan->value = scan->at + FT_STRATEGY_NAME_LEN;
			return 1;
		}
		scan->at += FT_STRATEGY_NAME_LEN;
		scan->in_entry = 1;
		return 0;
	}
	n = bpf_probe_read_user_str(scan->piece, FT_ENV_PIECE, (void *)scan->at);
	if (n <= 0)
		return 1;
	if (n < FT_ENV_PIECE) {
		scan->at += n; /* the rest of the entry, NUL included */
		scan->in_entry = 0;
	} else {
		scan->at += FT_ENV_PIECE - 1; /* 63 bytes, no NUL among them yet */
	}
	return 0;
}

/* bpf_loop's context must be on the stack: it carries the map value's address. */
struct env_walk {
	struct env_scan *scan;
};

static __attribute__((unused)) long env_loop_step(__u64 index, struct env_walk *walk)
{
	return env_scan_step(walk->scan);
}

/* The strategy named in the current process's environment, read at exec. */
static __always_inline __u8 strategy_from_environment(struct task_struct *task,
						      const __u32 hook)
{
	struct env_scan *scan;
	char value[8] = {};
	__u32 zero = 0;

	scan = bpf_map_lookup_elem(&env_scratch, &zero);
	if (!scan)
		return FT_STRATEGY_OBSERVE;
	scan->at = BPF_CORE_READ(task, mm, env_start);
	scan->end = BPF_CORE_READ(task, mm, env_end);
	scan->value = 0;
	scan->in_entry = 0;
	if (scan->end > scan->at + FT_ENV_MAX_BYTES)
		scan->end = scan->at + FT_ENV_MAX_BYTES;
	if (hook & FT_HOOK_LOOP) {
		struct env_walk walk = { .scan = scan };

		bpf_loop(FT_ENV_MAX_STEPS, env_loop_step, &walk, 0);
	} else {
		for (__u32 i = 0; i < FT_ENV_BOUNDED_STEPS; i++)
			if (env_scan_step(scan))
				break;
	}
	if (!scan->value || bpf_probe_read_user(value, sizeof(value), (void *)scan->value))
		return FT_STRATEGY_OBSERVE;
	/* The value ends at its NUL: "forward" fills 7 bytes, "ignore" 6. */
	if (value[0] == 'f' && value[1] == 'o' && value[2] == 'r' && value[3] == 'w' &&
	    value[4] == 'a' && value[5] == 'r' && value[6] == 'd' && value[7] == 0)
		return FT_STRATEGY_FORWARD;
	if (value[0] == 'i' && value[1] == 'g' && value[2] == 'n' && value[3] == 'o' &&
	    value[4] == 'r' && value[5] == 'e' && value[6] == 0)
		return FT_STRATEGY_IGNORE;
	return FT_STRATEGY_OBSERVE;
}

#endif /* FLOWTAP_ENVIRONMENT_H */
