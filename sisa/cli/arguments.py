"""Options and inputs several ``sisa`` commands share: runtime overrides, shard selection, ID files."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import RUNTIME_KEYS
from ..exceptions import SisaError

RUNTIME_HELP = ", ".join(RUNTIME_KEYS)


def runtime_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="runtime",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"for this process only, what does not change the models: {RUNTIME_HELP} (repeatable)",
    )


def shard_option(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--shard",
        dest="shards",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help=f"{verb} only this shard (repeatable); default all",
    )


def read_ids(path: str | None) -> list[str]:
    if not path:
        return []
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SisaError(f"cannot read ID file {path!r}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
