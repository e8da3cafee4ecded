"""JSON lines: one compact record per line (flowtap's fields, or Qtap's shape)."""

from __future__ import annotations

import json

from flowtap.records.connection import Record
from flowtap.sinks.base import LineSink
from flowtap.sinks.qtap_format import to_qtap


class JsonLinesSink(LineSink):
    def format(self, record: Record) -> str:
        return json.dumps(record, separators=(",", ":"))


class QtapJsonSink(LineSink):
    """`--output json --output-format qtap`: Qtap's field names (sinks/qtap_format.py)."""

    def format(self, record: Record) -> str:
        return json.dumps(to_qtap(record), separators=(",", ":"))
