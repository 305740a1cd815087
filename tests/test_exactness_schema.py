"""Exactness with a raw table and a schema (docs/preprocessing.md, docs/design.md §2.5): deleting the only holder
of a category value, or the record holding a numeric maximum, in a first slice and in a later slice, gives the
same weights, optimizer state and probabilities as training from scratch without it — from the user's ORIGINAL
config (schema as a file path). The slice-0 statistics inside each shard model depend on that shard's first slice
only; the stacked executor (exact and batched modes) and stacked inference carry them bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from sisa.aggregation import Ensemble
from sisa.config import Config
from sisa.evidence.erasure import check_erasure
from sisa.fitting import train
from sisa.sharding import place
from sisa.store.rundir import RunDir
from sisa.tables.datasets import make_customers
from sisa.tables.table import validate_table
from sisa.train import units
from sisa.unlearning import delete
from tests.conftest import assert_runs_identical, small_config
from tests.test_stacking import assert_same_checkpoints, with_executor

SCHEMA = {
    "age": {"type": "numeric", "missing": "indicator", "scaling": "slice0"},
    "city": {"type": "categorical", "categories": ["Rome", "Paris", "Oslo", "Lima", "Atlantis"]},
    "income": {"type": "numeric", "missing": "indicator", "scaling": "slice0", "transform": "log1p"},
    "member": {"type": "boolean"},
}
SPECIAL = {"city": "Atlantis", "age": 150.0}  # one record holds both: the only Atlantis, the oldest customer


def customers(n: int = 360, seed: int = 0) -> pd.DataFrame:
    df = make_customers(n, seed=seed).rename(columns={"customer": "record_id"})
    df["city"] = df["city"].where(~df["city"].str.startswith("Town-", na=False), "Rome")
    return df


def user_config(tmp_path: Path, seed: int, **training) -> Config:
    """The user's config as written: data.schema is the path of a YAML file."""
    path = tmp_path / "customers.schema.yaml"
    path.write_text(yaml.safe_dump(SCHEMA))
    return small_config(
        data={"label_column": "churn", "schema": str(path)},
        training={"seed": seed, "epochs": 3, **training},
    )


def record_in_slice(df: pd.DataFrame, cfg: Config, slice_: int, shard: int = 1) -> str:
    """A record ID that keyed placement puts in ``shard`` / ``slice_`` (placement hashes the ID only)."""
    at = place(
        df["record_id"], df["record_id"], shards=3, slices=3, seed=cfg.training.seed, strategy="uniform"
    )
    hits = df["record_id"][(at["shard"] == shard).to_numpy() & (at["slice"] == slice_).to_numpy()]
    return str(hits.iloc[len(hits) // 2])


def with_special(df: pd.DataFrame, rid: str) -> pd.DataFrame:
    out = df.copy()
    for col, value in SPECIAL.items():
        out.loc[out["record_id"] == rid, col] = value
    assert (out["city"] == "Atlantis").sum() == 1 and out["age"].max() == 150
    return out


def encoded(run: RunDir, df: pd.DataFrame) -> np.ndarray:
    return validate_table(df, run.config().data, "probe", purpose="predict").features


def assert_same_predictions(a: RunDir, b: RunDir, X: np.ndarray) -> None:
    ea = Ensemble.from_manifest(a.root, a.config(), a.manifest())
    eb = Ensemble.from_manifest(b.root, b.config(), b.manifest())
    for mode in ("loop", "stacked"):
        assert torch.equal(ea.shard_probabilities(X, mode), eb.shard_probabilities(X, mode)), mode
        assert np.array_equal(ea.predict_proba(X, mode), eb.predict_proba(X, mode)), mode


def fitted_buffers(run: RunDir) -> dict[str, torch.Tensor]:
    out = {}
    for e in run.manifest()["shards"]:
        for name in e["checkpoints"]:
            tensors = load_file(run.shard_checkpoints(e["shard"]) / name / "model.safetensors")
            out.update(
                {f"{e['shard']}/{name[:9]}/{k}": v for k, v in tensors.items() if k.startswith("fitted.")}
            )
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("slice_", [0, 2])
def test_deleting_the_only_holder_of_a_category_and_the_maximum_is_exact(tmp_path, seed, slice_):
    cfg = user_config(tmp_path, seed)
    base = customers(seed=seed)
    rid = record_in_slice(base, cfg, slice_)
    df = with_special(base, rid)
    run, _ = train(tmp_path / "run", cfg, df)
    before = fitted_buffers(run)
    receipt = delete(run.root, [rid])
    assert receipt["shards_retrained"] == {"1": slice_}
    ref, _ = train(tmp_path / "ref", cfg, df.loc[df["record_id"] != rid].sample(frac=1.0, random_state=3))
    assert_runs_identical(run, ref)  # weights, fitted statistics, optimizer state, checkpoint names
    assert_same_predictions(run, ref, encoded(run, df))
    after = fitted_buffers(run)
    changed = sorted({k.split("/")[0] for k in after if not torch.equal(after[k], before[k])})
    assert changed == (["1"] if slice_ == 0 else [])  # a later slice never moves the slice-0 statistics
    assert run.config().data.schema["city"]["categories"][-1] == "Atlantis"  # the run holds the schema inline


def test_the_prefix_depends_on_a_shards_first_slice_only(tmp_path):
    """Perturbing later-slice rows leaves every shard's statistics unchanged; perturbing slice 0 changes them."""
    cfg = user_config(tmp_path, 0)
    df = customers()
    late, first = record_in_slice(df, cfg, 2), record_in_slice(df, cfg, 0)
    a, _ = train(tmp_path / "a", cfg, df)
    bumped = df.copy()
    bumped.loc[bumped["record_id"] == late, ["age", "income"]] = [99.0, 1e7]
    b, _ = train(tmp_path / "b", cfg, bumped)
    fa, fb = fitted_buffers(a), fitted_buffers(b)
    assert fa.keys() == fb.keys() and len(fa) == 3 * 3 * 2
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    bumped.loc[bumped["record_id"] == first, ["age", "income"]] = [99.0, 1e7]
    c, _ = train(tmp_path / "c", cfg, bumped)
    fc = fitted_buffers(c)
    assert {k.split("/")[0] for k in fa if not torch.equal(fa[k], fc[k])} == {"1"}
    centers = [v for k, v in fa.items() if k.startswith("1/slice-000/fitted.center")]
    assert float(centers[0][0]) != 0.0  # age is centred on shard 1's slice-0 mean


def test_stacked_equals_loop_with_a_schema(tmp_path):
    cfg = user_config(tmp_path, 4)
    df = customers(seed=4)
    loop = train(tmp_path / "loop", with_executor(cfg, "loop"), df)[0]
    stacked = train(tmp_path / "stacked", with_executor(cfg, "stacked", 2, 2), df)[0]
    assert stacked.config().training.executor == "stacked"
    assert_same_checkpoints(loop, stacked)
    assert_same_predictions(loop, stacked, encoded(loop, df))


def test_batched_mode_with_a_schema_is_exact(tmp_path, monkeypatch):
    """The CUDA rule (full-width calls, fixed slots, idle placeholders) on CPU, prefix statistics per slot."""
    monkeypatch.setitem(units.MODES, "cpu", "batched")
    cfg = user_config(tmp_path, 2, executor="stacked", stack_size=3)
    base = customers(seed=2)
    rid = record_in_slice(base, cfg, 0)
    df = with_special(base, rid)
    run, _ = train(tmp_path / "run", cfg, df)
    delete(run.root, [rid])
    ref, _ = train(tmp_path / "ref", cfg, df.loc[df["record_id"] != rid])
    assert_runs_identical(run, ref)


def test_verify_erasure_reports_declared_values_no_active_record_holds(tmp_path):
    cfg = user_config(tmp_path, 0)
    base = customers()
    rid = record_in_slice(base, cfg, 1)
    run, _ = train(tmp_path / "run", cfg, with_special(base, rid))
    check = {c.name: c for c in check_erasure(run.root).checks}["schema values"]
    assert check.ok and not check.warning
    delete(run.root, [rid])
    report = check_erasure(run.root)
    check = {c.name: c for c in report.checks}["schema values"]
    assert report.ok and check.ok and check.warning  # a warning, not a failure
    assert check.detail.startswith(
        "warning: 1 declared categor(ies) no active record holds: city='Atlantis';"
    )
