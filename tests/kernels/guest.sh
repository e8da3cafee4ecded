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
# A writable home and Go cache (the tests build Go peers); no proxy for loopback traffic.
export HOME=$tmp/home GOCACHE=$tmp/gocache GOPATH=$tmp/gopath
mkdir -p "$HOME"
uname -r >"$out/kernel"

echo "=== $(uname -r): flowtap check"
check=0
.venv/bin/flowtap check --color never >"$out/check.txt" 2>&1 || check=$?
echo "$check" >"$out/check.rc"
cat "$out/check.txt"
echo "flowtap check: exit $check"

echo "=== $(uname -r): pytest -m kernels"
tests=0
.venv/bin/python -m pytest -m kernels -p no:cacheprovider -ra \
  --junitxml="$out/junit.xml" tests/e2e "$@" || tests=$?
echo "$tests" >"$out/pytest.rc"
[ "$check" -eq 0 ] && [ "$tests" -eq 0 ]
