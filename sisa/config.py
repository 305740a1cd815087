"""Typed, saved configuration.

A run's configuration is a tree of dataclasses with commented defaults. It is loaded from YAML, overridden with
``key=value`` strings (``sharding.shards=8``), validated all at once (every problem named in one error), resolved
(``device: auto`` becomes ``cpu``/``cuda``, the class list is frozen) and written into the run directory together
with its digest. Unknown keys are rejected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .exceptions import ConfigError


@dataclass
class DataConfig:
    train: str | None = None  # training table: .parquet, .csv or .npz
    test: str | None = None  # held-out table used for accuracy reports (optional)
    id_column: str = "record_id"  # unique record ID (int or string); never a feature
    label_column: str = "label"  # class label (int or string)
    features: list[str] | None = None  # feature columns; null = every other column (or the schema's encoding)
    # typed raw columns: a mapping column -> spec, or the path of a YAML file holding it (docs/preprocessing.md);
    # frozen inline into the run's config at train time, so the digest covers it
    schema: Any | None = None
    subject_column: str | None = None  # data-subject ID; when set, placement is by subject (never a feature)
    deletion_prob_column: str | None = None  # per-record deletion probability (distribution_aware sharding)
    classes: list[Any] | None = None  # frozen class list; null = sorted labels of the training table


@dataclass
class ShardingConfig:
    shards: int = 5  # S: number of isolated shards / sub-models
    slices: int = 4  # R: slices per shard (checkpoint after each)
    strategy: str = "uniform"  # uniform | stratified | distribution_aware


@dataclass
class ModelConfig:
    name: str = (
        "mlp"  # mlp | cnn | "package.module:Factory" (called as Factory(n_features, n_classes, **options))
    )
    hidden: list[int] = field(default_factory=lambda: [128])  # MLP hidden layer widths
    activation: str = "relu"  # relu | tanh (MLP)
    dropout: float = 0.0  # dropout probability (seeded per shard, slice and epoch)
    input_shape: list[int] | None = (
        None  # CNN input as [channels, height, width]; null = [1, sqrt(F), sqrt(F)]
    )
    input_scale: float = 1.0  # fixed multiplier applied to inputs (1/255 for raw pixels); never fitted
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for a custom factory


@dataclass
class TrainingConfig:
    epochs: float = 10.0  # e: epochs for an unsliced shard; each of the R slice steps gets 2e/(R+1)
    batch_size: int = 128
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    seed: int = 0  # root of every derived seed (placement, init, shuffling, dropout)
    device: str = "auto"  # auto | cpu | cuda (auto resolves at train time and is saved)
    deterministic: bool = True  # torch deterministic algorithms (needed for bit-exactness on GPU)
    threads: int = 1  # torch CPU threads per shard worker; part of the result (see docs/design.md §2.7)
    executor: str = "auto"  # auto | loop | stacked (resolved and saved)
    stack_size: int | None = None  # shards per stacked group; null = from memory_budget_mb (resolved, saved)
    stack_threads: int | None = None  # CPU threads training a stack's shards side by side; null = the cores
    memory_budget_mb: int = 1024  # budget for one stacked group's batch tensors and activations
    n_jobs: int = 1  # parallel worker processes for the loop executor
    backend: str = "local"  # local | dask
    scheduler: str | None = None  # dask scheduler address tcp://HOST:PORT; null = a local Dask cluster
    progress: bool = True  # show a progress bar on a terminal


@dataclass
class AggregationConfig:
    method: str = "soft"  # soft (mean probability) | hard (majority vote, ties to the lowest class index)
    weights: list[float] | None = None  # optional per-shard weights, one per shard, non-negative
    inference: str = "auto"  # auto | loop | stacked: how the S sub-models are evaluated


Duration = str | float  # seconds, or a string with a unit: 90s, 15m, 12h, 30d (checked by duration_s)


@dataclass
class UnlearningConfig:
    """When a rolled-back shard is retrained (docs/design.md §4.2); how, never what: outside the digest."""

    retrain: str = "immediate"  # immediate | batched (once per shard, see below) | manual (`sisa retrain`)
    max_delay: Duration = (
        "1d"  # batched: retrain a shard once its oldest rollback has waited this long (s, m, h, d)
    )
    max_accuracy_drop: float | None = (
        None  # batched: also when test accuracy fell this much (0.02 = 2 points)
    )
    deadline: Duration = (
        "30d"  # no policy lets a retrain wait longer after the oldest request it covers (GDPR 12(3))
    )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)

    # ---- conversion -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Config:
        problems: list[str] = []
        cfg = _build(cls, raw or {}, "", problems)
        try:
            cfg.validate()
        except ConfigError as exc:  # report range problems together with type problems, once per key
            typed = {p.split(":")[0] for p in problems}
            problems += [p for p in exc.problems if p.split(":")[0] not in typed]
        except (TypeError, ValueError):
            if not problems:
                raise
            # a value of the wrong type broke a range check; its type problem is already listed
        if problems:
            raise ConfigError(problems)
        return cfg

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> Config:
        """Load a YAML file and apply ``key=value`` overrides."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {str(path)!r} does not exist"])
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML ({exc})"]) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"{path}: expected a mapping at the top level, got {type(raw).__name__}"])
        return cls.from_dict(apply_overrides(raw, overrides or []))

    def with_overrides(self, overrides: list[str]) -> Config:
        return Config.from_dict(apply_overrides(self.to_dict(), overrides))

    def with_runtime(self, overrides: list[str] | tuple[str, ...]) -> Config:
        """An existing run's config with ``section.key=value`` overrides of keys that change how fast or where it
        trains, never what (:data:`RUNTIME_KEYS`: outside the digest). Any other key is refused, all at once."""
        problems = []
        for item in overrides:
            key = item.partition("=")[0].strip()
            if key not in RUNTIME_KEYS:
                problems.append(
                    f"{key}: cannot be changed on an existing run (it shapes the trained models); "
                    f"--set here takes only {', '.join(RUNTIME_KEYS)}"
                )
        if problems:
            raise ConfigError(problems)
        return self.with_overrides(list(overrides))  # same digest: RUNTIME_KEYS are all outside it

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def frozen_digest(self) -> Config:
        """Mark this config read-only in practice (a run's frozen config): :meth:`digest` is computed once and kept.
        Returns self."""
        self.__dict__["_digest"] = None
        self.__dict__["_digest"] = self.digest()
        return self

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of everything that shapes training (data file paths excluded)."""
        if self.__dict__.get("_digest"):
            return self.__dict__["_digest"]
        d = self.to_dict()
        d["data"] = {k: v for k, v in d["data"].items() if k not in ("train", "test")}
        if d["data"]["schema"] is None:  # configs without a schema keep the digest they had before it existed
            del d["data"]["schema"]
        d["training"] = {k: v for k, v in d["training"].items() if k not in _NON_RESULT_TRAINING_KEYS}
        d["aggregation"] = {}
        d.pop(
            "unlearning", None
        )  # when to retrain changes no bits (runs trained before it keep their digest)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check value ranges and choices; raise one ConfigError naming every problem."""
        p: list[str] = []
        s, t, m, a, d = self.sharding, self.training, self.model, self.aggregation, self.data
        _positive_int(p, "sharding.shards", s.shards)
        _positive_int(p, "sharding.slices", s.slices)
        _choice(p, "sharding.strategy", s.strategy, ("uniform", "stratified", "distribution_aware"))
        if s.strategy == "distribution_aware" and not d.deletion_prob_column:
            p.append(
                "sharding.strategy: distribution_aware needs data.deletion_prob_column (a column of "
                "per-record deletion probabilities); set it or use strategy=uniform"
            )
        if not (isinstance(t.epochs, (int, float)) and t.epochs > 0):
            p.append(f"training.epochs: expected a number > 0, got {t.epochs!r}")
        _positive_int(p, "training.batch_size", t.batch_size)
        _positive_int(p, "training.threads", t.threads)
        _positive_int(p, "training.n_jobs", t.n_jobs)
        _positive_int(p, "training.memory_budget_mb", t.memory_budget_mb)
        if t.stack_size is not None:
            _positive_int(p, "training.stack_size", t.stack_size)
        if t.stack_threads is not None:
            _positive_int(p, "training.stack_threads", t.stack_threads)
        if not (isinstance(t.lr, (int, float)) and t.lr > 0):
            p.append(f"training.lr: expected a number > 0, got {t.lr!r}")
        _choice(p, "training.optimizer", t.optimizer, ("adam", "sgd"))
        _choice(p, "training.device", t.device, ("auto", "cpu", "cuda"))
        _choice(p, "training.executor", t.executor, ("auto", "loop", "stacked"))
        _choice(p, "training.backend", t.backend, ("local", "dask"))
        if not isinstance(t.seed, int) or isinstance(t.seed, bool) or t.seed < 0:
            p.append(f"training.seed: expected an integer >= 0, got {t.seed!r}")
        _choice(p, "model.activation", m.activation, ("relu", "tanh"))
        if not (0.0 <= m.dropout < 1.0):
            p.append(f"model.dropout: expected 0 <= dropout < 1, got {m.dropout!r}")
        if m.name not in ("mlp", "cnn") and ":" not in str(m.name):
            p.append(
                f"model.name: expected 'mlp', 'cnn' or an import path 'package.module:Factory', got {m.name!r}"
            )
        if not isinstance(m.hidden, list) or any((not isinstance(h, int)) or h <= 0 for h in m.hidden):
            p.append(f"model.hidden: expected a list of positive integers, got {m.hidden!r}")
        if m.input_shape is not None and (
            len(m.input_shape) != 3
            or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in m.input_shape)
        ):
            p.append(f"model.input_shape: expected [channels, height, width], got {m.input_shape!r}")
        _choice(p, "aggregation.method", a.method, ("soft", "hard"))
        _choice(p, "aggregation.inference", a.inference, ("auto", "loop", "stacked"))
        if a.weights is not None:
            if len(a.weights) != s.shards:
                p.append(
                    f"aggregation.weights: expected {s.shards} weights (one per shard), got {len(a.weights)}; "
                    "give one weight per shard or null"
                )
            elif any((not isinstance(w, (int, float))) or w < 0 for w in a.weights) or sum(a.weights) <= 0:
                p.append(
                    "aggregation.weights: expected non-negative numbers with a positive sum, "
                    f"got {a.weights!r}"
                )
        cols = [("data.id_column", d.id_column), ("data.label_column", d.label_column)]
        if d.subject_column:
            cols.append(("data.subject_column", d.subject_column))
        names = [c for _, c in cols]
        if len(set(names)) != len(names):
            p.append(f"data: id, label and subject columns must differ, got {dict(cols)}")
        if d.schema is not None and not isinstance(d.schema, (str, dict)):
            p.append(f"data.schema: expected a mapping column -> spec or a YAML file path, got {d.schema!r}")
        if d.features is not None:
            clash = sorted(set(d.features) & set(names))
            if clash:
                p.append(f"data.features: {clash} are ID/label/subject columns and cannot be features")
            if not d.features:
                p.append(
                    "data.features: expected a non-empty list of column names or null (all other columns)"
                )
        _check_unlearning(p, self.unlearning)
        if p:
            raise ConfigError(p)


def _check_unlearning(p: list[str], u: UnlearningConfig) -> None:
    _choice(p, "unlearning.retrain", u.retrain, ("immediate", "batched", "manual"))
    seconds = {}
    for name in ("max_delay", "deadline"):
        try:
            seconds[name] = duration_s(getattr(u, name))
        except ValueError as exc:
            p.append(f"unlearning.{name}: {exc}")
    drop = u.max_accuracy_drop
    if drop is not None and (
        isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop <= 1
    ):
        p.append(f"unlearning.max_accuracy_drop: expected a fraction between 0 and 1 or null, got {drop!r}")
    if len(seconds) == 2 and seconds["max_delay"] > seconds["deadline"]:
        p.append(
            f"unlearning.max_delay: {u.max_delay!r} is longer than unlearning.deadline {u.deadline!r}; "
            "the deadline would always come first"
        )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(value: Any) -> float:
    """Seconds in a duration: a number of seconds or a string like ``90s``, ``15m``, ``12h``, ``30d``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value))
        if not m:
            raise ValueError(f"expected a duration like 90s, 15m, 12h or 30d, got {value!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds < 0:
        raise ValueError(f"expected a duration >= 0, got {value!r}")
    return seconds


# Training keys that change how fast, not what, is computed; they stay out of the digest.
_NON_RESULT_TRAINING_KEYS = (
    "n_jobs",
    "backend",
    "scheduler",
    "progress",
    "memory_budget_mb",
    "stack_threads",  # exact (CPU) stacking: a shard's bits do not depend on which thread trains it
)
# What `--set` may change on an existing run (delete, repair, serve, train --resume): where and how fast, not what.
# Every aggregation key: the aggregator learns nothing, so it is outside the digest (see Config.digest).
RUNTIME_KEYS = (
    *(f"training.{k}" for k in _NON_RESULT_TRAINING_KEYS),
    "aggregation.method",
    "aggregation.weights",
    "aggregation.inference",
    *(f"unlearning.{f.name}" for f in dataclasses.fields(UnlearningConfig)),
)


# The encoded name of a column's missing-value indicator (sisa/tables/encoder.py writes it, shard models read it).
MISSING_SUFFIX = "__missing"


def fitted_columns(data: DataConfig) -> list[tuple[int, int | None]]:
    """(value column, indicator column or None) of every feature scaled by statistics of each shard's first slice
    (``scaling: slice0`` in a resolved, inline ``data.schema``), as indices into ``data.features``. Shard models
    hold those statistics (sisa/train/models.py: FittedScaling); the encoder leaves these columns unscaled."""
    if not isinstance(data.schema, dict) or not data.features:
        return []
    where = {name: j for j, name in enumerate(data.features)}
    out = []
    for column, spec in data.schema.items():
        if isinstance(spec, dict) and spec.get("type") == "numeric" and spec.get("scaling") == "slice0":
            out.append((where[str(column)], where.get(f"{column}{MISSING_SUFFIX}")))
    return out


def _positive_int(p: list[str], name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        p.append(f"{name}: expected an integer >= 1, got {v!r}")


def _choice(p: list[str], name: str, v: Any, options: tuple[str, ...]) -> None:
    if v not in options:
        p.append(f"{name}: expected one of {', '.join(options)}, got {v!r}")


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping, collecting unknown keys and type errors into ``problems``."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            close = [n for n in fields if n.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(fields)})"
            problems.append(f"{prefix}{key}: unknown key{hint}")
            continue
        ftype = fields[key].type
        if dataclasses.is_dataclass(_SECTIONS.get(f"{prefix}{key}")):
            kwargs[key] = _build(_SECTIONS[f"{prefix}{key}"], value, f"{prefix}{key}.", problems)
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, str(ftype), problems)
    return cls(**kwargs)


# Scientific notation without a dot (1e-3, 5E+2), which PyYAML's YAML 1.1 resolver leaves as a string.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def _coerce(name: str, value: Any, ftype: str, problems: list[str]) -> Any:
    """Light type checks for leaf values; YAML already gives int/float/str/list/None."""
    if value is None:
        if "None" in ftype:
            return None
        problems.append(f"{name}: expected a value, got null")
        return value
    if ftype == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if ftype == "float" and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if ftype.startswith("list[float]") and isinstance(value, list):
        value = [float(v) if isinstance(v, str) and _FLOAT_TEXT.fullmatch(v.strip()) else v for v in value]
    expected = {"int": int, "float": float, "str": str, "bool": bool}.get(ftype.split(" |")[0])
    if (
        expected is not None
        and not isinstance(value, expected)
        or (expected is int and isinstance(value, bool))
    ):
        problems.append(f"{name}: expected {ftype}, got {value!r}")
    if ftype.startswith("list") and not isinstance(value, list):
        problems.append(f"{name}: expected a list, got {value!r}")
    if ftype.startswith("dict") and not isinstance(value, dict):
        problems.append(f"{name}: expected a mapping, got {value!r}")
    return value


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "sharding": ShardingConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "aggregation": AggregationConfig,
    "unlearning": UnlearningConfig,
}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config mapping."""
    out = json.loads(json.dumps(raw, default=str))
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(f"override {item!r}: expected section.key=value, e.g. sharding.shards=8")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        section = out.setdefault(parts[0], {})
        if not isinstance(section, dict):
            problems.append(f"override {item!r}: {parts[0]} is not a section")
            continue
        section[parts[1]] = value
    if problems:
        raise ConfigError(problems)
    return out
