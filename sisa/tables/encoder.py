"""The one encoder: a raw table (text categories, gaps, booleans) -> the float32 feature matrix shard models see.

Training, ``sisa predict``, :class:`sisa.SisaClassifier` on a DataFrame, HTTP ``/predict``, the audit, the
comparison baselines and ``verify --erasure`` all encode through :class:`Encoder`. Its output width and column
names depend on the schema only (never on the data), so every shard has the same width; a row's encoding depends
on that row alone. Encoded columns, in schema order:

- numeric ``c``: ``c`` (declared scaling applied; ``slice0`` columns left unscaled: each shard model scales them
  by its first slice's statistics), and ``c__missing`` (1 where the value was missing; the value is then 0);
- categorical ``c`` with declared categories: one-hot ``c=<value>`` per category, ``c=__unknown__`` for any
  other value (never an error), ``c=__missing__`` for gaps (``missing: category``);
- categorical ``c`` with ``hash_buckets: N``: one-hot ``c#0`` .. ``c#N-1`` by a keyed BLAKE2b hash of the value;
- boolean ``c``: ``c`` in {0, 1} and ``c__missing``.

Bad input (a missing or unknown column, text in a numeric column, an infinite number, a gap where ``missing:
error``) raises one DataError naming every column and its rows; nothing is encoded half.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pandas as pd

from ..exceptions import DataError
from .schema import Column, Schema, canonical

HASH_KEY = b"sisa-categorical-hash-v1"  # fixed: a value's bucket is the same in every run and every process
FLOAT32_MAX = float(np.finfo(np.float32).max)
TRUE = {"true", "t", "yes", "y", "1"}
FALSE = {"false", "f", "no", "n", "0"}


def rows_text(mask: np.ndarray, limit: int = 10) -> str:
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:limit])
    return f"rows {shown}" + (f" (and {len(idx) - limit} more)" if len(idx) > limit else "")


def bucket(value: str, buckets: int) -> int:
    digest = hashlib.blake2b(value.encode(), digest_size=8, key=HASH_KEY).digest()
    return int.from_bytes(digest, "little") % buckets


class Encoder:
    """Encodes raw frames by one :class:`~sisa.tables.schema.Schema`."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.feature_names = schema.feature_names()

    @property
    def width(self) -> int:
        return len(self.feature_names)

    def encode(self, df: pd.DataFrame, source: str = "input", extra: Iterable[str] = ()) -> np.ndarray:
        """float32 [n, width]; ``extra``: other columns the table may hold (ID, label...). Raises DataError."""
        problems: list[str] = []
        out = self.encode_into(df, problems, extra)
        if problems:
            raise DataError(source, problems)
        return out

    def encode_into(self, df: pd.DataFrame, problems: list[str], extra: Iterable[str] = ()) -> np.ndarray:
        """Like :meth:`encode`, appending problems to ``problems`` instead of raising."""
        names = self.schema.names
        missing = [c for c in names if c not in df.columns]
        unknown = [str(c) for c in df.columns if c not in set(names) | set(extra)]
        if missing:
            problems.append(f"missing columns {missing[:20]} (data.schema names them)")
        if unknown:
            problems.append(
                f"columns {unknown[:20]} are not in data.schema; add them (type: ignore to keep them out)"
            )
        n = len(df)
        if missing or unknown:
            return np.zeros((n, self.width), dtype=np.float32)
        blocks = []
        for col in self.schema.columns:
            if col.type != "ignore":
                blocks.append(_ENCODERS[col.type](col, df[col.name].reset_index(drop=True), problems))
        return np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32)

    def category_columns(self) -> list[tuple[str, str, str]]:
        """(raw column, declared value, encoded column) of every declared category."""
        return [
            (c.name, v, f"{c.name}={v}")
            for c in self.schema.columns
            if c.type == "categorical"
            for v in c.categories
        ]


# ---- one raw column each ----------------------------------------------------------------------------------------
def _factorized(s: pd.Series, col: Column) -> tuple[np.ndarray, list, np.ndarray]:
    """(codes, unique raw values, missing mask): missing = null/NaN or one of the column's missing_values."""
    codes, uniques = pd.factorize(s, use_na_sentinel=True)
    values = list(uniques)
    tokens = set(col.missing_values)
    gap_codes = [j for j, v in enumerate(values) if canonical(v) in tokens]
    missing = (codes < 0) | np.isin(codes, gap_codes)
    return codes, values, missing


def _gaps(col: Column, missing: np.ndarray, problems: list[str]) -> None:
    if col.missing == "error" and missing.any():
        problems.append(
            f"column {col.name!r}: missing values at {rows_text(missing)}; "
            "the schema says missing: error (declare a missing-value policy to accept gaps)"
        )


def _numeric(col: Column, s: pd.Series, problems: list[str]) -> np.ndarray:
    n = len(s)
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        values = s.to_numpy(dtype=np.float64, na_value=np.nan)
        missing = np.isnan(values)
        if col.missing_values:
            missing |= np.isin(
                np.array([canonical(v) for v in values], dtype=object), list(col.missing_values)
            )
    else:
        codes, uniques, missing = _factorized(s, col)
        parsed, bad_codes = _parse_numbers(uniques)
        values = (
            np.where(codes >= 0, parsed[np.maximum(codes, 0)], np.nan) if len(parsed) else np.full(n, np.nan)
        )
        bad = np.isin(codes, bad_codes) & ~missing
        if bad.any():
            example = uniques[codes[np.flatnonzero(bad)[0]]]
            problems.append(
                f"column {col.name!r}: expected numbers, got {_describe(example)} at {rows_text(bad)}"
            )
        missing = missing | bad
    values = np.where(missing, 0.0, values)
    if col.transform == "log1p":
        low = values <= -1
        if low.any():
            problems.append(f"column {col.name!r}: transform log1p needs values > -1, got {rows_text(low)}")
        values = np.log1p(np.where(low, 0.0, values))
    wild = ~np.isfinite(values) | (np.abs(values) > FLOAT32_MAX)
    if wild.any():
        problems.append(f"column {col.name!r}: infinite or beyond-float32 values at {rows_text(wild)}")
    _gaps(col, missing, problems)
    if col.scaling == "declared":
        values = (values - col.center) / col.scale
    elif col.scaling == "range":
        lo, hi = col.range or (0.0, 1.0)
        values = (values - lo) / (hi - lo)
    values = np.where(missing | wild, 0.0, values)
    return _with_indicator(col, values, missing, n)


def _parse_numbers(uniques: list) -> tuple[np.ndarray, list[int]]:
    parsed, bad = np.full(len(uniques), np.nan), []
    for j, v in enumerate(uniques):
        if isinstance(v, (bool, np.bool_)):
            bad.append(j)
        elif isinstance(v, (int, float, np.integer, np.floating)):
            parsed[j] = float(v)
        else:
            try:
                parsed[j] = float(str(v).strip())
            except ValueError:
                bad.append(j)
    return parsed, bad


def _with_indicator(col: Column, values: np.ndarray, missing: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, 1 + (col.missing == "indicator")), dtype=np.float32)
    out[:, 0] = values
    if col.missing == "indicator":
        out[:, 1] = missing
    return out


def _categorical(col: Column, s: pd.Series, problems: list[str]) -> np.ndarray:
    n = len(s)
    codes, uniques, missing = _factorized(s, col)
    text = [canonical(v) for v in uniques]
    width = len(col.encoded_names())
    if col.hash_buckets:
        target = np.array([bucket(t, col.hash_buckets) for t in text] + [0], dtype=np.int64)
    else:
        where = {v: j for j, v in enumerate(col.categories)}
        unknown = len(col.categories)
        target = np.array([where.get(t, unknown) for t in text] + [0], dtype=np.int64)
    slot = target[codes]  # code -1 (null) reads the padding entry; missing rows are placed below
    if col.missing == "category":
        slot = np.where(missing, width - 1, slot)
    elif col.missing == "unknown":
        slot = np.where(missing, len(col.categories), slot)
    _gaps(col, missing, problems)
    out = np.zeros((n, width), dtype=np.float32)
    keep = ~missing if col.missing == "error" else np.ones(n, dtype=bool)
    out[np.flatnonzero(keep), slot[keep]] = 1.0
    return out


def _boolean(col: Column, s: pd.Series, problems: list[str]) -> np.ndarray:
    n = len(s)
    codes, uniques, missing = _factorized(s, col)
    parsed = np.array([_truth(v) for v in uniques] + [0.0], dtype=np.float64)
    values = parsed[codes]
    bad = np.isnan(values) & ~missing
    if bad.any():
        example = uniques[codes[np.flatnonzero(bad)[0]]]
        problems.append(
            f"column {col.name!r}: expected true/false (or yes/no, 1/0), got {_describe(example)} at {rows_text(bad)}"
        )
    _gaps(col, missing, problems)
    return _with_indicator(col, np.where(missing | bad, 0.0, values), missing, n)


def _truth(v) -> float:
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    text = canonical(v).strip().lower()
    return 1.0 if text in TRUE else 0.0 if text in FALSE else np.nan


def _describe(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return f"a boolean ({str(bool(v)).lower()})"
    if isinstance(v, str):
        return f"text {v[:40]!r}"
    return f"{type(v).__name__} {v!r}"


_ENCODERS = {"numeric": _numeric, "categorical": _categorical, "boolean": _boolean}
