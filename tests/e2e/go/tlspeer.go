// tlspeer: the Go HTTPS peer of the e2e tests (crypto/tls in the executable).
//
//	tlspeer server CERT KEY            HTTPS on 127.0.0.1:0 (HTTP/2 and HTTP/1.1 by ALPN);
//	                                   GET /items/N answers N bytes, POST echoes "echo:"+body
//	tlspeer client CA URL N PROTO GO [STOP]
//	                                   waits for the file GO, then GETs URL N times on one
//	                                   connection (PROTO h1 or h2; h1-new: a connection
//	                                   each), checking each body; stops early once the
//	                                   file STOP exists
//
//	tlspeer getpost CA BASE GO         waits for the file GO, then GETs BASE/items/9 and
//	                                   POSTs "hello go" to BASE/v1/echo, on one connection
//	tlspeer bench CA URL SECONDS PROTO GETs URL on one connection for SECONDS (bench/)
//
// Each prints JSON status lines on stdout, like tests/e2e/peer.py.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

func say(event string, fields map[string]any) {
	out := map[string]any{"event": event, "pid": os.Getpid()}
	for k, v := range fields {
		out[k] = v
	}
	line, _ := json.Marshal(out)
	fmt.Println(string(line))
}

func body(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i % 251)
	}
	return b
}

func serve(cert, key string) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	say("listening", map[string]any{"port": ln.Addr().(*net.TCPAddr).Port})
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			in, _ := io.ReadAll(r.Body)
			w.Header().Set("Content-Type", "text/plain")
			w.WriteHeader(http.StatusCreated)
			w.Write(append([]byte("echo:"), in...))
			return
		}
		n, _ := strconv.Atoi(r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:])
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(body(n))
	})
	srv := &http.Server{Handler: handler}
	if err := srv.ServeTLS(ln, cert, key); err != nil {
		panic(err)
	}
}

// newTransport trusts the CA in the file ca and speaks proto: h2, h1, or h1-new (a new
// connection, and TLS handshake, for every request).
func newTransport(ca, proto string) *http.Transport {
	pem, err := os.ReadFile(ca)
	if err != nil {
		panic(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	transport := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: proto == "h2"}
	if proto != "h2" {
		transport.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	transport.DisableKeepAlives = proto == "h1-new"
	return transport
}

// waitFor returns once the file exists (the test's trigger; the process exits at 120 s).
func waitFor(path string) {
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func client(ca, url string, count int, proto, goFile, stopFile string) {
	transport := newTransport(ca, proto)
	waitFor(goFile)
	c := &http.Client{Transport: transport, Timeout: 20 * time.Second}
	want := body(0)
	if i := strings.LastIndex(url, "/"); i >= 0 {
		n, _ := strconv.Atoi(url[i+1:])
		want = body(n)
	}
	done := 0
	for ; done < count; done++ {
		if stopFile != "" {
			if _, err := os.Stat(stopFile); err == nil {
				break
			}
		}
		resp, err := c.Get(url)
		if err != nil {
			panic(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !bytes.Equal(got, want) {
			panic(fmt.Sprintf("request %d: status %d, %d bytes", done, resp.StatusCode, len(got)))
		}
	}
	say("done", map[string]any{"requests": done, "proto": proto})
}

// getpost: one GET and one POST on one keep-alive connection, each answer reported.
func getpost(ca, base, goFile string) {
	c := &http.Client{Transport: newTransport(ca, "h1"), Timeout: 20 * time.Second}
	waitFor(goFile)
	for _, post := range []bool{false, true} {
		var resp *http.Response
		var err error
		if post {
			resp, err = c.Post(base+"/v1/echo", "text/plain", strings.NewReader("hello go"))
		} else {
			resp, err = c.Get(base + "/items/9")
		}
		if err != nil {
			panic(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		say("response", map[string]any{"status": resp.StatusCode, "body": got})
	}
	say("done", nil)
}

// bench: GETs URL on one keep-alive connection for SECONDS, then prints the rate.
func bench(ca, url string, seconds int, proto string) {
	c := &http.Client{Transport: newTransport(ca, proto)}
	deadline := time.Now().Add(time.Duration(seconds) * time.Second)
	start := time.Now()
	n := 0
	for time.Now().Before(deadline) {
		resp, err := c.Get(url)
		if err != nil {
			panic(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		n++
	}
	elapsed := time.Since(start).Seconds()
	say("rate", map[string]any{"requests": n, "seconds": elapsed, "rate": float64(n) / elapsed})
}

func main() {
	time.AfterFunc(120*time.Second, func() { os.Exit(3) })
	switch os.Args[1] {
	case "server":
		serve(os.Args[2], os.Args[3])
	case "getpost":
		getpost(os.Args[2], os.Args[3], os.Args[4])
	case "bench":
		secs, _ := strconv.Atoi(os.Args[4])
		bench(os.Args[2], os.Args[3], secs, os.Args[5])
	case "client":
		n, _ := strconv.Atoi(os.Args[4])
		stop := ""
		if len(os.Args) > 7 {
			stop = os.Args[7]
		}
		client(os.Args[2], os.Args[3], n, os.Args[5], os.Args[6], stop)
	}
}
