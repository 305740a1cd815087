"""The typed schema of a user's raw table (``data.schema``): what each column is and how it is encoded.

``data.schema`` is a mapping column -> spec, or the path of a YAML file holding that mapping (drafted by
``sisa schema``; see docs/preprocessing.md). Every parameter of the encoding is **declared** here (a category list, a
centre and scale, a range), **data-independent** (hashing into buckets) or **fitted on each shard's first slice
only** (``scaling: slice0``: the statistics live inside each shard model). Nothing is fitted on the whole table,
so deleting a record can never leave a trace in the encoding (docs/design.md §2.5).

Specs (every key but ``type`` optional)::

    age:    {type: numeric, missing: indicator, scaling: slice0}       # default for numbers
    income: {type: numeric, center: 50000, scale: 20000, transform: log1p}
    pixel:  {type: numeric, range: [0, 255], missing: error}
    city:   {type: categorical, categories: [Paris, Rome], missing: category, missing_values: ["?"]}
    domain: {type: categorical, hash_buckets: 32}
    member: {type: boolean, missing: indicator}
    notes:  {type: ignore}                                              # accepted in tables, never a feature

A spec may also be just the type name (``age: numeric``). The parsed schema is normalised (every default written
out) and frozen inline into the run's config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..config import MISSING_SUFFIX, DataConfig
from ..exceptions import ConfigError

UNKNOWN = "__unknown__"  # the bucket of categorical values outside the declared list (and of gaps, missing: unknown)
MISSING_CATEGORY = "__missing__"  # the category of gaps (missing: category)
TYPES = ("numeric", "categorical", "boolean", "ignore")
MISSING = {
    "numeric": ("indicator", "error"),
    "categorical": ("category", "unknown", "error"),
    "boolean": ("indicator", "error"),
    "ignore": ("ignore",),
}
SCALINGS = ("slice0", "declared", "range", "none")
TRANSFORMS = ("none", "log1p")
KEYS = {
    "numeric": {"type", "missing", "missing_values", "scaling", "center", "scale", "range", "transform"},
    "categorical": {"type", "missing", "missing_values", "categories", "hash_buckets"},
    "boolean": {"type", "missing", "missing_values"},
    "ignore": {"type"},
}


def canonical(value: Any) -> str:
    """A raw value as the text categories are compared by: 3, 3.0 and "3" are one value; booleans are true/false."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Column:
    """One raw column's type and encoding parameters (all declared, none learned from the table)."""

    name: str
    type: str
    missing: str
    missing_values: tuple[str, ...] = ()  # raw values that mean "missing" besides null/NaN, e.g. "?"
    scaling: str = "none"  # numeric
    center: float = 0.0
    scale: float = 1.0
    range: tuple[float, float] | None = None
    transform: str = "none"
    categories: tuple[str, ...] = ()  # categorical, declared
    hash_buckets: int | None = None  # categorical, hashed

    def encoded_names(self) -> list[str]:
        """The encoded columns this raw column becomes: fixed by the spec, never by the data."""
        n = self.name
        if self.type == "ignore":
            return []
        if self.type == "categorical":
            if self.hash_buckets:
                body = [f"{n}#{b}" for b in range(self.hash_buckets)]
            else:
                body = [f"{n}={c}" for c in self.categories] + [f"{n}={UNKNOWN}"]
            return body + ([f"{n}={MISSING_CATEGORY}"] if self.missing == "category" else [])
        return [n] + ([f"{n}{MISSING_SUFFIX}"] if self.missing == "indicator" else [])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "ignore":
            return out
        out["missing"] = self.missing
        if self.missing_values:
            out["missing_values"] = list(self.missing_values)
        if self.type == "numeric":
            out["scaling"] = self.scaling
            if self.scaling == "declared":
                out.update(center=self.center, scale=self.scale)
            if self.scaling == "range":
                out["range"] = list(self.range or ())
            out["transform"] = self.transform
        if self.type == "categorical":
            if self.hash_buckets:
                out["hash_buckets"] = self.hash_buckets
            else:
                out["categories"] = list(self.categories)
        return out


@dataclass(frozen=True)
class Schema:
    columns: tuple[Column, ...] = field(default_factory=tuple)

    @property
    def names(self) -> list[str]:
        """Raw column names, in schema order (ignored columns included)."""
        return [c.name for c in self.columns]

    def feature_names(self) -> list[str]:
        return [n for c in self.columns for n in c.encoded_names()]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {c.name: c.to_dict() for c in self.columns}


def load_schema(value: Any, where: str = "data.schema") -> Schema | None:
    """``data.schema`` as given: None, a mapping, or a YAML file's path. Raises one ConfigError listing every problem."""
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise ConfigError([f"{where}: schema file {value!r} does not exist"])
        try:
            value = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError([f"{where}: {path} is not valid YAML ({exc})"]) from None
        where = f"{where} ({path})"
    return parse_schema(value, where)


def parse_schema(raw: Any, where: str = "data.schema") -> Schema:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError([f"{where}: expected a non-empty mapping column -> spec, got {raw!r}"])
    problems: list[str] = []
    columns = [_column(str(name), spec, f"{where}.{name}", problems) for name, spec in raw.items()]
    schema = Schema(tuple(c for c in columns if c is not None))
    names = schema.feature_names()
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash and not problems:  # a bad spec's own problems first; its names are not meaningful yet
        problems.append(f"{where}: encoded column names collide: {clash[:10]}; rename a column")
    if not problems and not names:
        problems.append(f"{where}: every column is ignored; declare at least one feature")
    if problems:
        raise ConfigError(problems)
    return schema


def _column(name: str, spec: Any, where: str, problems: list[str]) -> Column | None:
    spec = {"type": spec} if isinstance(spec, str) else spec
    if not isinstance(spec, dict):
        problems.append(
            f"{where}: expected a spec mapping (e.g. {{type: numeric}}) or a type name, got {spec!r}"
        )
        return None
    kind = spec.get("type")
    if kind not in TYPES:
        problems.append(f"{where}.type: expected one of {', '.join(TYPES)}, got {kind!r}")
        return None
    unknown = sorted(set(map(str, spec)) - KEYS[kind])
    if unknown:
        problems.append(f"{where}: unknown keys {unknown} for type {kind}; known: {sorted(KEYS[kind])}")
    default = MISSING[kind][0]
    missing = spec.get("missing", default)
    if missing not in MISSING[kind]:
        problems.append(f"{where}.missing: expected one of {', '.join(MISSING[kind])}, got {missing!r}")
    tokens = spec.get("missing_values", [])
    if not isinstance(tokens, list):
        problems.append(f"{where}.missing_values: expected a list of values, got {tokens!r}")
        tokens = []
    col = Column(name, kind, missing, tuple(canonical(t) for t in tokens))
    if kind == "numeric":
        return _numeric(col, spec, where, problems)
    if kind == "categorical":
        return _categorical(col, spec, where, problems)
    return col


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numeric(col: Column, spec: dict, where: str, problems: list[str]) -> Column:
    declared = "center" in spec or "scale" in spec
    scaling = spec.get("scaling", "declared" if declared else "range" if "range" in spec else "slice0")
    if scaling not in SCALINGS:
        problems.append(f"{where}.scaling: expected one of {', '.join(SCALINGS)}, got {scaling!r}")
    center, scale, lo_hi = spec.get("center", 0.0), spec.get("scale", 1.0), spec.get("range")
    if scaling == "declared" and not (_number(center) and _number(scale) and scale > 0):
        problems.append(
            f"{where}: scaling declared needs center (a number) and scale (> 0), got {center!r}, {scale!r}"
        )
    if scaling != "declared" and declared:
        problems.append(f"{where}: center/scale are only used with scaling: declared (got scaling {scaling})")
    if scaling == "range":
        if not (
            isinstance(lo_hi, list) and len(lo_hi) == 2 and all(map(_number, lo_hi)) and lo_hi[0] < lo_hi[1]
        ):
            problems.append(f"{where}.range: expected [low, high] with low < high, got {lo_hi!r}")
            lo_hi = [0.0, 1.0]
    elif lo_hi is not None:
        problems.append(f"{where}.range: only used with scaling: range (got scaling {scaling})")
    transform = spec.get("transform", "none")
    if transform not in TRANSFORMS:
        problems.append(f"{where}.transform: expected one of {', '.join(TRANSFORMS)}, got {transform!r}")
    return Column(
        col.name,
        col.type,
        col.missing,
        col.missing_values,
        scaling=scaling,
        center=float(center) if _number(center) else 0.0,
        scale=float(scale) if _number(scale) else 1.0,
        range=(float(lo_hi[0]), float(lo_hi[1])) if scaling == "range" else None,
        transform=transform,
    )


def _categorical(col: Column, spec: dict, where: str, problems: list[str]) -> Column:
    cats, buckets = spec.get("categories"), spec.get("hash_buckets")
    if (cats is None) == (buckets is None):
        problems.append(f"{where}: give either categories: [...] (declared values) or hash_buckets: N")
        return col
    if buckets is not None:
        if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 1:
            problems.append(f"{where}.hash_buckets: expected an integer >= 1, got {buckets!r}")
            buckets = 1
        if col.missing == "unknown":
            problems.append(f"{where}.missing: hashed columns have no unknown bucket; use category or error")
        return Column(col.name, col.type, col.missing, col.missing_values, hash_buckets=buckets)
    if not isinstance(cats, list):
        problems.append(f"{where}.categories: expected a list of values, got {cats!r}")
        return col
    for v in cats:
        if isinstance(v, bool):
            problems.append(
                f"{where}.categories: {v!r} is a YAML boolean; quote it ('yes', 'no', 'on'...) if you mean the text"
            )
    text = [canonical(v) for v in cats]
    dupes = sorted({t for t in text if text.count(t) > 1})
    if dupes:
        problems.append(f"{where}.categories: duplicate values {dupes[:10]}")
    reserved = sorted({UNKNOWN, MISSING_CATEGORY} & set(text))
    if reserved:
        problems.append(f"{where}.categories: {reserved} are reserved bucket names")
    return Column(col.name, col.type, col.missing, col.missing_values, categories=tuple(text))


def schema_of(data: DataConfig) -> Schema | None:
    """The config's schema (a path is read), checked against its other data keys; None without one."""
    schema = load_schema(data.schema)
    if schema is None:
        return None
    reserved = {
        "data.id_column": data.id_column,
        "data.label_column": data.label_column,
        "data.subject_column": data.subject_column,
        "data.deletion_prob_column": data.deletion_prob_column,
    }
    problems = [
        f"data.schema: {col!r} is {key} and cannot be a feature; drop it from the schema"
        for key, col in reserved.items()
        if col and col in schema.names
    ]
    if data.features is not None and list(data.features) != schema.feature_names():
        problems.append(
            "data.features: leave it null when data.schema is set (the schema's encoded columns become the features)"
        )
    if problems:
        raise ConfigError(problems)
    return schema
