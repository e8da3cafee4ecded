"""The kernel matrix (`make test-kernels`): boots each kernel under qemu with run.sh, runs
guest.sh there (`flowtap check`, then `pytest -m kernels`), and prints a table of what came
back through the writable share. Exits 1 when any kernel failed.

usage: matrix.py [--jobs N] [--timeout S] [--memory MiB] [--out DIR] LABEL...
LABEL: 5.10, 6.1, 6.12 (a Debian kernel in a qemu guest) or host (this machine, no guest),
optionally with ~FEATURE[,FEATURE] to run the sensor without those kernel features
(--avoid-kernel-features): 6.1~fentry takes the kprobe fallback on a kernel that has both.
A kernel passes when `flowtap check` exits 0 and every selected test passed: a test that
failed, errored or was skipped fails its kernel (a skip in the matrix proves nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUN = HERE / "run.sh"
GUEST = HERE / "guest.sh"
# Beyond run.sh's own bound on the guest: the first use of a label downloads a kernel.
PREPARE_S = 300
# The Go peers of tests/e2e/test_go_tls.py, built here once: compiling them under qemu's
# emulation takes minutes. The guests find them through $FLOWTAP_TEST_GO_PEERS.
BUILD_GO_PEERS = (
    "import sys; from pathlib import Path; from tests.e2e.test_go_tls import build_go_peers; "
    "build_go_peers(Path(sys.argv[1]))"
)
REASON_CHARS = 160

_print_lock = threading.Lock()


def say(text: str) -> None:
    with _print_lock:
        print(text, flush=True)


@dataclass
class Outcome:
    label: str
    rc: int = -1
    seconds: float = 0.0
    kernel: str = "?"
    check_rc: int | None = None
    check: str = ""
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)  # reason -> tests

    @property
    def ok(self) -> bool:
        return (
            self.rc == 0
            and self.check_rc == 0
            and self.passed > 0
            and self.failed == 0
            and self.skipped == 0
        )


def read_junit(path: Path, outcome: Outcome) -> None:
    """Counts and the first line of each failure, error and skip reason."""
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:  # the test running when pytest was interrupted
            continue
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        verdicts = [child for child in case if child.tag in ("failure", "error", "skipped")]
        if not verdicts:
            outcome.passed += 1
            continue
        verdict = verdicts[0]
        if verdict.tag == "skipped":
            outcome.skipped += 1
        else:
            outcome.failed += 1
        reason = summary(verdict.get("message") or "", verdict.text or "")
        outcome.reasons.setdefault(f"{verdict.tag}: {reason}", []).append(name)


def summary(message: str, text: str) -> str:
    """The first line of a failure, and flowtap's own last error line and the last line
    of what it says the kernel said, when it has them (the sensor's stderr follows
    "flowtap exited 1 before it was ready")."""
    first = next((line.strip() for line in (message or text).splitlines() if line.strip()), "")
    errors = [line.removeprefix("E").strip() for line in text.splitlines() if line[:1] == "E"]
    own = [line for line in errors if line.startswith("flowtap: ") and "libbpf:" not in line]
    said = [line for line in errors if line.startswith("kernel said:")]
    lines = [first or "(no message)", *own[-1:], *said[-1:]]
    return " / ".join(line[:REASON_CHARS] for line in lines)


def run_kernel(label: str, args: argparse.Namespace) -> Outcome:
    outcome = Outcome(label)
    workdir: Path = args.out / label
    shutil.rmtree(workdir, ignore_errors=True)
    share = workdir / "share"
    share.mkdir(parents=True)
    log = workdir / "log"
    kernel, _, avoid = label.partition("~")
    argv = [str(RUN), "-t", str(args.timeout), "-m", str(args.memory), "-o", str(share)]
    argv += ["-C", str(ROOT), kernel, "--", f"FLOWTAP_TEST_GO_PEERS={args.go_peers}"]
    if avoid:
        argv.append(f"FLOWTAP_AVOID_KERNEL_FEATURES={avoid}")
    argv += ["bash", str(GUEST)]
    say(f"kernels: {label}: started ({log})")
    start = time.monotonic()
    with log.open("wb") as out:
        # Its own process group, so that a run that outlives every bound is stopped whole
        # (run.sh and the qemu it started), and only that.
        process = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            outcome.rc = process.wait(args.timeout + PREPARE_S)
        except subprocess.TimeoutExpired:
            outcome.problems.append(f"run.sh still running after {args.timeout + PREPARE_S} s")
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    outcome.seconds = time.monotonic() - start
    collect(share, outcome)
    if outcome.rc not in (0, 1):
        what = {124: "timed out", 125: "the guest did not finish the command"}
        detail = what.get(outcome.rc, "stopped")
        outcome.problems.insert(0, f"run.sh exit {outcome.rc}: {detail} (see {log})")
    say(f"kernels: {label}: {'ok' if outcome.ok else 'FAILED'} in {outcome.seconds:.0f} s")
    return outcome


def collect(share: Path, outcome: Outcome) -> None:
    with contextlib.suppress(OSError):
        outcome.kernel = (share / "kernel").read_text().strip()
    with contextlib.suppress(OSError, ValueError):
        outcome.check_rc = int((share / "check.rc").read_text())
    with contextlib.suppress(OSError):
        outcome.check = (share / "check.txt").read_text(errors="replace")
    with contextlib.suppress(OSError, ValueError):
        if int((share / "pytest.rc").read_text()) == 124:
            outcome.problems.append("pytest interrupted at the guest's time budget")
    junit = share / "junit.xml"
    try:
        read_junit(junit, outcome)
    except (OSError, ET.ParseError) as exc:
        outcome.problems.append(f"no test results ({junit}: {exc})")


def table(outcomes: list[Outcome]) -> str:
    rows = [("label", "kernel", "check", "passed", "failed", "skipped", "time", "result")]
    for o in outcomes:
        check = "-" if o.check_rc is None else f"exit {o.check_rc}"
        rows.append(
            (o.label, o.kernel, check, str(o.passed), str(o.failed), str(o.skipped),
             f"{o.seconds:.0f} s", "ok" if o.ok else "FAILED")
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def report(outcomes: list[Outcome]) -> None:
    for o in outcomes:
        print(f"\n=== {o.label} ({o.kernel}): flowtap check, exit {o.check_rc}")
        print(o.check.rstrip() or "(no output)")
        for problem in o.problems:
            print(f"  {problem}")
        for reason, tests in o.reasons.items():
            print(f"  {len(tests)} x {reason}")
            for test in tests:
                print(f"      {test}")
    print()
    print(table(outcomes))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="+", metavar="LABEL")
    parser.add_argument("--jobs", type=int, default=2, help="guests at once")
    parser.add_argument("--timeout", type=int, default=720, help="seconds per guest")
    parser.add_argument("--memory", type=int, default=3072, help="MiB per guest")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "kernels")
    args = parser.parse_args()
    args.out = args.out.resolve()
    start = time.monotonic()
    args.go_peers = args.out / "go-peers"
    shutil.rmtree(args.go_peers, ignore_errors=True)
    args.go_peers.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-c", BUILD_GO_PEERS, str(args.go_peers)], cwd=ROOT, check=True,
        timeout=600,
    )  # fmt: skip
    say(f"kernels: Go peers built in {time.monotonic() - start:.0f} s ({args.go_peers})")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(lambda label: run_kernel(label, args), args.labels))
    report(outcomes)
    print(f"\n{len(outcomes)} kernel(s) in {time.monotonic() - start:.0f} s, {args.jobs} at once")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
