// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * TCP connections from their state changes (BTF tracepoints, every kernel from 5.10):
 *   tp_btf/inet_sock_set_state   CLOSE->SYN_SENT registers an outgoing connection in the
 *                                connecting thread; ESTABLISHED opens it (egress) or
 *                                registers an accepted one (ingress, softirq: owner from
 *                                the listeners map until the acceptor touches it);
 *                                CLOSE->LISTEN records a listener's owner; CLOSE ends a
 *                                connection, or marks it when received data is still
 *                                queued, then it ends once the program has read it.
 *   tp_btf/tcp_destroy_sock      ends a closed connection whose data was never read.
 */
#include "conns.h"

/* An outgoing connection starts: we are in connect() (or a fast-open send), in its thread. */
static __always_inline void on_syn_sent(const struct sock *sk, const __u32 hook)
{
	struct ft_conn_state *state;

	/* connect() again on a socket whose last connection ended: that one is over. */
	state = lookup_conn(sk, hook);
	if (state)
		untrack(sk, state, hook);
	if (!cfg.trace_egress || !current_is_traced())
		return;
	state = new_state();
	if (!state)
		return;
	fill_current_task(&state->task);
	read_addresses(sk, &state->conn);
	track(sk, state, IPPROTO_TCP, FT_DIR_EGRESS, hook);
}

/*
 * An incoming connection completed its handshake. This runs in softirq (or in the
 * connecting process, over loopback): the process that will accept it is not known yet.
 * It is attributed to the listening port's owner for now, and to the thread that first
 * reads or writes it when that happens (see claim_ingress).
 */
static __always_inline void on_passive_established(const struct sock *sk, const __u32 hook)
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
	track(sk, state, IPPROTO_TCP, FT_DIR_INGRESS, hook);
}

static __always_inline void tcp_state_changed(const struct sock *sk, const int old_state,
					      const int new_state, const __u32 hook)
{
	struct ft_conn_state *state;

	if (sk->sk_protocol != IPPROTO_TCP)
		return;

	if (new_state == TCP_SYN_SENT && old_state == TCP_CLOSE) {
		on_syn_sent(sk, hook);
		return;
	}
	if (new_state == TCP_LISTEN) {
		struct ft_listener_key lkey = listener_key(sk, BPF_CORE_READ(sk, __sk_common.skc_num));
		struct ft_listener listener = {};

		fill_current_task(&listener.task);
		listener.sk = (__u64)sk;
		listener.traced = current_is_traced();
		if (bpf_map_update_elem(&listeners, &lkey, &listener, BPF_ANY))
			count(FT_CNT_LISTENER_TABLE_FULL);
		return;
	}
	if (old_state == TCP_LISTEN) {
		struct ft_listener_key lkey = listener_key(sk, BPF_CORE_READ(sk, __sk_common.skc_num));
		struct ft_listener *listener_entry;

		/* A new connection's socket is cloned from its listener: LISTEN -> SYN_RECV. */
		if (new_state != TCP_CLOSE)
			return;

		/* Only its own listener's close: SO_REUSEPORT siblings, a failed listen(). */
		listener_entry = bpf_map_lookup_elem(&listeners, &lkey);
		if (listener_entry && listener_entry->sk == (__u64)sk)
			bpf_map_delete_elem(&listeners, &lkey);
		return;
	}

	state = lookup_conn(sk, hook);
	if (!state) {
		if (new_state == TCP_ESTABLISHED && old_state == TCP_SYN_RECV)
			on_passive_established(sk, hook);
		return;
	}
	if (new_state == TCP_ESTABLISHED) {
		state->established = 1;
		/* The local port is bound by now; refresh what SYN_SENT saw. */
		read_addresses(sk, &state->conn);
		if (!state->open_emitted && state->conn.direction == FT_DIR_EGRESS)
			emit_open(state);
		return;
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
			finish(sk, state, hook);
	}
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(on_tcp_state, const struct sock *sk, const int old_state, const int new_state)
{
	tcp_state_changed(sk, old_state, new_state, FT_HOOK_BTF | FT_FULL);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(on_tcp_state_bounded, const struct sock *sk, const int old_state,
	     const int new_state)
{
	tcp_state_changed(sk, old_state, new_state, FT_HOOK_BTF);
	return 0;
}

/* Released with data never read: the close event goes out now. */
static __always_inline void tcp_destroyed(struct sock *sk, const __u32 hook)
{
	struct ft_conn_state *state = lookup_conn(sk, hook);

	if (state)
		finish(sk, state, hook);
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(on_tcp_destroy, struct sock *sk)
{
	tcp_destroyed(sk, FT_HOOK_BTF | FT_FULL);
	return 0;
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(on_tcp_destroy_bounded, struct sock *sk)
{
	tcp_destroyed(sk, FT_HOOK_BTF);
	return 0;
}
