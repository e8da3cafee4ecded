// An HTTPS client for the egress e2e tests: java.net.http, trusting what the JVM's
// javax.net.ssl.trustStore names. Usage: java EgressClient.java URL BODY
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class EgressClient {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1).build();
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[0]))
                .header("Content-Type", "text/plain")
                .POST(HttpRequest.BodyPublishers.ofString(args[1]))
                .build();
        HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
        System.out.println("{\"event\": \"response\", \"pid\": " + ProcessHandle.current().pid()
                + ", \"status\": " + response.statusCode() + "}");
    }
}
