"""The request log: one row per deletion or addition request (``kind``), from the journal, in arrival order.

Each row says when a request was made, forgotten (rolled back and erased: no model that saw it answers) and
applied (caught up: the retrain restored the accuracy) (UTC, ISO 8601), how many records and data subjects it
forgot, which shards and slices were retrained at what cost, and its status (``pending`` until it is applied;
a pending request is being applied, or will be replayed by the next command). The journal holds keyed hashes
only, so the log never names a record.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

from ..exceptions import UsageError
from ..session import reader_session
from ..store.journal import Journal, kind_of

COLUMNS = [
    "request_id",
    "kind",
    "requested_utc",
    "forgotten_utc",
    "applied_utc",
    "status",
    "records",
    "subjects",
    "shards",
    "slices_retrained",
    "samples_retrained",
    "seconds",
    "generation",
    "returning_allowed",
]
FORMATS = ("table", "csv", "json")


def deletion_log(root: str | Path) -> list[dict]:
    """Rows of the deletion log, oldest first (replays pending requests first when the run is idle)."""
    run = reader_session(root)
    return [_row(e) for e in Journal(run.journal_dir).entries()]


def _row(entry: dict) -> dict:
    receipt = entry.get("receipt", {})
    slices = receipt.get("slices_retrained", {})
    return {
        "request_id": entry["request_id"],
        "kind": kind_of(entry),
        "requested_utc": _utc(entry["created"]),
        "forgotten_utc": _utc(entry["rolled_back"]) if "rolled_back" in entry else None,
        "applied_utc": _utc(entry["applied"]) if "applied" in entry else None,
        "status": entry["status"],
        "records": int(entry["records"]),
        "subjects": len(entry.get("subject_hashes", [])),
        "shards": sorted(int(s) for s in entry["shards"]),
        "slices_retrained": {str(s): list(v) for s, v in sorted(slices.items(), key=lambda kv: int(kv[0]))},
        "samples_retrained": receipt.get("samples_retrained"),
        "seconds": receipt.get("seconds"),
        "generation": receipt.get("generation"),
        "returning_allowed": bool(entry.get("allow_returning", False)) if kind_of(entry) == "add" else None,
    }


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_log(rows: list[dict], fmt: str = "table") -> str:
    """The log as an aligned text table, CSV (one cell per value, lists joined) or JSON."""
    if fmt not in FORMATS:
        raise UsageError([("fmt", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")])
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    cells = [[_cell(r[c]) for c in COLUMNS] for r in rows]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(cells)
        return buf.getvalue()
    if not rows:
        return "no deletion or addition requests\n"
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = [COLUMNS, *cells]
    return "".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n" for line in lines
    )


def _cell(value) -> str:
    """Lists as ``0 2``, slice maps as ``0:1-3 2:3``, missing values as empty."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{s}:{_span(v)}" for s, v in value.items())
    return str(value)


def _span(slices: list[int]) -> str:
    if not slices:
        return "-"
    return f"{slices[0]}-{slices[-1]}" if len(slices) > 1 else str(slices[0])
