// HTTPS clients and a server for the Java TLS e2e tests (tests/e2e/test_java_tls.py).
// Compiled once with `javac --release 11`, run on every Java runtime under test. Prints one
// JSON line per event on stdout, as the Python peers do; trusts what javax.net.ssl.trustStore
// names. Usage:
//   TlsPeer client MODE URL GO_FILE|- COUNT INTERVAL_MS
//       MODE: http1 | http2 (java.net.http.HttpClient, one per JVM: one keep-alive connection),
//       http1-new (a new HttpClient, so a new connection, each round), urlconnection
//       (HttpsURLConnection).
//       Each round: a GET of URL, then a POST of "java-<round>" to URL.
//   TlsPeer bench URL SECONDS
//       java.net.http.HttpClient, HTTP/1.1 keep-alive GETs of URL for SECONDS (bench.slowdown):
//       prints {"event": "result", "rate": requests per second, "requests": N}.
//   TlsPeer server KEYSTORE PASSWORD
//       com.sun.net.httpserver.HttpsServer on 127.0.0.1: POST answers 201 "seen:" + body,
//       GET answers 200 "hello from java".
import com.sun.net.httpserver.HttpsConfigurator;
import com.sun.net.httpserver.HttpsServer;
import java.io.ByteArrayOutputStream;
import java.io.FileInputStream;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.URL;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.KeyStore;
import java.time.Duration;
import java.time.Instant;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;

public class TlsPeer {
    static long pid() {
        return ProcessHandle.current().pid();
    }

    // Milliseconds since this JVM started (its process's start time).
    static long sinceStart() {
        Instant start = ProcessHandle.current().info().startInstant().orElse(Instant.now());
        return Duration.between(start, Instant.now()).toMillis();
    }

    static void say(String event, String fields) {
        System.out.println("{\"event\": \"" + event + "\", \"pid\": " + pid()
                + (fields.isEmpty() ? "" : ", " + fields) + "}");
        System.out.flush();
    }

    static String quote(String text) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : text.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }

    static void waitFor(String path) throws InterruptedException {
        if (path.equals("-")) {
            return;
        }
        for (int i = 0; i < 3000 && !Files.exists(Paths.get(path)); i++) {
            Thread.sleep(10);
        }
    }

    static void response(String method, int round, int status, String body) {
        say("response", "\"method\": " + quote(method) + ", \"round\": " + round
                + ", \"status\": " + status + ", \"body\": " + quote(body)
                + ", \"ms_since_start\": " + sinceStart());
    }

    static void viaHttpClient(HttpClient.Version version, URI uri, int round, boolean fresh)
            throws Exception {
        HttpClient client = fresh ? HttpClient.newBuilder().version(version).build() : Client.get(version);
        HttpResponse<String> got = client.send(HttpRequest.newBuilder(uri).GET().build(),
                HttpResponse.BodyHandlers.ofString());
        response("GET", round, got.statusCode(), got.body());
        HttpRequest post = HttpRequest.newBuilder(uri)
                .header("Content-Type", "text/plain")
                .POST(HttpRequest.BodyPublishers.ofString("java-" + round))
                .build();
        HttpResponse<String> posted = client.send(post, HttpResponse.BodyHandlers.ofString());
        response("POST", round, posted.statusCode(), posted.body());
    }

    // One client per JVM: rounds reuse its connection (keep-alive), as applications do.
    static class Client {
        static HttpClient client;

        static HttpClient get(HttpClient.Version version) {
            if (client == null) {
                client = HttpClient.newBuilder().version(version).build();
            }
            return client;
        }
    }

    static String readAll(InputStream in) throws Exception {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] buffer = new byte[8192];
        for (int n; (n = in.read(buffer)) > 0; ) {
            out.write(buffer, 0, n);
        }
        return out.toString(StandardCharsets.UTF_8);
    }

    static void viaUrlConnection(URL url, int round) throws Exception {
        HttpURLConnection conn = (HttpURLConnection) url.openConnection();
        conn.setRequestMethod("POST");
        conn.setDoOutput(true);
        conn.setRequestProperty("Content-Type", "text/plain");
        try (OutputStream out = conn.getOutputStream()) {
            out.write(("java-" + round).getBytes(StandardCharsets.UTF_8));
        }
        int status = conn.getResponseCode();
        try (InputStream in = conn.getInputStream()) {
            response("POST", round, status, readAll(in));
        }
    }

    static void client(String[] args) throws Exception {
        String mode = args[1];
        String url = args[2];
        int count = Integer.parseInt(args[4]);
        int interval = Integer.parseInt(args[5]);
        say("waiting", "\"ms_since_start\": " + sinceStart());
        waitFor(args[3]);
        say("started", "\"ms_since_start\": " + sinceStart());
        for (int round = 0; round < count; round++) {
            if (round > 0) {
                Thread.sleep(interval);
            }
            switch (mode) {
                case "http1":
                    viaHttpClient(HttpClient.Version.HTTP_1_1, URI.create(url), round, false);
                    break;
                case "http1-new":
                    viaHttpClient(HttpClient.Version.HTTP_1_1, URI.create(url), round, true);
                    break;
                case "http2":
                    viaHttpClient(HttpClient.Version.HTTP_2, URI.create(url), round, false);
                    break;
                case "urlconnection":
                    viaUrlConnection(new URL(url), round);
                    break;
                default:
                    throw new IllegalArgumentException("unknown mode " + mode);
            }
        }
        say("done", "");
    }

    static void server(String[] args) throws Exception {
        char[] password = args[2].toCharArray();
        KeyStore keys = KeyStore.getInstance("PKCS12");
        try (FileInputStream in = new FileInputStream(args[1])) {
            keys.load(in, password);
        }
        KeyManagerFactory managers = KeyManagerFactory.getInstance("SunX509");
        managers.init(keys, password);
        SSLContext context = SSLContext.getInstance("TLS");
        context.init(managers.getKeyManagers(), null, null);
        HttpsServer server = HttpsServer.create(new InetSocketAddress("127.0.0.1", 0), 16);
        server.setHttpsConfigurator(new HttpsConfigurator(context));
        server.createContext("/", exchange -> {
            String body = readAllQuietly(exchange.getRequestBody());
            boolean post = exchange.getRequestMethod().equals("POST");
            byte[] reply = (post ? "seen:" + body : "hello from java")
                    .getBytes(StandardCharsets.UTF_8);
            exchange.getResponseHeaders().add("Content-Type", "text/plain");
            exchange.sendResponseHeaders(post ? 201 : 200, reply.length);
            try (OutputStream out = exchange.getResponseBody()) {
                out.write(reply);
            }
        });
        server.start();
        say("listening", "\"port\": " + server.getAddress().getPort());
    }

    static String readAllQuietly(InputStream in) {
        try {
            return readAll(in);
        } catch (Exception e) {
            return "";
        }
    }

    static void bench(String[] args) throws Exception {
        URI uri = URI.create(args[1]);
        long seconds = Long.parseLong(args[2]);
        HttpClient client = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1).build();
        HttpRequest get = HttpRequest.newBuilder(uri).GET().build();
        long start = System.nanoTime();
        long end = start + seconds * 1_000_000_000L;
        long requests = 0;
        while (System.nanoTime() < end) {
            HttpResponse<byte[]> got = client.send(get, HttpResponse.BodyHandlers.ofByteArray());
            if (got.statusCode() != 200) {
                throw new IllegalStateException("status " + got.statusCode());
            }
            requests++;
        }
        double elapsed = (System.nanoTime() - start) / 1e9;
        say("result", "\"rate\": " + (requests / elapsed) + ", \"requests\": " + requests);
    }

    public static void main(String[] args) throws Exception {
        if (args[0].equals("client")) {
            client(args);
        } else if (args[0].equals("bench")) {
            bench(args);
        } else {
            server(args);
        }
    }
}
