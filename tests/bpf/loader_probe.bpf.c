// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Test-only programs that exercise the loader's uprobe and cgroup attach paths. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile __u32 target_tgid = 0;

__u64 uprobe_hits = 0;
__u64 uprobe_last_arg = 0;
__u64 uretprobe_last_ret = 0;
__u64 connect4_calls = 0;

SEC("uprobe")
int BPF_KPROBE(count_call, long arg)
{
	if ((bpf_get_current_pid_tgid() >> 32) != target_tgid)
		return 0;
	__sync_fetch_and_add(&uprobe_hits, 1);
	uprobe_last_arg = arg;
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(record_return, long ret)
{
	if ((bpf_get_current_pid_tgid() >> 32) != target_tgid)
		return 0;
	uretprobe_last_ret = ret;
	return 0;
}

/* Counts connect() calls in the test's cgroup and lets every one through unchanged. */
SEC("cgroup/connect4")
int count_connect4(struct bpf_sock_addr *ctx)
{
	__sync_fetch_and_add(&connect4_calls, 1);
	return 1;
}

/* Loaded only by the test that checks how a refused program type is explained. */
SEC("?fentry/tcp_connect")
int BPF_PROG(refused_fentry, struct sock *sk)
{
	return 0;
}
