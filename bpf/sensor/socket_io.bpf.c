// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Bytes of every send and receive on a socket (write, writev, sendto, sendmsg, sendfile,
 * splice, io_uring...), keyed by struct sock so non-socket I/O never gets here; and with
 * them the first bytes, HTTP payload, the acceptor of an incoming connection, UDP sockets
 * that query port 53, and the socket of a TLS call in progress (tls.h).
 *
 * No syscall tracepoints: attaching any of them puts every task on the host on the slow
 * syscall path. One hook family is loaded, the best this kernel has (userspace decides,
 * src/flowtap/loader/hooks.py):
 *   tracepoint  tp_btf/sock_send_length, sock_recv_length (6.3): after every send and
 *               receive of any socket, in sock_sendmsg/sock_recvmsg.
 *   fexit       the same points one level down, where TCP and UDP over IPv4 and IPv6 go
 *               through: inet_sendmsg, inet6_sendmsg, inet_recvmsg, inet6_recvmsg, and
 *               inet_sendpage (sendfile, splice: until 6.5).
 *   kprobe      the same functions with a kprobe and a kretprobe (entry arguments kept
 *               by thread), where fentry/fexit are missing.
 * Each hook comes in two builds (compat.h): full (5.17 on) and bounded (_bounded). The
 * bounded build also loads a release hook, which ends a UDP flow when its socket is
 * released (the full build's exit hook walks the table with bpf_for_each_map_elem).
 */
#include "tls.h"

/*
 * A UDP socket that sends to port 53 starts a DNS flow: one exchange of queries and
 * answers (a resolver often sends A and AAAA together). It ends when every query has an
 * answer, on an ICMP error, or when the process exits; a later query starts a new flow.
 */
static __always_inline struct ft_conn_state *track_dns(const struct sock *sk, const __u32 hook)
{
	struct ft_conn_state *state, *tracked;
	__u64 one = 1, *owned;
	__u32 tgid;

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
	tracked = track(sk, state, IPPROTO_UDP, FT_DIR_EGRESS, hook);
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

/* A send on sk returned ret (bytes sent, or -errno). */
static __always_inline void account_send(const struct sock *sk, int ret, const __u32 hook)
{
	struct ft_conn_state *state;
	__u64 position;

	note_ssl_socket(sk, hook);
	state = lookup_conn(sk, hook);
	if (state && state->owner_pending && !claim_ingress(sk, state, hook))
		return;
	if (state && ret <= 0)
		note_udp_error(state, ret);
	if (ret <= 0)
		return;
	if (!state) {
		if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_UDP)
			return;
		state = track_dns(sk, hook);
		if (!state)
			return;
	}
	position = add_bytes(&state->bytes_sent, ret, hook);
	if (state->conn.protocol == IPPROTO_UDP)
		state->datagrams_sent++;
	if (!state->sniff.flow)
		capture_sniff(state, FT_FLOW_TX, ret, hook);
	if (state->capture)
		emit_payload(state, FT_FLOW_TX, position, ret, hook);
}

/* A receive on sk returned ret (bytes received, 0 at the end, or -errno). */
static __always_inline void account_recv(const struct sock *sk, int ret, int flags,
					 const __u32 hook)
{
	struct ft_conn_state *state;
	struct ssl_call *call;

	if (flags & MSG_PEEK)
		return;
	call = note_ssl_socket(sk, hook);
	state = lookup_conn(sk, hook);
	if (call && !call->active && ret > 0)
		note_received(call, sk, state);
	if (!state)
		return;
	if (state->owner_pending && !claim_ingress(sk, state, hook))
		return;
	if (ret > 0) {
		__u64 position = add_bytes(&state->bytes_received, ret, hook);

		if (!state->sniff.flow)
			capture_sniff(state, FT_FLOW_RX, ret, hook);
		if (state->capture)
			emit_payload(state, FT_FLOW_RX, position, ret, hook);
	}
	if (state->conn.protocol == IPPROTO_UDP) {
		note_udp_error(state, ret);
		if (ret > 0)
			state->datagrams_received++;
		if (state->sock_error || (ret > 0 && state->datagrams_received >= state->datagrams_sent))
			untrack_udp(sk, state, hook);
		return;
	}
	/* A connection that ended with data queued: done once the program has it all. */
	if (state->closed && (ret <= 0 || !unread_bytes(sk)))
		finish(sk, state, hook);
}

/* A socket is released: a UDP flow still open on it ends (bounded build only). */
static __always_inline void account_release(const struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct ft_conn_state *state;

	if (!sk)
		return;
	state = bpf_map_lookup_elem(&conns, &key);
	if (state && state->conn.protocol == IPPROTO_UDP)
		untrack_udp(sk, state, 0);
}

/* --- tracepoints (6.3) ---------------------------------------------------------------- */

SEC("tp_btf/sock_send_length")
int BPF_PROG(on_sock_send, struct sock *sk, int ret, int flags)
{
	account_send(sk, ret, FT_HOOK_BTF | FT_FULL);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(on_sock_recv, struct sock *sk, int ret, int flags)
{
	account_recv(sk, ret, flags, FT_HOOK_BTF | FT_FULL);
	return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(on_sock_send_bounded, struct sock *sk, int ret, int flags)
{
	account_send(sk, ret, FT_HOOK_BTF);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(on_sock_recv_bounded, struct sock *sk, int ret, int flags)
{
	account_recv(sk, ret, flags, FT_HOOK_BTF);
	return 0;
}

/* --- fexit (5.5 on x86_64) ------------------------------------------------------------ */

#define FEXIT_SENDMSG(func, name, hook)                                                     \
	SEC("fexit/" #func)                                                                 \
	int BPF_PROG(name, struct socket *sock, struct msghdr *msg, size_t size, int ret)   \
	{                                                                                   \
		account_send(sock->sk, ret, FT_HOOK_BTF | (hook));                          \
		return 0;                                                                   \
	}

#define FEXIT_RECVMSG(func, name, hook)                                                     \
	SEC("fexit/" #func)                                                                 \
	int BPF_PROG(name, struct socket *sock, struct msghdr *msg, size_t size, int flags, \
		     int ret)                                                               \
	{                                                                                   \
		account_recv(sock->sk, ret, flags, FT_HOOK_BTF | (hook));                   \
		return 0;                                                                   \
	}

#define FEXIT_SENDPAGE(name, hook)                                                          \
	SEC("fexit/inet_sendpage")                                                          \
	int BPF_PROG(name, struct socket *sock, struct page *page, int offset, size_t size, \
		     int flags, long ret)                                                   \
	{                                                                                   \
		account_send(sock->sk, ret, FT_HOOK_BTF | (hook));                          \
		return 0;                                                                   \
	}

FEXIT_SENDMSG(inet_sendmsg, fexit_inet_sendmsg, FT_FULL)
FEXIT_SENDMSG(inet6_sendmsg, fexit_inet6_sendmsg, FT_FULL)
FEXIT_RECVMSG(inet_recvmsg, fexit_inet_recvmsg, FT_FULL)
FEXIT_RECVMSG(inet6_recvmsg, fexit_inet6_recvmsg, FT_FULL)
FEXIT_SENDPAGE(fexit_inet_sendpage, FT_FULL)
FEXIT_SENDMSG(inet_sendmsg, fexit_inet_sendmsg_bounded, 0)
FEXIT_SENDMSG(inet6_sendmsg, fexit_inet6_sendmsg_bounded, 0)
FEXIT_RECVMSG(inet_recvmsg, fexit_inet_recvmsg_bounded, 0)
FEXIT_RECVMSG(inet6_recvmsg, fexit_inet6_recvmsg_bounded, 0)
FEXIT_SENDPAGE(fexit_inet_sendpage_bounded, 0)

SEC("fentry/inet_release")
int BPF_PROG(fentry_inet_release, struct socket *sock)
{
	account_release(sock->sk);
	return 0;
}

/* --- kprobes ---------------------------------------------------------------------------- */

/* A socket call in progress, from its kprobe to its kretprobe, by thread. */
struct io_call {
	__u64 sk;
	__s32 flags;
	__u32 pad;
};

/* LRU: a kretprobe the kernel could not arm (maxactive) never takes its entry. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64); /* pid_tgid */
	__type(value, struct io_call);
} io_calls SEC(".maps");

static __always_inline void io_call_enter(struct socket *sock, int flags)
{
	__u64 thread = bpf_get_current_pid_tgid();
	struct io_call call = { .sk = (__u64)BPF_CORE_READ(sock, sk), .flags = flags };

	bpf_map_update_elem(&io_calls, &thread, &call, BPF_ANY);
}

static __always_inline bool io_call_exit(struct io_call *call)
{
	__u64 thread = bpf_get_current_pid_tgid();
	struct io_call *found = bpf_map_lookup_elem(&io_calls, &thread);

	if (!found)
		return false;
	*call = *found;
	bpf_map_delete_elem(&io_calls, &thread);
	return call->sk != 0;
}

#define KPROBE_ENTER(func, name)                                                            \
	SEC("kprobe/" #func)                                                                \
	int BPF_KPROBE(name, struct socket *sock)                                           \
	{                                                                                   \
		io_call_enter(sock, 0);                                                     \
		return 0;                                                                   \
	}

#define KPROBE_ENTER_RECV(func, name)                                                       \
	SEC("kprobe/" #func)                                                                \
	int BPF_KPROBE(name, struct socket *sock, struct msghdr *msg, size_t size, int flags) \
	{                                                                                   \
		io_call_enter(sock, flags);                                                 \
		return 0;                                                                   \
	}

#define KRETPROBE_SEND(func, name, hook)                                                    \
	SEC("kretprobe/" #func)                                                             \
	int BPF_KRETPROBE(name, long ret)                                                   \
	{                                                                                   \
		struct io_call call;                                                        \
                                                                                            \
		if (io_call_exit(&call))                                                    \
			account_send((const struct sock *)call.sk, ret, (hook));            \
		return 0;                                                                   \
	}

#define KRETPROBE_RECV(func, name, hook)                                                    \
	SEC("kretprobe/" #func)                                                             \
	int BPF_KRETPROBE(name, long ret)                                                   \
	{                                                                                   \
		struct io_call call;                                                        \
                                                                                            \
		if (io_call_exit(&call))                                                    \
			account_recv((const struct sock *)call.sk, ret, call.flags, (hook)); \
		return 0;                                                                   \
	}

KPROBE_ENTER(inet_sendmsg, kprobe_inet_sendmsg)
KPROBE_ENTER(inet6_sendmsg, kprobe_inet6_sendmsg)
KPROBE_ENTER_RECV(inet_recvmsg, kprobe_inet_recvmsg)
KPROBE_ENTER_RECV(inet6_recvmsg, kprobe_inet6_recvmsg)
KPROBE_ENTER(inet_sendpage, kprobe_inet_sendpage)
KRETPROBE_SEND(inet_sendmsg, kretprobe_inet_sendmsg, FT_FULL)
KRETPROBE_SEND(inet6_sendmsg, kretprobe_inet6_sendmsg, FT_FULL)
KRETPROBE_RECV(inet_recvmsg, kretprobe_inet_recvmsg, FT_FULL)
KRETPROBE_RECV(inet6_recvmsg, kretprobe_inet6_recvmsg, FT_FULL)
KRETPROBE_SEND(inet_sendpage, kretprobe_inet_sendpage, FT_FULL)
KRETPROBE_SEND(inet_sendmsg, kretprobe_inet_sendmsg_bounded, 0)
KRETPROBE_SEND(inet6_sendmsg, kretprobe_inet6_sendmsg_bounded, 0)
KRETPROBE_RECV(inet_recvmsg, kretprobe_inet_recvmsg_bounded, 0)
KRETPROBE_RECV(inet6_recvmsg, kretprobe_inet6_recvmsg_bounded, 0)
KRETPROBE_SEND(inet_sendpage, kretprobe_inet_sendpage_bounded, 0)

SEC("kprobe/inet_release")
int BPF_KPROBE(kprobe_inet_release, struct socket *sock)
{
	account_release(BPF_CORE_READ(sock, sk));
	return 0;
}
