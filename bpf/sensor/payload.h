/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * A connection's bytes: the first ones (sniff), and the payload of connections that look
 * like HTTP, copied from the user memory of the socket syscall in progress.
 */
#ifndef FLOWTAP_SENSOR_PAYLOAD_H
#define FLOWTAP_SENSOR_PAYLOAD_H

#include "conns.h"

/* x86_64 syscall numbers whose second argument points at the data. */
#define NR_READ 0
#define NR_WRITE 1
#define NR_READV 19
#define NR_WRITEV 20
#define NR_SENDTO 44
#define NR_RECVFROM 45
#define NR_SENDMSG 46
#define NR_RECVMSG 47

#define FT_PAYLOAD_STEPS 40 /* chunks and iovecs per syscall: up to ~128 KiB copied */
#define FT_TLS_PAYLOAD_STEPS 512 /* chunks per SSL call: up to 2 MiB copied */
/* The bounded build (no bpf_loop) verifies each step of its loops again: fewer steps,
 * the most where it matters (an SSL_write of a whole body). */
#define FT_BOUNDED_PAYLOAD_STEPS 16 /* 64 KiB per syscall */
#define FT_BOUNDED_TLS_PAYLOAD_STEPS 128 /* 512 KiB per TLS call */
#define FT_DATA_HEAD __builtin_offsetof(struct ft_data_event, data)
#define FT_DATA_SMALL 256 /* data event sizes reserved in the ring, besides FT_DATA_LEN */
#define FT_DATA_MEDIUM 1024

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
	struct syscall_regs regs;
	void *arg;
	__u64 count;

	read_syscall_regs(&regs);
	arg = (void *)regs.si;
	count = regs.dx;
	/* Keep the register loads apart from the user-memory loads below (verifier). */
	barrier_var(count);
	switch (regs.nr) {
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

/* One step of a payload copy (a bpf_loop callback: verified once, not per iteration). */
static __attribute__((unused)) long payload_step(__u64 index, struct payload_walk *walk)
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
	e->skipped = 0;
	bpf_ringbuf_submit(e, wakeup_flags(sizeof(*e)));
	walk->position += n;
	walk->left -= n;
	walk->seg += n;
	walk->seg_len -= n;
	return 0;
}

/* Where a bounded walk runs (per CPU: socket and TLS hooks run in process context). */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct payload_walk);
} payload_walks SEC(".maps");

/* Runs payload_step up to `steps` times with bpf_loop, or `bounded` times without it. */
static __always_inline void walk_payload(struct payload_walk *walk, __u32 steps,
					 const __u32 bounded, const __u32 hook)
{
	struct payload_walk *kept;
	__u32 zero = 0;

	if (hook & FT_HOOK_LOOP) {
		bpf_loop(steps, payload_step, walk, 0);
		return;
	}
	/* In a map value the verifier knows nothing of the walk's fields, so it checks each
	 * step once per iteration, not once per path through the earlier ones. */
	kept = bpf_map_lookup_elem(&payload_walks, &zero);
	if (!kept)
		return;
	*kept = *walk;
	for (__u32 i = 0; i < bounded; i++)
		if (payload_step(i, kept))
			break;
}

/* Where userspace's parser needs no more bytes (conn_id -> struct ft_payload_skip). */
FT_SHARED struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct ft_payload_skip);
} payload_skips SEC(".maps");

/*
 * A call whose bytes userspace asked not to copy (all of them before its mark): only their
 * length goes out, so the parser counts them. A call that crosses the mark is copied whole.
 */
static __always_inline bool skip_payload(struct ft_conn_state *state, __u32 flow,
					 __u64 position, int ret)
{
	struct ft_payload_skip *skip = bpf_map_lookup_elem(&payload_skips, &state->conn.conn_id);
	struct ft_data_event *e;
	__u64 until;

	if (!skip)
		return false;
	until = flow == FT_FLOW_TX ? skip->tx_until : skip->rx_until;
	if (position + ret > until)
		return false;
	/* Not shed with the payload: a few bytes keep the parser exact. */
	e = bpf_ringbuf_reserve(&events, FT_DATA_HEAD, 0);
	if (!e) {
		count(FT_CNT_RINGBUF_FULL);
		return true;
	}
	e->hdr.kind = FT_EVENT_DATA;
	e->hdr.pad = 0;
	e->hdr.timestamp_ns = bpf_ktime_get_ns();
	e->conn_id = state->conn.conn_id;
	e->position = position;
	e->flow = flow;
	e->length = 0;
	e->source = FT_SOURCE_SOCKET;
	e->skipped = ret;
	bpf_ringbuf_submit(e, wakeup_flags(FT_DATA_HEAD));
	return true;
}

/*
 * Copies what this call moved (ret bytes from position on) into data events, across the
 * call's buffers. What does not fit, or cannot be read, is left out: the next event's
 * position shows the gap.
 */
static __always_inline void emit_payload(struct ft_conn_state *state, __u32 flow,
					 __u64 position, int ret, const __u32 hook)
{
	struct payload_walk walk = {
		.left = ret,
		.position = position,
		.conn_id = state->conn.conn_id,
		.timestamp_ns = bpf_ktime_get_ns(),
		.flow = flow,
		.source = FT_SOURCE_SOCKET,
	};

	if (skip_payload(state, flow, position, ret))
		return;
	if (!syscall_io(&walk.io))
		return; /* sendfile, io_uring: userspace sees a gap by position */
	walk.seg = walk.io.buf;
	walk.seg_len = walk.io.buf ? walk.io.len : 0;
	walk_payload(&walk, FT_PAYLOAD_STEPS, FT_BOUNDED_PAYLOAD_STEPS, hook);
}

/* One capture per connection, even with a send and a receive racing. */
static __always_inline bool claim_sniff(struct ft_conn_state *state, const __u32 hook)
{
	if (hook & FT_HOOK_ATOMICS)
		return __sync_val_compare_and_swap(&state->sniff.flow, 0, FT_SNIFF_CLAIMED) == 0;
	if (state->sniff.flow || !claim(state->conn.conn_id, FT_CLAIM_SNIFF))
		return false;
	state->sniff.flow = FT_SNIFF_CLAIMED;
	return true;
}

/* A capture that found nothing to read: the next call tries again. */
static __always_inline void release_sniff(struct ft_conn_state *state, const __u32 hook)
{
	state->sniff.flow = 0;
	if (!(hook & FT_HOOK_ATOMICS))
		unclaim(state->conn.conn_id, FT_CLAIM_SNIFF);
}

/*
 * Keeps the first bytes the connection moves through a user buffer, either way (the
 * client's request on both ends, normally), read from the syscall's user buffer.
 */
static __always_inline void capture_sniff(struct ft_conn_state *state, __u32 flow, int ret,
					  const __u32 hook)
{
	void *buf = NULL;
	__u64 len;

	if (!claim_sniff(state, hook))
		return;
	len = syscall_user_buffer(&buf);
	if (!len || !buf) {
		release_sniff(state, hook); /* sendfile, io_uring: try again on the next call */
		return;
	}
	if (len > (__u64)ret)
		len = ret;
	if (len > FT_SNIFF_LEN)
		len = FT_SNIFF_LEN;
	if (bpf_probe_read_user(state->sniff.data, len, buf)) {
		count(FT_CNT_SNIFF_READ_FAILED);
		release_sniff(state, hook);
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
	struct syscall_regs regs;
	struct sockaddr_in6 sa = {};
	void *addr;

	read_syscall_regs(&regs);
	addr = (void *)regs.r8;
	barrier_var(addr);
	if (regs.nr == NR_SENDMSG) {
		struct user_msghdr msg;

		if (bpf_probe_read_user(&msg, sizeof(msg), (void *)regs.si))
			return false;
		addr = msg.msg_name;
	} else if (regs.nr != NR_SENDTO) {
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

#endif /* FLOWTAP_SENSOR_PAYLOAD_H */
