// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Java (JSSE): flowtap's agent, loaded into each JVM (src/flowtap/java/), hands every piece
 * of plaintext an SSLSocket or SSLEngine moved to flowtap_java_data(fd, flow, buf, len) in
 * its shim library, with the descriptor of the socket the bytes travel on. One entry probe:
 * the descriptor is resolved here, in the calling process's file table, so the plaintext
 * lands on the very connection whichever thread calls (HttpClient wraps on one thread and
 * writes on another). A call with fd -1 reports plaintext the agent could not tie to a
 * socket: counted, as is a descriptor that is no socket. A call longer than the copy's
 * bound is copied in part, the rest a gap (emit_plaintext). java_data comes in the full
 * build and the bounded one (compat.h).
 */
#include "tls.h"

static __always_inline void java_data(struct pt_regs *ctx, const __u32 hook)
{
	__u64 fd = PT_REGS_PARM1(ctx) & 0xffffffff;
	__u32 flow = (__u32)PT_REGS_PARM2(ctx);
	void *buf = (void *)PT_REGS_PARM3(ctx);
	long length = (long)PT_REGS_PARM4(ctx);
	struct ft_conn_state *state;
	__u64 sk;

	if (tls_probes_stopped() || !current_is_traced())
		return;
	if (fd == 0xffffffff) { /* -1: the agent could not tie this plaintext to a socket */
		count(FT_CNT_JAVA_UNRESOLVED);
		return;
	}
	if (length <= 0 || (flow != FT_FLOW_TX && flow != FT_FLOW_RX))
		return;
	sk = socket_of_fd(current_task(), fd);
	if (!sk) {
		count(FT_CNT_JAVA_UNRESOLVED);
		return;
	}
	state = tcp_state(sk);
	if (state) /* else not traced (filters, loopback) */
		emit_plaintext(state, flow, buf, length, FT_SOURCE_JAVA, hook);
}

SEC("uprobe")
int java_data_enter(struct pt_regs *ctx)
{
	java_data(ctx, FT_FULL);
	return 0;
}

SEC("uprobe")
int java_data_enter_bounded(struct pt_regs *ctx)
{
	java_data(ctx, 0);
	return 0;
}
