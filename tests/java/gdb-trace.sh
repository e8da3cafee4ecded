#!/bin/bash
# Runs a command under gdb with a breakpoint on flowtap_java_data standing in for the sensor's
# uprobe (an int3 too: flowtap_java_active() turns 1). Prints each call's arguments and dumps
# each buffer to $DUMP/NNN-fdF-flowW.bin. Usage: DUMP=/tmp/ftdump gdb-trace.sh java ARGS...
# (gdb -batch does not take `commands` from -ex: hence a script file.)
DUMP=${DUMP:-/tmp/flowtap-java-dump}
rm -rf "$DUMP" && mkdir -p "$DUMP"
script=$(mktemp /tmp/flowtap-gdb.XXXXXX)
trap 'rm -f "$script"' EXIT
cat > "$script" <<GDB
set breakpoint pending on
set pagination off
set print thread-events off
handle SIGSEGV nostop noprint pass
handle SIGQUIT nostop noprint pass
set \$n = 0
break flowtap_java_data
commands
silent
printf "flowtap_java_data fd=%d flow=%d len=%ld\n", \$rdi, \$rsi, \$rcx
eval "dump binary memory $DUMP/%03d-fd%d-flow%d.bin %lu %lu", \$n, \$rdi, \$rsi, \$rdx, \$rdx + \$rcx
set \$n = \$n + 1
continue
end
run
GDB
gdb -q -batch -x "$script" --args "$@"
