/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Record layouts shared by the BPF programs and the Python decoder.
 *
 * This header is the single source of truth: Python never restates these
 * layouts, it reads offsets and sizes from the BTF that clang emits for them
 * into the compiled object (src/flowtap/loader/btf.py). Every struct and enum
 * here is anchored in sensor/maps.bpf.c so that its BTF is always present.
 */
#ifndef FLOWTAP_H
#define FLOWTAP_H

#define FT_COMM_LEN 16
#define FT_SNIFF_LEN 512
#define FT_PATH_LEN 256
#define FT_ARGS_LEN 512
#define FT_CGROUP_NAME_LEN 128
#define FT_DATA_LEN 4096 /* payload bytes per data event */

enum ft_event_kind {
	FT_EVENT_CONN_OPEN = 1,
	FT_EVENT_CONN_CLOSE = 2,
	FT_EVENT_EXEC = 3,
	FT_EVENT_EXIT = 4,
	FT_EVENT_DATA = 5,
	FT_EVENT_FORK = 6, /* a traced process forked (only when userspace asks for them) */
};

enum ft_direction {
	FT_DIR_EGRESS = 1,
	FT_DIR_INGRESS = 2,
};

/* --direction egress-internal / egress-external: outbound connections by their peer. */
enum ft_egress_scope {
	FT_EGRESS_ALL = 0,
	FT_EGRESS_INTERNAL = 1, /* private, loopback, link-local, CGNAT peers only */
	FT_EGRESS_EXTERNAL = 2, /* every other peer */
};

enum ft_flow {
	FT_FLOW_TX = 1,
	FT_FLOW_RX = 2,
};

/* Where a data event's bytes were seen. */
enum ft_source {
	FT_SOURCE_SOCKET = 1, /* the socket syscall's user buffer: what went on the wire */
	FT_SOURCE_OPENSSL = 2, /* SSL_read/SSL_write's buffer: TLS plaintext */
	FT_SOURCE_GOTLS = 3, /* Go crypto/tls (*Conn).Read/Write's buffer: TLS plaintext */
	FT_SOURCE_JAVA = 4, /* the JVM agent's SSLSocket/SSLEngine plaintext (javatls.bpf.c) */
};

/* Indexes of the per-CPU counters map; userspace sums them across CPUs. */
enum ft_counter {
	FT_CNT_RINGBUF_FULL = 0,
	FT_CNT_CONN_TABLE_FULL = 1,
	FT_CNT_SNIFF_READ_FAILED = 2,
	FT_CNT_PID_TABLE_FULL = 3,
	FT_CNT_INGRESS_UNATTRIBUTED = 4, /* accepted, closed unused, listener unknown */
	FT_CNT_LISTENER_TABLE_FULL = 5,
	FT_CNT_PAYLOAD_READ_FAILED = 6, /* payload bytes not copied: userspace sees a gap */
	FT_CNT_TLS_UNATTRIBUTED = 7, /* TLS plaintext whose socket is unknown (memory BIOs) */
	FT_CNT_TLS_CALLS_FULL = 8, /* an SSL call not followed: no memory for its state */
	FT_CNT_PAYLOAD_SHED = 9, /* payload not copied: the ring buffer is kept for connections */
	FT_CNT_GO_CONN_UNRESOLVED = 10, /* a Go tls.Conn not over a *net.TCPConn: not walked */
	FT_CNT_STRATEGY_TABLE_FULL = 11, /* a QPOINT_STRATEGY not stored: process observed */
	/* Connections, not events: a connection whose open or close event found no room. */
	FT_CNT_CONN_OPEN_LOST = 12, /* its open event was lost (open record made at close) */
	FT_CNT_CONN_CLOSE_LOST = 13, /* its close event was lost (bytes and end unknown) */
	FT_CNT_CONN_UNREPORTED = 14, /* close lost and no open delivered: no record at all */
	FT_CNT_JAVA_UNRESOLVED = 15, /* a JVM's plaintext not tied to a socket (agent or kernel) */
	FT_CNT_MAX = 16,
};

/* Settings written by the loader into .rodata before the object is loaded. */
struct ft_config {
	__u32 self_tgid;
	__u8 filter_pids;
	__u8 filter_cgroup;
	__u8 trace_egress;
	__u8 trace_ingress;
	__u8 include_loopback;
	__u8 capture_payload; /* copy HTTP connections' bytes for the parsers */
	__u8 egress_scope; /* enum ft_egress_scope: which outbound peers (--direction) */
	__u8 pad;
	__u32 wakeup_bytes; /* wake the consumer once this much is waiting; it polls otherwise */
	__u32 payload_limit_bytes; /* no payload copied while this much is waiting */
	__u8 notify_forks; /* send fork events of traced processes (per-process TLS probes) */
	__u8 pad2[3];
	__u32 features; /* enum ft_feature bits: what this kernel offers (sensor/compat.h) */
	__u32 thread_size; /* the kernel's THREAD_SIZE, where bpf_task_pt_regs is missing */
};

/* What the running kernel offers, probed by userspace (loader/features.py) before load. */
enum ft_feature {
	FT_FEATURE_TASK_BTF = 1 << 0, /* bpf_get_current_task_btf (5.11) */
	FT_FEATURE_TASK_STORAGE = 1 << 1, /* task storage in tracing programs (5.11) */
	FT_FEATURE_TASK_PT_REGS = 1 << 2, /* bpf_task_pt_regs (5.15) */
	FT_FEATURE_SOCKET_COOKIE = 1 << 3, /* bpf_get_socket_cookie in tracing programs (5.12) */
};

/* Who did it: the thread that opened the connection or ran the exec. */
struct ft_task {
	__u32 pid; /* thread group id, i.e. the process */
	__u32 tid;
	__u32 uid;
	__u32 pad;
	char comm[FT_COMM_LEN];
};

struct ft_header {
	__u32 kind; /* enum ft_event_kind */
	__u32 pad;
	__u64 timestamp_ns; /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
};

/*
 * One connection's identity: a TCP connection, or the UDP socket a program sends DNS
 * queries from. Addresses are IPv4 in the first 4 bytes, or IPv6.
 */
struct ft_conn {
	__u64 conn_id;
	__u64 start_ns;
	__u16 family; /* AF_INET or AF_INET6 */
	__u8 protocol; /* IPPROTO_TCP, or IPPROTO_UDP for DNS */
	__u8 direction; /* enum ft_direction */
	__u16 local_port;
	__u16 remote_port;
	__u8 local_addr[16];
	__u8 remote_addr[16];
};

/* Sent when a TCP connection is established (a UDP DNS flow: at its first query). */
struct ft_conn_open_event {
	struct ft_header hdr;
	struct ft_task task;
	struct ft_conn conn;
};

/* The first bytes a connection moved, for protocol detection and the TLS SNI. */
struct ft_sniff {
	__u32 flow; /* enum ft_flow: which way they went; 0: none seen yet */
	__u32 length; /* bytes valid in data */
	__u8 data[FT_SNIFF_LEN];
};

struct ft_conn_close_event {
	struct ft_header hdr;
	struct ft_task task;
	struct ft_conn conn;
	__u64 bytes_sent;
	__u64 bytes_received;
	__s32 sock_error; /* sk_err at close: ECONNREFUSED, ETIMEDOUT, ECONNRESET, ... */
	__u8 old_state; /* TCP state before CLOSE */
	__u8 established; /* reached ESTABLISHED at least once */
	__u8 open_emitted; /* an open event was sent before this one */
	__u8 open_lost; /* ... but found the ring buffer full */
	struct ft_sniff sniff;
};

/*
 * Value of the conns map (key: struct sock pointer); also read at exit for open
 * connections. A TCP socket that reached CLOSE stays here, with closed set, until the
 * kernel destroys it: the program may still read data that arrived before the end.
 */
struct ft_conn_state {
	struct ft_task task;
	struct ft_conn conn;
	__u64 bytes_sent;
	__u64 bytes_received;
	__u64 close_ns; /* when TCP reached CLOSE; 0 while open */
	__s32 sock_error; /* sk_err at CLOSE */
	__u8 established;
	__u8 open_emitted;
	__u8 closed;
	__u8 close_old_state; /* TCP state before CLOSE */
	/* Claimed with compare-and-swap (32-bit: BPF atomics), since CPUs race for them. */
	__u32 owner_pending; /* ingress: task is the listener's until the acceptor shows up */
	__u32 finished; /* the close event went out (or is going out) */
	__u8 listener_traced; /* ingress: the listener's owner passes the filters */
	__u8 capture; /* its first bytes look like HTTP: copy its payload */
	__u8 tls; /* TLS plaintext seen through the OpenSSL probes: ciphertext is not copied */
	__u8 open_lost; /* its open event found the ring buffer full */
	__u64 cookie; /* socket cookie: tells a reused struct sock from the one tracked */
	__u32 datagrams_sent; /* UDP (DNS): queries and answers, to end the exchange */
	__u32 datagrams_received;
	__u64 tls_sent; /* plaintext positions: bytes through SSL_write / SSL_read so far */
	__u64 tls_received;
	struct ft_sniff sniff; /* last: only what is before sniff.data is zeroed */
};

/* Key of the listeners map: containers each have their own port 80. */
struct ft_listener_key {
	__u32 netns; /* inode number of the network namespace */
	__u32 port;
};

/*
 * Value of the listeners map: who listens there, so an incoming connection can be
 * attributed and filtered in softirq, before any process touches it.
 */
struct ft_listener {
	struct ft_task task;
	__u64 sk; /* the listening socket: only its own close removes the entry */
	__u8 traced; /* the owner passes the filters */
	__u8 pad[7];
};

/*
 * A piece of a connection's payload in one direction. position is the offset of data[0]
 * in that direction's byte stream (its bytes_sent or bytes_received before the call), so
 * userspace reassembles exactly and sees every gap.
 */
struct ft_data_event {
	struct ft_header hdr;
	__u64 conn_id;
	__u64 position;
	__u32 flow; /* enum ft_flow */
	__u32 length; /* bytes valid in data */
	__u32 source; /* enum ft_source: positions count per source */
	__u32 skipped; /* bytes at position not copied as userspace asked (length is 0) */
	__u8 data[FT_DATA_LEN];
};

/*
 * Value of the payload_skips map (key: conn_id), written by userspace: the bytes of each
 * direction before these positions are not copied (a body past the capture limit); a call
 * that ends at or before its mark sends a data event with only its length, in skipped.
 */
struct ft_payload_skip {
	__u64 tx_until;
	__u64 rx_until;
};

struct ft_exec_event {
	struct ft_header hdr;
	struct ft_task task;
	__u32 ppid;
	__u32 args_length; /* bytes valid in args: NUL-separated argv */
	__u64 cgroup_id;
	char filename[FT_PATH_LEN];
	char cgroup_name[FT_CGROUP_NAME_LEN];
	char args[FT_ARGS_LEN];
};

struct ft_exit_event {
	struct ft_header hdr;
	struct ft_task task;
};

/*
 * Key of the go_executables map: a Go executable by the inode of its file, as the kernel
 * sees it (mm->exe_file). dev is the kernel's dev_t: major << 20 | minor.
 */
struct ft_go_executable_key {
	__u64 ino;
	__u32 dev;
	__u32 pad;
};

/* How to walk from a *tls.Conn to its socket's fd in that executable (userspace fills it
 * in from the symbol table and the offsets of its Go version). */
struct ft_go_executable {
	__u64 itab_tcpconn; /* address of the itab *net.TCPConn -> net.Conn */
	__u32 conn_offset; /* tls.Conn.conn (a net.Conn interface) */
	__u32 fd_offset; /* net.TCPConn -> its *netFD */
	__u32 sysfd_offset; /* netFD -> pfd.Sysfd */
	__u32 pad;
};

/* task is the new process (its first thread); parent_pid the process that forked it. */
struct ft_fork_event {
	struct ft_header hdr;
	struct ft_task task;
	__u32 parent_pid;
	__u32 pad;
};

/*
 * Egress controller (egress.bpf.c, strategy.h): per-process strategy from the environment
 * and the original destination of each connection redirected to the proxy.
 */
#define FT_MAX_STRATEGIES 65536
#define FT_ENV_MAX_BYTES 32768 /* environment bytes searched at exec */
#define FT_STRATEGY_NAME_LEN 16 /* strlen("QPOINT_STRATEGY=") */
#define FT_MAX_REDIRECTS 65536

enum ft_strategy {
	FT_STRATEGY_OBSERVE = 0, /* absent: observed only */
	FT_STRATEGY_FORWARD = 1, /* outbound TCP goes through the egress proxy */
	FT_STRATEGY_IGNORE = 2, /* never captured */
};

/* Settings of the egress object, written into its .rodata before load. */
struct ft_egress_config {
	__u32 proxy_tgid; /* the proxy's own connections are never redirected */
	__u16 proxy_port; /* network order: the transparent listener on 127.0.0.1 and ::1 */
	__u16 pad;
};

/* Key of a redirected connection as the proxy sees it: the client's address and port. */
struct ft_egress_key {
	__u8 addr[16]; /* IPv4 in the first 4 bytes */
	__u16 port; /* network order */
	__u16 family; /* AF_INET or AF_INET6 */
};

/* Where a redirected connection was going, and who made it. */
struct ft_egress_origin {
	__u8 addr[16]; /* IPv4 in the first 4 bytes */
	__u16 port; /* network order */
	__u16 family;
	__u32 pid; /* tgid of the process that connected */
};

/* Indexes of the egress object's per-CPU counters. */
enum ft_egress_counter {
	FT_EGRESS_REDIRECTED = 0, /* connects rewritten to the proxy */
	FT_EGRESS_TABLE_FULL = 1, /* an original destination not stored: connect refused */
	FT_EGRESS_ANSWERED = 2, /* SO_ORIGINAL_DST answered */
	FT_EGRESS_UNKNOWN = 3, /* SO_ORIGINAL_DST asked for a connection not redirected */
	FT_EGRESS_MAX = 4,
};

#endif /* FLOWTAP_H */
