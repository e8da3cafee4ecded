// Self-test client/server for the flowtap Java agent (tests/java/README.md). Single-file
// program: `java [-javaagent:...] TlsSelfTest.java MODE ARGS` (Java 11+ runs it from source).
import com.sun.net.httpserver.HttpsConfigurator;
import com.sun.net.httpserver.HttpsServer;
import java.io.ByteArrayOutputStream;
import java.io.FileInputStream;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.URL;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyStore;
import java.security.cert.X509Certificate;
import java.util.List;
import javax.net.ssl.HttpsURLConnection;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManager;
import javax.net.ssl.X509TrustManager;

public class TlsSelfTest {
    static final int POST_BYTES = 3000;

    public static void main(String[] a) throws Exception {
        switch (a[0]) {
            case "http1": httpClient(a[1], HttpClient.Version.HTTP_1_1); break;
            case "h2": httpClient(a[1], HttpClient.Version.HTTP_2); break;
            case "socket": urlConnection(a[1]); break;
            case "loop": loop(a[1], Integer.parseInt(a[2])); break;
            case "serve": serve(Integer.parseInt(a[1]), a[2], a[3], Integer.parseInt(a[4])); break;
            default: throw new IllegalArgumentException(a[0]);
        }
    }

    static SSLContext trustAll() throws Exception {
        TrustManager tm = new X509TrustManager() {
            public void checkClientTrusted(X509Certificate[] c, String s) {}
            public void checkServerTrusted(X509Certificate[] c, String s) {}
            public X509Certificate[] getAcceptedIssuers() { return new X509Certificate[0]; }
        };
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(null, new TrustManager[] {tm}, null);
        return ctx;
    }

    static void httpClient(String url, HttpClient.Version v) throws Exception {
        // Self-signed test certificate: no host name check (the trust manager accepts any).
        System.setProperty("jdk.internal.httpclient.disableHostnameVerification", "true");
        HttpClient c = HttpClient.newBuilder().sslContext(trustAll()).version(v).build();
        HttpResponse<byte[]> r = c.send(HttpRequest.newBuilder(URI.create(url)).GET().build(),
                HttpResponse.BodyHandlers.ofByteArray());
        System.out.println("GET " + r.version() + " status=" + r.statusCode() + " body=" + r.body().length);
        byte[] body = new byte[POST_BYTES];
        java.util.Arrays.fill(body, (byte) 'p');
        r = c.send(HttpRequest.newBuilder(URI.create(url)).POST(HttpRequest.BodyPublishers.ofByteArray(body)).build(),
                HttpResponse.BodyHandlers.ofByteArray());
        System.out.println("POST " + r.version() + " status=" + r.statusCode() + " sent=" + POST_BYTES + " body=" + r.body().length);
        sockets();
        agent();
    }

    /** One HttpClient GET a second, `n` times (a target for a dynamic attach). */
    static void loop(String url, int n) throws Exception {
        System.setProperty("jdk.internal.httpclient.disableHostnameVerification", "true");
        HttpClient c = HttpClient.newBuilder().sslContext(trustAll()).version(HttpClient.Version.HTTP_1_1).build();
        System.out.println("pid " + ProcessHandle.current().pid());
        for (int i = 0; i < n; i++) {
            HttpResponse<byte[]> r = c.send(HttpRequest.newBuilder(URI.create(url)).GET().build(),
                    HttpResponse.BodyHandlers.ofByteArray());
            System.out.println("GET " + i + " status=" + r.statusCode() + " body=" + r.body().length);
            agent();
            Thread.sleep(1000);
        }
        sockets();
    }

    static void urlConnection(String url) throws Exception {
        HttpsURLConnection.setDefaultSSLSocketFactory(trustAll().getSocketFactory());
        HttpsURLConnection.setDefaultHostnameVerifier((h, s) -> true);
        HttpsURLConnection c = (HttpsURLConnection) new URL(url).openConnection();
        System.out.println("GET status=" + c.getResponseCode() + " body=" + readAll(c.getInputStream()).length);
        c = (HttpsURLConnection) new URL(url).openConnection();
        c.setDoOutput(true);
        try (OutputStream o = c.getOutputStream()) { o.write(new byte[POST_BYTES]); }
        System.out.println("POST status=" + c.getResponseCode() + " sent=" + POST_BYTES + " body=" + readAll(c.getInputStream()).length);
        sockets();
        agent();
    }

    static byte[] readAll(InputStream in) throws Exception {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] b = new byte[1024];
        for (int n; (n = in.read(b)) > 0; ) out.write(b, 0, n);
        return out.toByteArray();
    }

    /** The agent's counters (boot loader), when it is loaded. */
    static void agent() {
        try {
            Class<?> h = Class.forName("flowtap.agent.Hooks", false, null);
            Class<?> b = Class.forName("flowtap.agent.Boot", false, null);
            System.out.println("agent: shim=" + b.getMethod("shimPath").invoke(null)
                    + " noFd=" + h.getField("noFd").get(null) + " unbound=" + h.getField("unbound").get(null)
                    + " bound=" + h.getField("bound").get(null) + " errors=" + h.getField("errors").get(null) + " lastError=" + h.getField("lastError").get(null)
                    + " rewritten=" + Class.forName("flowtap.agent.Transformer", false, null).getField("rewritten").get(null));
        } catch (Throwable t) {
            System.out.println("agent: not loaded (" + t + ")");
        }
    }

    /** This process's TCP sockets: fd -> ports, to compare with the fds the shim reported. */
    static void sockets() throws Exception {
        java.util.Map<String, String> byInode = new java.util.HashMap<>();
        for (String f : new String[] {"/proc/self/net/tcp", "/proc/self/net/tcp6"}) {
            List<String> lines = Files.readAllLines(Path.of(f));
            for (String l : lines.subList(1, lines.size())) {
                String[] p = l.trim().split("\\s+");
                byInode.put(p[9], Integer.parseInt(p[1].split(":")[1], 16) + "->" + Integer.parseInt(p[2].split(":")[1], 16));
            }
        }
        try (var fds = Files.list(Path.of("/proc/self/fd"))) {
            for (Path fd : (Iterable<Path>) fds::iterator) {
                try {
                    String t = Files.readSymbolicLink(fd).toString();
                    if (t.startsWith("socket:[")) {
                        String ino = t.substring(8, t.length() - 1);
                        if (byInode.containsKey(ino)) System.out.println("fd " + fd.getFileName() + " tcp " + byInode.get(ino));
                    }
                } catch (Exception e) { /* gone */ }
            }
        }
    }

    /** HttpsServer (jdk.httpserver, Java 17+ here): GET -> `size` bytes, POST -> its length. */
    static void serve(int port, String p12, String pass, int size) throws Exception {
        KeyStore ks = KeyStore.getInstance("PKCS12");
        ks.load(new FileInputStream(p12), pass.toCharArray());
        KeyManagerFactory kmf = KeyManagerFactory.getInstance("SunX509");
        kmf.init(ks, pass.toCharArray());
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(kmf.getKeyManagers(), null, null);
        HttpsServer s = HttpsServer.create(new InetSocketAddress("127.0.0.1", port), 0);
        s.setHttpsConfigurator(new HttpsConfigurator(ctx));
        s.createContext("/", x -> {
            byte[] in = readAllUnchecked(x.getRequestBody());
            byte[] out = "GET".equals(x.getRequestMethod()) ? new byte[size] : ("got " + in.length).getBytes();
            x.sendResponseHeaders(200, out.length);
            x.getResponseBody().write(out);
            x.close();
            try { sockets(); } catch (Exception e) { /* listing only */ } // the connection is still open
        });
        s.start();
        System.out.println("serving on " + port);
    }

    static byte[] readAllUnchecked(InputStream in) {
        try { return readAll(in); } catch (Exception e) { throw new RuntimeException(e); }
    }
}
