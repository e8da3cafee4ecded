// Node.js HTTPS peers for the e2e tests: `node node_peer.js MODE ...`.
//
// Clients wait for GO (a file the test creates once the sensor is ready) and trust the
// test CA through NODE_EXTRA_CA_CERTS. Every line on stdout is a JSON status message.
//
// request URL GO         https.request: POST "hello node" to URL, then GET URL2 (URL with
//                        /items/7) on the same keep-alive connection
// sequential URL GO      ROUNDS POSTs of "new<i>", each on a new connection (agent: false)
// bench URL SECONDS GO   GET URL on one keep-alive connection for SECONDS; prints
//                        "result" with the rate (bench/slowdown.py, node-tls)
// get URL GO             https.get (the global agent): GET URL
// fetch URL GO           fetch (undici): POST "hello fetch" to URL
// h2 URL GO              http2.connect: GET /items/7, then POST "hello h2" to URL's path
// two URL1 URL2 GO       two keep-alive connections, one per server, requests on both at
//                        once, ROUNDS times: POST "a<i>" to URL1 and "b<i>" to URL2
// server CERT KEY        https.createServer on 127.0.0.1: POST answers 201
//                        "node-echo:" + body, GET /items/N N bytes "y"; prints
//                        "listening" with its port
'use strict';
const fs = require('fs');
const https = require('https');
const http2 = require('http2');

const ROUNDS = 5;

function say(event, fields) {
  console.log(JSON.stringify({ event, pid: process.pid, ...fields }));
}

function whenGo(go, start) {
  (function wait() { fs.existsSync(go) ? start() : setTimeout(wait, 10); })();
}

// One https.request on agent; resolves with status, body and the local port.
function send(agent, url, method, body) {
  return new Promise((resolve, reject) => {
    const headers = body === undefined ? {} : { 'content-type': 'text/plain' };
    const req = https.request(url, { method, agent, headers }, (res) => {
      const chunks = [];
      const localPort = res.socket.localPort; // the socket goes back to the agent at 'end'
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({
        status: res.statusCode,
        body: Buffer.concat(chunks).toString('latin1'),
        local_port: localPort,
      }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

const modes = {
  async request(url) {
    const agent = new https.Agent({ keepAlive: true, maxSockets: 1 });
    const posted = await send(agent, url, 'POST', 'hello node');
    say('response', posted);
    const got = await send(agent, new URL('/items/7', url), 'GET');
    say('response', { ...got, body: got.body.length });
    agent.destroy();
  },
  async sequential(url) {
    for (let i = 0; i < ROUNDS; i++) {
      say('response', await send(false, url, 'POST', `new${i}`)); // a new connection each
    }
  },
  async bench(url, seconds) {
    const agent = new https.Agent({ keepAlive: true, maxSockets: 1 });
    const start = process.hrtime.bigint();
    const end = Date.now() + Number(seconds) * 1000;
    let requests = 0;
    while (Date.now() < end) {
      const got = await send(agent, url, 'GET');
      if (got.status !== 200) throw new Error(`status ${got.status}`);
      requests++;
    }
    const elapsed = Number(process.hrtime.bigint() - start) / 1e9;
    say('result', { rate: requests / elapsed, requests });
    agent.destroy();
  },
  async get(url) {
    const got = await new Promise((resolve, reject) => {
      https.get(url, (res) => {
        const chunks = [];
        const localPort = res.socket.localPort;
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve({
          status: res.statusCode,
          body: Buffer.concat(chunks).toString('latin1'),
          local_port: localPort,
        }));
      }).on('error', reject);
    });
    say('response', got);
  },
  async fetch(url) {
    const res = await fetch(url, { method: 'POST', body: 'hello fetch' });
    say('response', { status: res.status, body: await res.text() });
  },
  async h2(url) {
    const session = http2.connect(new URL(url).origin);
    const one = (headers, body) => new Promise((resolve, reject) => {
      const stream = session.request(headers);
      const chunks = [];
      let status = 0;
      stream.on('response', (h) => { status = h[':status']; });
      stream.on('data', (c) => chunks.push(c));
      stream.on('end', () => resolve({ status, body: Buffer.concat(chunks).toString('latin1') }));
      stream.on('error', reject);
      stream.end(body);
    });
    const got = await one({ ':path': '/items/7' });
    say('response', { ...got, body: got.body.length, local_port: session.socket.localPort });
    say('response', await one({ ':method': 'POST', ':path': new URL(url).pathname }, 'hello h2'));
    session.close();
  },
  async two(url1, url2) {
    const agents = [1, 2].map(() => new https.Agent({ keepAlive: true, maxSockets: 1 }));
    for (let i = 0; i < ROUNDS; i++) {
      const [a, b] = await Promise.all([
        send(agents[0], url1, 'POST', `a${i}`),
        send(agents[1], url2, 'POST', `b${i}`),
      ]);
      say('response', { url: url1, ...a });
      say('response', { url: url2, ...b });
    }
    agents.forEach((agent) => agent.destroy());
  },
};

function server(cert, key) {
  const srv = https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) },
    (req, res) => {
      const chunks = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        const body = Buffer.concat(chunks).toString('latin1');
        const items = /^\/items\/(\d+)$/.exec(req.url);
        res.writeHead(req.method === 'POST' ? 201 : 200, { 'content-type': 'text/plain' });
        if (req.method === 'POST') res.end(`node-echo:${body}`);
        else res.end(items ? 'y'.repeat(Number(items[1])) : 'node says hi');
      });
    });
  srv.keepAliveTimeout = 30000;
  srv.listen(0, '127.0.0.1', () => say('listening', { port: srv.address().port }));
  setTimeout(() => process.exit(0), 60000).unref();
}

const [mode, ...args] = process.argv.slice(2);
if (mode === 'server') {
  server(...args);
} else {
  const go = args.pop();
  whenGo(go, () => modes[mode](...args).then(
    () => say('done', {}),
    (err) => { say('error', { message: String(err && err.stack || err) }); process.exit(1); },
  ));
}
