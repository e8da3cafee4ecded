/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * QPOINT_STRATEGY read from the environment of a process that has just exec'd: its
 * mm->env_start..env_end, searched 64 bytes at a time through a per-CPU buffer.
 */
#ifndef FLOWTAP_ENVIRONMENT_H
#define FLOWTAP_ENVIRONMENT_H

#include "strategy.h"

#define FT_ENV_CHUNK 64
#define FT_ENV_MAX_CHUNKS (FT_ENV_MAX_BYTES / FT_ENV_CHUNK)

/* "QPOINT_STRATEGY=" as two little-endian words: no constant array in .rodata, which
 * clang 14 places where the kernel's BTF check refuses it. */
#define FT_STRATEGY_NAME_LO 0x535f544e494f5051ULL /* "QPOINT_S" */
#define FT_STRATEGY_NAME_HI 0x3d59474554415254ULL /* "TRATEGY=" */

static __always_inline char strategy_name_at(__u32 i)
{
	__u64 word = i < 8 ? FT_STRATEGY_NAME_LO : FT_STRATEGY_NAME_HI;

	return (char)(word >> ((i & 7) * 8));
}

struct env_scan {
	unsigned long start;
	unsigned long end;
};

/*
 * The match state lives in the map value, not on the stack: the verifier then sees it as
 * any number, so the byte loop verifies once instead of once per possible state.
 */
struct env_chunk {
	char bytes[FT_ENV_CHUNK];
	__s32 matched; /* name bytes matched at the start of the current entry, -1: skip */
	__u32 pad;
	__u64 value; /* address of the value once the name is found */
};

/* Per-CPU scratch: no 64-byte array on the BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct env_chunk);
} env_scratch SEC(".maps");

static long env_scan_step(__u64 index, struct env_scan *scan)
{
	unsigned long at = scan->start + index * FT_ENV_CHUNK;
	struct env_chunk *chunk;
	__u32 zero = 0, i;
	__u64 len;

	if (at >= scan->end)
		return 1;
	chunk = bpf_map_lookup_elem(&env_scratch, &zero);
	if (!chunk)
		return 1;
	len = scan->end - at;
	if (len > FT_ENV_CHUNK)
		len = FT_ENV_CHUNK;
	if (bpf_probe_read_user(chunk->bytes, len, (void *)at))
		return 1;
	for (i = 0; i < FT_ENV_CHUNK && i < len; i++) {
		char c = chunk->bytes[i];
		/* Loaded from memory each time (volatile), never carried as a known constant. */
		__s32 matched = *(volatile __s32 *)&chunk->matched;

		if (c == 0) {
			chunk->matched = 0; /* the next entry starts */
			continue;
		}
		if (matched < 0)
			continue;
		if (c != strategy_name_at((__u32)matched)) {
			chunk->matched = -1;
			continue;
		}
		if (matched + 1 >= FT_STRATEGY_NAME_LEN) {
			chunk->value = at + i + 1;
			return 1;
		}
		chunk->matched = matched + 1;
	}
	return 0;
}

/* The strategy named in the current process's environment, read at exec. */
static __always_inline __u8 strategy_from_environment(struct task_struct *task)
{
	struct env_scan scan = {};
	struct env_chunk *chunk;
	char value[8] = {};
	__u32 zero = 0;

	scan.start = BPF_CORE_READ(task, mm, env_start);
	scan.end = BPF_CORE_READ(task, mm, env_end);
	chunk = bpf_map_lookup_elem(&env_scratch, &zero);
	if (!chunk || scan.end <= scan.start)
		return FT_STRATEGY_OBSERVE;
	chunk->matched = 0;
	chunk->value = 0;
	bpf_loop(FT_ENV_MAX_CHUNKS, env_scan_step, &scan, 0);
	if (!chunk->value || bpf_probe_read_user(value, sizeof(value), (void *)chunk->value))
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
