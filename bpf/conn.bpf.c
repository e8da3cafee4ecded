// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Socket layer: TCP connections (and UDP DNS flows), their process and their bytes.
 *
 * No syscall tracepoints: attaching any of them puts every task on the host on the slow
 * syscall path (measured here: +65 ns on every syscall of every process). Every hook is
 * a BTF tracepoint that fires only for socket work (none are kprobes or fentry, which
 * these kernels refuse):
 *   tp_btf/inet_sock_set_state   CLOSE->SYN_SENT registers an outgoing connection in the
 *                                connecting thread; ESTABLISHED opens it (egress) or
 *                                registers an accepted one (ingress, softirq: owner from
 *                                the listeners map until the acceptor touches it);
 *                                CLOSE->LISTEN records a listener's owner; CLOSE ends a
 *                                connection, or marks it when received data is still
 *                                queued, then it ends once the program has read it.
 *   tp_btf/tcp_destroy_sock      ends a closed connection whose data was never read.
 *   tp_btf/sock_send_length      bytes of every send and receive on a socket (write,
 *   tp_btf/sock_recv_length      writev, sendto, sendmsg, sendfile, splice, io_uring...),
 *                                keyed by struct sock so non-socket I/O never gets here;
 *                                the first bytes; HTTP payload; the acceptor of an
 *                                incoming connection; UDP sockets that query port 53;
 *                                the socket of an SSL call in progress.
 *   tp_btf/sched_process_*       exec (exe and argv for short-lived programs), fork
 *                                (--pid follows children), exit.
 * And uprobes, attached by userspace per OpenSSL file (end of this file, docs/tls.md):
 *   ssl_*_enter, ssl_return      TLS plaintext of SSL_read/SSL_write and their _ex
 *                                variants, on the connection of the socket they used.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "flowtap.h"
#include "environment.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define DNS_PORT 53
#define EAGAIN 11
#define EINTR 4
#define MSG_PEEK 2
#define FT_SNIFF_CLAIMED 0xff /* sniff.flow while a capture is in progress */
#define BPF_F_NO_PREALLOC (1U << 0)

/* x86_64 syscall numbers whose second argument points at the data. */
#define NR_READ 0
#define NR_WRITE 1
#define NR_READV 19
#define NR_WRITEV 20
#define NR_SENDTO 44
#define NR_RECVFROM 45
#define NR_SENDMSG 46
#define NR_RECVMSG 47

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile struct ft_config cfg = {};

/* Connection ids are unique for the life of the loaded object. */
__u64 next_conn_id = 0;

/* BTF anchors: make clang emit every shared layout so Python can read it. */
const struct ft_conn_open_event *anchor_open __attribute__((unused));
const struct ft_conn_close_event *anchor_close __attribute__((unused));
const struct ft_exec_event *anchor_exec __attribute__((unused));
const struct ft_exit_event *anchor_exit __attribute__((unused));
const struct ft_fork_event *anchor_fork __attribute__((unused));
const struct ft_go_executable *anchor_go_executable __attribute__((unused));
const struct ft_go_executable_key *anchor_go_executable_key __attribute__((unused));
const struct ft_data_event *anchor_data __attribute__((unused));
const struct ft_conn_state *anchor_state __attribute__((unused));
const struct ft_listener *anchor_listener __attribute__((unused));
const struct ft_listener_key *anchor_listener_key __attribute__((unused));
const enum ft_event_kind *anchor_kind __attribute__((unused));
const enum ft_counter *anchor_counter __attribute__((unused));
const enum ft_direction *anchor_direction __attribute__((unused));
const enum ft_flow *anchor_flow __attribute__((unused));
const enum ft_source *anchor_source __attribute__((unused));
const enum ft_strategy *anchor_strategy __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);
} events SEC(".maps");

/* Allocated as connections come (no prealloc): a state holds 512 bytes of sniff. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64); /* struct sock * */
	__type(value, struct ft_conn_state);
} conns SEC(".maps");

/* Where a new connection's state is built: too big for the BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ft_conn_state);
} scratch SEC(".maps");

/* (netns, local port) -> the process listening there (and whether it passes the filters). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ft_listener_key);
	__type(value, struct ft_listener);
} listeners SEC(".maps");

/* Processes owning UDP (DNS) flows -> how many, so only their exit walks the table. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u32);
} udp_owners SEC(".maps");

/* Processes traced under --pid (with their descendants). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} traced_pids SEC(".maps");

/* The --cgroup directory; a task matches when it is in it or below it. */
struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} filter_cgroup SEC(".maps");

/* An SSL_read/SSL_write call in progress, from its entry probe to its return probe. */
struct ssl_call {
	__u64 ssl; /* SSL * */
	__u64 buf;
	__u64 out; /* size_t * of the _ex variants' length; 0: the return value is the length */
	__u64 sk; /* the socket the call read or wrote, seen by sock_*_length meanwhile */
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
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ssl_call);
} ssl_calls SEC(".maps");

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

struct {
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

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH); /* a goroutine that panics never returns */
	__uint(max_entries, 65536);
	__type(key, struct go_call_key);
	__type(value, struct go_call);
} go_calls SEC(".maps");

/* Set by userspace when it stops: the TLS probes do nothing from then on, all at once,
 * while their links (~100 ms each to destroy) go away one by one. */
struct {
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
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} go_probed SEC(".maps");

/* Go executables whose tls.Conn can be walked to its socket (non-PIE, with symbols). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ft_go_executable_key);
	__type(value, struct ft_go_executable);
} go_executables SEC(".maps");

/* Go handshakes in progress (tls.Conn.handshakeContext), by goroutine. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct go_call_key);
	__type(value, struct go_call);
} go_handshakes SEC(".maps");

/* Processes with Go TLS probes: only their socket calls look for a goroutine's call. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u8);
} go_processes SEC(".maps");

struct {
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

/* Index 0: set once any process has QPOINT_STRATEGY=ignore, so until then nobody pays
 * the strategies lookup. Written by the exec hook and by userspace's /proc scan. */
struct {
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

/* Fills family, ports and addresses from the socket as it is now. */
static __always_inline void read_addresses(const struct sock *sk, struct ft_conn *conn)
{
	const struct inet_sock *inet = (const struct inet_sock *)sk;
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	__u16 local_port = BPF_CORE_READ(sk, __sk_common.skc_num);

	conn->family = family;
	/* skc_num is cleared when the port is released at CLOSE; inet_sport is not. */
	if (!local_port)
		local_port = bpf_ntohs(BPF_CORE_READ(inet, inet_sport));
	conn->local_port = local_port;
	conn->remote_port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (family == AF_INET) {
		__u32 local = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__u32 remote = BPF_CORE_READ(sk, __sk_common.skc_daddr);

		__builtin_memset(conn->local_addr, 0, sizeof(conn->local_addr));
		__builtin_memset(conn->remote_addr, 0, sizeof(conn->remote_addr));
		__builtin_memcpy(conn->local_addr, &local, sizeof(local));
		__builtin_memcpy(conn->remote_addr, &remote, sizeof(remote));
	} else {
		BPF_CORE_READ_INTO(&conn->local_addr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&conn->remote_addr, sk, __sk_common.skc_v6_daddr);
	}
}

static __always_inline bool is_loopback(const struct ft_conn *conn)
{
	const __u8 *a = conn->remote_addr;

	if (conn->family == AF_INET)
		return a[0] == 127;
	/* ::1 */
	if (a[15] == 1) {
		bool zero = true;
#pragma unroll
		for (int i = 0; i < 15; i++)
			zero = zero && a[i] == 0;
		if (zero)
			return true;
	}
	/* ::ffff:127.0.0.0/104 */
	if (a[10] == 0xff && a[11] == 0xff && a[12] == 127) {
		bool zero = true;
#pragma unroll
		for (int i = 0; i < 10; i++)
			zero = zero && a[i] == 0;
		return zero;
	}
	return false;
}

/* This CPU's scratch state, zeroed but for the sniff bytes. */
static __always_inline struct ft_conn_state *new_state(void)
{
	__u32 zero = 0;
	struct ft_conn_state *state = bpf_map_lookup_elem(&scratch, &zero);

	/* The sniff bytes need no zeroing: sniff.length says how many are valid. */
	if (state)
		__builtin_memset(state, 0, __builtin_offsetof(struct ft_conn_state, sniff.data));
	return state;
}

/* Starts tracking sk with state (task filled in by the caller); NULL when filtered out. */
static __always_inline struct ft_conn_state *track(const struct sock *sk, struct ft_conn_state *state,
						   __u8 protocol, __u8 direction)
{
	__u64 key = (__u64)sk;

	if (!cfg.include_loopback && is_loopback(&state->conn))
		return NULL;
	state->conn.conn_id = __sync_fetch_and_add(&next_conn_id, 1) + 1;
	state->conn.start_ns = bpf_ktime_get_ns();
	state->conn.protocol = protocol;
	state->conn.direction = direction;
	state->cookie = bpf_get_socket_cookie((void *)sk);
	if (bpf_map_update_elem(&conns, &key, state, BPF_ANY)) {
		count(FT_CNT_CONN_TABLE_FULL);
		return NULL;
	}
	return bpf_map_lookup_elem(&conns, &key);
}

static __always_inline void emit_open(struct ft_conn_state *state)
{
	struct ft_conn_open_event *e;

	state->open_emitted = 1;
	e = reserve(sizeof(*e), FT_EVENT_CONN_OPEN);
	if (!e)
		return;
	e->task = state->task;
	e->conn = state->conn;
	submit(e, sizeof(*e));
}

/* The close event, with what CLOSE recorded (TCP) or the socket's state now (UDP). */
static __always_inline void emit_close(const struct sock *sk, struct ft_conn_state *state)
{
	struct ft_conn_close_event *e;

	e = reserve(sizeof(*e), FT_EVENT_CONN_CLOSE);
	if (!e)
		return;
	if (state->closed) {
		e->hdr.timestamp_ns = state->close_ns;
		e->sock_error = state->sock_error;
		e->old_state = state->close_old_state;
	} else {
		e->sock_error = state->sock_error ?: BPF_CORE_READ(sk, sk_err);
		e->old_state = 0;
	}
	e->task = state->task;
	e->conn = state->conn;
	e->bytes_sent = state->bytes_sent;
	e->bytes_received = state->bytes_received;
	e->established = state->established;
	e->open_emitted = state->open_emitted;
	e->pad = 0;
	/* A capture another CPU has claimed but not finished counts as none. */
	e->sniff.flow = state->sniff.flow == FT_SNIFF_CLAIMED ? 0 : state->sniff.flow;
	e->sniff.length = e->sniff.flow ? state->sniff.length : 0;
	bpf_probe_read_kernel(e->sniff.data, sizeof(e->sniff.data), state->sniff.data);
	submit(e, sizeof(*e));
}

/*
 * A UDP socket reports an ICMP error (port unreachable: ECONNREFUSED) once, to the next
 * send or recv, which clears it: keep it for the close event.
 */
static __always_inline void note_udp_error(struct ft_conn_state *state, int ret)
{
	if (ret < 0 && state->conn.protocol == IPPROTO_UDP && !state->sock_error &&
	    ret != -EAGAIN && ret != -EINTR)
		state->sock_error = -ret;
}

/* Ends a connection once, whichever CPUs race to: close event out, entry gone. */
static __always_inline void untrack(const struct sock *sk, struct ft_conn_state *state)
{
	__u64 key = (__u64)sk;

	if (__sync_val_compare_and_swap(&state->finished, 0, 1) != 0)
		return;
	emit_close(sk, state);
	bpf_map_delete_elem(&conns, &key);
}

static __always_inline void untrack_udp(const struct sock *sk, struct ft_conn_state *state)
{
	__u32 tgid = state->task.pid;
	__u32 *owned = bpf_map_lookup_elem(&udp_owners, &tgid);

	untrack(sk, state);
	if (owned && __sync_fetch_and_add(owned, -1) == 1)
		bpf_map_delete_elem(&udp_owners, &tgid);
}

/*
 * The tracked state of sk. A UDP flow whose socket was closed with a query unanswered
 * stays in conns (UDP has no close hook); when its struct sock is reused, the cookie
 * tells the new socket apart, and the old flow ends here.
 */
static __always_inline struct ft_conn_state *lookup_conn(const struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct ft_conn_state *state = bpf_map_lookup_elem(&conns, &key);

	if (state && state->conn.protocol == IPPROTO_UDP &&
	    state->cookie != bpf_get_socket_cookie((void *)sk)) {
		untrack_udp(sk, state);
		return NULL;
	}
	return state;
}

/* Bytes the peer sent that the program has not read yet. */
static __always_inline __u32 unread_bytes(const struct sock *sk)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;

	return BPF_CORE_READ(tp, rcv_nxt) - BPF_CORE_READ(tp, copied_seq);
}

static __always_inline struct ft_listener_key listener_key(const struct sock *sk, __u32 port)
{
	struct ft_listener_key key = {
		.netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum),
		.port = port,
	};

	return key;
}

/* An outgoing connection starts: we are in connect() (or a fast-open send), in its thread. */
static __always_inline void on_syn_sent(const struct sock *sk)
{
	struct ft_conn_state *state;

	/* connect() again on a socket whose last connection ended: that one is over. */
	state = lookup_conn(sk);
	if (state)
		untrack(sk, state);
	if (!cfg.trace_egress || !current_is_traced())
		return;
	state = new_state();
	if (!state)
		return;
	fill_current_task(&state->task);
	read_addresses(sk, &state->conn);
	track(sk, state, IPPROTO_TCP, FT_DIR_EGRESS);
}

/*
 * An incoming connection completed its handshake. This runs in softirq (or in the
 * connecting process, over loopback): the process that will accept it is not known yet.
 * It is attributed to the listening port's owner for now, and to the thread that first
 * reads or writes it when that happens (see claim_ingress).
 */
static __always_inline void on_passive_established(const struct sock *sk)
{
	struct ft_listener_key key;
	struct ft_conn_state *state;
	struct ft_listener *listener;

	if (!cfg.trace_ingress)
		return;
	state = new_state();
	if (!state)
		return;
	read_addresses(sk, &state->conn);
	key = listener_key(sk, state->conn.local_port);
	listener = bpf_map_lookup_elem(&listeners, &key);
	/* A filtered-out listener's connections are kept too: with pre-forked servers the
	 * process that listens is not the one that serves (--pid on a worker). */
	if (listener) {
		state->task = listener->task;
		state->listener_traced = listener->traced;
	}
	state->established = 1;
	state->owner_pending = 1;
	track(sk, state, IPPROTO_TCP, FT_DIR_INGRESS);
}

/* The first thread to read or write an accepted connection owns it: check it, open it. */
static __always_inline bool claim_ingress(const struct sock *sk, struct ft_conn_state *state)
{
	__u64 key = (__u64)sk;

	/* Two threads, or a send and a receive, may race here: one claims it. */
	if (__sync_val_compare_and_swap(&state->owner_pending, 1, 0) != 1)
		return true;
	if (!current_is_traced()) {
		bpf_map_delete_elem(&conns, &key);
		return false;
	}
	fill_current_task(&state->task);
	emit_open(state);
	return true;
}

/* The connection is over: its open (if not out yet) and close events go out. */
static __always_inline void finish(const struct sock *sk, struct ft_conn_state *state)
{
	__u64 key = (__u64)sk;

	if (state->owner_pending && !state->listener_traced) {
		/* Accepted and closed unused: the listener's owner is filtered out, or unknown
		 * and then there is nobody to attribute it to. */
		if (!state->task.pid)
			count(FT_CNT_INGRESS_UNATTRIBUTED);
		bpf_map_delete_elem(&conns, &key);
		return;
	}
	if (state->owner_pending && !state->open_emitted)
		emit_open(state);
	untrack(sk, state);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(on_tcp_state, const struct sock *sk, const int old_state, const int new_state)
{
	struct ft_conn_state *state;

	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;

	if (new_state == TCP_SYN_SENT && old_state == TCP_CLOSE) {
		on_syn_sent(sk);
		return 0;
	}
	if (new_state == TCP_LISTEN) {
		struct ft_listener_key lkey = listener_key(sk, BPF_CORE_READ(sk, __sk_common.skc_num));
		struct ft_listener listener = {};

		fill_current_task(&listener.task);
		listener.sk = (__u64)sk;
		listener.traced = current_is_traced();
		if (bpf_map_update_elem(&listeners, &lkey, &listener, BPF_ANY))
			count(FT_CNT_LISTENER_TABLE_FULL);
		return 0;
	}
	if (old_state == TCP_LISTEN) {
		struct ft_listener_key lkey = listener_key(sk, BPF_CORE_READ(sk, __sk_common.skc_num));
		struct ft_listener *listener_entry;

		/* A new connection's socket is cloned from its listener: LISTEN -> SYN_RECV. */
		if (new_state != TCP_CLOSE)
			return 0;

		/* Only its own listener's close: SO_REUSEPORT siblings, a failed listen(). */
		listener_entry = bpf_map_lookup_elem(&listeners, &lkey);
		if (listener_entry && listener_entry->sk == (__u64)sk)
			bpf_map_delete_elem(&listeners, &lkey);
		return 0;
	}

	state = lookup_conn(sk);
	if (!state) {
		if (new_state == TCP_ESTABLISHED && old_state == TCP_SYN_RECV)
			on_passive_established(sk);
		return 0;
	}
	if (new_state == TCP_ESTABLISHED) {
		state->established = 1;
		/* The local port is bound by now; refresh what SYN_SENT saw. */
		read_addresses(sk, &state->conn);
		if (!state->open_emitted && state->conn.direction == FT_DIR_EGRESS)
			emit_open(state);
		return 0;
	}
	if (new_state == TCP_CLOSE) {
		if (!state->conn.local_port) {
			/* Never established: take the local end only, the peer's may be reset. */
			struct ft_conn now = {};

			read_addresses(sk, &now);
			state->conn.local_port = now.local_port;
			__builtin_memcpy(state->conn.local_addr, now.local_addr, sizeof(now.local_addr));
		}
		/* Reading sk_err later is too late: the program's recv() clears it. */
		state->sock_error = BPF_CORE_READ(sk, sk_err);
		state->close_old_state = old_state;
		state->close_ns = bpf_ktime_get_ns();
		state->closed = 1;
		/* Data still queued will be read (and counted) later: close after that. */
		if (!unread_bytes(sk))
			finish(sk, state);
	}
	return 0;
}

/* Released with data never read: the close event goes out now. */
SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(on_tcp_destroy, struct sock *sk)
{
	struct ft_conn_state *state = lookup_conn(sk);

	if (state)
		finish(sk, state);
	return 0;
}

/* The user memory of the socket syscall in progress: one buffer, or an iovec array. */
struct user_io {
	void *buf;
	__u64 len;
	struct iovec *iov;
	__u64 iovcnt;
};

/*
 * Finds it from the syscall's saved registers; false for paths without user memory
 * (sendfile, splice, io_uring) and syscalls we do not know.
 */
static __always_inline bool syscall_io(struct user_io *io)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	long nr = regs->orig_ax;
	void *arg = (void *)regs->si;
	__u64 count = regs->dx;

	/* Keep the register loads apart from the user-memory loads below (verifier). */
	barrier_var(count);
	switch (nr) {
	case NR_READ:
	case NR_WRITE:
	case NR_SENDTO:
	case NR_RECVFROM:
		io->buf = arg;
		io->len = count;
		return true;
	case NR_READV:
	case NR_WRITEV:
		io->iov = arg;
		io->iovcnt = count;
		return true;
	case NR_SENDMSG:
	case NR_RECVMSG: {
		struct user_msghdr msg;

		if (bpf_probe_read_user(&msg, sizeof(msg), arg))
			return false;
		io->iov = msg.msg_iov;
		io->iovcnt = msg.msg_iovlen;
		return true;
	}
	default:
		return false;
	}
}

/* The first user buffer of the syscall in progress; its length, 0 when there is none. */
static __always_inline __u64 syscall_user_buffer(void **buf)
{
	struct user_io io = {};
	struct iovec iov;

	if (!syscall_io(&io))
		return 0;
	if (io.buf) {
		*buf = io.buf;
		return io.len;
	}
	if (!io.iov || !io.iovcnt || bpf_probe_read_user(&iov, sizeof(iov), io.iov))
		return 0;
	*buf = iov.iov_base;
	return iov.iov_len;
}

/* Request and status lines (and the HTTP/2 preface) start with one of these. */
static __always_inline bool looks_like_http(const __u8 *data, __u32 len)
{
	__u32 head;

	if (len < 4)
		return false;
	head = data[0] | data[1] << 8 | data[2] << 16 | (__u32)data[3] << 24;
	switch (head) {
	case 0x20544547: /* "GET " */
	case 0x54534f50: /* "POST" */
	case 0x20545550: /* "PUT " */
	case 0x44414548: /* "HEAD" */
	case 0x454c4544: /* "DELE" */
	case 0x4954504f: /* "OPTI" */
	case 0x43544150: /* "PATC" */
	case 0x4e4e4f43: /* "CONN" */
	case 0x50545448: /* "HTTP" */
	case 0x20495250: /* "PRI " */
		return true;
	}
	return false;
}

#define FT_PAYLOAD_STEPS 40 /* chunks and iovecs per syscall: up to ~128 KiB copied */
#define FT_TLS_PAYLOAD_STEPS 512 /* chunks per SSL call: up to 2 MiB copied */
#define FT_DATA_HEAD __builtin_offsetof(struct ft_data_event, data)
#define FT_DATA_SMALL 256 /* data event sizes reserved in the ring, besides FT_DATA_LEN */
#define FT_DATA_MEDIUM 1024

struct payload_walk {
	struct user_io io;
	void *seg; /* the part of the current buffer not copied yet */
	__u64 seg_len;
	__u64 iov_index;
	__u64 left; /* bytes of the call not copied yet */
	__u64 position;
	__u64 conn_id;
	__u64 timestamp_ns; /* the call's, for each of its pieces */
	__u32 flow;
	__u32 source;
};

/* One step of emit_payload (a bpf_loop callback: verified once, not per iteration). */
static long payload_step(__u64 index, struct payload_walk *walk)
{
	struct ft_data_event *e;
	__u64 n;

	if (!walk->left)
		return 1;
	if (!walk->seg_len) {
		struct iovec iov;

		if (!walk->io.iov || walk->iov_index >= walk->io.iovcnt)
			return 1;
		if (bpf_probe_read_user(&iov, sizeof(iov), &walk->io.iov[walk->iov_index & 1023]))
			return 1;
		walk->iov_index++;
		walk->seg = iov.iov_base;
		walk->seg_len = iov.iov_len;
		return 0;
	}
	/* A consumer that falls behind loses payload first: connection events keep room. */
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= cfg.payload_limit_bytes) {
		count(FT_CNT_PAYLOAD_SHED);
		return 1;
	}
	n = walk->seg_len < walk->left ? walk->seg_len : walk->left;
	/* Reserved in place at one of three sizes (a reservation's size must be a constant):
	 * no copy through a scratch buffer, and small pieces take little of the ring. */
	if (n <= FT_DATA_SMALL)
		e = bpf_ringbuf_reserve(&events, FT_DATA_HEAD + FT_DATA_SMALL, 0);
	else if (n <= FT_DATA_MEDIUM)
		e = bpf_ringbuf_reserve(&events, FT_DATA_HEAD + FT_DATA_MEDIUM, 0);
	else
		e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(FT_CNT_RINGBUF_FULL);
		return 1;
	}
	if (n > FT_DATA_LEN)
		n = FT_DATA_LEN;
	if (bpf_probe_read_user(e->data, n, walk->seg)) {
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
		count(FT_CNT_PAYLOAD_READ_FAILED);
		return 1;
	}
	e->hdr.kind = FT_EVENT_DATA;
	e->hdr.pad = 0;
	e->hdr.timestamp_ns = walk->timestamp_ns;
	e->conn_id = walk->conn_id;
	e->position = walk->position;
	e->flow = walk->flow;
	e->length = n;
	e->source = walk->source;
	e->pad = 0;
	bpf_ringbuf_submit(e, wakeup_flags(sizeof(*e)));
	walk->position += n;
	walk->left -= n;
	walk->seg += n;
	walk->seg_len -= n;
	return 0;
}

/*
 * Copies what this call moved (ret bytes from position on) into data events, across the
 * call's buffers. What does not fit, or cannot be read, is left out: the next event's
 * position shows the gap.
 */
static __always_inline void emit_payload(struct ft_conn_state *state, __u32 flow,
					 __u64 position, int ret)
{
	struct payload_walk walk = {
		.left = ret,
		.position = position,
		.conn_id = state->conn.conn_id,
		.timestamp_ns = bpf_ktime_get_ns(),
		.flow = flow,
		.source = FT_SOURCE_SOCKET,
	};

	if (!syscall_io(&walk.io))
		return; /* sendfile, io_uring: userspace sees a gap by position */
	walk.seg = walk.io.buf;
	walk.seg_len = walk.io.buf ? walk.io.len : 0;
	bpf_loop(FT_PAYLOAD_STEPS, payload_step, &walk, 0);
}

/*
 * Keeps the first bytes the connection moves through a user buffer, either way (the
 * client's request on both ends, normally), read from the syscall's user buffer.
 */
static __always_inline void capture_sniff(struct ft_conn_state *state, __u32 flow, int ret)
{
	void *buf = NULL;
	__u64 len;

	/* One capture per connection, even with a send and a receive racing. */
	if (__sync_val_compare_and_swap(&state->sniff.flow, 0, FT_SNIFF_CLAIMED) != 0)
		return;
	len = syscall_user_buffer(&buf);
	if (!len || !buf) {
		state->sniff.flow = 0; /* sendfile, io_uring: try again on the next call */
		return;
	}
	if (len > (__u64)ret)
		len = ret;
	if (len > FT_SNIFF_LEN)
		len = FT_SNIFF_LEN;
	if (bpf_probe_read_user(state->sniff.data, len, buf)) {
		count(FT_CNT_SNIFF_READ_FAILED);
		state->sniff.flow = 0;
		return;
	}
	state->sniff.length = len;
	state->sniff.flow = flow;
	state->capture = cfg.capture_payload && looks_like_http(state->sniff.data, len);
}

/*
 * Where an unconnected UDP send goes: the sockaddr argument of sendto(), or msg_name of
 * sendmsg(), read from the syscall's saved registers. False when there is none.
 */
static __always_inline bool syscall_destination(struct ft_conn *conn)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	long nr = regs->orig_ax;
	void *addr = (void *)regs->r8;
	struct sockaddr_in6 sa = {};

	barrier_var(addr);
	if (nr == NR_SENDMSG) {
		struct user_msghdr msg;

		if (bpf_probe_read_user(&msg, sizeof(msg), (void *)regs->si))
			return false;
		addr = msg.msg_name;
	} else if (nr != NR_SENDTO) {
		return false;
	}
	if (!addr || bpf_probe_read_user(&sa, sizeof(sa), addr))
		return false;
	conn->remote_port = bpf_ntohs(sa.sin6_port);
	if (sa.sin6_family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)&sa;

		__builtin_memset(conn->remote_addr, 0, sizeof(conn->remote_addr));
		__builtin_memcpy(conn->remote_addr, &sin->sin_addr, 4);
		/* An IPv6 socket sending to an IPv4 sockaddr is not possible; keep families aligned. */
		return conn->family == AF_INET;
	}
	if (sa.sin6_family == AF_INET6) {
		__builtin_memcpy(conn->remote_addr, &sa.sin6_addr, 16);
		return conn->family == AF_INET6;
	}
	return false;
}

/*
 * A UDP socket that sends to port 53 starts a DNS flow: one exchange of queries and
 * answers (a resolver often sends A and AAAA together). It ends when every query has an
 * answer, on an ICMP error, or when the process exits; a later query starts a new flow.
 */
static __always_inline struct ft_conn_state *track_dns(const struct sock *sk)
{
	struct ft_conn_state *state, *tracked;
	__u32 tgid, one = 1, *owned;

	if (!cfg.trace_egress || !current_is_traced())
		return NULL;
	state = new_state();
	if (!state)
		return NULL;
	read_addresses(sk, &state->conn);
	if (state->conn.family != AF_INET && state->conn.family != AF_INET6)
		return NULL;
	if (!state->conn.remote_port && !syscall_destination(&state->conn))
		return NULL;
	if (state->conn.remote_port != DNS_PORT)
		return NULL;
	fill_current_task(&state->task);
	state->established = 1;
	tracked = track(sk, state, IPPROTO_UDP, FT_DIR_EGRESS);
	if (!tracked)
		return NULL;
	tgid = tracked->task.pid;
	owned = bpf_map_lookup_elem(&udp_owners, &tgid);
	if (!owned && bpf_map_update_elem(&udp_owners, &tgid, &one, BPF_NOEXIST)) {
		/* Not inserted: another thread of the process did meanwhile, or it is full. */
		owned = bpf_map_lookup_elem(&udp_owners, &tgid);
		if (!owned)
			count(FT_CNT_PID_TABLE_FULL);
	}
	if (owned)
		__sync_fetch_and_add(owned, 1);
	emit_open(tracked);
	return tracked;
}

/* length bytes of plaintext at buf, moved by a TLS call on that connection. */
static __always_inline void emit_plaintext(struct ft_conn_state *state, __u32 flow, void *buf,
					   __u64 length, __u32 source)
{
	__u64 position;

	if (!state->tls) {
		state->tls = 1;
		state->capture = 0;
	}
	if (flow == FT_FLOW_TX)
		position = __sync_fetch_and_add(&state->tls_sent, length);
	else
		position = __sync_fetch_and_add(&state->tls_received, length);
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
			bpf_loop(FT_TLS_PAYLOAD_STEPS, payload_step, &walk, 0);
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
static __always_inline struct ssl_call *note_ssl_socket(const struct sock *sk)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct ssl_call *call = bpf_task_storage_get(&ssl_calls, task, 0, 0);
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
	key.pad = 0;
	key.g = ((struct pt_regs *)bpf_task_pt_regs(task))->r14;
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
			emit_plaintext(state, FT_FLOW_TX, (void *)go->buf, go->len, FT_SOURCE_GOTLS);
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

SEC("tp_btf/sock_send_length")
int BPF_PROG(on_sock_send, struct sock *sk, int ret, int flags)
{
	struct ft_conn_state *state;
	__u64 position;

	note_ssl_socket(sk);
	state = lookup_conn(sk);
	if (state && state->owner_pending && !claim_ingress(sk, state))
		return 0;
	if (state && ret <= 0)
		note_udp_error(state, ret);
	if (ret <= 0)
		return 0;
	if (!state) {
		if (sk->sk_protocol != IPPROTO_UDP)
			return 0;
		state = track_dns(sk);
		if (!state)
			return 0;
	}
	position = __sync_fetch_and_add(&state->bytes_sent, ret);
	if (state->conn.protocol == IPPROTO_UDP)
		state->datagrams_sent++;
	if (!state->sniff.flow)
		capture_sniff(state, FT_FLOW_TX, ret);
	if (state->capture)
		emit_payload(state, FT_FLOW_TX, position, ret);
	return 0;
}

struct exit_ctx {
	__u32 tgid;
};

static long close_udp_of_process(struct bpf_map *map, __u64 *key, struct ft_conn_state *state,
				 struct exit_ctx *ctx)
{
	if (state->conn.protocol == IPPROTO_UDP && state->task.pid == ctx->tgid)
		untrack_udp((const struct sock *)*key, state);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(on_sock_recv, struct sock *sk, int ret, int flags)
{
	struct ft_conn_state *state;
	struct ssl_call *call;

	if (flags & MSG_PEEK)
		return 0;
	call = note_ssl_socket(sk);
	state = lookup_conn(sk);
	if (call && !call->active && ret > 0)
		note_received(call, sk, state);
	if (!state)
		return 0;
	if (state->owner_pending && !claim_ingress(sk, state))
		return 0;
	if (ret > 0) {
		__u64 position = __sync_fetch_and_add(&state->bytes_received, ret);

		if (!state->sniff.flow)
			capture_sniff(state, FT_FLOW_RX, ret);
		if (state->capture)
			emit_payload(state, FT_FLOW_RX, position, ret);
	}
	if (state->conn.protocol == IPPROTO_UDP) {
		note_udp_error(state, ret);
		if (ret > 0)
			state->datagrams_received++;
		if (state->sock_error || (ret > 0 && state->datagrams_received >= state->datagrams_sent))
			untrack_udp(sk, state);
		return 0;
	}
	/* A connection that ended with data queued: done once the program has it all. */
	if (state->closed && (ret <= 0 || !unread_bytes(sk)))
		finish(sk, state);
	return 0;
}

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
static __always_inline void note_strategy(struct task_struct *task)
{
	__u32 tgid = task->tgid, zero = 0;
	__u8 strategy = strategy_from_environment(task);

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

SEC("tp_btf/sched_process_exec")
int BPF_PROG(on_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	struct ft_exec_event *e;
	unsigned long arg_start, arg_end, len;

	note_strategy(task);
	if (!current_is_traced())
		return 0;
	e = reserve(sizeof(*e), FT_EVENT_EXEC);
	if (!e)
		return 0;
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
	/* Rare, and read best while the process still lives (its /proc entry): wake now. */
	bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(on_exit, struct task_struct *task)
{
	struct ft_exit_event *e;
	__u32 tgid = task->tgid;

	if (BPF_CORE_READ(task, signal, live.counter) == 0 &&
	    bpf_map_lookup_elem(&udp_owners, &tgid)) {
		struct exit_ctx ctx = { .tgid = tgid };

		/* Its sockets are closed by exit, not by close(): end its DNS flows here. */
		bpf_for_each_map_elem(&conns, close_udp_of_process, &ctx, 0);
		bpf_map_delete_elem(&udp_owners, &tgid);
	}
	/* The process is gone once its last thread is, whichever thread that is. */
	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	bpf_map_delete_elem(&go_processes, &tgid);
	bpf_map_delete_elem(&strategies, &tgid);
	if (cfg.filter_pids) {
		bool traced = bpf_map_lookup_elem(&traced_pids, &tgid) != NULL;

		bpf_map_delete_elem(&traced_pids, &tgid);
		if (!traced)
			return 0;
	} else if (!current_is_traced()) {
		return 0;
	}
	e = reserve(sizeof(*e), FT_EVENT_EXIT);
	if (!e)
		return 0;
	fill_current_task(&e->task);
	submit(e, sizeof(*e));
	return 0;
}

/*
 * OpenSSL: plaintext at SSL_read/SSL_write, attached by userspace per library file
 * (tls/attach.py), either at the exported functions or at the internal function both
 * variants call, whose first instruction the kernel emulates instead of single-stepping
 * (tls/placement.py). The entry probe keeps the buffer; the return probe copies what the
 * call really moved and ties it to the socket the same thread used meanwhile.
 */
static __always_inline int ssl_enter(void *ssl, void *buf, void *out, __u32 flow)
{
	struct ssl_call *call;

	if (tls_probes_stopped() || !current_is_traced())
		return 0;
	call = bpf_task_storage_get(&ssl_calls, bpf_get_current_task_btf(), 0,
				    BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!call) {
		count(FT_CNT_TLS_CALLS_FULL);
		return 0;
	}
	call->ssl = (__u64)ssl;
	call->buf = (__u64)buf;
	call->out = (__u64)out;
	call->sk = 0;
	call->flow = flow;
	call->active = 1;
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(ssl_read_enter, void *ssl, void *buf)
{
	return ssl_enter(ssl, buf, NULL, FT_FLOW_RX);
}

SEC("uprobe")
int BPF_KPROBE(ssl_read_ex_enter, void *ssl, void *buf, __u64 num, __u64 *readbytes)
{
	return ssl_enter(ssl, buf, readbytes, FT_FLOW_RX);
}

SEC("uprobe")
int BPF_KPROBE(ssl_write_enter, void *ssl, void *buf)
{
	return ssl_enter(ssl, buf, NULL, FT_FLOW_TX);
}

SEC("uprobe")
int BPF_KPROBE(ssl_write_ex_enter, void *ssl, void *buf, __u64 num, __u64 *written)
{
	return ssl_enter(ssl, buf, written, FT_FLOW_TX);
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

/*
 * The connection of an SSL call that made no syscall (memory BIOs: node): its SSL *'s
 * socket when known, else the socket this thread last received on, unless another SSL *
 * claimed that receive first or its connection does not carry TLS. NULL when unknown
 * (*untraced: the socket is one the filters leave out, not a loss).
 */
static __always_inline struct ft_conn_state *memory_bio_connection(struct ssl_call *call,
								   __u64 ssl, bool *untraced)
{
	struct ft_conn_state *state;
	__u64 sk = 0;

	*untraced = false;
	state = cached_connection(ssl, &sk);
	if (state) {
		/* Its own receive: claimed, so that no other SSL * takes it. */
		if (call->recv_sk == sk && !call->recv_ssl)
			call->recv_ssl = ssl;
		return state;
	}
	if (!call->recv_sk || (call->recv_ssl && call->recv_ssl != ssl))
		return NULL;
	state = bpf_map_lookup_elem(&conns, &call->recv_sk);
	if (!state) {
		*untraced = true;
		return NULL;
	}
	if (state->conn.protocol != IPPROTO_TCP || state->conn.conn_id != call->recv_conn_id ||
	    !carries_tls(state))
		return NULL;
	call->recv_ssl = ssl;
	remember_tls_socket(ssl, call->recv_sk, call->recv_conn_id);
	return state;
}

/* A read that found nothing more (<= 0) ends its SSL *'s turn with the thread's receive;
 * the handshake's reads tie the SSL * to its socket already. */
static __always_inline void reads_done(struct ssl_call *found, __u64 ssl)
{
	bool untraced;

	memory_bio_connection(found, ssl, &untraced);
	if (found->recv_ssl == ssl) {
		found->recv_sk = 0;
		found->recv_ssl = 0;
	}
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_return, int ret)
{
	struct ft_conn_state *state;
	struct ssl_call *found;
	struct ssl_call call;
	__u64 length = ret;
	bool untraced = false;

	found = bpf_task_storage_get(&ssl_calls, bpf_get_current_task_btf(), 0, 0);
	if (!found || !found->active)
		return 0;
	found->active = 0;
	if (tls_probes_stopped())
		return 0;
	call = *found;
	/* Non-positive: an error, or the _ex variants' failure: no data moved. */
	if (ret <= 0) {
		if (!call.sk && call.flow == FT_FLOW_RX)
			reads_done(found, call.ssl);
		return 0;
	}
	if (call.out && bpf_probe_read_user(&length, sizeof(length), (void *)call.out)) {
		count(FT_CNT_PAYLOAD_READ_FAILED);
		return 0;
	}
	if (!length)
		return 0;
	if (call.sk) {
		state = tls_connection(call.sk, call.ssl);
	} else {
		/* A write too: node writes a request made during the handshake right after the
		 * receive that ends it, before decrypting (and its buffer is freed before the
		 * ciphertext is sent, so it could not wait for the send). */
		state = memory_bio_connection(found, call.ssl, &untraced);
		if (!state && !untraced)
			count(FT_CNT_TLS_UNATTRIBUTED);
	}
	if (state)
		emit_plaintext(state, call.flow, (void *)call.buf, length, FT_SOURCE_OPENSSL);
	return 0;
}

/*
 * Go crypto/tls: (*Conn).Read and (*Conn).Write, attached by userspace per Go executable
 * (tls/golang.py): an entry probe, and a plain uprobe on every RET of the function (never
 * a uretprobe: Go moves goroutine stacks, and a hijacked return address would crash it).
 * Register ABI (Go >= 1.17, amd64): receiver in RAX, the slice in RBX/RCX at entry; n in
 * RAX at return; the goroutine in R14 throughout.
 */
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
	struct task_struct *task = bpf_get_current_task_btf();
	struct ft_go_executable_key key = {};
	struct ft_go_executable *exe;
	struct file **fds;
	struct file *file;
	struct socket *sock;
	__u64 iface[2], fd_ptr, sysfd;
	unsigned int max_fds;

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
	max_fds = BPF_CORE_READ(task, files, fdt, max_fds);
	if (sysfd >= max_fds)
		return 0;
	fds = BPF_CORE_READ(task, files, fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[sysfd]) || !file)
		return 0;
	sock = BPF_CORE_READ(file, private_data);
	return (__u64)BPF_CORE_READ(sock, sk);
}

SEC("uprobe")
int go_return(struct pt_regs *ctx)
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
		return 0;
	call = *found;
	bpf_map_delete_elem(&go_calls, &key);
	if (tls_probes_stopped())
		return 0;
	/* n bytes moved, even when an error comes with them (io.Reader's contract). */
	if (n <= 0)
		return 0;
	if (!call.sk) {
		struct tls_object object = { .tgid = key.tgid, .address = call.conn };

		if (!bpf_map_lookup_elem(&tls_sockets, &object))
			call.sk = go_conn_socket(call.conn);
	}
	state = tls_connection(call.sk, call.conn); /* also remembers the tls.Conn's socket */
	/* A Write that reached the socket was sent whole already (see note_ssl_socket). */
	if (state && !call.sent)
		emit_plaintext(state, call.flow, (void *)call.buf, n, FT_SOURCE_GOTLS);
	return 0;
}
