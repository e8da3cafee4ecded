package flowtap.agent;

import jdk.internal.org.objectweb.asm.ClassReader;
import jdk.internal.org.objectweb.asm.ClassVisitor;
import jdk.internal.org.objectweb.asm.ClassWriter;
import jdk.internal.org.objectweb.asm.MethodVisitor;
import jdk.internal.org.objectweb.asm.Opcodes;
import jdk.internal.org.objectweb.asm.Type;
import jdk.internal.org.objectweb.asm.commons.AdviceAdapter;

/**
 * The bytecode edits. Each inserts straight-line calls to {@link Hooks} at a method's entry or
 * before its normal returns, with no branch of its own, so the class's stack map frames stay
 * valid: LocalVariablesSorter (under AdviceAdapter) renumbers the locals in them for the new
 * ones, and COMPUTE_MAXS recomputes only the stack and local sizes (no frame computation, so
 * no class loading from getCommonSuperClass).
 *
 * <p>Compiled against java.base's internal ASM (javac -source 11 -target 11 --add-exports ...,
 * see the Makefile: --release 11 refuses internal packages); present in java.base 11 to 21.
 */
final class Rewriter {
    private static final int API = pickApi();
    private static final String HOOKS = "flowtap/agent/Hooks";
    private static final String BUF = "Ljava/nio/ByteBuffer;";
    private static final String BUFS = "[Ljava/nio/ByteBuffer;";
    private static final String RESULT = "Ljavax/net/ssl/SSLEngineResult;";
    private static final String ENGINE_OP = "(" + BUFS + "II" + BUFS + "II)" + RESULT;

    private Rewriter() {}

    /**
     * The newest ASM API level this JDK's copy accepts: JDK 11.0.13's refuses ASM7 (yet its
     * ClassReader reports nest attributes, which ASM6 visitors let through unchanged).
     */
    private static int pickApi() {
        // ASM9..ASM6 (JDK 17's Opcodes lacks the ASM9 constant).
        for (int api : new int[] {9 << 16, 8 << 16, 7 << 16, 6 << 16}) {
            try {
                new Probe(api);
                return api;
            } catch (Throwable t) {
                // not this one
            }
        }
        return Opcodes.ASM5;
    }

    private static final class Probe extends ClassVisitor {
        Probe(int api) {
            super(api);
        }
    }

    static byte[] rewrite(String name, byte[] bytes) {
        ClassReader reader = new ClassReader(bytes);
        ClassWriter writer = new ClassWriter(ClassWriter.COMPUTE_MAXS);
        int[] edits = new int[1];
        ClassVisitor cv =
                new ClassVisitor(API, writer) {
                    @Override
                    public MethodVisitor visitMethod(
                            int access, String m, String desc, String sig, String[] exc) {
                        MethodVisitor mv = super.visitMethod(access, m, desc, sig, exc);
                        MethodVisitor edit = edit(name, mv, access, m, desc);
                        if (edit != null) {
                            edits[0]++;
                            return edit;
                        }
                        return mv;
                    }
                };
        reader.accept(cv, ClassReader.EXPAND_FRAMES);
        return edits[0] == 0 ? null : writer.toByteArray();
    }

    private static MethodVisitor edit(String cls, MethodVisitor mv, int access, String m, String desc) {
        if ((access & (Opcodes.ACC_STATIC | Opcodes.ACC_ABSTRACT | Opcodes.ACC_NATIVE)) != 0) {
            return null;
        }
        switch (cls) {
            case Transformer.OUT:
                return m.equals("write") && desc.equals("([BII)V") ? new SocketWrite(mv, access, m, desc) : null;
            case Transformer.IN:
                return m.equals("read") && desc.equals("([BII)I") ? new SocketRead(mv, access, m, desc) : null;
            case Transformer.ENGINE:
                if (desc.equals(ENGINE_OP) && (m.equals("wrap") || m.equals("unwrap"))) {
                    return new EngineOp(mv, access, m, desc, m.equals("wrap"));
                }
                return null;
            case Transformer.CHANNEL:
                if ((m.equals("read") || m.equals("write"))
                        && (desc.equals("(" + BUF + ")I") || desc.equals("(" + BUFS + "II)J"))) {
                    return new ChannelOp(mv, access, m, desc);
                }
                return null;
            default:
                return null;
        }
    }

    /** AppOutputStream.write(byte[] b, int off, int len): at entry, Hooks.socketWrite(this, b, off, len). */
    private static final class SocketWrite extends AdviceAdapter {
        SocketWrite(MethodVisitor mv, int access, String m, String desc) {
            super(API, mv, access, m, desc);
        }

        @Override
        protected void onMethodEnter() {
            loadThis();
            loadArgs();
            hook(mv, "socketWrite", "(Ljava/lang/Object;[BII)V");
        }
    }

    /** AppInputStream.read(byte[] b, int off, int len): on return n, Hooks.socketRead(n, this, b, off). */
    private static final class SocketRead extends AdviceAdapter {
        private int buf;
        private int off;

        SocketRead(MethodVisitor mv, int access, String m, String desc) {
            super(API, mv, access, m, desc);
        }

        @Override
        protected void onMethodEnter() {
            // The arguments as passed: the body may reuse their slots.
            buf = newLocal(Type.getType("[B"));
            off = newLocal(Type.INT_TYPE);
            loadArg(0);
            storeLocal(buf);
            loadArg(1);
            storeLocal(off);
        }

        @Override
        protected void onMethodExit(int opcode) {
            if (opcode != IRETURN) {
                return;
            }
            dup();
            loadThis();
            loadLocal(buf);
            loadLocal(off);
            hook(mv, "socketRead", "(ILjava/lang/Object;[BI)V");
        }
    }

    /** SSLEngineImpl.wrap/unwrap(srcs, off, len, dsts, off, len): positions at entry, result at return. */
    private static final class EngineOp extends AdviceAdapter {
        private final boolean wrap;
        private int state;

        EngineOp(MethodVisitor mv, int access, String m, String desc, boolean wrap) {
            super(API, mv, access, m, desc);
            this.wrap = wrap;
        }

        @Override
        protected void onMethodEnter() {
            state = newLocal(Type.getType(Object.class));
            loadThis();
            loadArgs();
            String args = "(Ljava/lang/Object;" + BUFS + "II" + BUFS + "II)Ljava/lang/Object;";
            hook(mv, wrap ? "wrapEnter" : "unwrapEnter", args);
            storeLocal(state);
        }

        @Override
        protected void onMethodExit(int opcode) {
            if (opcode != ARETURN) {
                return;
            }
            dup();
            loadLocal(state);
            hook(mv, "engineExit", "(" + RESULT + "Ljava/lang/Object;)V");
        }
    }

    /** SocketChannelImpl.read/write(buffer(s)): at entry, Hooks.channel*(getFDVal(), ...). */
    private static final class ChannelOp extends AdviceAdapter {
        private final String target;
        private final String args;

        ChannelOp(MethodVisitor mv, int access, String m, String desc) {
            super(API, mv, access, m, desc);
            boolean vector = desc.startsWith("([");
            target = (m.equals("read") ? "channelRead" : "channelWrite") + (vector ? "V" : "");
            args = vector ? "(I" + BUFS + "II)V" : "(I" + BUF + ")V";
        }

        @Override
        protected void onMethodEnter() {
            loadThis();
            mv.visitMethodInsn(INVOKEVIRTUAL, Transformer.CHANNEL, "getFDVal", "()I", false);
            loadArgs();
            hook(mv, target, args);
        }
    }

    /** INVOKESTATIC Hooks.name: straight to the next visitor, as GeneratorAdapter's own calls. */
    private static void hook(MethodVisitor mv, String name, String desc) {
        mv.visitMethodInsn(Opcodes.INVOKESTATIC, HOOKS, name, desc, false);
    }
}
