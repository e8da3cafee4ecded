/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * --direction egress-internal / egress-external (Qtap's tap.direction): an outbound
 * connection is internal when its peer is in a private, loopback, link-local or
 * carrier-grade NAT range, external otherwise. The same ranges are in
 * src/flowtap/tracking/scope.py, which applies them to the proxy's records.
 */
#ifndef FLOWTAP_SENSOR_SCOPE_H
#define FLOWTAP_SENSOR_SCOPE_H

#include "common.h"

static __always_inline bool ipv4_internal(const __u8 *a)
{
	return a[0] == 10 || a[0] == 127 || /* 10/8, 127/8 */
	       (a[0] == 172 && (a[1] & 0xf0) == 16) || /* 172.16/12 */
	       (a[0] == 192 && a[1] == 168) || /* 192.168/16 */
	       (a[0] == 169 && a[1] == 254) || /* 169.254/16 */
	       (a[0] == 100 && (a[1] & 0xc0) == 64); /* 100.64/10 */
}

static __always_inline bool is_internal(const struct ft_conn *conn)
{
	const __u8 *a = conn->remote_addr;
	bool zero = true;

	if (conn->family == AF_INET)
		return ipv4_internal(a);
	if ((a[0] & 0xfe) == 0xfc) /* fc00::/7, unique local */
		return true;
	if (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) /* fe80::/10, link-local */
		return true;
#pragma unroll
	for (int i = 0; i < 10; i++)
		zero = zero && a[i] == 0;
	if (!zero)
		return false;
	if (a[10] == 0xff && a[11] == 0xff) /* ::ffff:a.b.c.d */
		return ipv4_internal(a + 12);
	/* ::1 */
	return a[10] == 0 && a[11] == 0 && a[12] == 0 && a[13] == 0 && a[14] == 0 && a[15] == 1;
}

/* Whether an outbound connection to this peer is in the --direction's scope. */
static __always_inline bool egress_in_scope(const struct ft_conn *conn)
{
	if (cfg.egress_scope == FT_EGRESS_INTERNAL)
		return is_internal(conn);
	if (cfg.egress_scope == FT_EGRESS_EXTERNAL)
		return !is_internal(conn);
	return true;
}

#endif /* FLOWTAP_SENSOR_SCOPE_H */
