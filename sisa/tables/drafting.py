"""``sisa schema``: draft a ``data.schema`` YAML from a table, for the user to review and commit beside the config.

What the draft may contain is the point (docs/preprocessing.md): a schema outlives every deletion, so it must not
hold anything one record determines. The draft therefore

- lists a category only when at least ``min_count`` rows hold it (default :data:`DEFAULT_MIN_COUNT`); rarer values
  go to the column's ``__unknown__`` bucket, and only their number is reported (on stderr, never written): a value
  one person holds identifies them, and written into a config it would outlive their deletion;
- scales numeric columns by each shard's first-slice statistics (``scaling: slice0``), never by a table minimum,
  maximum, mean or count;
- names the label's frequent classes in a comment (rare classes: a warning, without the values).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import yaml

from .encoder import FALSE, TRUE
from .schema import UNKNOWN, canonical

# 10 rows: a declared category is then shared by at least ten records, so no single person's value is written,
# and deleting any one holder still leaves nine. Below ~10 examples a model learns little from a one-hot column
# anyway. Raise it for small or sensitive tables (it is k in the k-anonymity sense for this one column).
DEFAULT_MIN_COUNT = 10
MISSING_TOKENS = ("?", "")  # raw text that means "missing" in common exports (UCI files use "?")
MAX_DECLARED = 256  # more frequent values than this: hash them into buckets instead of declaring a list


@dataclass
class Draft:
    text: str  # the commented YAML
    warnings: list[str] = field(default_factory=list)


def draft_schema(
    df: pd.DataFrame,
    id_column: str,
    label_column: str,
    subject_column: str | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
    source: str = "the table",
) -> Draft:
    """The schema draft of ``df``: inferred types, frequent categories, warnings (which name no rare value)."""
    reserved = {id_column, label_column, subject_column}
    draft = Draft("")
    specs: dict[str, dict] = {}
    notes: dict[str, str] = {}
    for column in df.columns:
        if column in reserved:
            continue
        spec, note = _infer(str(column), df[column], min_count, draft.warnings)
        specs[str(column)], notes[str(column)] = spec, note
    head = _header(source, min_count, label_column, df.get(label_column), draft.warnings)
    body = [_entry(name, spec, notes[name]) for name, spec in specs.items()]
    draft.text = "\n".join(head + body) + "\n"
    return draft


def _header(source: str, k: int, label: str, labels: pd.Series | None, warnings: list[str]) -> list[str]:
    lines = [
        f"# data.schema drafted by `sisa schema` from {source}: review it, then commit it beside the config",
        "# (data.schema: <this file>). Everything here is declared or data-independent: numeric columns are scaled",
        "# by each shard's first slice (scaling: slice0, inside the shard models), and only categories held by at",
        f"# least {k} rows are listed; any other value goes to the column's '{UNKNOWN}' bucket (docs/preprocessing.md).",
    ]
    if labels is None:
        return lines
    frequent, rare = _split(labels.dropna(), k)
    lines.append(
        f"# label {label!r}: classes {frequent} (set data.classes in the config to freeze their order)"
    )
    if rare:
        warnings.append(
            f"label {label!r}: {rare} class(es) are held by fewer than {k} rows each (not listed here); a class "
            "that few records hold identifies them, and the model can barely learn it"
        )
    return lines


def _split(values: pd.Series, k: int) -> tuple[list[str], int]:
    counts = pd.Series([canonical(v) for v in values], dtype=object).value_counts()
    frequent = sorted(str(v) for v, n in counts.items() if n >= k)
    return frequent, int((counts < k).sum())


def _entry(name: str, spec: dict, note: str) -> str:
    text = yaml.safe_dump({name: spec}, default_flow_style=None, sort_keys=False, width=116).rstrip()
    return (f"# {note}\n" if note else "") + text


def _infer(name: str, s: pd.Series, k: int, warnings: list[str]) -> tuple[dict, str]:
    if pd.api.types.is_bool_dtype(s):
        return {"type": "boolean", "missing": "indicator"}, ""
    if pd.api.types.is_numeric_dtype(s):
        present = set(pd.unique(s.dropna()).tolist())
        if present == {0, 1}:
            return {"type": "boolean", "missing": "indicator"}, "0/1 values: read as a boolean"
        return _numeric(), ""
    values = s.dropna()
    text = pd.Series([canonical(v) for v in values], dtype=object)
    tokens = sorted(t for t in MISSING_TOKENS if (text.str.strip() == t).any())
    observed = text[~text.str.strip().isin(tokens)]
    tokens_spec = {"missing_values": tokens} if tokens else {}
    if len(observed) and pd.to_numeric(observed, errors="coerce").notna().all():
        return {**_numeric(), **tokens_spec}, "numbers stored as text"
    if len(observed) and observed.str.strip().str.lower().isin(TRUE | FALSE).all():
        return {"type": "boolean", "missing": "indicator", **tokens_spec}, ""
    return _categorical(name, observed, s.isna().any() or bool(tokens), k, tokens_spec, warnings)


def _numeric() -> dict:
    return {"type": "numeric", "missing": "indicator", "scaling": "slice0"}


def _categorical(
    name: str, observed: pd.Series, gaps: bool, k: int, tokens_spec: dict, warnings: list[str]
) -> tuple[dict, str]:
    counts = observed.value_counts()
    if len(observed) and len(counts) == len(observed) and len(observed) >= k:
        warnings.append(
            f"column {name!r}: every value is unique (an identifier or free text?): left out (type: ignore)"
        )
        return {"type": "ignore"}, "every value unique: an identifier or free text, so never a feature"
    frequent = sorted((str(v) for v, n in counts.items() if n >= k), key=_order)
    rare = counts[counts < k]
    missing = "category" if gaps else "unknown"
    if rare.size:
        warnings.append(
            f"column {name!r}: {rare.size} value(s) held by fewer than {k} rows each ({int(rare.sum())} rows in all) "
            f"go to '{name}={UNKNOWN}' and are not written: a value one person holds identifies them, and in "
            "the config it would outlive their deletion"
        )
    if len(frequent) > MAX_DECLARED:
        buckets = int(2 ** np.ceil(np.log2(len(frequent))))
        spec = {"type": "categorical", "missing": "category", "hash_buckets": buckets, **tokens_spec}
        return spec, f"{len(frequent)} frequent values: hashed into {buckets} buckets instead of listed"
    return {"type": "categorical", "missing": missing, **tokens_spec, "categories": frequent}, ""


def _order(value: str) -> tuple:
    """Numbers in numeric order, then text in alphabetical order."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)
