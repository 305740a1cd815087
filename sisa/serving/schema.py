"""The HTTP service's wire format: request models, their OpenAPI schema, and the checks on every input.

Inputs are checked here, before anything is computed or changed, and every problem becomes a 4xx answer whose
message names the offending field (``instances[3].x2: NaN or infinite value``). Instances are validated by hand
rather than by a pydantic union so that the messages say what was wrong once, not once per union branch; the
OpenAPI schema is still exact (built from the run's feature names), so a schema-driven fuzzer can produce both
valid and invalid requests.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from ..exceptions import ConfigError, DataError
from ..tables.encoder import Encoder
from ..tables.schema import UNKNOWN, Schema

FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_ID_CHARS = 256
MAX_PROBLEMS = 20


class ApiError(Exception):
    """An answer other than success: HTTP status, a one-line reason, and optional structured details."""

    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None, **details: Any):
        super().__init__(error)
        self.status, self.error, self.headers, self.details = status, error, headers, details

    def body(self) -> dict:
        return {"error": self.error, **self.details}


@dataclass(frozen=True)
class ServerSettings:
    """Limits and credentials of one server; validated at start so a bad flag fails before binding a port."""

    token: str | None = None
    max_batch: int = 1024
    max_body_bytes: int = 8 << 20
    max_delete_ids: int = 10_000
    delete_wait_s: float = 60.0  # how long the deletion worker waits for another writer's lock
    ack_timeout_s: float = 300.0  # how long POST /deletions waits in the queue before answering 503
    pool_size: int = field(
        default_factory=lambda: min(8, os.cpu_count() or 1)
    )  # ensemble copies: predictions at once

    def validate(self) -> ServerSettings:
        p = []
        if self.token is not None and not self.token.strip():
            p.append("serve: the deletion token is empty")
        for name in ("max_batch", "max_body_bytes", "max_delete_ids", "pool_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                p.append(f"serve: {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("delete_wait_s", "ack_timeout_s"):
            if not getattr(self, name) >= 0:
                p.append(f"serve: {name} must be >= 0, got {getattr(self, name)!r}")
        if p:
            raise ConfigError(p)
        return self


def raw_instance_schema(schema: Schema) -> dict:
    """The JSON schema of one raw record: the schema's columns with their types (and declared categories); a
    column left out or null is a missing value."""
    props = {}
    for c in schema.columns:
        if c.type == "numeric":
            props[c.name] = {"type": ["number", "null"], "description": f"numeric; missing: {c.missing}"}
        elif c.type == "boolean":
            props[c.name] = {"type": ["boolean", "null"], "description": f"boolean; missing: {c.missing}"}
        elif c.type == "categorical":
            what = (
                f"one of {list(c.categories)}"
                if not c.hash_buckets
                else f"hashed into {c.hash_buckets} buckets"
            )
            props[c.name] = {
                "type": ["string", "number", "integer", "boolean", "null"],
                "description": f"categorical, {what}; any other value goes to the {UNKNOWN} bucket",
                **(
                    {"examples": list(c.categories), "x-categories": list(c.categories)}
                    if c.categories
                    else {}
                ),
            }
        else:
            props[c.name] = {"description": "ignored (not a feature)"}
    return {"type": "object", "properties": props, "additionalProperties": False}


def request_models(
    feature_names: list[str], settings: ServerSettings, has_subjects: bool, schema: Schema | None = None
) -> tuple[type, type]:
    """Pydantic models of the two POST bodies, with a JSON schema exact for this run's features (its raw
    columns when the run has a ``data.schema``)."""
    number = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    n = len(feature_names)
    instance = (
        raw_instance_schema(schema)
        if schema is not None
        else {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {f: number for f in feature_names},
                    "required": list(feature_names),
                    "additionalProperties": False,
                },
                {"type": "array", "items": number, "minItems": n, "maxItems": n},
            ]
        }
    )
    instances_schema = {"type": "array", "items": instance, "minItems": 1, "maxItems": settings.max_batch}
    an_id = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}, {"type": "integer"}]}
    ids_schema = {"type": "array", "items": an_id, "maxItems": settings.max_delete_ids}
    # Without a subject column, record IDs are the only way to delete: the schema says so (at least one), and
    # subject_ids stays accepted but undocumented so that sending it gets a clear message rather than "extra".
    record_ids_schema = ids_schema if has_subjects else {**ids_schema, "minItems": 1}
    subject_ids_type = Annotated[list[Any], WithJsonSchema(ids_schema)]
    if not has_subjects:
        subject_ids_type = SkipJsonSchema[list[Any]]

    class PredictRequest(BaseModel):
        """Instances to classify: objects of named feature columns, or lists in training feature order."""

        model_config = ConfigDict(extra="forbid")
        instances: Annotated[list[Any], WithJsonSchema(instances_schema)]

    class DeletionRequest(BaseModel):
        """Record IDs (and, when the run has a subject column, data-subject IDs) to forget."""

        model_config = ConfigDict(
            extra="forbid", json_schema_extra=None if has_subjects else {"required": ["record_ids"]}
        )
        record_ids: Annotated[list[Any], WithJsonSchema(record_ids_schema)] = Field(default_factory=list)
        subject_ids: subject_ids_type = Field(default_factory=list)  # type: ignore[valid-type]

    return PredictRequest, DeletionRequest


# ---- instances ----------------------------------------------------------------------------------------------
def raw_instances_matrix(instances: list, encoder: Encoder, max_batch: int) -> np.ndarray:
    """Raw JSON records -> the encoder's float32 [n, F]; ApiError(422) naming the column and instance of every
    problem (an unknown column, text where a number belongs, a gap where the schema says missing: error)."""
    _batch_size(instances, max_batch)
    problems = [
        f"instances[{i}]: expected an object of raw columns, got {_describe(inst)}"
        for i, inst in enumerate(instances)
        if not isinstance(inst, dict)
    ]
    if problems:
        raise _invalid("invalid instances", problems)
    known = set(encoder.schema.names)
    for i, inst in enumerate(instances):
        unknown = [k for k in inst if k not in known]
        if unknown:
            problems.append(
                f"instances[{i}]: unknown columns {unknown[:10]}; expected some of {sorted(known)[:20]}"
            )
    if problems:
        raise _invalid("invalid instances", problems)
    frame = pd.DataFrame([{c: inst.get(c) for c in encoder.schema.names} for inst in instances], dtype=object)
    try:
        return encoder.encode(frame, "instances")
    except DataError as exc:
        raise _invalid(
            "invalid instances", [p.replace(" at rows ", " at instances ") for p in exc.problems]
        ) from None


def _batch_size(instances: list, max_batch: int) -> None:
    if len(instances) == 0:
        raise ApiError(422, "empty batch: send at least one instance in 'instances'")
    if len(instances) > max_batch:
        raise ApiError(
            422, f"too many instances: {len(instances)} exceed this server's limit of {max_batch} per request"
        )


def instances_matrix(instances: list, feature_names: list[str], max_batch: int) -> np.ndarray:
    """float32 [n, F] from JSON instances; raises ApiError(422) listing every problem (first 20)."""
    _batch_size(instances, max_batch)
    names, problems = list(feature_names), []
    known = set(names)
    rows = [_row(i, inst, names, known, problems) for i, inst in enumerate(instances)]
    if not problems:
        values = np.array(rows, dtype=np.float64)
        bad = ~np.isfinite(values) | (np.abs(values) > FLOAT32_MAX)
        for i, j in zip(*np.nonzero(bad), strict=True):
            v = float(values[i, j])
            what = "NaN or infinite value" if not math.isfinite(v) else f"{v!r} is outside the float32 range"
            problems.append(f"instances[{i}].{names[j]}: {what}; features must be finite numbers")
    if problems:
        raise _invalid("invalid instances", problems)
    return np.ascontiguousarray(values.astype(np.float32))


def _row(i: int, inst: Any, names: list[str], known: set[str], problems: list[str]) -> list | None:
    if isinstance(inst, dict):
        unknown = [k for k in inst if k not in known]
        missing = [f for f in names if f not in inst]
        if unknown or missing:
            parts = ([f"unknown feature columns {unknown[:10]}"] if unknown else []) + (
                [f"missing feature columns {missing[:10]}"] if missing else []
            )
            problems.append(f"instances[{i}]: {'; '.join(parts)}; expected exactly {names[:20]}")
            return None
        values = [inst[f] for f in names]
    elif isinstance(inst, list):
        if len(inst) != len(names):
            problems.append(
                f"instances[{i}]: expected {len(names)} feature values (in training order), got {len(inst)}"
            )
            return None
        values = inst
    else:
        problems.append(
            f"instances[{i}]: expected an object of named features or a list of {len(names)} numbers, "
            f"got {_describe(inst)}"
        )
        return None
    bad = [j for j, v in enumerate(values) if not _is_number(v)]
    for j in bad:
        problems.append(f"instances[{i}].{names[j]}: expected a number, got {_describe(values[j])}")
    return None if bad else values


def _is_number(v: Any) -> bool:
    """int or float, never bool; ints beyond float range count as not-a-number (message says why)."""
    if type(v) is float:
        return True
    return type(v) is int and abs(v) <= FLOAT32_MAX


def _describe(v: Any) -> str:
    """A JSON value as a message fragment: 'a string 'NaN'', 'a boolean (true)', 'null'..."""
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if v is None:
        return "null"
    if isinstance(v, str):
        text = repr(v) if len(v) <= 40 else repr(v[:37]) + "..."
        return f"a string {text}"
    if isinstance(v, int):
        return "an integer outside the float32 range"
    if isinstance(v, float):
        return f"a number ({v!r})"
    return {list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


# ---- record IDs ---------------------------------------------------------------------------------------------
def deletion_ids(record_ids: list, subject_ids: list, has_subjects: bool, max_ids: int) -> tuple[list, list]:
    """Check the IDs of a deletion request; raises ApiError(422) listing every problem."""
    problems: list[str] = []
    if not record_ids and not subject_ids:
        problems.append(
            "give at least one ID in 'record_ids'" + (" or 'subject_ids'" if has_subjects else "")
        )
    if subject_ids and not has_subjects:
        problems.append("subject_ids: this run has no data.subject_column; delete by record ID")
    for name, ids in (("record_ids", record_ids), ("subject_ids", subject_ids)):
        if len(ids) > max_ids:
            problems.append(f"{name}: {len(ids)} IDs exceed this server's limit of {max_ids} per request")
            continue
        for k, v in enumerate(ids):
            if type(v) is int:
                continue
            if type(v) is str and 0 < len(v) <= MAX_ID_CHARS:
                continue
            why = f"a string of {len(v)} characters" if type(v) is str else _describe(v)
            problems.append(
                f"{name}[{k}]: IDs must be integers or strings of 1..{MAX_ID_CHARS} characters, got {why}"
            )
    if problems:
        raise _invalid("invalid deletion request", problems)
    return record_ids, subject_ids


def _invalid(what: str, problems: list[str]) -> ApiError:
    shown = problems[:MAX_PROBLEMS]
    more = len(problems) - len(shown)
    head = shown[0] if len(problems) == 1 else f"{len(problems)} problems, first: {shown[0]}"
    return ApiError(422, f"{what}: {head}", problems=shown + ([f"... and {more} more"] if more else []))


def validation_problems(errors: list[dict]) -> list[str]:
    """FastAPI/pydantic request-validation errors as 'where: what' lines."""
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "json_invalid":
            why = (e.get("ctx") or {}).get("error", "JSON decode error")
            out.append(f"the body is not valid JSON: {why} at character {'.'.join(loc) or 0}")
            continue
        where = ".".join(loc) or "body"
        out.append(f"{where}: {e.get('msg', 'invalid')}")
    return out


class AdditionRequest(BaseModel):
    """New rows in the run's training schema (ID, label, features or raw schema columns, subject if any)."""

    model_config = ConfigDict(extra="forbid")
    records: list[dict[str, Any]] = Field(min_length=1)
    allow_returning: bool = False


def addition_rows(records: list[dict[str, Any]], max_rows: int) -> pd.DataFrame:
    """The rows of POST /records as a table; ApiError(422) past the batch limit."""
    if len(records) > max_rows:
        raise ApiError(422, f"records: at most {max_rows} rows per request, got {len(records)}")
    return pd.DataFrame.from_records(records)
