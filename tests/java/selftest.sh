#!/bin/bash
# Self-test of the Java agent without the sensor (tests/java/README.md): for each JAVA given,
# HttpClient HTTP/1.1 and HTTP/2 and HttpsURLConnection against local servers, then (Java 17+)
# the JDK's HttpsServer hit by curl, each under gdb (tests/java/gdb-trace.sh) with the agent
# loaded by -javaagent. Loopback only; stops only the servers it started, by pid.
# Usage: tests/java/selftest.sh /path/to/bin/java ...   (after `make java`)
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
JDK=${JDK:-/usr/lib/jvm/java-17-openjdk-amd64}
WORK=$(mktemp -d /tmp/flowtap-java-selftest.XXXXXX)
JAR=$ROOT/src/flowtap/java/flowtap-agent.jar
SHIM=$ROOT/src/flowtap/java/libflowtap-java.so
AGENT="-javaagent:$JAR=shim=$SHIM"
VERIFY="-XX:+UnlockDiagnosticVMOptions -XX:+BytecodeVerificationLocal" # verify the rewritten JDK classes
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT

openssl req -x509 -newkey rsa:2048 -nodes -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 2 \
  -subj /CN=localhost >/dev/null 2>&1
openssl pkcs12 -export -in "$WORK/cert.pem" -inkey "$WORK/key.pem" -out "$WORK/cert.p12" \
  -passout pass:changeit -name flowtap >/dev/null 2>&1
"$JDK/bin/javac" --release 11 -d "$WORK/classes" "$HERE/TlsSelfTest.java" || exit 1
python3 "$HERE/https_server.py" 18443 "$WORK/cert.pem" "$WORK/key.pem" 5000 & PIDS+=($!)
node "$HERE/h2_server.js" 18444 "$WORK/cert.pem" "$WORK/key.pem" 7000 & PIDS+=($!)
sleep 1

for JAVA in "$@"; do
  for mode in "http1 https://127.0.0.1:18443/" "socket https://127.0.0.1:18443/" "h2 https://127.0.0.1:18444/"; do
    echo "=== $JAVA $mode"
    DUMP=$WORK/dump timeout 120 "$HERE/gdb-trace.sh" "$JAVA" $VERIFY "$AGENT" -cp "$WORK/classes" TlsSelfTest $mode 2>&1 |
      grep -E '^(flowtap_java_data|GET|POST|fd |agent:)|Exception|Error' | sed 's/ lastError=null//; s/ rewritten=.*//'
  done
  if "$JAVA" --list-modules | grep -q jdk.httpserver; then
    echo "=== $JAVA HttpsServer (curl GET, POST 3000 bytes)"
    log=$WORK/server.log
    DUMP=$WORK/dump timeout 60 "$HERE/gdb-trace.sh" "$JAVA" $VERIFY "$AGENT" -cp "$WORK/classes" TlsSelfTest \
      serve 18445 "$WORK/cert.p12" changeit 4000 >"$log" 2>&1 & gdbpid=$!
    for _ in $(seq 1 60); do grep -q serving "$log" && break; sleep 0.5; done
    curl -sk https://127.0.0.1:18445/ -o /dev/null -w 'curl GET %{http_code} %{size_download}\n'
    head -c 3000 /dev/zero | curl -sk --data-binary @- https://127.0.0.1:18445/ -o /dev/null -w 'curl POST %{http_code} %{size_upload}\n'
    sleep 1
    kill "$gdbpid" 2>/dev/null; wait "$gdbpid" 2>/dev/null
    grep -E '^(flowtap_java_data|fd )' "$log"
  fi
done
rm -rf "$WORK"
