package flowtap.agent;

import java.lang.instrument.Instrumentation;
import java.lang.reflect.Method;
import java.security.ProtectionDomain;
import java.util.Map;
import java.util.Set;

/**
 * Defines the agent's classes in the boot loader with jdk.internal.misc.Unsafe. Loaded by a
 * class loader of its own (see {@link Agent}), so the export of jdk.internal.misc goes to that
 * loader's unnamed module only.
 */
public final class Definer {
    private Definer() {}

    public static void define(Instrumentation inst, Map<String, byte[]> classes) throws Exception {
        Module base = Object.class.getModule();
        inst.redefineModule(base, Set.of(), Map.of("jdk.internal.misc", Set.of(Definer.class.getModule())),
                Map.of(), Set.of(), Map.of());
        Class<?> unsafeClass = Class.forName("jdk.internal.misc.Unsafe");
        Object unsafe = unsafeClass.getMethod("getUnsafe").invoke(null);
        Method define = unsafeClass.getMethod(
                "defineClass", String.class, byte[].class, int.class, int.class, ClassLoader.class, ProtectionDomain.class);
        boolean opened = false;
        for (Map.Entry<String, byte[]> c : classes.entrySet()) {
            byte[] b = c.getValue();
            Class<?> k = (Class<?>) define.invoke(unsafe, c.getKey(), b, 0, b.length, null, null);
            if (!opened) {
                // Boot, first: its module is the boot loader's unnamed one, which the rewriter's
                // classes need java.base's ASM exported to before they can be defined.
                k.getMethod("openJavaBase", Instrumentation.class).invoke(null, inst);
                opened = true;
            }
        }
    }
}
