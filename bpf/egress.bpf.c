// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Egress controller: transparent redirection of QPOINT_STRATEGY=forward processes'
 * outbound TCP to flowtap's local proxy, attached to one cgroup v2 (docs/egress.md).
 *
 *   cgroup/connect4, connect6   rewrite the destination of a forward process's connect to
 *                               the proxy's listener and keep the original, by socket cookie.
 *   sockops (TCP_CONNECT_CB)    the local port is known now: re-key the original by the
 *                               client's address and port, which is what the proxy sees.
 *   cgroup/getsockopt           answer the proxy's SO_ORIGINAL_DST on the accepted socket,
 *                               exactly as netfilter does after an nftables REDIRECT, so
 *                               the proxy works the same with either.
 *
 * Never redirected: the proxy's own connections, loopback destinations (the proxy's
 * listener among them) and anything but TCP, so a loop cannot form.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "flowtap.h"
#include "strategy.h"

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* IP6T_SO_ORIGINAL_DST has the same number */
#define SOCKADDR_IN_LEN 16
#define SOCKADDR_IN6_LEN 28

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile struct ft_egress_config ecfg = {};

const struct ft_egress_key *anchor_egress_key __attribute__((unused));
const struct ft_egress_origin *anchor_egress_origin __attribute__((unused));
const struct ft_egress_config *anchor_egress_config __attribute__((unused));
const enum ft_egress_counter *anchor_egress_counter __attribute__((unused));

/* Set at connect, until the local port is known (sockops). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FT_MAX_REDIRECTS);
	__type(key, __u64); /* socket cookie */
	__type(value, struct ft_egress_origin);
} pending_redirects SEC(".maps");

/* Read by the getsockopt program and by the proxy (who connected), by client address. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FT_MAX_REDIRECTS);
	__type(key, struct ft_egress_key);
	__type(value, struct ft_egress_origin);
} redirects SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FT_EGRESS_MAX);
	__type(key, __u32);
	__type(value, __u64);
} egress_counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *value = bpf_map_lookup_elem(&egress_counters, &which);

	if (value)
		*value += 1;
}

/* A TCP connect by a process whose strategy is forward, not by the proxy itself. */
static __always_inline bool should_redirect(struct bpf_sock_addr *ctx, __u32 *tgid)
{
	*tgid = bpf_get_current_pid_tgid() >> 32;
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return false;
	if (*tgid == ecfg.proxy_tgid)
		return false;
	return strategy_of(*tgid) == FT_STRATEGY_FORWARD;
}

static __always_inline int remember(struct bpf_sock_addr *ctx, struct ft_egress_origin *origin)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);

	if (bpf_map_update_elem(&pending_redirects, &cookie, origin, BPF_ANY)) {
		count(FT_EGRESS_TABLE_FULL);
		return -1; /* not redirected: better direct than unattributable */
	}
	count(FT_EGRESS_REDIRECTED);
	return 0;
}

SEC("cgroup/connect4")
int egress_connect4(struct bpf_sock_addr *ctx)
{
	struct ft_egress_origin origin = {};
	__u32 ip = ctx->user_ip4;
	__u32 tgid;

	if (!should_redirect(ctx, &tgid))
		return 1;
	/* Loopback (the proxy's own listener among them) and 0.0.0.0 stay local. */
	if ((bpf_ntohl(ip) >> 24) == 127 || ip == 0)
		return 1;
	__builtin_memcpy(origin.addr, &ip, 4);
	origin.port = (__u16)ctx->user_port;
	origin.family = AF_INET;
	origin.pid = tgid;
	if (remember(ctx, &origin))
		return 1;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = ecfg.proxy_port;
	return 1;
}

SEC("cgroup/connect6")
int egress_connect6(struct bpf_sock_addr *ctx)
{
	struct ft_egress_origin origin = {};
	__u32 ip[4];
	__u32 tgid;
	bool mapped;

	if (!should_redirect(ctx, &tgid))
		return 1;
	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	/* ::ffff:a.b.c.d is an IPv4 connect from a dual-stack socket. */
	mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0xffff);
	if (mapped) {
		if ((bpf_ntohl(ip[3]) >> 24) == 127 || ip[3] == 0)
			return 1;
		__builtin_memcpy(origin.addr, &ip[3], 4);
		origin.family = AF_INET;
	} else {
		if (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || ip[3] == bpf_htonl(1)))
			return 1; /* :: and ::1 */
		__builtin_memcpy(origin.addr, ip, 16);
		origin.family = AF_INET6;
	}
	origin.port = (__u16)ctx->user_port;
	origin.pid = tgid;
	if (remember(ctx, &origin))
		return 1;
	if (mapped) {
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = ecfg.proxy_port;
	return 1;
}

SEC("sockops")
int egress_sockops(struct bpf_sock_ops *ctx)
{
	struct ft_egress_origin *origin;
	struct ft_egress_key key = {};
	__u64 cookie;

	if (ctx->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	origin = bpf_map_lookup_elem(&pending_redirects, &cookie);
	if (!origin)
		return 1;
	key.port = bpf_htons((__u16)ctx->local_port);
	if (ctx->family == AF_INET) {
		__u32 ip = ctx->local_ip4;

		__builtin_memcpy(key.addr, &ip, 4);
		key.family = AF_INET;
	} else if (ctx->local_ip6[0] == 0 && ctx->local_ip6[1] == 0 &&
		   ctx->local_ip6[2] == bpf_htonl(0xffff)) {
		/* A dual-stack socket's IPv4 connection: the proxy sees an IPv4 peer. */
		__u32 ip = ctx->local_ip6[3];

		__builtin_memcpy(key.addr, &ip, 4);
		key.family = AF_INET;
	} else {
		__u32 ip[4] = { ctx->local_ip6[0], ctx->local_ip6[1], ctx->local_ip6[2],
				ctx->local_ip6[3] };

		__builtin_memcpy(key.addr, ip, 16);
		key.family = AF_INET6;
	}
	if (bpf_map_update_elem(&redirects, &key, origin, BPF_ANY))
		count(FT_EGRESS_TABLE_FULL);
	bpf_map_delete_elem(&pending_redirects, &cookie);
	return 1;
}

/* Writes the original destination as the sockaddr the caller's level expects. */
static __always_inline int answer(struct bpf_sockopt *ctx, struct ft_egress_origin *origin)
{
	__u8 *optval = ctx->optval;

	if (ctx->level == SOL_IP && origin->family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)optval;

		if (optval + SOCKADDR_IN_LEN > (__u8 *)ctx->optval_end)
			return 1;
		__builtin_memset(optval, 0, SOCKADDR_IN_LEN);
		sin->sin_family = AF_INET;
		sin->sin_port = origin->port;
		__builtin_memcpy(&sin->sin_addr, origin->addr, 4);
		ctx->optlen = SOCKADDR_IN_LEN;
	} else if (ctx->level == SOL_IPV6 && origin->family == AF_INET6) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)optval;

		if (optval + SOCKADDR_IN6_LEN > (__u8 *)ctx->optval_end)
			return 1;
		__builtin_memset(optval, 0, SOCKADDR_IN6_LEN);
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = origin->port;
		__builtin_memcpy(&sin6->sin6_addr, origin->addr, 16);
		ctx->optlen = SOCKADDR_IN6_LEN;
	} else {
		return 1; /* asked at the other level: the kernel's answer stands */
	}
	ctx->retval = 0;
	count(FT_EGRESS_ANSWERED);
	return 1;
}

SEC("cgroup/getsockopt")
int egress_getsockopt(struct bpf_sockopt *ctx)
{
	struct ft_egress_origin *origin;
	struct ft_egress_key key = {};
	struct bpf_sock *sk = ctx->sk;

	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return 1;
	if (!sk || sk->src_port != bpf_ntohs(ecfg.proxy_port))
		return 1; /* only sockets accepted on the proxy's listener */
	key.port = (__u16)sk->dst_port;
	if (sk->family == AF_INET) {
		__u32 ip = sk->dst_ip4;

		__builtin_memcpy(key.addr, &ip, 4);
		key.family = AF_INET;
	} else {
		__u32 ip[4] = { sk->dst_ip6[0], sk->dst_ip6[1], sk->dst_ip6[2], sk->dst_ip6[3] };

		__builtin_memcpy(key.addr, ip, 16);
		key.family = AF_INET6;
	}
	origin = bpf_map_lookup_elem(&redirects, &key);
	if (!origin) {
		count(FT_EGRESS_UNKNOWN);
		return 1;
	}
	return answer(ctx, origin);
}
