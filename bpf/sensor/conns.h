/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The connection table: TCP connections (and UDP DNS flows) by struct sock, their open
 * and close events, and the listeners incoming connections are attributed to.
 */
#ifndef FLOWTAP_SENSOR_CONNS_H
#define FLOWTAP_SENSOR_CONNS_H

#include "compat.h"
#include "filters.h"
#include "scope.h"

#define FT_SNIFF_CLAIMED 0xff /* sniff.flow while a capture is in progress */

/* Allocated as connections come (no prealloc): a state holds 512 bytes of sniff. */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64); /* struct sock * */
	__type(value, struct ft_conn_state);
} conns SEC(".maps");

/* Where a new connection's state is built: too big for the BPF stack. */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ft_conn_state);
} scratch SEC(".maps");

/* (netns, local port) -> the process listening there (and whether it passes the filters). */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ft_listener_key);
	__type(value, struct ft_listener);
} listeners SEC(".maps");

/* Processes owning UDP (DNS) flows -> how many, so only their exit walks the table. */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64); /* 64-bit: 5.10's atomic add (no fetch) has no 32-bit form */
} udp_owners SEC(".maps");

/*
 * The bounded build has no compare-and-swap: what CPUs race for (an accepted
 * connection's owner, its first bytes) goes to the first to insert it here. Created
 * only for that build (userspace turns it off otherwise).
 */
#define FT_CLAIM_OWNER 1
#define FT_CLAIM_SNIFF 2

struct ft_claim_key {
	__u64 conn_id;
	__u32 what;
	__u32 pad;
};

FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ft_claim_key);
	__type(value, __u8);
} claims SEC(".maps");

static __always_inline bool claim(__u64 conn_id, __u32 what)
{
	struct ft_claim_key key = { .conn_id = conn_id, .what = what };
	__u8 one = 1;

	return bpf_map_update_elem(&claims, &key, &one, BPF_NOEXIST) == 0;
}

static __always_inline void unclaim(__u64 conn_id, __u32 what)
{
	struct ft_claim_key key = { .conn_id = conn_id, .what = what };

	bpf_map_delete_elem(&claims, &key);
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
						   __u8 protocol, __u8 direction, const __u32 hook)
{
	__u64 key = (__u64)sk;

	if (!cfg.include_loopback && is_loopback(&state->conn))
		return NULL;
	if (direction == FT_DIR_EGRESS && !egress_in_scope(&state->conn))
		return NULL;
	state->conn.conn_id = new_conn_id(hook);
	state->conn.start_ns = bpf_ktime_get_ns();
	state->conn.protocol = protocol;
	state->conn.direction = direction;
	state->cookie = socket_identity(sk, hook);
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
	if (!e) {
		/* Counted as a connection: its close event says so, userspace makes the open. */
		state->open_lost = 1;
		count(FT_CNT_CONN_OPEN_LOST);
		return;
	}
	e->task = state->task;
	e->conn = state->conn;
	submit(e, sizeof(*e));
}

/* The close event, with what CLOSE recorded (TCP) or the socket's state now (UDP). */
static __always_inline void emit_close(const struct sock *sk, struct ft_conn_state *state)
{
	struct ft_conn_close_event *e;

	e = reserve(sizeof(*e), FT_EVENT_CONN_CLOSE);
	if (!e) {
		count(FT_CNT_CONN_CLOSE_LOST);
		/* Nothing of it reached userspace: the connection vanished but for this count. */
		if (!state->open_emitted || state->open_lost)
			count(FT_CNT_CONN_UNREPORTED);
		return;
	}
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
	e->open_lost = state->open_lost;
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
static __always_inline void untrack(const struct sock *sk, struct ft_conn_state *state,
				    const __u32 hook)
{
	__u64 key = (__u64)sk;

	if (hook & FT_HOOK_ATOMICS) {
		if (__sync_val_compare_and_swap(&state->finished, 0, 1) != 0)
			return;
		emit_close(sk, state);
		bpf_map_delete_elem(&conns, &key);
		return;
	}
	/* Bounded build: the CPU whose delete succeeds ends it. The entry's memory (no prealloc)
	 * is freed after an RCU grace period, so it can still be read here. */
	if (bpf_map_delete_elem(&conns, &key))
		return;
	emit_close(sk, state);
}

static __always_inline void untrack_udp(const struct sock *sk, struct ft_conn_state *state,
					const __u32 hook)
{
	__u32 tgid = state->task.pid;
	__u64 *owned = bpf_map_lookup_elem(&udp_owners, &tgid);

	untrack(sk, state, hook);
	if (!owned)
		return;
	if (hook & FT_HOOK_ATOMICS) {
		if (__sync_fetch_and_add(owned, -1) == 1)
			bpf_map_delete_elem(&udp_owners, &tgid);
		return;
	}
	__sync_fetch_and_add(owned, -1);
	if (*(volatile __u64 *)owned == 0)
		bpf_map_delete_elem(&udp_owners, &tgid);
}

/*
 * The tracked state of sk. A UDP flow whose socket was closed with a query unanswered
 * stays in conns (UDP has no close hook); when its struct sock is reused, the socket's
 * identity tells the new socket apart, and the old flow ends here.
 */
static __always_inline struct ft_conn_state *lookup_conn(const struct sock *sk, const __u32 hook)
{
	__u64 key = (__u64)sk;
	struct ft_conn_state *state = bpf_map_lookup_elem(&conns, &key);

	if (state && state->conn.protocol == IPPROTO_UDP &&
	    state->cookie != socket_identity(sk, hook)) {
		untrack_udp(sk, state, hook);
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

/* The first thread to read or write an accepted connection owns it: check it, open it. */
static __always_inline bool claim_ingress(const struct sock *sk, struct ft_conn_state *state,
					  const __u32 hook)
{
	__u64 key = (__u64)sk;

	/* Two threads, or a send and a receive, may race here: one claims it. */
	if (hook & FT_HOOK_ATOMICS) {
		if (__sync_val_compare_and_swap(&state->owner_pending, 1, 0) != 1)
			return true;
	} else {
		if (!state->owner_pending || !claim(state->conn.conn_id, FT_CLAIM_OWNER))
			return true;
		state->owner_pending = 0;
	}
	if (!current_is_traced()) {
		bpf_map_delete_elem(&conns, &key);
		return false;
	}
	fill_current_task(&state->task);
	emit_open(state);
	return true;
}

/* The connection is over: its open (if not out yet) and close events go out. */
static __always_inline void finish(const struct sock *sk, struct ft_conn_state *state,
				   const __u32 hook)
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
	untrack(sk, state, hook);
}

#endif /* FLOWTAP_SENSOR_CONNS_H */
