#!/bin/bash
# Boot a stock Debian kernel under qemu and run one shell command in it, with this host's
# whole filesystem (the checkout, its .venv, the host's packages) visible read-only under a
# throw-away tmpfs overlay. bpffs, tracefs, debugfs, securityfs and cgroup2 (at
# /sys/fs/cgroup) are mounted; loopback is up; there is no other network.
# (The project's copy of /work/shared/kmatrix/run.sh; see tests/kernels/README.md.)
#
#   tests/kernels/run.sh [-t SECONDS] [-C DIR] [-m MiB] [-o DIR] LABEL [--] COMMAND...
#
# LABEL: 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie): the newest linux-image-amd64 of
# that Debian release, fetched once and cached in $FLOWTAP_KERNELS_CACHE (default
# /var/tmp/flowtap-kernels); or host (no VM).
# COMMAND (its words joined by spaces) runs as root through /bin/sh in DIR (default: the
# current directory); its stdout+stderr are printed, and run.sh exits with its exit code,
# or 124 (timed out, default 600 s) or 125 (the guest did not finish it: console shown).
# -o DIR: a host directory the command sees writable as /kmatrix (also $KMATRIX_OUT) and
# that is kept, for results; default: a temporary one. $KMATRIX_TIMEOUT is the -t bound.
# Env: KMATRIX_ACCEL=kvm|tcg (default kvm only where kvm_intel/kvm_amd is loaded: the
# PVM-based /dev/kvm of these machines cannot boot stock kernels), KMATRIX_CPUS (2),
# KMATRIX_APPEND (extra kernel arguments, e.g. lockdown=integrity).
# apt runs with a private configuration under the cache: nothing goes to /etc/apt.
# The Debian mirror is the one this machine's apt sources already name.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${FLOWTAP_KERNELS_CACHE:-/var/tmp/flowtap-kernels}
mkdir -p "$STATE/cache"
TIMEOUT=600 DIR=$PWD MEM=2048 KEEP=
while getopts "t:C:m:o:" opt; do
  case $opt in
    t) TIMEOUT=$OPTARG ;; C) DIR=$(cd "$OPTARG" && pwd) ;; m) MEM=$OPTARG ;; o) KEEP=$OPTARG ;;
    *) sed -n '2,24p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 2 ] || { sed -n '2,24p' "$0" >&2; exit 2; }
LABEL=$1; shift
[ "${1:-}" = "--" ] && shift
FLAVOR=amd64

if [ -n "$KEEP" ]; then mkdir -p "$KEEP" && KEEP=$(cd "$KEEP" && pwd); fi
if [ "$LABEL" = host ]; then
  export KMATRIX_OUT=${KEEP:-$(mktemp -d /tmp/kmatrix-out.XXXXXX)} KMATRIX_TIMEOUT=$TIMEOUT
  cd "$DIR" && exec timeout "$TIMEOUT" /bin/sh -c "$*"
fi

case $LABEL in
  5.10) SUITES="bullseye bullseye-security" ;;
  6.1) SUITES="bookworm bookworm-security" ;;
  6.12) SUITES="trixie trixie-security" ;;
  *) echo "kmatrix: unknown label $LABEL (5.10, 6.1, 6.12, host)" >&2; exit 2 ;;
esac

APT_DIR=$STATE/apt
APT=(-o Dir::Etc::SourceList="$APT_DIR/sources.list" -o Dir::Etc::SourceParts=/nonexistent
     -o Dir::State::Lists="$APT_DIR/lists" -o Dir::Cache="$APT_DIR/cache"
     -o APT::Architectures=amd64 -o Debug::NoLocking=1 -q)

# The mirror URI this machine's apt already uses, for the archive ($1 = debian or debian-security).
mirror() {
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -oE '(https?|file)://[^ ]+' | sed 's:/*$::' | grep -E "/$1\$" | head -1
}

apt_lists() {
  mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
  if [ ! -s "$APT_DIR/sources.list" ]; then
    local key=/usr/share/keyrings/debian-archive-keyring.gpg s
    for s in bullseye bookworm trixie; do
      echo "deb [signed-by=$key] $(mirror debian) $s main"
      echo "deb [signed-by=$key] $(mirror debian-security) $s-security main"
    done >"$APT_DIR/sources.list"
  fi
  if [ -z "$(find "$APT_DIR/lists" -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
    apt-get "${APT[@]}" update >&2
  fi
}

# -> $CACHE/{vmlinuz,package,release,kernel.deb} and $INITRD (keyed on the files that
# make it, so that editing guest-init or mkinitrd.py rebuilds it; the kernel is kept).
prepare() {
  CACHE=$STATE/cache/$LABEL-$FLAVOR
  INITRD=$CACHE/initrd-$(cat "$HERE/guest-init" "$HERE/mkinitrd.py" | sha256sum | cut -c1-12).gz
  [ -s "$INITRD" ] && return
  mkdir -p "$CACHE"
  if [ ! -s "$CACHE/kernel.deb" ]; then
    apt_lists
    # The newest linux-image-$FLAVOR in the label's suites, and the ABI package it pulls.
    local ver pkg dl suite_re
    suite_re=$(echo "$SUITES" | sed 's/ /|/')
    ver=$(apt-cache "${APT[@]}" madison "linux-image-$FLAVOR" | awk -F'|' -v re="$suite_re" \
          '$3 ~ " ("re")/" {gsub(/ /,"",$2); print $2}' | sort -V | tail -1)
    [ -n "$ver" ] || { echo "kmatrix: no linux-image-$FLAVOR in $SUITES" >&2; exit 125; }
    pkg=$(apt-cache "${APT[@]}" show "linux-image-$FLAVOR=$ver" \
          | sed -n 's/^Depends: \(linux-image-[^ ,]*\).*/\1/p' | head -1)
    dl=$(mktemp -d "$STATE/cache/download.XXXXXX")
    chmod 755 "$dl"  # apt's download user (_apt) writes there
    (cd "$dl" && apt-get "${APT[@]}" download "$pkg" >&2)
    echo "$pkg $ver" >"$CACHE/package"
    mv "$dl"/*.deb "$CACHE/kernel.deb.tmp" && mv "$CACHE/kernel.deb.tmp" "$CACHE/kernel.deb"
    rm -rf "$dl"
  fi
  local work moddir d
  work=$(mktemp -d "$STATE/cache/extract.XXXXXX")
  dpkg-deb -x "$CACHE/kernel.deb" "$work/root"
  for d in "$work"/root/lib/modules/* "$work"/root/usr/lib/modules/*; do
    [ -d "$d" ] && moddir=$d
  done
  cp "$work"/root/boot/vmlinuz-* "$CACHE/vmlinuz"
  cp "$work"/root/boot/config-* "$CACHE/config"
  basename "$moddir" >"$CACHE/release"
  /usr/bin/python3 "$HERE/mkinitrd.py" "$moddir" "$HERE/guest-init" "$INITRD" >&2
  rm -rf "$work"
  find "$CACHE" -name 'initrd-*.gz' ! -path "$INITRD" -delete
}

for need in qemu-system-x86_64:qemu-system-x86 /bin/busybox:busybox-static; do
  command -v "${need%%:*}" >/dev/null \
    || { echo "kmatrix: needs ${need%%:*}: apt-get install ${need#*:}" >&2; exit 125; }
done
# One preparation at a time (they share the apt lists); later runs find it cached.
exec 9>"$STATE/.lock-prepare"
flock 9
prepare
flock -u 9

ACCEL=${KMATRIX_ACCEL:-}
if [ -z "$ACCEL" ]; then
  if [ -w /dev/kvm ] && [ -d /sys/module/kvm_intel -o -d /sys/module/kvm_amd ]; then ACCEL=kvm; else ACCEL=tcg; fi
fi
if [ "$ACCEL" = kvm ]; then ACCEL_ARGS=(-accel kvm -cpu host); else ACCEL_ARGS=(-accel tcg,thread=multi -cpu max); fi

if [ -n "$KEEP" ]; then
  OUT=$KEEP
else
  OUT=$(mktemp -d /tmp/kmatrix-out.XXXXXX)
  trap 'rm -rf "$OUT"' EXIT
fi
{ printf 'export KMATRIX_OUT=/kmatrix KMATRIX_TIMEOUT=%d\ncd %q || exit 125\n' "$TIMEOUT" "$DIR"
  printf '%s\n' "$*"; } >"$OUT/cmd.sh"

boot() {
  rm -f "$OUT/output" "$OUT/rc" "$OUT/boot_s"
  START=$(date +%s%N)
  set +e
  timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 "${ACCEL_ARGS[@]}" -m "$MEM" \
    -smp "${KMATRIX_CPUS:-2}" -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$OUT/console.log" \
    -kernel "$CACHE/vmlinuz" -initrd "$INITRD" \
    -append "console=ttyS0 panic=-1 quiet ${KMATRIX_APPEND:-}" \
    -fsdev local,id=root,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=root,mount_tag=root \
    -fsdev "local,id=out,path=$OUT,security_model=none" \
    -device virtio-9p-pci,fsdev=out,mount_tag=out >"$OUT/qemu.log" 2>&1
  QRC=$?
  set -e
  ELAPSED=$(( ($(date +%s%N) - START) / 1000000 ))
  cp "$OUT/console.log" "$STATE/last-console-$LABEL.log" 2>/dev/null || true
}
# A guest that died before it started the command (a rare early-boot oops under
# multi-threaded TCG was seen once in ~50 boots) is booted once more; one that died
# while running it is reported (exit 125 and the console), never retried.
boot
if [ ! -e "$OUT/boot_s" ] && [ $QRC -ne 124 ] && [ $QRC -ne 137 ]; then
  echo "kmatrix: the guest died before it started the command; booting it again" >&2
  grep -m3 -E "BUG|Oops|panic" "$OUT/console.log" >&2 || true
  boot
fi

[ -f "$OUT/output" ] && cat "$OUT/output"
printf 'kmatrix: %s (%s, %s): guest booted at %ss, total %d.%01ds\n' "$LABEL" \
  "$(cat "$CACHE/package")" "${ACCEL_ARGS[1]%%,*}" "$(cat "$OUT/boot_s" 2>/dev/null || echo ?)" \
  $((ELAPSED / 1000)) $((ELAPSED % 1000 / 100)) >&2
if [ -s "$OUT/rc" ]; then exit "$(cat "$OUT/rc")"; fi
if [ $QRC -eq 124 ] || [ $QRC -eq 137 ]; then
  echo "kmatrix: timed out after ${TIMEOUT}s" >&2; tail -30 "$OUT/console.log" >&2; exit 124
fi
echo "kmatrix: the guest did not run the command (qemu rc $QRC)" >&2
cat "$OUT/qemu.log" >&2; tail -40 "$OUT/console.log" >&2
exit 125
