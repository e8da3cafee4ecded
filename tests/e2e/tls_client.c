/*
 * A TLS client linked statically against libssl.a: OpenSSL lives in the executable, so
 * the sensor must find SSL_read/SSL_write there. Usage: tls_client PORT CAFILE PATH GO.
 * Waits for the file GO, sends "GET PATH" on 127.0.0.1:PORT, reads the whole answer
 * (Connection: close), and prints {"event": "done", "received": N}.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int fail(const char *what)
{
	fprintf(stderr, "tls_client: %s\n", what);
	ERR_print_errors_fp(stderr);
	return 1;
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	char request[512], buf[16384];
	long received = 0;
	SSL_CTX *ctx;
	SSL *ssl;
	int fd, n, waited;

	if (argc != 5)
		return fail("usage: tls_client PORT CAFILE PATH GO");
	for (waited = 0; access(argv[4], F_OK) != 0; waited++) {
		if (waited > 3000)
			return fail("no go file");
		usleep(10000);
	}
	addr.sin_port = htons(atoi(argv[1]));
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)))
		return fail("connect");
	ctx = SSL_CTX_new(TLS_client_method());
	if (!ctx || !SSL_CTX_load_verify_locations(ctx, argv[2], NULL))
		return fail("CA file");
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	ssl = SSL_new(ctx);
	SSL_set_fd(ssl, fd);
	SSL_set1_host(ssl, "127.0.0.1");
	if (SSL_connect(ssl) != 1)
		return fail("handshake");
	snprintf(request, sizeof(request),
		 "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nUser-Agent: static-client\r\n"
		 "Connection: close\r\n\r\n",
		 argv[3], argv[1]);
	if (SSL_write(ssl, request, strlen(request)) <= 0)
		return fail("write");
	while ((n = SSL_read(ssl, buf, sizeof(buf))) > 0)
		received += n;
	printf("{\"event\": \"done\", \"pid\": %d, \"received\": %ld}\n", getpid(), received);
	fflush(stdout);
	SSL_shutdown(ssl);
	SSL_free(ssl);
	SSL_CTX_free(ctx);
	close(fd);
	return 0;
}
