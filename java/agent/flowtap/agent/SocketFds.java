package flowtap.agent;

import java.io.FileDescriptor;
import java.lang.reflect.Field;
import java.lang.reflect.Method;
import java.net.Socket;
import java.net.SocketImpl;

/**
 * The file descriptor under an SSLSocket's application stream, found by reflection (the
 * packages are opened to this module by {@link Boot}) and cached per socket. -1 when unknown.
 */
final class SocketFds {
    private static final WeakIdentityMap<Object, Integer> cache = new WeakIdentityMap<>(16384);
    private static final ClassValue<Field> OUTER =
            new ClassValue<Field>() {
                @Override
                protected Field computeValue(Class<?> c) {
                    return field(c, "this$0");
                }
            };
    private static volatile Field self; // BaseSSLSocketImpl.self: the socket it is layered over
    private static volatile Field impl; // Socket.impl
    private static volatile Field implFd; // SocketImpl.fd
    private static volatile Field fdInt; // FileDescriptor.fd
    private static volatile boolean ready;

    private SocketFds() {}

    /** fd of the SSLSocketImpl that owns an AppInputStream or AppOutputStream. */
    static int ofStream(Object stream) {
        Field outer = OUTER.get(stream.getClass());
        if (outer == null) {
            return -1;
        }
        try {
            Object socket = outer.get(stream);
            return socket == null ? -1 : ofSocket(socket);
        } catch (IllegalAccessException e) {
            return -1;
        }
    }

    static int ofSocket(Object socket) {
        Integer known = cache.get(socket);
        if (known != null) {
            return known;
        }
        int fd = resolve(socket);
        if (fd >= 0) {
            cache.put(socket, fd); // -1 is not cached: the socket may not be connected yet
        }
        return fd;
    }

    private static int resolve(Object socket) {
        init();
        try {
            Object s = socket;
            if (self != null && self.getDeclaringClass().isInstance(s)) {
                Object under = self.get(s);
                if (under != null && under != s) {
                    s = under;
                }
            }
            if (!(s instanceof Socket)) {
                return -1;
            }
            // sun.nio.ch.SocketAdaptor: a channel's socket.
            Field sc = field(s.getClass(), "sc");
            if (sc != null) {
                Object channel = sc.get(s);
                if (channel != null) {
                    Method m = channel.getClass().getMethod("getFDVal");
                    m.setAccessible(true);
                    return (Integer) m.invoke(channel);
                }
            }
            Object si = impl == null ? null : impl.get(s);
            // SocksSocketImpl and friends delegate (13+) to the platform implementation.
            for (int depth = 0; si instanceof SocketImpl && depth < 4; depth++) {
                Object fdo = implFd == null ? null : implFd.get(si);
                if (fdo instanceof FileDescriptor && fdInt != null) {
                    int fd = fdInt.getInt(fdo);
                    if (fd >= 0) {
                        return fd;
                    }
                }
                Field delegate = field(si.getClass(), "delegate");
                si = delegate == null ? null : delegate.get(si);
            }
        } catch (Throwable t) {
            Hooks.fail(t);
        }
        return -1;
    }

    private static void init() {
        if (ready) {
            return;
        }
        try {
            self = field(Class.forName("sun.security.ssl.BaseSSLSocketImpl", false, null), "self");
        } catch (Throwable t) {
            self = null;
        }
        impl = field(Socket.class, "impl");
        implFd = field(SocketImpl.class, "fd");
        fdInt = field(FileDescriptor.class, "fd");
        ready = true;
    }

    /** A field declared by c or a superclass, made accessible; null if none or not allowed. */
    static Field field(Class<?> c, String name) {
        for (Class<?> k = c; k != null; k = k.getSuperclass()) {
            try {
                Field f = k.getDeclaredField(name);
                f.setAccessible(true);
                return f;
            } catch (NoSuchFieldException e) {
                // keep walking up
            } catch (Throwable t) {
                return null;
            }
        }
        return null;
    }
}
