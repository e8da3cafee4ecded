// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * OpenSSL: plaintext at SSL_read/SSL_write, attached by userspace per library file
 * (tls/attach.py), either at the exported functions or at the internal function both
 * variants call, whose first instruction the kernel emulates instead of single-stepping
 * (tls/placement.py). The entry probe keeps the buffer; the return probe copies what the
 * call really moved and ties it to the socket the same thread used meanwhile.
 * ssl_return comes in the full build and the bounded one (compat.h).
 */
#include "tls.h"

static __always_inline int ssl_enter(void *ssl, void *buf, void *out, __u32 flow)
{
	struct ssl_call *call;

	if (tls_probes_stopped() || !current_is_traced())
		return 0;
	call = new_thread_ssl_call();
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

static __always_inline void ssl_exit(int ret, const __u32 hook)
{
	struct ft_conn_state *state;
	struct ssl_call *found;
	struct ssl_call call;
	__u64 length = ret;
	bool untraced = false;

	found = thread_ssl_call();
	if (!found || !found->active)
		return;
	found->active = 0;
	if (tls_probes_stopped())
		return;
	call = *found;
	/* Non-positive: an error, or the _ex variants' failure: no data moved. */
	if (ret <= 0) {
		if (!call.sk && call.flow == FT_FLOW_RX)
			reads_done(found, call.ssl);
		return;
	}
	if (call.out && bpf_probe_read_user(&length, sizeof(length), (void *)call.out)) {
		count(FT_CNT_PAYLOAD_READ_FAILED);
		return;
	}
	if (!length)
		return;
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
		emit_plaintext(state, call.flow, (void *)call.buf, length, FT_SOURCE_OPENSSL, hook);
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_return, int ret)
{
	ssl_exit(ret, FT_FULL);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_return_bounded, int ret)
{
	ssl_exit(ret, 0);
	return 0;
}
