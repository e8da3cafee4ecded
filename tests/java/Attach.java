// Loads the flowtap agent into a running JVM, as the sensor does (HotSpot dynamic attach).
// Usage: java Attach.java PID /abs/flowtap-agent.jar /abs/libflowtap-java.so  (needs jdk.attach)
import com.sun.tools.attach.VirtualMachine;

public class Attach {
    public static void main(String[] a) throws Exception {
        VirtualMachine vm = VirtualMachine.attach(a[0]);
        try {
            vm.loadAgent(a[1], "shim=" + a[2]);
            System.out.println("loaded " + a[1] + " into " + a[0]);
        } finally {
            vm.detach();
        }
    }
}
