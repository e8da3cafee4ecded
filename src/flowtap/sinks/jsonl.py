"""JSON lines: one compact record per line."""

from __future__ import annotations

import json

from flowtap.records.connection import Record
from flowtap.sinks.base import LineSink


class JsonLinesSink(LineSink):
    def format(self, record: Record) -> str:
        return json.dumps(record, separators=(",", ":"))
