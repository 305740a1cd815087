"""Reading and validating input tables (Parquet, CSV, NPZ) into the arrays training needs.

A table has a record-ID column, a label column, optionally a data-subject column and a deletion-probability
column, and numeric feature columns. Every problem with a table is reported at once, naming the column and the
offending rows, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..exceptions import DataError
from .encoder import Encoder
from .schema import schema_of


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a .parquet, .csv or .npz table. NPZ: 1-D arrays become columns; a 2-D array ``X`` becomes X0, X1..."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), ["file does not exist"])
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        # one pandas block per column, each Arrow buffer freed as it is converted: the table is held once, not
        # twice (Arrow + a consolidated 2-D block) — a 40k x 600 float32 table peaked at 2.4x its size
        return pd.read_parquet(path, to_pandas_kwargs={"split_blocks": True, "self_destruct": True})
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix == ".npz":
        return _npz_frame(path)
    raise DataError(str(path), [f"unsupported file type {suffix!r}; expected .parquet, .csv or .npz"])


def _npz_frame(path: Path) -> pd.DataFrame:
    cols: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            try:
                arr = z[key]
            except ValueError:  # an object array: loading it would unpickle
                raise DataError(
                    str(path),
                    [
                        f"array {key!r} is an object array, which cannot be read without pickle; "
                        "save strings as a fixed-width str array (np.asarray(values, dtype=str))"
                    ],
                ) from None
            if arr.ndim == 1:
                cols[key] = arr
            elif arr.ndim == 2:
                cols.update({f"{key}{j}": arr[:, j] for j in range(arr.shape[1])})
            else:
                raise DataError(str(path), [f"array {key!r} has {arr.ndim} dimensions; expected 1 or 2"])
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(str(path), [f"arrays have different lengths: {lengths}"])
    return pd.DataFrame(cols)


@dataclass
class Table:
    """A validated table: IDs, encoded labels and float32 features, in input row order."""

    ids: pd.Series  # record IDs (int64 or string)
    labels: np.ndarray  # int64 class indices into ``classes``
    features: np.ndarray  # float32 [n, F]
    feature_names: list[str]
    classes: list
    subjects: pd.Series | None = None  # data-subject IDs when configured
    deletion_prob: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, positions: np.ndarray) -> Table:
        return Table(
            ids=self.ids.iloc[positions].reset_index(drop=True),
            labels=self.labels[positions],
            features=self.features[positions],
            feature_names=self.feature_names,
            classes=self.classes,
            subjects=None if self.subjects is None else self.subjects.iloc[positions].reset_index(drop=True),
            deletion_prob=None if self.deletion_prob is None else self.deletion_prob[positions],
        )


def _rows(mask: np.ndarray, limit: int = 10) -> str:
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:limit])
    return f"rows {shown}" + (f" (and {len(idx) - limit} more)" if len(idx) > limit else "")


def feature_columns(df: pd.DataFrame, cfg: DataConfig) -> list[str]:
    if cfg.features is not None:
        return list(cfg.features)
    reserved = {cfg.id_column, cfg.label_column, cfg.subject_column, cfg.deletion_prob_column}
    return [c for c in df.columns if c not in reserved]


# What a table is for decides which columns it must have (docs/preprocessing.md, "Tables as they come"):
# training needs IDs and labels (and the subject / deletion-probability columns the config names); a scored table
# (data.test, `sisa evaluate`) needs labels only; prediction input needs neither. Absent IDs become row numbers.
PURPOSES = ("train", "score", "predict")


def validate_table(
    df: pd.DataFrame,
    cfg: DataConfig,
    source: str,
    classes: list | None = None,
    feature_names: list[str] | None = None,
    require_labels: bool = True,
    purpose: str | None = None,
) -> Table:
    """Check ``df`` against the config and return a :class:`Table`; raise one DataError listing every problem.

    ``classes`` (frozen at training time) maps labels to indices; labels outside it are errors. ``purpose`` is one
    of :data:`PURPOSES` (default ``train``, or ``predict`` with ``require_labels=False``). With a ``data.schema``
    the features are the :class:`~sisa.tables.encoder.Encoder`'s encoding of the raw columns.
    """
    purpose = purpose or ("train" if require_labels else "predict")
    if len(df) == 0:
        raise DataError(source, ["the table is empty (0 rows)"])
    schema = schema_of(cfg)
    if schema is not None:
        names = schema.feature_names()
    else:
        names = feature_names if feature_names is not None else feature_columns(df, cfg)
    wanted = _required_columns(cfg, purpose) + ([] if schema is not None else list(names))
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise DataError(source, [f"missing columns {missing}; the table has {list(df.columns)[:20]}"])
    if not names:
        raise DataError(source, ["no feature columns: every column is an ID/label/subject column"])
    problems: list[str] = []
    if schema is not None:
        reserved = [cfg.id_column, cfg.label_column, cfg.subject_column, cfg.deletion_prob_column]
        features = Encoder(schema).encode_into(df, problems, extra=[c for c in reserved if c])
    else:
        features = _check_features(df, names, problems)
    table = _checked_columns(df, cfg, purpose, classes, problems)
    if problems:
        raise DataError(source, problems)
    table.features, table.feature_names = features, list(names)
    return table


def _required_columns(cfg: DataConfig, purpose: str) -> list[str]:
    if purpose not in PURPOSES:
        raise ValueError(f"purpose: expected one of {PURPOSES}, got {purpose!r}")
    if purpose == "predict":
        return []
    if purpose == "score":
        return [cfg.label_column]
    return [c for c in (cfg.id_column, cfg.label_column, cfg.subject_column, cfg.deletion_prob_column) if c]


def _checked_columns(df: pd.DataFrame, cfg: DataConfig, purpose: str, classes, problems: list[str]) -> Table:
    """IDs, labels, subjects and deletion probabilities (features are filled in by the caller)."""
    ids = _check_ids(df, cfg.id_column, problems) if cfg.id_column in df.columns else None
    labels = None
    if cfg.label_column in df.columns and purpose != "predict":
        labels, classes = _check_labels(df[cfg.label_column], cfg.label_column, classes, problems)
    subjects = None
    if cfg.subject_column and purpose == "train":
        s = df[cfg.subject_column]
        if s.isna().any():
            problems.append(
                f"column {cfg.subject_column!r}: missing subject IDs at {_rows(s.isna().to_numpy())}"
            )
        subjects = s.reset_index(drop=True)
    prob = None
    if cfg.deletion_prob_column and purpose == "train":
        prob = _check_probabilities(df[cfg.deletion_prob_column], cfg.deletion_prob_column, problems)
    n = len(df)
    return Table(
        ids=ids if ids is not None else pd.Series(np.arange(n)),
        labels=labels if labels is not None else np.full(n, -1, dtype=np.int64),
        features=np.zeros((n, 0), dtype=np.float32),
        feature_names=[],
        classes=list(classes) if classes is not None else [],
        subjects=subjects,
        deletion_prob=prob,
    )


def _check_ids(df: pd.DataFrame, col: str, problems: list[str]) -> pd.Series:
    ids = df[col].reset_index(drop=True)
    if ids.isna().any():
        problems.append(f"column {col!r}: missing record IDs at {_rows(ids.isna().to_numpy())}")
    if _integral_with_gaps(ids):
        pass  # an integer column with blanks (CSV reads it as float): the missing IDs are the problem
    elif not (pd.api.types.is_integer_dtype(ids) or pd.api.types.is_string_dtype(ids) or ids.dtype == object):
        problems.append(f"column {col!r}: record IDs must be integers or strings, got dtype {ids.dtype}")
    elif ids.dtype == object:
        ids = ids.astype("string")
    dup = ids.duplicated(keep=False).to_numpy() & ~ids.isna().to_numpy()
    if dup.any():
        examples = ", ".join(repr(_plain(v)) for v in pd.unique(ids[dup])[:5])
        problems.append(f"column {col!r}: duplicate record IDs ({examples}) at {_rows(dup)}")
    return ids


def _integral_with_gaps(ids: pd.Series) -> bool:
    if not pd.api.types.is_float_dtype(ids) or not ids.isna().any():
        return False
    v = ids.dropna().to_numpy()
    return bool(np.all(v == np.round(v)))


def _check_features(df: pd.DataFrame, names: list[str], problems: list[str]) -> np.ndarray:
    bad = [c for c in names if not pd.api.types.is_numeric_dtype(df[c])]
    for c in bad[:10]:
        col = df[c].reset_index(drop=True)
        text = col.notna().to_numpy() & pd.to_numeric(col, errors="coerce").isna().to_numpy()
        what = (
            f"non-numeric feature values at {_rows(text)} (e.g. {col[text].iloc[0]!r})"
            if text.any()
            else f"feature values stored as text (dtype {col.dtype})"
        )
        problems.append(
            f"column {c!r}: {what}; encode them as numbers or leave the column out of data.features"
        )
    if bad:
        return np.zeros((len(df), len(names)), dtype=np.float32)
    # column by column into one float32 matrix: no float64 or frame copy of the whole table on the way
    values = np.empty((len(df), len(names)), dtype=np.float32)
    bad_rows = np.zeros(len(df), dtype=bool)
    bad_cols = []
    for j, c in enumerate(names):
        values[:, j] = df[c].to_numpy(dtype=np.float32)
        finite = np.isfinite(values[:, j])
        if not finite.all():
            bad_cols.append(c)
            bad_rows |= ~finite
    if bad_cols:
        problems.append(f"columns {bad_cols[:10]}: NaN or infinite feature values at {_rows(bad_rows)}")
    return values


def _check_labels(col: pd.Series, name: str, classes: list | None, problems: list[str]):
    col = col.reset_index(drop=True)
    na = col.isna().to_numpy()
    if na.any():
        problems.append(f"column {name!r}: missing/NaN labels at {_rows(na)}")
        return None, classes
    values = col.to_numpy()
    if pd.api.types.is_float_dtype(col):
        if not np.all(values == np.round(values)):
            problems.append(f"column {name!r}: labels must be integers or strings, found non-integer floats")
            return None, classes
        values = values.astype(np.int64)
    if classes is None:
        classes = sorted(pd.unique(values).tolist(), key=lambda v: (str(type(v)), v))
    classes = [_plain(c) for c in classes]
    lookup = pd.Index(classes)
    codes = lookup.get_indexer(pd.Index([_plain(v) for v in values]))
    unknown = codes < 0
    if unknown.any():
        odd = sorted({str(v) for v in values[unknown]})[:10]
        problems.append(
            f"column {name!r}: labels {odd} are not in the frozen class set {classes} at {_rows(unknown)}"
        )
    return codes.astype(np.int64), classes


def _check_probabilities(col: pd.Series, name: str, problems: list[str]) -> np.ndarray | None:
    if not pd.api.types.is_numeric_dtype(col):
        problems.append(f"column {name!r}: deletion probabilities must be numbers, got dtype {col.dtype}")
        return None
    p = col.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(p) | (p < 0) | (p > 1)
    if bad.any():
        problems.append(f"column {name!r}: deletion probabilities must lie in [0, 1] at {_rows(bad)}")
    return p


def _plain(v):
    """numpy scalars -> Python scalars, so class lists round-trip through YAML/JSON."""
    return v.item() if isinstance(v, np.generic) else v


def features_for_prediction(data, feature_names: list[str], config: DataConfig | None = None) -> np.ndarray:
    """Turn prediction input (DataFrame with named columns, or array in feature order) into float32 [n, F].

    With ``config`` naming a ``data.schema``, a DataFrame holds raw columns and goes through the encoder (its ID,
    label and subject columns, when present, are ignored); an array is taken as already encoded."""
    if isinstance(data, pd.DataFrame) and config is not None and config.schema is not None:
        return validate_table(data, config, "prediction input", purpose="predict").features
    if isinstance(data, pd.DataFrame):
        missing = [c for c in feature_names if c not in data.columns]
        if missing:
            raise DataError("prediction input", [f"missing feature columns {missing[:10]}"])
        cfg = DataConfig(id_column="__none__", label_column="__none__", features=feature_names)
        return validate_table(
            data, cfg, "prediction input", feature_names=feature_names, require_labels=False
        ).features
    arr = np.asarray(data)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != len(feature_names):
        raise DataError(
            "prediction input", [f"expected shape [n, {len(feature_names)}], got {list(arr.shape)}"]
        )
    if arr.shape[0] == 0:
        raise DataError("prediction input", ["the input is empty (0 rows)"])
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError("prediction input", [f"features must be numbers, got dtype {arr.dtype}"])
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataError(
            "prediction input", [f"NaN or infinite values at {_rows(~np.isfinite(arr).all(axis=1))}"]
        )
    return np.ascontiguousarray(arr)
