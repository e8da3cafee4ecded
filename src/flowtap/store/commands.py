"""`flowtap query` and `flowtap export`: the store read while the sensor writes it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flowtap import safefile
from flowtap.rules.syntax import RuleSyntaxError
from flowtap.store import har
from flowtap.store.db import StoreError, connect
from flowtap.store.query import Record, Selection, compile_filter, select

EXIT_OK = 0
EXIT_USAGE = 2

_FILTER_HELP = (
    "a rule of the configuration's rule language (docs/configuration.md), e.g. "
    '\'http.req.host == "example.com" and src.process.binary == "curl"\'; the words are '
    "joined with spaces"
)


def _duration(text: str) -> float:
    """A duration: seconds, or a number with s, m, h or d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (30, 30s, 5m, 2h, 1d)"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration is not negative")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, required=True, help="the sensor's --store file")
    parser.add_argument(
        "--since", type=_duration, metavar="DURATION", help="only the last DURATION (5m, 1h)"
    )
    parser.add_argument("filter", nargs="*", metavar="FILTER", help=_FILTER_HELP)


def add_commands(commands: Any) -> None:
    query = commands.add_parser("query", help="print what the store (--store) holds")
    _common(query)
    query.add_argument("--output", choices=("table", "json"), default="table")
    query.add_argument(
        "--connections", action="store_true", help="connection records, not HTTP transactions"
    )
    query.add_argument("--limit", type=int, metavar="N", help="at most N records")
    export = commands.add_parser("export", help="write the store's HTTP transactions as HAR")
    _common(export)
    export.add_argument("--har", type=Path, required=True, metavar="FILE", help="HAR 1.2 file")


def _selection(args: argparse.Namespace, kind: str) -> Selection:
    since = time.time() - args.since if args.since is not None else None
    return Selection(
        kind=kind, since=since, rule=compile_filter(args.filter), limit=getattr(args, "limit", None)
    )


def _table(records: Iterable[Record], kind: str) -> Iterable[str]:
    if kind == "http":
        yield f"{'TIME':26} {'PID':>7} {'PROCESS':15} {'METHOD':7} {'STATUS':>6} {'MS':>8}  URL"
        for r in records:
            req, res, proc = r.get("request") or {}, r.get("response") or {}, r["process"]
            yield (
                f"{r['timestamp']:26} {proc['pid']:>7} {proc['comm']:15.15} "
                f"{req.get('method', '-'):7} {res.get('status', '-'):>6} "
                f"{r['duration_ms']:>8.1f}  {req.get('url', '(request not seen)')}"
            )
        return
    yield f"{'TIME':26} {'PID':>7} {'PROCESS':15} {'EVENT':5} {'DIR':7} {'REMOTE':24} STATUS"
    for r in records:
        proc, remote = r["process"], r["remote"]
        peer = (
            f"[{remote['ip']}]:{remote['port']}"
            if ":" in remote["ip"]
            else (f"{remote['ip']}:{remote['port']}")
        )
        yield (
            f"{r['timestamp']:26} {proc['pid']:>7} {proc['comm']:15.15} {r['event']:5} "
            f"{r['direction']:7} {peer:24} {r.get('status') or r.get('state') or ''}"
        )


def main(args: argparse.Namespace) -> int:
    try:
        db = connect(args.store, create=False)
    except StoreError as exc:
        print(f"flowtap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        kind = "connections" if getattr(args, "connections", False) else "http"
        selection = _selection(args, kind)
        records = select(db, selection)
        if args.command == "export":
            data = json.dumps(har.har(records), indent=1).encode() + b"\n"
            safefile.replace(args.har, data)
            return EXIT_OK
        if args.output == "json":
            for record in records:
                sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
        else:
            for line in _table(records, kind):
                sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except RuleSyntaxError as exc:
        print(f"flowtap: the filter is not a valid rule: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `flowtap query | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, StoreError) as exc:
        print(f"flowtap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        db.close()
    return EXIT_OK
