"""Exact versus APPROXIMATE unlearning on the same forget requests (``sisa compare``).

For each request (``random:N`` records, or ``class:LABEL``) every method answers the same question: "forget these
records". The table reports, per method: wall time, accuracy on the test set, on (a sample of) the retained
records and on the forget set, a loss-threshold membership-inference AUC of forget records versus never-seen
records, and the distance to the exact answer.

What is compared with what (written into the output as ``conventions``):

- ``retrain``: one model (no shards) trained from scratch on the retained records: the exact answer for the
  single-model methods. ``retrain (seed+1)`` is the same with another seed: its distance is the noise floor.
- ``original``: the single model trained on all records, before any unlearning.
- ``approx-*``: the APPROXIMATE baselines of :mod:`sisa.evidence.baselines`, applied to ``original``; distances to
  ``retrain``.
- ``sisa delete``: the SISA ensemble trained on all records, then ``delete`` of the forget set (timed
  in-process); its distance is to ``sisa retrain``, a SISA ensemble trained from scratch on the retained records
  with the same config, seed and placement (an ensemble has no single parameter vector; L2 sums over shards).
- ``tv_to_retrain``: mean total-variation distance 0.5·Σ|p - p_ref| between predicted class probabilities on the
  test set; ``l2_to_retrain``: L2 norm of the parameter difference.
- ``mia_auc``: loss attack, positives = forget records, negatives = never-seen test records (for ``class:`` only
  test records of that class, so that both sides share a label distribution). Compare it with ``retrain``'s.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..aggregation import Ensemble
from ..config import Config
from ..exceptions import ConfigError, UsageError
from ..fitting import freeze_data, load_training_table, train
from ..store.rundir import RunDir
from ..tables.table import Table, read_table, validate_table
from ..unlearning import delete
from .attacks import aggregate_log_probs, loss_score, model_log_probs
from .audit import retrain_from_scratch
from .baselines import APPROXIMATE, CLASS_ONLY, METHODS, Records, apply_baseline, fit_model
from .roc import evaluate_attack

CONVENTIONS = {
    "kind": "exact for retrain and SISA (the result equals training without the forget set); APPROXIMATE for "
    "every approx-* method (" + APPROXIMATE + "); no unlearning for original",
    "l2_to_retrain": "L2 norm of the parameter difference to the exact reference of the same architecture "
    "(single model: retrain; SISA: sisa retrain, summed over shards)",
    "tv_to_retrain": "mean total-variation distance of predicted probabilities on the test set, same reference",
    "mia_auc": "loss-threshold attack AUC, forget records (positive) vs never-seen test records; "
    "for class: requests only test records of that class; compare with retrain's value",
    "wall_s": "seconds of the unlearning step itself (for retrain rows: the training)",
}

EXACT, APPROX, NONE = "exact", "APPROXIMATE", "no unlearning"
LogProbs = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ForgetRequest:
    spec: str
    kind: str  # random | class
    value: object  # N for random, the class index for class


def parse_requests(specs: list[str], classes: list, n_rows: int) -> list[ForgetRequest]:
    """Parse ``random:N`` / ``class:LABEL`` specs; one UsageError naming every bad spec."""
    out, problems = [], []
    names = [str(c) for c in classes]
    for spec in specs:
        kind, _, value = spec.partition(":")
        if kind == "random" and value.isdigit() and 1 <= int(value) < n_rows:
            out.append(ForgetRequest(spec, "random", int(value)))
        elif kind == "class" and value in names:
            out.append(ForgetRequest(spec, "class", names.index(value)))
        elif kind == "class":
            problems.append(("specs", f"{spec}: unknown class {value!r}; classes are {names}"))
        else:
            problems.append(
                ("specs", f"{spec}: expected random:N with 1 <= N < {n_rows} training rows, or class:LABEL")
            )
    if not specs:
        problems.append(("specs", "give at least one request, e.g. random:50 or class:1"))
    if problems:
        raise UsageError(problems)
    return out


def forget_positions(req: ForgetRequest, table: Table, seed: int) -> np.ndarray:
    if req.kind == "class":
        return np.flatnonzero(table.labels == req.value)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(table), int(req.value), replace=False))


# ---- predictors and metrics ---------------------------------------------------------------------------------
def single_log_probs(model: nn.Module) -> LogProbs:
    @torch.no_grad()
    def predict(X: np.ndarray) -> np.ndarray:
        return torch.log_softmax(model.eval()(torch.tensor(X, dtype=torch.float32)).double(), -1).numpy()

    return predict


def ensemble_log_probs(ens: Ensemble) -> LogProbs:
    return lambda X: aggregate_log_probs(model_log_probs(ens, X), ens)


def parameter_l2(a: list[nn.Module], b: list[nn.Module]) -> float:
    total = 0.0
    for ma, mb in zip(a, b, strict=True):
        pb = dict(mb.named_parameters())
        total += sum(
            float((p.detach() - pb[n].detach()).double().pow(2).sum()) for n, p in ma.named_parameters()
        )
    return math.sqrt(total)


@dataclass
class Sets:
    test: Records
    retain: Records
    forget: Records
    unseen: Records  # negatives of the membership attack


def metrics(predict: LogProbs, ref: LogProbs, sets: Sets, seed: int) -> dict:
    def acc(r: Records) -> float:
        return round(float((predict(r.features).argmax(-1) == r.labels).mean()), 4)

    attack = None
    if len(sets.forget) >= 2:  # an AUC needs two positives
        attack = evaluate_attack(
            loss_score(predict(sets.forget.features), sets.forget.labels),
            loss_score(predict(sets.unseen.features), sets.unseen.labels),
            bootstrap=0,
            seed=seed,
        )
    p, q = np.exp(predict(sets.test.features)), np.exp(ref(sets.test.features))
    return {
        "test_acc": acc(sets.test),
        "retain_acc": acc(sets.retain),
        "forget_acc": acc(sets.forget),
        "mia_auc": round(attack.auc, 4) if attack else None,
        "mia_auc_ci": [round(v, 4) for v in attack.auc_ci] if attack else None,
        "tv_to_retrain": round(float(0.5 * np.abs(p - q).sum(-1).mean()), 6),
    }


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 4)


# ---- the comparison -----------------------------------------------------------------------------------------
def compare(config: Config, specs: list[str], methods: list[str] | None = None, seed: int = 0) -> dict:
    """Run every method on every forget request; return the JSON-ready result."""
    table = load_training_table(config)
    if not config.data.test:
        raise ConfigError(["data.test: compare needs a test table for accuracy and the membership attack"])
    test = validate_table(
        read_table(config.data.test), config.data, config.data.test, classes=table.classes,
        feature_names=table.feature_names, purpose="score",
    )  # fmt: skip
    config = freeze_data(config, table)
    methods = list(METHODS) if methods is None else methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError([("methods", f"unknown {unknown}; expected some of {', '.join(METHODS)}")])
    requests = parse_requests(specs, table.classes, len(table))
    torch.set_num_threads(config.training.threads)
    every = Records(table.features, table.labels)
    original, original_s = _timed(lambda: fit_model(config, every))
    out = {"config_digest": config.digest(), "train_rows": len(table), "test_rows": len(test), "requests": []}
    with tempfile.TemporaryDirectory(prefix="sisa-compare-") as tmp:
        (sisa_all, _), sisa_s = _timed(lambda: train(Path(tmp) / "sisa-all", config, table))
        for i, req in enumerate(requests):
            ctx = _Context(config, table, test, original, sisa_all, Path(tmp) / f"req-{i}", seed)
            out["requests"].append(ctx.run(req, methods))
    out["original_train_s"], out["sisa_train_s"] = original_s, sisa_s
    out["conventions"] = CONVENTIONS
    return out


@dataclass
class _Context:
    config: Config
    table: Table
    test: Table
    original: nn.Module
    sisa_all: RunDir
    folder: Path
    seed: int

    def run(self, req: ForgetRequest, methods: list[str]) -> dict:
        gone = forget_positions(req, self.table, self.seed)
        keep = np.setdiff1d(np.arange(len(self.table)), gone)
        sets = self.sets(req, gone, keep)
        retain = Records(self.table.features[keep], self.table.labels[keep])
        ref, ref_s = _timed(lambda: fit_model(self.config, retain))
        ref_lp = single_log_probs(ref)
        rows = [self.row("retrain", EXACT, ref_s, ref_lp, ref_lp, sets, [ref], [ref])]
        other, other_s = _timed(lambda: fit_model(self.config, retain, seed=self.config.training.seed + 1))
        rows.append(
            self.row(
                "retrain (seed+1)", EXACT, other_s, single_log_probs(other), ref_lp, sets, [other], [ref]
            )
        )
        rows.append(
            self.row(
                "original", NONE, None, single_log_probs(self.original), ref_lp, sets, [self.original], [ref]
            )
        )
        rows += self.sisa_rows(gone, sets)
        for m in methods:
            if m in CLASS_ONLY and req.kind != "class":
                continue
            model, s = _timed(
                lambda m=m: apply_baseline(m, self.original, retain, sets.forget, seed=self.seed)
            )
            rows.append(self.row(m, APPROX, s, single_log_probs(model), ref_lp, sets, [model], [ref]))
        skipped = [m for m in methods if m in CLASS_ONLY and req.kind != "class"]
        notes = [f"{m} forgets whole classes only; not run for {req.spec}" for m in skipped]
        if len(gone) < 2:
            notes.append("mia_auc needs at least 2 forget records; not computed")
        return {
            "forget": req.spec,
            "forget_rows": len(gone),
            "retain_rows": len(keep),
            "unseen_rows": len(sets.unseen),
            "rows": rows,
            "notes": notes,
        }

    def sets(self, req: ForgetRequest, gone: np.ndarray, keep: np.ndarray) -> Sets:
        t, test = self.table, self.test
        sample = np.random.default_rng(self.seed).permutation(keep)[:5000]
        unseen = np.flatnonzero(test.labels == req.value) if req.kind == "class" else np.arange(len(test))
        if len(unseen) < 2:
            unseen = np.arange(len(test))
        return Sets(
            test=Records(test.features, test.labels),
            retain=Records(t.features[sample], t.labels[sample]),
            forget=Records(t.features[gone], t.labels[gone]),
            unseen=Records(test.features[unseen], test.labels[unseen]),
        )

    def sisa_rows(self, gone: np.ndarray, sets: Sets) -> list[dict]:
        run_dir = self.folder / "sisa"
        shutil.copytree(self.sisa_all.root, run_dir, ignore=shutil.ignore_patterns("lock"))
        ids = self.table.ids.iloc[gone].tolist()
        _, delete_s = _timed(lambda: delete(run_dir, ids))
        run = RunDir(run_dir)
        live = Ensemble.from_manifest(run.root, run.config(), run.require_manifest())
        ref_run, ref_s = _timed(lambda: retrain_from_scratch(run, self.folder / "sisa-ref"))
        ref = Ensemble.from_manifest(ref_run.root, ref_run.config(), ref_run.require_manifest())
        ref_lp = ensemble_log_probs(ref)
        models = (list(live.models.values()), list(ref.models.values()))
        return [
            self.row("sisa retrain", EXACT, ref_s, ref_lp, ref_lp, sets, models[1], models[1]),
            self.row("sisa delete", EXACT, delete_s, ensemble_log_probs(live), ref_lp, sets, *models),
        ]

    def row(
        self,
        name: str,
        kind: str,
        wall: float | None,
        predict: LogProbs,
        ref: LogProbs,
        sets: Sets,
        models: list[nn.Module],
        ref_models: list[nn.Module],
    ) -> dict:
        return {
            "method": name,
            "kind": kind,
            "exact": kind == EXACT,
            "wall_s": wall,
            **metrics(predict, ref, sets, self.seed),
            "l2_to_retrain": round(parameter_l2(models, ref_models), 6),
        }


COLUMNS = ("method", "kind", "wall_s", "test_acc", "retain_acc", "forget_acc", "mia_auc", "l2_to_retrain",
           "tv_to_retrain")  # fmt: skip


def markdown(result: dict) -> str:
    """The comparison as Markdown tables, one per request."""
    parts = []
    for req in result["requests"]:
        parts.append(
            f"### forget {req['forget']} ({req['forget_rows']} records; {req['retain_rows']} retained; "
            f"{req['unseen_rows']} unseen for the attack)\n"
        )
        parts.append("| " + " | ".join(COLUMNS) + " |")
        parts.append("|" + "---|" * len(COLUMNS))
        for row in req["rows"]:
            cells = [_cell(row[c]) for c in COLUMNS]
            parts.append("| " + " | ".join(cells) + " |")
        parts += [f"\nnote: {n}" for n in req["notes"]]
        parts.append("")
    parts.append("approx-* rows are APPROXIMATE unlearning: " + APPROXIMATE + ".")
    return "\n".join(parts)


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_outputs(result: dict, out: str | Path) -> list[Path]:
    """compare.json and compare.md into ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "compare.json", folder / "compare.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result) + "\n")
    return paths
