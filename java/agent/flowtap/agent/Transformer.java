package flowtap.agent;

import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.security.ProtectionDomain;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;

/**
 * Rewrites the JDK's TLS and socket-channel classes (boot loader only) so that they call
 * {@link Hooks}. The bytecode work is in {@link Rewriter}, which uses java.base's internal ASM:
 * it is loaded only once {@link Boot} has exported that package to this module.
 */
public final class Transformer implements ClassFileTransformer {
    static final String OUT = "sun/security/ssl/SSLSocketImpl$AppOutputStream";
    static final String IN = "sun/security/ssl/SSLSocketImpl$AppInputStream";
    static final String ENGINE = "sun/security/ssl/SSLEngineImpl";
    static final String CHANNEL = "sun/nio/ch/SocketChannelImpl";

    /** The classes rewritten so far (for tests and diagnostics: at most the four targets). */
    public static final Set<String> rewritten = ConcurrentHashMap.newKeySet();

    static boolean isTarget(String name) {
        return OUT.equals(name) || IN.equals(name) || ENGINE.equals(name) || CHANNEL.equals(name);
    }

    @Override
    public byte[] transform(
            ClassLoader loader, String name, Class<?> redefined, ProtectionDomain domain, byte[] bytes) {
        if (loader != null || name == null || !isTarget(name)) {
            return null;
        }
        try {
            byte[] out = Rewriter.rewrite(name, bytes);
            if (out != null) {
                rewritten.add(name);
            }
            return out;
        } catch (Throwable t) {
            Hooks.fail(t);
            return null; // unchanged: the application runs as if there were no agent
        }
    }

    /** The targets loaded before the agent came (dynamic attach) go through transform now. */
    void retransformLoaded(Instrumentation inst) {
        List<Class<?>> todo = new ArrayList<>();
        for (Class<?> c : inst.getAllLoadedClasses()) {
            if (c.getClassLoader() == null
                    && isTarget(c.getName().replace('.', '/'))
                    && inst.isModifiableClass(c)) {
                todo.add(c);
            }
        }
        for (Class<?> c : todo) {
            try {
                inst.retransformClasses(c); // one at a time: a failure leaves the others hooked
            } catch (Throwable t) {
                Hooks.fail(t);
            }
        }
    }
}
