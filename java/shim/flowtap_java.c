/* flowtap's native shim for the Java agent (java/agent): the agent hands every piece of TLS
 * plaintext to flowtap_java_data, which does nothing; the sensor's uprobe on its entry reads
 * the arguments (fd, flow, buf, len; fd -1: len bytes the agent could not tie to a socket).
 * flowtap_java_active tells the agent whether a probe is
 * installed, so that a JVM without a sensor pays almost nothing. */
#include <jni.h>
#include <stddef.h>
#include <stdint.h>

/* Lets the sensor recognise the file (src/flowtap/java/__init__.py: SHIM_SIGNATURE). */
__attribute__((used, visibility("default")))
const char flowtap_java_signature[] = "flowtap-java-shim 1";

#define FLOW_TX 1
#define FLOW_RX 2

#if defined(__x86_64__)
/* Written in assembly so that its first instruction is a 2-byte `jmp` to the next one: the
 * kernel emulates a jump under a uprobe (~0.5 us a hit) where it single-steps `endbr64`,
 * `sub` or `mov` (~9 us, docs/DESIGN.md). No endbr64: only called directly, from this file. */
__asm__(".text\n"
        ".globl flowtap_java_data\n"
        ".type flowtap_java_data, @function\n"
        ".p2align 4\n"
        "flowtap_java_data:\n"
        "\t.byte 0xeb, 0x00\n" /* jmp .+2: the probed instruction */
        "\tret\n"
        ".size flowtap_java_data, .-flowtap_java_data\n");
void flowtap_java_data(int fd, int flow, const void *buf, long len);
#else
__attribute__((noinline, used, visibility("default"))) void
flowtap_java_data(int fd, int flow, const void *buf, long len)
{
    /* Keeps the arguments live and the body distinct from any other empty function. */
    __asm__ volatile("" : : "r"(fd), "r"(flow), "r"(buf), "r"(len) : "memory");
}
#endif

/* The probe is an int3 (0xCC) written over the first byte, in this process's copy. */
__attribute__((noinline, used, visibility("default"))) int flowtap_java_active(void)
{
    const volatile unsigned char *p = (const volatile unsigned char *)(uintptr_t)&flowtap_java_data;
    return *p == 0xCC;
}

static int valid_flow(jint flow)
{
    return flow == FLOW_TX || flow == FLOW_RX;
}

JNIEXPORT void JNICALL Java_flowtap_agent_Native_data(JNIEnv *env, jclass cls, jint fd, jint flow,
                                                     jbyteArray array, jint off, jint len)
{
    (void)cls;
    if (array == NULL || fd < 0 || !valid_flow(flow) || off < 0 || len <= 0)
        return;
    jsize size = (*env)->GetArrayLength(env, array);
    if (off > size || len > size - off)
        return;
    void *base = (*env)->GetPrimitiveArrayCritical(env, array, NULL);
    if (base == NULL) {
        (*env)->ExceptionClear(env); /* OutOfMemoryError: never thrown into the application */
        return;
    }
    flowtap_java_data(fd, flow, (const char *)base + off, (long)len);
    (*env)->ReleasePrimitiveArrayCritical(env, array, base, JNI_ABORT);
}

JNIEXPORT void JNICALL Java_flowtap_agent_Native_dataDirect(JNIEnv *env, jclass cls, jint fd, jint flow,
                                                           jobject buffer, jint pos, jint len)
{
    (void)cls;
    if (buffer == NULL || fd < 0 || !valid_flow(flow) || pos < 0 || len <= 0)
        return;
    char *base = (*env)->GetDirectBufferAddress(env, buffer);
    jlong cap = (*env)->GetDirectBufferCapacity(env, buffer);
    if (base == NULL || cap < 0 || (jlong)pos > cap || (jlong)len > cap - pos)
        return;
    flowtap_java_data(fd, flow, base + pos, (long)len);
}

/* Plaintext the agent could not tie to a socket: fd -1 and no buffer, so the sensor counts
 * what was lost instead of never hearing of it. */
JNIEXPORT void JNICALL Java_flowtap_agent_Native_lost(JNIEnv *env, jclass cls, jint flow, jlong len)
{
    (void)env;
    (void)cls;
    if (!valid_flow(flow) || len <= 0)
        return;
    flowtap_java_data(-1, flow, NULL, (long)len);
}

JNIEXPORT jint JNICALL Java_flowtap_agent_Native_active(JNIEnv *env, jclass cls)
{
    (void)env;
    (void)cls;
    return flowtap_java_active();
}
