// HTTP/2 (TLS, ALPN h2) test server for the Java agent self-test: GET -> SIZE bytes, POST -> its length.
// Usage: node h2_server.js PORT CERT KEY SIZE (loopback only; stop it by its pid).
const http2 = require('http2');
const fs = require('fs');
const [port, cert, key, size] = process.argv.slice(2);
const server = http2.createSecureServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) });
server.on('stream', (stream, headers) => {
  let n = 0;
  stream.on('data', (d) => { n += d.length; });
  stream.on('end', () => {
    const body = headers[':method'] === 'GET' ? Buffer.alloc(Number(size), 'h') : Buffer.from('got ' + n);
    stream.respond({ ':status': 200, 'content-length': body.length });
    stream.end(body);
  });
});
server.listen(Number(port), '127.0.0.1');
