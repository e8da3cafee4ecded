// SPDX-License-Identifier: Apache-2.0
/*
 * Loopback TCP load for flowtap's benchmarks (bench/capacity.py, bench/slowdown.py).
 * Compiled at run time by bench/common.py; talks to 127.0.0.1 only, and every loop
 * is bounded in count and time (each process also arms alarm() as a last resort).
 *
 *   loadgen conn [options]      short connections: connect, send SIZE bytes, receive
 *                               SIZE bytes, close; CLIENTS processes paced to RATE
 *                               conn/s in total (0: as fast as possible) for SECONDS,
 *                               against SERVERS accepting processes on PORTS ports.
 *   loadgen pingpong [options]  one connection, COUNT round trips of SIZE bytes.
 *   loadgen syscalls [options]  COUNT getppid() system calls (no socket at all): what
 *                               any process pays per system call while syscall
 *                               tracepoints are attached.
 *
 * Options: -r RATE -d SECONDS -c CLIENTS -s SERVERS -p PORTS -b SIZE -n COUNT
 *          -m MAX_CONNS (total bound) -g CGROUP_PROCS_FILE (join before forking)
 *          -a CPU (pin every process to this CPU; -1: no pinning)
 * Prints one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 64
#define MAX_PROCS 256

struct options {
	double rate;
	double seconds;
	int clients;
	int servers;
	int ports;
	int size;
	long count;
	long max_conns;
	const char *cgroup_procs;
	int cpu;
};

struct client_result {
	long ok;
	long errors;
	long first_errno;
	double last_done;
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_until(double when)
{
	struct timespec ts;

	ts.tv_sec = (time_t)when;
	ts.tv_nsec = (long)((when - (double)ts.tv_sec) * 1e9);
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static void die(const char *what)
{
	fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
	exit(2);
}

static int io_all(int fd, char *buf, int len, int sending)
{
	int done = 0;

	while (done < len) {
		ssize_t n = sending ? send(fd, buf + done, (size_t)(len - done), MSG_NOSIGNAL)
				    : recv(fd, buf + done, (size_t)(len - done), 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		done += (int)n;
	}
	return 0;
}

static void join_cgroup(const char *procs)
{
	FILE *f;

	if (!procs)
		return;
	f = fopen(procs, "w");
	if (!f)
		die("open cgroup.procs");
	if (fprintf(f, "%d\n", getpid()) < 0 || fclose(f) != 0)
		die("join cgroup");
}

static void pin(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set))
		die("sched_setaffinity");
}

static int listen_loopback(int *port)
{
	struct sockaddr_in addr = {.sin_family = AF_INET};
	socklen_t len = sizeof(addr);
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) || listen(fd, 4096))
		die("bind/listen 127.0.0.1");
	if (getsockname(fd, (struct sockaddr *)&addr, &len))
		die("getsockname");
	*port = ntohs(addr.sin_port);
	return fd;
}

static int connect_loopback(int port)
{
	struct sockaddr_in addr = {.sin_family = AF_INET};
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		return -1;
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	addr.sin_port = htons((unsigned short)port);
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr))) {
		int saved = errno;

		close(fd);
		errno = saved;
		return -1;
	}
	return fd;
}

/* Accepts and answers connections on one port until killed (or the alarm fires). */
static void serve_short(int listener, int size, unsigned int lifetime_s)
{
	char buf[65536];

	alarm(lifetime_s);
	for (;;) {
		int fd = accept(listener, NULL, NULL);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			_exit(3);
		}
		if (io_all(fd, buf, size, 0) == 0)
			io_all(fd, buf, size, 1);
		close(fd);
	}
}

static void run_client(const struct options *o, int index, const int *ports, double t0,
		       struct client_result *res)
{
	char buf[65536];
	double interval = o->rate > 0 ? (double)o->clients / o->rate : 0;
	double next = t0 + (o->rate > 0 ? (double)index / o->rate : 0);
	double end = t0 + o->seconds;
	long budget = (o->max_conns + o->clients - 1) / o->clients;
	long k;

	memset(buf, 'q', sizeof(buf));
	alarm((unsigned int)o->seconds + 30);
	sleep_until(t0);
	for (k = 0; k < budget; k++) {
		double t = now_s();
		int fd;

		if (t >= end)
			break;
		if (interval > 0) {
			if (next >= end)
				break;
			if (next > t)
				sleep_until(next);
			next += interval;
		}
		fd = connect_loopback(ports[(index + k) % o->ports]);
		if (fd < 0 || io_all(fd, buf, o->size, 1) || io_all(fd, buf, o->size, 0)) {
			if (!res->first_errno)
				res->first_errno = errno;
			res->errors++;
			if (fd >= 0)
				close(fd);
			continue;
		}
		close(fd);
		res->ok++;
		res->last_done = now_s();
	}
}

static int run_conn(const struct options *o)
{
	int listeners[MAX_PORTS], ports[MAX_PORTS];
	pid_t servers[MAX_PROCS], clients[MAX_PROCS];
	struct client_result *results;
	long ok = 0, errors = 0, first_errno = 0;
	double t0, last = 0;
	int i;

	results = mmap(NULL, sizeof(*results) * (size_t)o->clients, PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (results == MAP_FAILED)
		die("mmap");
	memset(results, 0, sizeof(*results) * (size_t)o->clients);
	for (i = 0; i < o->ports; i++)
		listeners[i] = listen_loopback(&ports[i]);
	for (i = 0; i < o->servers; i++) {
		servers[i] = fork();
		if (servers[i] < 0)
			die("fork");
		if (servers[i] == 0)
			serve_short(listeners[i % o->ports], o->size, (unsigned int)o->seconds + 40);
	}
	t0 = now_s() + 0.05;
	for (i = 0; i < o->clients; i++) {
		clients[i] = fork();
		if (clients[i] < 0)
			die("fork");
		if (clients[i] == 0) {
			run_client(o, i, ports, t0, &results[i]);
			_exit(0);
		}
	}
	for (i = 0; i < o->clients; i++)
		waitpid(clients[i], NULL, 0);
	/* Every answer was received, so the servers are at most one close() from done. */
	usleep(200000);
	for (i = 0; i < o->servers; i++)
		kill(servers[i], SIGTERM);
	for (i = 0; i < o->servers; i++)
		waitpid(servers[i], NULL, 0);
	for (i = 0; i < o->clients; i++) {
		ok += results[i].ok;
		errors += results[i].errors;
		if (!first_errno)
			first_errno = results[i].first_errno;
		if (results[i].last_done > last)
			last = results[i].last_done;
	}
	if (last <= t0)
		last = now_s();
	printf("{\"mode\": \"conn\", \"ok\": %ld, \"errors\": %ld, \"first_errno\": %ld, "
	       "\"elapsed_s\": %.6f, \"rate\": %.1f, \"target_rate\": %.1f, \"clients\": %d, "
	       "\"servers\": %d, \"ports\": %d, \"size\": %d, \"port0\": %d}\n",
	       ok, errors, first_errno, last - t0, (double)ok / (last - t0), o->rate, o->clients,
	       o->servers, o->ports, o->size, ports[0]);
	return 0;
}

static int run_pingpong(const struct options *o)
{
	char buf[65536];
	int port, listener = listen_loopback(&port);
	struct sockaddr_in local;
	socklen_t len = sizeof(local);
	double t0, t1, end;
	long done = 0;
	int fd, one = 1, status = 0;
	pid_t server;

	memset(buf, 'p', sizeof(buf));
	server = fork();
	if (server < 0)
		die("fork");
	if (server == 0) {
		alarm((unsigned int)o->seconds + 30);
		fd = accept(listener, NULL, NULL);
		if (fd < 0)
			_exit(3);
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		while (io_all(fd, buf, o->size, 0) == 0)
			if (io_all(fd, buf, o->size, 1))
				_exit(4);
		close(fd);
		_exit(0);
	}
	alarm((unsigned int)o->seconds + 30);
	close(listener);
	fd = connect_loopback(port);
	if (fd < 0)
		die("connect");
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	getsockname(fd, (struct sockaddr *)&local, &len);
	t0 = now_s();
	end = t0 + o->seconds;
	while (done < o->count) {
		if ((done & 1023) == 0 && now_s() >= end)
			break;
		if (io_all(fd, buf, o->size, 1) || io_all(fd, buf, o->size, 0))
			die("ping-pong");
		done++;
	}
	t1 = now_s();
	close(fd);
	waitpid(server, &status, 0);
	printf("{\"mode\": \"pingpong\", \"round_trips\": %ld, \"size\": %d, "
	       "\"bytes_each_way\": %ld, \"elapsed_s\": %.6f, \"client_port\": %d, "
	       "\"server_port\": %d, \"server_status\": %d}\n",
	       done, o->size, done * o->size, t1 - t0, ntohs(local.sin_port), port, status);
	return 0;
}

static int run_syscalls(const struct options *o)
{
	double t0 = now_s(), t1, end = t0 + o->seconds;
	long done = 0;

	while (done < o->count) {
		if ((done & 4095) == 0 && now_s() >= end)
			break;
		syscall(SYS_getppid);
		done++;
	}
	t1 = now_s();
	printf("{\"mode\": \"syscalls\", \"calls\": %ld, \"elapsed_s\": %.6f, \"rate\": %.1f}\n",
	       done, t1 - t0, (double)done / (t1 - t0));
	return 0;
}

int main(int argc, char **argv)
{
	struct options o = {.rate = 0, .seconds = 5, .clients = 1, .servers = 1, .ports = 1,
			    .size = 100, .count = 100000, .max_conns = 10000000, .cpu = -1};
	const char *mode;
	int opt;

	if (argc < 2) {
		fprintf(stderr, "usage: loadgen conn|pingpong [options]\n");
		return 2;
	}
	mode = argv[1];
	optind = 2;
	while ((opt = getopt(argc, argv, "r:d:c:s:p:b:n:m:g:a:")) != -1) {
		switch (opt) {
		case 'r': o.rate = atof(optarg); break;
		case 'd': o.seconds = atof(optarg); break;
		case 'c': o.clients = atoi(optarg); break;
		case 's': o.servers = atoi(optarg); break;
		case 'p': o.ports = atoi(optarg); break;
		case 'b': o.size = atoi(optarg); break;
		case 'n': o.count = atol(optarg); break;
		case 'm': o.max_conns = atol(optarg); break;
		case 'g': o.cgroup_procs = optarg; break;
		case 'a': o.cpu = atoi(optarg); break;
		default: return 2;
		}
	}
	if (o.clients < 1 || o.clients > MAX_PROCS || o.servers < 1 || o.servers > MAX_PROCS ||
	    o.ports < 1 || o.ports > MAX_PORTS || o.servers < o.ports || o.size < 1 ||
	    o.size > 65536 || o.seconds <= 0 || o.seconds > 600 || o.count < 1 || o.max_conns < 1) {
		fprintf(stderr, "loadgen: option out of range\n");
		return 2;
	}
	join_cgroup(o.cgroup_procs);
	pin(o.cpu);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (strcmp(mode, "conn") == 0)
		return run_conn(&o);
	if (strcmp(mode, "pingpong") == 0)
		return run_pingpong(&o);
	if (strcmp(mode, "syscalls") == 0)
		return run_syscalls(&o);
	fprintf(stderr, "loadgen: unknown mode %s\n", mode);
	return 2;
}
