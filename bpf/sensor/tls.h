/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * TLS plaintext, whatever the library: the calls in progress per thread (OpenSSL) or
 * goroutine (Go), which socket a TLS object moves its bytes over, and the plaintext
 * events themselves. The probes are in openssl.bpf.c and gotls.bpf.c; the socket hooks
 * (socket_io.bpf.c) tell them which socket a call used.
 */
#ifndef FLOWTAP_SENSOR_TLS_H
#define FLOWTAP_SENSOR_TLS_H

#include "payload.h"

/* An SSL_read/SSL_write call in progress, from its entry probe to its return probe. */
struct ssl_call {
	__u64 ssl; /* SSL * */
	__u64 buf;
	__u64 out; /* size_t * of the _ex variants' length; 0: the return value is the length */
	__u64 sk; /* the socket the call read or wrote, seen by the socket hooks meanwhile */
	__u32 flow; /* enum ft_flow */
	__u32 active; /* between the entry and the return probe */
	/*
	 * Memory BIOs (node): the thread reads the socket, then, with no syscall inside,
	 * writes any pending plaintext (SSL_write) and decrypts what it read (SSL_read until
	 * that returns <= 0). So the socket it last received on, outside an SSL call, is the
	 * one its next SSL call works for: the first SSL * to call claims it, and its last
	 * read (<= 0) gives it up.
	 */
	__u64 recv_sk;
	__u64 recv_conn_id;
	__u64 recv_ssl; /* the SSL * that claimed the receive; 0: none yet */
};

/* Each thread's SSL call in progress: task storage costs a pointer lookup, where a hash
 * keyed by thread id costs an update and a delete per call (measured: ~2x the BPF time). */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ssl_call);
} ssl_calls SEC(".maps");

/* The same by thread id, where task storage is missing (before 5.11): LRU-bounded, and
 * a thread's entry goes when it exits. Only one of the two maps is created. */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct ssl_call);
} ssl_calls_by_thread SEC(".maps");

static __always_inline struct ssl_call *thread_ssl_call(void)
{
	__u32 tid;

	if (have(FT_FEATURE_TASK_STORAGE))
		return bpf_task_storage_get(&ssl_calls, bpf_get_current_task_btf(), 0, 0);
	tid = (__u32)bpf_get_current_pid_tgid();
	return bpf_map_lookup_elem(&ssl_calls_by_thread, &tid);
}

static __always_inline struct ssl_call *new_thread_ssl_call(void)
{
	struct ssl_call fresh = {};
	__u32 tid;

	if (have(FT_FEATURE_TASK_STORAGE))
		return bpf_task_storage_get(&ssl_calls, bpf_get_current_task_btf(), 0,
					    BPF_LOCAL_STORAGE_GET_F_CREATE);
	tid = (__u32)bpf_get_current_pid_tgid();
	bpf_map_update_elem(&ssl_calls_by_thread, &tid, &fresh, BPF_NOEXIST);
	return bpf_map_lookup_elem(&ssl_calls_by_thread, &tid);
}

/*
 * The connection a TLS object (an OpenSSL SSL *, a Go *tls.Conn) last moved bytes on, for
 * reads served from the library's own buffer with no syscall. The key has the process:
 * forked workers hold their objects at the same addresses. conn_id tells a reused
 * struct sock from the one seen.
 */
struct tls_object {
	__u32 tgid;
	__u32 pad;
	__u64 address;
};

struct tls_socket {
	__u64 sk;
	__u64 conn_id;
};

FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tls_object);
	__type(value, struct tls_socket);
} tls_sockets SEC(".maps");

/* A Go crypto/tls Read or Write in progress, keyed by goroutine: a goroutine may move to
 * another thread between the entry and the return, and a thread runs many goroutines. */
struct go_call_key {
	__u32 tgid;
	__u32 pad;
	__u64 g; /* the goroutine (runtime.g pointer, in R14 under Go's register ABI) */
};

struct go_call {
	__u64 conn; /* *tls.Conn */
	__u64 buf;
	__u64 len; /* len(b) at entry */
	__u64 sk; /* the socket the goroutine used meanwhile */
	__u32 flow;
	__u32 sent; /* a Write whose plaintext went out at its first send */
};

FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH); /* a goroutine that panics never returns */
	__uint(max_entries, 65536);
	__type(key, struct go_call_key);
	__type(value, struct go_call);
} go_calls SEC(".maps");

/* Set by userspace when it stops: the TLS probes do nothing from then on, all at once,
 * while their links (~100 ms each to destroy) go away one by one. */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} tls_stopped SEC(".maps");

static __always_inline bool tls_probes_stopped(void)
{
	__u32 zero = 0;
	__u32 *stopped = bpf_map_lookup_elem(&tls_stopped, &zero);

	return stopped && *stopped;
}

/* Set by userspace once a Go executable is probed: until then the socket hooks of every
 * process skip the go_processes lookup (an array lookup is inlined, a hash one is not). */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} go_probed SEC(".maps");

/* Go executables whose tls.Conn can be walked to its socket (non-PIE, with symbols). */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ft_go_executable_key);
	__type(value, struct ft_go_executable);
} go_executables SEC(".maps");

/* Go handshakes in progress (tls.Conn.handshakeContext), by goroutine. */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct go_call_key);
	__type(value, struct go_call);
} go_handshakes SEC(".maps");

/* Processes with Go TLS probes: only their socket calls look for a goroutine's call. */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u8);
} go_processes SEC(".maps");

#define FT_S_IFMT 0170000 /* the file type bits of i_mode (not in vmlinux.h) */
#define FT_S_IFSOCK 0140000

/* The struct sock behind a descriptor of task's, 0 when fd is not an open socket. */
static __always_inline __u64 socket_of_fd(struct task_struct *task, __u64 fd)
{
	struct file **fds;
	struct file *file;
	struct socket *sock;
	unsigned int max_fds;
	umode_t mode;

	max_fds = BPF_CORE_READ(task, files, fdt, max_fds);
	if (fd >= max_fds)
		return 0;
	fds = BPF_CORE_READ(task, files, fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return 0;
	/* Only a socket's private_data is a struct socket. */
	mode = BPF_CORE_READ(file, f_inode, i_mode);
	if ((mode & FT_S_IFMT) != FT_S_IFSOCK)
		return 0;
	sock = BPF_CORE_READ(file, private_data);
	return (__u64)BPF_CORE_READ(sock, sk);
}

/* length bytes of plaintext at buf, moved by a TLS call on that connection. */
static __always_inline void emit_plaintext(struct ft_conn_state *state, __u32 flow, void *buf,
					   __u64 length, __u32 source, const __u32 hook)
{
	__u64 position;

	if (!state->tls) {
		state->tls = 1;
		state->capture = 0;
	}
	if (flow == FT_FLOW_TX)
		position = add_bytes(&state->tls_sent, length, hook);
	else
		position = add_bytes(&state->tls_received, length, hook);
	if (cfg.capture_payload) {
		struct payload_walk walk = {
			.io = { .buf = buf, .len = length },
			.seg = buf,
			.seg_len = length,
			.left = length,
			.position = position,
			.conn_id = state->conn.conn_id,
			.timestamp_ns = bpf_ktime_get_ns(),
			.flow = flow,
			.source = source,
		};

		/* Most calls fit one piece: no loop to set up for them. */
		if (length <= FT_DATA_LEN)
			payload_step(0, &walk);
		else
			walk_payload(&walk, FT_TLS_PAYLOAD_STEPS, FT_BOUNDED_TLS_PAYLOAD_STEPS,
				     hook);
	}
}

/* The connection of a socket, if it is a traced TCP one. */
static __always_inline struct ft_conn_state *tcp_state(__u64 sk)
{
	struct ft_conn_state *state = bpf_map_lookup_elem(&conns, &sk);

	return state && state->conn.protocol == IPPROTO_TCP ? state : NULL;
}

/* Its first bytes were a TLS handshake record (or plaintext went through it already). */
static __always_inline bool carries_tls(const struct ft_conn_state *state)
{
	if (state->tls)
		return true;
	if (state->sniff.flow != FT_FLOW_TX && state->sniff.flow != FT_FLOW_RX)
		return false;
	return state->sniff.length >= 3 && state->sniff.data[0] == 0x16 &&
	       state->sniff.data[1] == 0x03;
}

/* The TLS object (SSL *, *tls.Conn) of this process moves its bytes over sk's connection. */
static __always_inline void remember_tls_socket(__u64 object, __u64 sk, __u64 conn_id)
{
	struct tls_object key = { .tgid = bpf_get_current_pid_tgid() >> 32, .address = object };
	struct tls_socket seen = { .sk = sk, .conn_id = conn_id };
	struct tls_socket *cached = bpf_map_lookup_elem(&tls_sockets, &key);

	if (cached && cached->sk == sk && cached->conn_id == conn_id)
		return;
	bpf_map_update_elem(&tls_sockets, &key, &seen, BPF_ANY);
}

/*
 * A socket moved bytes: inside an SSL call of this thread, that is the call's connection,
 * traced or not (an untraced one is not counted as unattributed). Returns the thread's
 * SSL call state (NULL for threads that never made an SSL call).
 */
static __always_inline struct ssl_call *note_ssl_socket(const struct sock *sk, const __u32 hook)
{
	struct ssl_call *call = thread_ssl_call();
	struct syscall_regs regs;
	struct go_call_key key;
	struct go_call *go;
	__u32 zero = 0;
	__u32 *any_go;

	if (call && call->active)
		call->sk = (__u64)sk;
	any_go = bpf_map_lookup_elem(&go_probed, &zero);
	if (!any_go || !*any_go)
		return call;
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	if (!bpf_map_lookup_elem(&go_processes, &key.tgid))
		return call;
	/* The goroutine making this syscall: Go's syscall path keeps g in R14. */
	read_syscall_regs(&regs);
	key.pad = 0;
	key.g = regs.r14;
	go = bpf_map_lookup_elem(&go_handshakes, &key);
	if (go)
		go->sk = (__u64)sk;
	go = bpf_map_lookup_elem(&go_calls, &key);
	if (!go)
		return call;
	go->sk = (__u64)sk;
	/* A Write's plaintext goes out here, at its first send, not at its return: goroutines
	 * write a connection in turns (tls.Conn's lock) but may reach their return probes in
	 * another order, and the peer's answer may be read before the writer returns. */
	if (go->flow == FT_FLOW_TX && !go->sent && !tls_probes_stopped()) {
		struct ft_conn_state *state = tcp_state(go->sk);

		go->sent = 1;
		if (state && go->len)
			emit_plaintext(state, FT_FLOW_TX, (void *)go->buf, go->len, FT_SOURCE_GOTLS,
				       hook);
	}
	return call;
}

/* A receive outside an SSL call (memory BIOs): the next SSL_read's socket, unclaimed. */
static __always_inline void note_received(struct ssl_call *call, const struct sock *sk,
					  const struct ft_conn_state *state)
{
	call->recv_sk = (__u64)sk;
	call->recv_conn_id = state ? state->conn.conn_id : 0;
	call->recv_ssl = 0;
}

/*
 * What tls_sockets says about this TLS object: its connection (and socket, in *sk) while
 * that lasts. A stale entry is dropped, never followed: its connection is over, or the
 * program closed that socket (orphaned, it may linger in FIN_WAIT meanwhile), and the
 * address may now hold a new object for another connection.
 */
static __always_inline struct ft_conn_state *cached_connection(__u64 object, __u64 *sk)
{
	struct tls_object key = { .tgid = bpf_get_current_pid_tgid() >> 32, .address = object };
	struct tls_socket *cached = bpf_map_lookup_elem(&tls_sockets, &key);
	struct ft_conn_state *state;
	const struct sock *sock;

	if (!cached)
		return NULL;
	state = bpf_map_lookup_elem(&conns, &cached->sk);
	sock = (const struct sock *)cached->sk;
	if (state && state->conn.conn_id == cached->conn_id && BPF_CORE_READ(sock, sk_socket)) {
		*sk = cached->sk;
		return state;
	}
	bpf_map_delete_elem(&tls_sockets, &key);
	return NULL;
}

/*
 * The connection of a finished TLS call: the socket it used, else the one its TLS object
 * used last; NULL when not traced, over, or unknown (counted).
 */
static __always_inline struct ft_conn_state *tls_connection(__u64 sk, __u64 object)
{
	struct ft_conn_state *state;
	__u64 cached_sk = 0;

	if (sk) {
		state = tcp_state(sk);
		if (!state)
			return NULL; /* not traced (filters, loopback) */
		remember_tls_socket(object, sk, state->conn.conn_id);
		return state;
	}
	state = cached_connection(object, &cached_sk);
	if (!state)
		count(FT_CNT_TLS_UNATTRIBUTED);
	return state;
}

#endif /* FLOWTAP_SENSOR_TLS_H */
