package flowtap.agent;

import java.lang.instrument.Instrumentation;
import java.util.HashMap;
import java.util.Map;
import java.util.Set;

/**
 * Runs from the boot class path: opens java.base to the hooks, loads the shim, installs the
 * transformer. Called again by every later load of the agent (the sensor restarted): then it
 * only loads the shim if no earlier load managed to.
 */
public final class Boot {
    private static boolean installed;
    private static String shimPath;

    private Boot() {}

    public static synchronized void start(Instrumentation inst, String args) {
        try {
            String shim = parse(args).get("shim");
            if (shimPath == null && shim != null && !shim.isEmpty()) {
                // Associated with the boot loader (the caller's): Native's methods bind to it.
                System.load(shim);
                shimPath = shim;
                Hooks.shimLoaded();
            }
        } catch (Throwable t) {
            Hooks.fail(t);
        }
        if (installed) {
            return;
        }
        try {
            openJavaBase(inst);
            Transformer transformer = new Transformer();
            inst.addTransformer(transformer, true);
            installed = true;
            transformer.retransformLoaded(inst);
        } catch (Throwable t) {
            Hooks.fail(t);
        }
    }

    /** Where the shim in use was loaded from (null when none is). */
    public static synchronized String shimPath() {
        return shimPath;
    }

    /**
     * java.base must read the hooks' module (the boot loader's unnamed module) to call them,
     * open the packages whose fields the hooks read, and export the JDK's ASM to the transformer.
     */
    public static void openJavaBase(Instrumentation inst) {
        Module base = Object.class.getModule();
        Module hooks = Boot.class.getModule();
        Set<Module> to = Set.of(hooks);
        Map<String, Set<Module>> exports = new HashMap<>();
        exports.put("jdk.internal.org.objectweb.asm", to);
        exports.put("jdk.internal.org.objectweb.asm.commons", to);
        Map<String, Set<Module>> opens = new HashMap<>();
        for (String pkg : new String[] {"sun.security.ssl", "sun.nio.ch", "java.net", "java.io"}) {
            opens.put(pkg, to);
        }
        inst.redefineModule(base, to, exports, opens, Set.of(), Map.of());
    }

    private static Map<String, String> parse(String args) {
        Map<String, String> out = new HashMap<>();
        if (args == null) {
            return out;
        }
        for (String pair : args.split(",")) {
            int eq = pair.indexOf('=');
            if (eq > 0) {
                out.put(pair.substring(0, eq).trim(), pair.substring(eq + 1).trim());
            }
        }
        return out;
    }
}
