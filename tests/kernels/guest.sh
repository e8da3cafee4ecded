#!/bin/bash
# What `make test-kernels` runs in each guest (and on the host for the label `host`), from
# the project root: `flowtap check`, then the e2e tests marked `kernels`, with the project
# venv. Results go to $KMATRIX_OUT (the writable share): kernel, check.txt, check.rc,
# junit.xml, pytest.rc. Exits non-zero when either failed. Extra words go to pytest.
set -euo pipefail
out=${KMATRIX_OUT:?run me through tests/kernels/run.sh}
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d /tmp/flowtap-kernels.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
# A writable home and Go cache (for Go builds the tests may make).
export HOME=$tmp/home GOCACHE=$tmp/gocache GOPATH=$tmp/gopath
mkdir -p "$HOME"
# In a guest (KMATRIX=1, set by guest-init) everything is several times slower: the tests'
# bounds grow with it. pytest is interrupted (SIGINT: junit.xml is still written) a minute
# before the guest's own bound, so that what ran is reported.
if [ -n "${KMATRIX:-}" ]; then
  export FLOWTAP_TEST_TIMEOUT_SCALE=${FLOWTAP_TEST_TIMEOUT_SCALE:-4}
fi
uname -r >"$out/kernel"

echo "=== $(uname -r): flowtap check"
check=0
timeout -k 10 120 .venv/bin/flowtap check --color never >"$out/check.txt" 2>&1 || check=$?
echo "$check" >"$out/check.rc"
cat "$out/check.txt"
echo "flowtap check: exit $check"

echo "=== $(uname -r): pytest -m kernels"
# What is left of the guest's bound (boot and the check took some), less a minute.
limit=${KMATRIX_TIMEOUT:-900}
budget=$(( limit - SECONDS - 60 > 120 ? limit - SECONDS - 60 : 120 ))
tests=0
timeout -s INT -k 30 "$budget" .venv/bin/python -m pytest -m kernels -p no:cacheprovider -ra \
  --junitxml="$out/junit.xml" tests/e2e "$@" || tests=$?
echo "$tests" >"$out/pytest.rc"
[ "$check" -eq 0 ] && [ "$tests" -eq 0 ]
