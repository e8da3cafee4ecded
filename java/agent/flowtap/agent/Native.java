package flowtap.agent;

import java.nio.ByteBuffer;

/** JNI entry points of libflowtap-java.so (java/shim/flowtap_java.c). */
public final class Native {
    private Native() {}

    /** Hands array[off, off + len) to flowtap_java_data; flow 1 = sent, 2 = received. */
    public static native void data(int fd, int flow, byte[] array, int off, int len);

    /** The same for a direct buffer: its bytes [pos, pos + len). */
    public static native void dataDirect(int fd, int flow, ByteBuffer direct, int pos, int len);

    /** Tells the sensor len bytes of plaintext could not be tied to a socket (fd -1). */
    public static native void lost(int flow, long len);

    /** 1 while the sensor's uprobe sits on flowtap_java_data, else 0. */
    public static native int active();
}
