package flowtap.agent;

import java.io.File;
import java.io.InputStream;
import java.lang.instrument.Instrumentation;
import java.lang.reflect.Method;
import java.net.URL;
import java.net.URLClassLoader;
import java.util.ArrayList;
import java.util.Enumeration;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.jar.JarEntry;
import java.util.jar.JarFile;

/**
 * Entry point of the agent jar (loaded by the application class loader). Everything else runs
 * in the boot loader, where java.base can see it: this class puts the jar's other classes there
 * once and hands over to {@link Boot}. It never prints anything.
 *
 * <p>The classes are defined in the boot loader one by one (jdk.internal.misc.Unsafe), not by
 * appending the jar to the boot class path: with class data sharing on, HotSpot answers an
 * append by printing "Sharing is only supported for boot loader classes because bootstrap
 * classpath has been appended" on the application's stdout and by turning sharing off for the
 * application's classes. The append remains the fallback.
 */
public final class Agent {
    private static final String BOOT = "flowtap.agent.Boot";
    private static final String DEFINER = "flowtap.agent.Definer";

    private Agent() {}

    public static void premain(String args, Instrumentation inst) {
        agentmain(args, inst);
    }

    public static void agentmain(String args, Instrumentation inst) {
        try {
            Class<?> boot = bootClass();
            if (boot == null) {
                // First load in this JVM: later loads find Boot in the boot loader and reuse it.
                File jar = new File(Agent.class.getProtectionDomain().getCodeSource().getLocation().toURI());
                boot = install(inst, jar);
            }
            Method start = boot.getMethod("start", Instrumentation.class, String.class);
            start.invoke(null, inst, args == null ? "" : args);
        } catch (Throwable t) {
            // Never disturb the application: the agent simply stays inert.
        }
    }

    private static Class<?> bootClass() {
        try {
            return Class.forName(BOOT, false, null);
        } catch (ClassNotFoundException e) {
            return null;
        }
    }

    private static Class<?> install(Instrumentation inst, File file) throws Exception {
        try (JarFile jar = new JarFile(file)) {
            try {
                define(inst, file, classes(jar));
            } catch (Throwable t) {
                inst.appendToBootstrapClassLoaderSearch(jar); // what is not yet defined comes from here
            }
            return Class.forName(BOOT, false, null);
        }
    }

    /** The jar's classes but this one and Definer, Boot first. */
    private static Map<String, byte[]> classes(JarFile jar) throws Exception {
        Map<String, byte[]> out = new LinkedHashMap<>();
        List<JarEntry> entries = new ArrayList<>();
        for (Enumeration<JarEntry> e = jar.entries(); e.hasMoreElements(); ) {
            JarEntry entry = e.nextElement();
            String name = entry.getName();
            if (name.startsWith("flowtap/agent/") && name.endsWith(".class")
                    && !name.equals("flowtap/agent/Agent.class") && !name.equals("flowtap/agent/Definer.class")) {
                entries.add(entry);
            }
        }
        entries.sort((a, b) -> Boolean.compare(!a.getName().equals("flowtap/agent/Boot.class"), !b.getName().equals("flowtap/agent/Boot.class")));
        for (JarEntry entry : entries) {
            try (InputStream in = jar.getInputStream(entry)) {
                String name = entry.getName();
                out.put(name.substring(0, name.length() - ".class".length()).replace('/', '.'), in.readAllBytes());
            }
        }
        return out;
    }

    /**
     * Defines the classes through {@link Definer}, loaded by a class loader of its own: the
     * export of jdk.internal.misc that Unsafe needs then goes to that loader's unnamed module,
     * never to the application's (this class's loader is the application class loader).
     */
    private static void define(Instrumentation inst, File file, Map<String, byte[]> classes) throws Exception {
        try (URLClassLoader own = new URLClassLoader(new URL[] {file.toURI().toURL()}, null)) {
            Class<?> definer = Class.forName(DEFINER, true, own);
            definer.getMethod("define", Instrumentation.class, Map.class).invoke(null, inst, classes);
        }
    }
}
