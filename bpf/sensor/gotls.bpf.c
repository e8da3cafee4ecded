// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Go crypto/tls: (*Conn).Read and (*Conn).Write, attached by userspace per Go executable
 * (tls/golang.py): an entry probe, and a plain uprobe on every RET of the function (never
 * a uretprobe: Go moves goroutine stacks, and a hijacked return address would crash it).
 * Register ABI (Go >= 1.17, amd64): receiver in RAX, the slice in RBX/RCX at entry; n in
 * RAX at return; the goroutine in R14 throughout. A Write's plaintext goes out at its
 * first send (tls.h, note_ssl_socket). go_return comes in the full and the bounded build.
 */
#include "tls.h"

/* From its first probed call on, this process's socket calls look for its goroutines. */
static __always_inline void go_process_seen(__u32 tgid)
{
	__u8 one = 1;

	if (!bpf_map_lookup_elem(&go_processes, &tgid) &&
	    bpf_map_update_elem(&go_processes, &tgid, &one, BPF_ANY))
		count(FT_CNT_PID_TABLE_FULL);
}

static __always_inline int go_enter(struct pt_regs *ctx, __u32 flow)
{
	struct go_call_key key = {
		.tgid = bpf_get_current_pid_tgid() >> 32,
		.g = ctx->r14,
	};
	struct go_call call = {
		.conn = ctx->ax,
		.buf = ctx->bx,
		.len = ctx->cx,
		.flow = flow,
	};

	if (tls_probes_stopped() || !current_is_traced())
		return 0;
	go_process_seen(key.tgid);
	bpf_map_update_elem(&go_calls, &key, &call, BPF_ANY);
	return 0;
}

SEC("uprobe")
int go_read_enter(struct pt_regs *ctx)
{
	return go_enter(ctx, FT_FLOW_RX);
}

SEC("uprobe")
int go_write_enter(struct pt_regs *ctx)
{
	return go_enter(ctx, FT_FLOW_TX);
}

/* The handshake moves no plaintext, but its socket is the tls.Conn's: a request that came
 * with the handshake's last bytes is then read from tls.Conn's buffer, with no syscall.
 * Read and Write call it too, so it has a map of its own. */
SEC("uprobe")
int go_handshake_enter(struct pt_regs *ctx)
{
	struct go_call_key key = {
		.tgid = bpf_get_current_pid_tgid() >> 32,
		.g = ctx->r14,
	};
	struct go_call call = { .conn = ctx->ax };

	if (tls_probes_stopped() || !current_is_traced())
		return 0;
	go_process_seen(key.tgid);
	bpf_map_update_elem(&go_handshakes, &key, &call, BPF_ANY);
	return 0;
}

SEC("uprobe")
int go_handshake_return(struct pt_regs *ctx)
{
	struct go_call_key key = {
		.tgid = bpf_get_current_pid_tgid() >> 32,
		.g = ctx->r14,
	};
	struct go_call *found = bpf_map_lookup_elem(&go_handshakes, &key);
	__u64 sk, conn;

	if (!found)
		return 0;
	sk = found->sk;
	conn = found->conn;
	bpf_map_delete_elem(&go_handshakes, &key);
	if (sk)
		tls_connection(sk, conn); /* remembers the tls.Conn's socket */
	return 0;
}

/*
 * The socket under a *tls.Conn, for a call that made no syscall and whose tls.Conn has
 * no socket seen yet (a request that arrived with the handshake, read from tls.Conn's
 * buffer): tls.Conn.conn -> *net.TCPConn -> *netFD -> Sysfd -> the file table. Only when
 * the interface's itab is *net.TCPConn's; anything else is counted, never guessed.
 */
static __always_inline __u64 go_conn_socket(__u64 conn)
{
	struct task_struct *task = current_task();
	struct ft_go_executable_key key = {};
	struct ft_go_executable *exe;
	__u64 iface[2], fd_ptr, sysfd;

	key.ino = BPF_CORE_READ(task, mm, exe_file, f_inode, i_ino);
	key.dev = BPF_CORE_READ(task, mm, exe_file, f_inode, i_sb, s_dev);
	exe = bpf_map_lookup_elem(&go_executables, &key);
	if (!exe)
		return 0;
	if (bpf_probe_read_user(iface, sizeof(iface), (void *)(conn + exe->conn_offset)))
		return 0;
	if (iface[0] != exe->itab_tcpconn) {
		count(FT_CNT_GO_CONN_UNRESOLVED);
		return 0;
	}
	if (bpf_probe_read_user(&fd_ptr, sizeof(fd_ptr), (void *)(iface[1] + exe->fd_offset)) ||
	    bpf_probe_read_user(&sysfd, sizeof(sysfd), (void *)(fd_ptr + exe->sysfd_offset)))
		return 0;
	return socket_of_fd(task, sysfd);
}

static __always_inline void go_exit(struct pt_regs *ctx, const __u32 hook)
{
	struct go_call_key key = {
		.tgid = bpf_get_current_pid_tgid() >> 32,
		.g = ctx->r14,
	};
	struct ft_conn_state *state;
	struct go_call *found;
	struct go_call call;
	long n = ctx->ax;

	found = bpf_map_lookup_elem(&go_calls, &key);
	if (!found)
		return;
	call = *found;
	bpf_map_delete_elem(&go_calls, &key);
	if (tls_probes_stopped())
		return;
	/* n bytes moved, even when an error comes with them (io.Reader's contract). */
	if (n <= 0)
		return;
	if (!call.sk) {
		struct tls_object object = { .tgid = key.tgid, .address = call.conn };

		if (!bpf_map_lookup_elem(&tls_sockets, &object))
			call.sk = go_conn_socket(call.conn);
	}
	state = tls_connection(call.sk, call.conn); /* also remembers the tls.Conn's socket */
	/* A Write that reached the socket was sent whole already (see note_ssl_socket). */
	if (state && !call.sent)
		emit_plaintext(state, call.flow, (void *)call.buf, n, FT_SOURCE_GOTLS, hook);
}

SEC("uprobe")
int go_return(struct pt_regs *ctx)
{
	go_exit(ctx, FT_FULL);
	return 0;
}

SEC("uprobe")
int go_return_bounded(struct pt_regs *ctx)
{
	go_exit(ctx, 0);
	return 0;
}
