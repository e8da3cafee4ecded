// Cost of the agent's SocketChannel hooks on plain (non-TLS) traffic: 1-byte ping-pong over
// loopback SocketChannels, round trips per second. Compare `java ChannelBench N` with and
// without -javaagent (no sensor: the hooks only check the cached answer of active()).
import java.net.InetSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;

public class ChannelBench {
    public static void main(String[] a) throws Exception {
        int n = Integer.parseInt(a[0]);
        ServerSocketChannel ss = ServerSocketChannel.open().bind(new InetSocketAddress("127.0.0.1", 0));
        SocketChannel c = SocketChannel.open(ss.getLocalAddress());
        SocketChannel s = ss.accept();
        Thread echo = new Thread(() -> {
            ByteBuffer b = ByteBuffer.allocate(1);
            try {
                for (int i = 0; i < n; i++) { b.clear(); s.read(b); b.flip(); s.write(b); }
            } catch (Exception e) { throw new RuntimeException(e); }
        });
        echo.start();
        ByteBuffer b = ByteBuffer.allocate(1);
        long t0 = System.nanoTime();
        for (int i = 0; i < n; i++) { b.clear(); b.put((byte) 1).flip(); c.write(b); b.clear(); c.read(b); }
        long ns = System.nanoTime() - t0;
        echo.join();
        System.out.printf("%d round trips, %.2f us each%n", n, ns / 1e3 / n);
    }
}
