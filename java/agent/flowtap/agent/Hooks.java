package flowtap.agent;

import java.nio.ByteBuffer;
import java.util.concurrent.atomic.AtomicLong;
import javax.net.ssl.SSLEngineResult;

/**
 * What the rewritten JDK methods call. Every method catches everything and returns normally;
 * none prints, none moves an application buffer's position (duplicates only). While the shim
 * says no probe is installed, each returns after one cached check.
 */
public final class Hooks {
    static final int TX = 1;
    static final int RX = 2;
    // Short: until a new sensor is seen, new connections are not tied to their channel.
    private static final long RECHECK_NANOS = 100_000_000L;
    private static final int CAP = 16384;
    private static final int PENDING_MAX = 1 << 16;

    /** Plaintext dropped: the socket's fd could not be found / the engine has no channel yet. */
    public static final AtomicLong noFd = new AtomicLong();
    public static final AtomicLong unbound = new AtomicLong();
    /** Engines tied to a channel (by a written wrap output / by an unwrapped channel read). */
    public static final AtomicLong bound = new AtomicLong();
    /** Exceptions swallowed in hooks, the transformer or the start-up. */
    public static final AtomicLong errors = new AtomicLong();
    /** The last of them, for diagnostics (tests/java reads it). */
    public static volatile Throwable lastError;

    private static volatile boolean shim;
    private static volatile boolean active;
    private static volatile long nextCheck = System.nanoTime();

    /**
     * The first bytes of a wrap's output -> its engine. By content, not buffer identity:
     * java.net.http copies each wrap's output (Utils.copyAligned) before writing it.
     */
    private static final RecentRecords wrapped = new RecentRecords(1024);
    /** A channel read's buffer -> the channel's fd (a server's engine unwraps from it). */
    private static final WeakIdentityMap<ByteBuffer, Integer> received = new WeakIdentityMap<>(CAP);
    /** An engine -> the fd of the channel it talks through. */
    private static final WeakIdentityMap<Object, Integer> engines = new WeakIdentityMap<>(CAP);

    private Hooks() {}

    static void fail(Throwable t) {
        errors.incrementAndGet();
        lastError = t;
    }

    static void shimLoaded() {
        shim = true;
        nextCheck = System.nanoTime(); // ask now
    }

    /** Whether a sensor probes the shim: asked at most every 100 ms. */
    static boolean on() {
        long now = System.nanoTime();
        if (now - nextCheck < 0) {
            return active;
        }
        boolean on = false;
        try {
            on = shim && Native.active() == 1;
        } catch (Throwable t) {
            Hooks.fail(t);
        }
        active = on;
        nextCheck = now + RECHECK_NANOS;
        return on;
    }

    // --- SSLSocket: SSLSocketImpl$AppOutputStream / $AppInputStream -------------------------

    public static void socketWrite(Object stream, byte[] b, int off, int len) {
        try {
            if (len <= 0 || !on()) {
                return;
            }
            emit(SocketFds.ofStream(stream), TX, b, off, len);
        } catch (Throwable t) {
            Hooks.fail(t);
        }
    }

    public static void socketRead(int n, Object stream, byte[] b, int off) {
        try {
            if (n <= 0 || !on()) {
                return;
            }
            emit(SocketFds.ofStream(stream), RX, b, off, n);
        } catch (Throwable t) {
            Hooks.fail(t);
        }
    }

    private static void emit(int fd, int flow, byte[] b, int off, int len) {
        if (fd < 0) {
            noFd.incrementAndGet();
            Native.lost(flow, len); // counted by the sensor: nothing is lost silently
            return;
        }
        if (b == null || off < 0 || len <= 0 || off > b.length - len) {
            return;
        }
        Native.data(fd, flow, b, off, len);
    }

    // --- SSLEngine: SSLEngineImpl.wrap / unwrap ------------------------------------------------

    /** What an engine call's exit needs from its entry. */
    static final class EngineCall {
        final Object engine;
        final boolean wrap;
        final ByteBuffer[] bufs; // the plaintext side: srcs of a wrap, dsts of an unwrap
        final int[] pos;
        final ByteBuffer out; // the wrap's first dst: what the channel will write
        final int outPos;

        EngineCall(Object engine, boolean wrap, ByteBuffer[] bufs, int[] pos, ByteBuffer out) {
            this.engine = engine;
            this.wrap = wrap;
            this.bufs = bufs;
            this.pos = pos;
            this.out = out;
            this.outPos = out == null ? -1 : out.position();
        }
    }

    public static Object wrapEnter(
            Object engine, ByteBuffer[] srcs, int srcOff, int srcLen, ByteBuffer[] dsts, int dstOff, int dstLen) {
        try {
            if (!on()) {
                return null;
            }
            ByteBuffer out = dstLen > 0 && dstOff >= 0 && dsts != null && dstOff < dsts.length ? dsts[dstOff] : null;
            return new EngineCall(engine, true, slice(srcs, srcOff, srcLen), positions(srcs, srcOff, srcLen), out);
        } catch (Throwable t) {
            Hooks.fail(t);
            return null;
        }
    }

    public static Object unwrapEnter(
            Object engine, ByteBuffer[] srcs, int srcOff, int srcLen, ByteBuffer[] dsts, int dstOff, int dstLen) {
        try {
            if (!on()) {
                return null;
            }
            // A server's engine meets its channel here first: the ClientHello it read.
            if (engines.get(engine) == null && srcs != null) {
                for (int i = srcOff; i >= 0 && i < srcOff + srcLen && i < srcs.length; i++) {
                    Integer fd = received.get(srcs[i]);
                    if (fd != null) {
                        engines.put(engine, fd);
                        bound.incrementAndGet();
                        break;
                    }
                }
            }
            return new EngineCall(engine, false, slice(dsts, dstOff, dstLen), positions(dsts, dstOff, dstLen), null);
        } catch (Throwable t) {
            Hooks.fail(t);
            return null;
        }
    }

    public static void engineExit(SSLEngineResult result, Object state) {
        try {
            if (!(state instanceof EngineCall) || result == null) {
                return;
            }
            EngineCall call = (EngineCall) state;
            long total = call.wrap ? result.bytesConsumed() : result.bytesProduced();
            Integer fd = engines.get(call.engine);
            if (call.wrap && call.out != null && result.bytesProduced() > 0) {
                // Unbound (e.g. the first request on a connection made before the agent came):
                // keep the plaintext for the channel write that binds the engine.
                byte[] pending = fd == null && total > 0 && total <= PENDING_MAX ? copy(call, (int) total) : null;
                wrapped.put(call.out, call.outPos, result.bytesProduced(), call.engine, pending);
                if (pending != null) {
                    return;
                }
            }
            if (total <= 0) {
                return;
            }
            if (fd == null) {
                unbound.incrementAndGet();
                Native.lost(call.wrap ? TX : RX, total);
                return;
            }
            int flow = call.wrap ? TX : RX;
            for (int i = 0; i < call.bufs.length && total > 0; i++) {
                ByteBuffer b = call.bufs[i];
                if (b == null || call.pos[i] < 0) {
                    continue;
                }
                // What this call took from (wrap) or put into (unwrap) the buffer.
                long moved = Math.min((long) b.position() - call.pos[i], total);
                if (moved > 0) {
                    emit(fd, flow, b, call.pos[i], (int) moved);
                    total -= moved;
                }
            }
        } catch (Throwable t) {
            Hooks.fail(t);
        }
    }

    /** The plaintext a wrap consumed: what it took from each source, in order. */
    private static byte[] copy(EngineCall call, int total) {
        byte[] out = new byte[total];
        int at = 0;
        for (int i = 0; i < call.bufs.length && at < total; i++) {
            ByteBuffer b = call.bufs[i];
            if (b == null || call.pos[i] < 0) {
                continue;
            }
            int moved = (int) Math.min((long) b.position() - call.pos[i], total - at);
            if (moved > 0) {
                ByteBuffer d = b.duplicate(); // the application's buffer keeps its position
                d.position(call.pos[i]);
                d.get(out, at, moved);
                at += moved;
            }
        }
        return at == total ? out : null;
    }

    private static ByteBuffer[] slice(ByteBuffer[] bufs, int off, int len) {
        if (bufs == null || off < 0 || len <= 0 || off > bufs.length - len) {
            return new ByteBuffer[0];
        }
        ByteBuffer[] out = new ByteBuffer[len];
        System.arraycopy(bufs, off, out, 0, len);
        return out;
    }

    private static int[] positions(ByteBuffer[] bufs, int off, int len) {
        ByteBuffer[] s = slice(bufs, off, len);
        int[] pos = new int[s.length];
        for (int i = 0; i < s.length; i++) {
            pos[i] = s[i] == null ? -1 : s[i].position();
        }
        return pos;
    }

    /** Bytes [pos, pos + len) of a buffer, whatever its kind, without touching its position. */
    private static void emit(int fd, int flow, ByteBuffer b, int pos, int len) {
        if (pos < 0 || len <= 0 || pos > b.capacity() - len) {
            return;
        }
        if (b.isDirect()) {
            Native.dataDirect(fd, flow, b, pos, len);
        } else if (b.hasArray()) {
            Native.data(fd, flow, b.array(), b.arrayOffset() + pos, len);
        } else {
            // Read-only heap buffer: copy through a duplicate, in bounded pieces.
            ByteBuffer d = b.duplicate();
            d.clear();
            d.position(pos);
            byte[] tmp = new byte[Math.min(len, 65536)];
            int left = len;
            while (left > 0) {
                int n = Math.min(left, tmp.length);
                d.get(tmp, 0, n);
                Native.data(fd, flow, tmp, 0, n);
                left -= n;
            }
        }
    }

    // --- SocketChannelImpl: ties engines to channels by buffer identity -------------------------

    public static void channelWrite(int fd, ByteBuffer b) {
        try {
            if (fd < 0 || b == null || !on()) {
                return;
            }
            bindWritten(fd, b);
        } catch (Throwable t) {
            Hooks.fail(t);
        }
    }

    public static void channelWriteV(int fd, ByteBuffer[] bufs, int off, int len) {
        try {
            if (fd < 0 || bufs == null || !on()) {
                return;
            }
            for (int i = off; i >= 0 && i < off + len && i < bufs.length; i++) {
                if (bufs[i] != null && bindWritten(fd, bufs[i])) {
                    return;
                }
            }
        } catch (Throwable t) {
            Hooks.fail(t);
        }
    }

    private static boolean bindWritten(int fd, ByteBuffer b) {
        RecentRecords.Entry e = wrapped.take(b, b.position(), b.remaining());
        Object engine = e == null ? null : e.engine.get();
        if (engine == null) {
            return false;
        }
        Integer known = engines.get(engine);
        if (known == null || known != fd) {
            engines.put(engine, fd);
            bound.incrementAndGet();
        }
        if (e.pending != null) {
            Native.data(fd, TX, e.pending, 0, e.pending.length); // before the bytes leave
        }
        return true;
    }

    public static void channelRead(int fd, ByteBuffer b) {
        try {
            if (fd < 0 || b == null || !on()) {
                return;
            }
            remember(b, fd);
        } catch (Throwable t) {
            Hooks.fail(t);
        }
    }

    public static void channelReadV(int fd, ByteBuffer[] bufs, int off, int len) {
        try {
            if (fd < 0 || bufs == null || !on()) {
                return;
            }
            for (int i = off; i >= 0 && i < off + len && i < bufs.length; i++) {
                if (bufs[i] != null) {
                    remember(bufs[i], fd);
                }
            }
        } catch (Throwable t) {
            Hooks.fail(t);
        }
    }

    /** Channels read into the same buffers again and again: no new entry for those. */
    private static void remember(ByteBuffer b, int fd) {
        Integer known = received.get(b);
        if (known == null || known != fd) {
            received.put(b, fd);
        }
    }
}
