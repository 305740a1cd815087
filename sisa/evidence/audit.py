"""Membership-inference audit: does a live model still behave as if it had seen the deleted records?

Bit-exactness (``verify``) proves forgetting at the algorithm level; this module gives the behavioural evidence
the field uses. Conventions (also written into every result as ``conventions``):

- An attack gives every record a score; a higher score means "more likely a training member". Positive = member.
- ROC AUC is the probability that a random positive outscores a random negative (ties count half); 0.5 is chance.
- (a) ``members_vs_unseen``: positives are active training records, negatives never-seen (holdout) records. An AUC
  whose confidence interval lies above 0.5 shows that the attack has power on this model; without power, (b) is
  weak evidence.
- (b) ``deleted_vs_unseen``: positives are deleted records (rows the auditor supplies: the run erased them),
  negatives the same never-seen records. After exact unlearning no live model saw either group, so the AUC is 0.5
  within its interval. Far above 0.5 = under-forgetting (still member-like); far below 0.5 = over-forgetting (the
  model treats deleted records as conspicuously unfamiliar, which itself reveals the deletion).
- ``reference``: the same attacks on an ensemble retrained from scratch on the run's current records (it never saw
  the deleted records either), so a deviation from 0.5 that both show comes from the data (e.g. deleted records
  drawn from one class), not from the unlearning.

The attacks themselves (per-record scores) live in :mod:`sisa.evidence.attacks`, the statistics in :mod:`sisa.evidence.roc`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..aggregation import Ensemble
from ..config import Config
from ..exceptions import DataError, RunStateError, UsageError
from ..fitting import train
from ..session import reader_session
from ..sharding import keyed_hash64
from ..store.index import RecordIndex, coerce_ids, keyed_id_hashes
from ..store.journal import Journal, kind_of
from ..store.rundir import RunDir
from ..store.shardfile import concat
from ..tables.table import Table, read_table, validate_table
from .attacks import Group, aggregate_log_probs, compare_groups, headline_attack, loss_score, model_log_probs
from .roc import AttackResult, evaluate_attack

CONVENTIONS = {
    "positive": "member: a record the model was trained on",
    "score": "higher = more likely a member",
    "auc": "P(score of a random positive > score of a random negative), ties count half; 0.5 = chance",
    "members_vs_unseen": "positives = active training records, negatives = never-seen holdout records; "
    "AUC above 0.5 (CI excluding 0.5) = the attack has power",
    "deleted_vs_unseen": "positives = deleted records (rows supplied by the auditor), negatives = the same "
    "holdout records; exact unlearning gives 0.5 within the CI; far above 0.5 = under-forgetting, "
    "far below 0.5 = over-forgetting",
    "reference": "the same attacks on an ensemble retrained from scratch on the run's current records, which "
    "never saw the deleted records either",
    "ci": "95% DeLong interval for AUC; 95% stratified bootstrap interval for TPR at a fixed FPR",
    "tpr_at_fpr": "with n negatives the smallest FPR above 0 is 1/n; below that the value is the TPR at zero "
    "false positives",
}


# ---- inputs ------------------------------------------------------------------------------------------------
def _sample(n: int, limit: int, seed: int, purpose: str) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(int(keyed_hash64([purpose], seed, "audit")[0]))
    return np.sort(rng.choice(n, limit, replace=False))


def member_group(run: RunDir, cfg: Config, ensemble: Ensemble, limit: int, seed: int) -> Group:
    """Active training records (from the run's shard data), sampled down to ``limit``."""
    rows = {s: i for i, s in enumerate(ensemble.shards)}
    feats, labels, target = [], [], []
    for s in ensemble.shards:
        shard = run.shard_rows(s)
        feats.append(shard.features)
        labels.append(shard.labels)
        target.append(np.full(len(shard), rows[s]))
    keep = _sample(sum(map(len, labels)), limit, seed, "members")
    return Group(np.concatenate(feats)[keep], np.concatenate(labels)[keep], np.concatenate(target)[keep])


def load_rows(path: str | Path, cfg: Config, what: str, purpose: str = "train") -> Table:
    """A labelled table encoded like the run's (``purpose="score"``: IDs and subjects optional)."""
    return validate_table(
        read_table(path),
        cfg.data,
        f"{what} {path}",
        classes=cfg.data.classes,
        feature_names=cfg.data.features,
        purpose=purpose,
    )


def unseen_group(table: Table, n_models: int, limit: int, seed: int) -> Group:
    """Never-seen records; each is scored against one shard model, assigned round-robin in a seeded order."""
    keep = _sample(len(table), limit, seed, "unseen")
    order = np.random.default_rng(seed).permutation(len(keep))
    return Group(table.features[keep], table.labels[keep], order % n_models)


def check_deleted(run: RunDir, index: RecordIndex, table: Table) -> None:
    """Every row of --deleted must be a record this run deleted: not active, tombstoned under the run's key."""
    ids = coerce_ids(list(table.ids), index.active["record_id"]) if len(index.active) else list(table.ids)
    live = index.positions_of(ids) >= 0
    active = [i for i, is_live in zip(ids, live, strict=True) if is_live]
    tombs = set(index.tombstones.loc[index.tombstones["kind"] == "record", "id_hash"])
    hashes = keyed_id_hashes(ids, run.secret(), "record")
    unknown = [i for i, h, v in zip(ids, hashes, live, strict=True) if h not in tombs and not v]
    problems = []
    if active:
        problems.append(f"{len(active)} record(s) are still active in the run, not deleted: {_show(active)}")
    if unknown:
        problems.append(f"{len(unknown)} record(s) were never deleted from this run: {_show(unknown)}")
    if problems:
        raise DataError("--deleted", problems)


def check_outside_run(root: str | Path, out: str | Path) -> None:
    """Results derived from deleted rows never go into the run directory (real erasure)."""
    if Path(out).resolve().is_relative_to(Path(root).resolve()):
        raise UsageError(
            [("out", f"{out}: results derived from deleted rows must be written outside the run")]
        )


def _show(ids: list) -> str:
    return ", ".join(repr(i) for i in ids[:10]) + (f" (and {len(ids) - 10} more)" if len(ids) > 10 else "")


def former_shards(run: RunDir, cfg: Config, table: Table) -> np.ndarray:
    """The shard each deleted record lived in (-1 when unknown).

    Under uniform and distribution_aware placement the shard is a pure function of (placement key, seed).
    Stratified placement depends on other records, so the journal tells: a request that touched one shard."""
    if cfg.sharding.strategy != "stratified":
        keys = table.subjects if table.subjects is not None else table.ids
        return (keyed_hash64(list(keys), cfg.training.seed, "shard") % np.uint64(cfg.sharding.shards)).astype(
            np.int64
        )
    where: dict[str, int] = {}
    for e in Journal(run.journal_dir).entries():
        if len(e["shards"]) == 1 and kind_of(e) == "delete":
            where.update(dict.fromkeys(e["id_hashes"], int(next(iter(e["shards"])))))
    hashes = keyed_id_hashes(list(table.ids), run.secret(), "record")
    return np.array([where.get(h, -1) for h in hashes], dtype=np.int64)


def deleted_group(run: RunDir, cfg: Config, ensemble: Ensemble, table: Table, limit: int, seed: int) -> Group:
    keep = _sample(len(table), limit, seed, "deleted")
    rows = {s: i for i, s in enumerate(ensemble.shards)}
    fallback = np.random.default_rng(seed + 1).permutation(len(keep)) % len(rows)
    shard = former_shards(run, cfg, table)[keep]
    target = np.array([rows.get(int(s), int(f)) for s, f in zip(shard, fallback, strict=True)])
    return Group(table.features[keep], table.labels[keep], target)


# ---- the reference: retrained from scratch ------------------------------------------------------------------
def active_table(run: RunDir, cfg: Config) -> tuple[Table, pd.DataFrame]:
    """The run's current records as a Table in index order, and their persisted placement."""
    index = run.index()
    stored = concat([run.shard_rows(s) for s in range(cfg.sharding.shards)], len(cfg.data.features))
    active = index.active
    pos = pd.Index(stored.ids).get_indexer(active["record_id"])
    stored = stored.take(pos)
    table = Table(
        ids=active["record_id"].reset_index(drop=True),
        labels=stored.labels,
        features=stored.features,
        feature_names=list(cfg.data.features),
        classes=list(cfg.data.classes),
        subjects=active["subject_id"].reset_index(drop=True) if index.has_subjects else None,
    )
    return table, active[["shard", "slice", "order"]].reset_index(drop=True)


def retrain_from_scratch(run: RunDir, workdir: Path) -> RunDir:
    """Train a fresh run on the run's current records with the same config and placement."""
    cfg = run.config()
    if cfg.training.device == "cuda" and not torch.cuda.is_available():
        cfg = cfg.with_overrides(["training.device=cpu"])
    table, placement = active_table(run, cfg)
    ref, _ = train(workdir, cfg, table, placement=placement)
    return ref


def same_weights(a: Ensemble, b: Ensemble) -> bool:
    if a.shards != b.shards:
        return False
    for s in a.shards:
        sa, sb = a.models[s].state_dict(), b.models[s].state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


# ---- the audit ----------------------------------------------------------------------------------------------
@dataclass
class Audit:
    """The JSON summary and the full results (with ROC curves) per model ("live", "reference") and comparison."""

    summary: dict
    results: dict[str, dict[str, dict[str, AttackResult]]]


def run_audit(
    root: str | Path,
    holdout: str | Path | None = None,
    deleted: str | Path | None = None,
    *,
    reference: bool = True,
    max_records: int = 5000,
    bootstrap: int = 200,
    seed: int = 0,
) -> Audit:
    """Audit the live ensemble of ``root`` (after replaying pending deletions) and, with ``reference``, an
    ensemble retrained from scratch in a temporary folder. Deleted rows are read from ``deleted`` and kept in
    memory only; nothing is written into the run directory except what recovery of pending deletions writes."""
    problems = [("max_records", f"expected an integer >= 10, got {max_records}")] if max_records < 10 else []
    if bootstrap < 0:
        problems.append(("bootstrap", f"expected an integer >= 0, got {bootstrap}"))
    if problems:
        raise UsageError(problems)
    run = reader_session(root)
    if Journal(run.journal_dir).pending():
        raise RunStateError(
            f"{run.root}: another process is applying a deletion; audit again when it has finished"
        )
    cfg, manifest = run.config(), run.require_manifest()
    holdout = holdout or cfg.data.test
    if not holdout:
        raise UsageError(
            [
                (
                    "holdout",
                    "the audit needs never-seen records: give a holdout table or set data.test in the config",
                )
            ]
        )
    unseen_rows = load_rows(holdout, cfg, "--holdout", purpose="score")
    deleted_rows = load_rows(deleted, cfg, "--deleted") if deleted else None
    if deleted_rows is not None:
        check_deleted(run, run.index(), deleted_rows)
    live = Ensemble.from_manifest(run.root, cfg, manifest)
    if len(live.models) < 1:
        raise RunStateError(f"{run.root}: no shard model is serving (every shard is empty); nothing to audit")
    members = member_group(run, cfg, live, max_records, seed)
    unseen = unseen_group(unseen_rows, len(live.models), max_records, seed)
    gone = (
        deleted_group(run, cfg, live, deleted_rows, max_records, seed) if deleted_rows is not None else None
    )
    models, ref_info = {"live": live}, {}
    if reference:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="sisa-audit-reference-") as tmp:
            ref_run = retrain_from_scratch(run, Path(tmp) / "run")
            models["reference"] = Ensemble.from_manifest(ref_run.root, ref_run.config(), ref_run.manifest())
        ref_info = {
            "seconds": round(time.perf_counter() - t0, 3),
            "bit_identical_to_live": same_weights(live, models["reference"]),
        }
    results = {}
    for name, ens in models.items():
        results[name] = {"members_vs_unseen": compare_groups(ens, members, unseen, bootstrap, seed)}
        if gone is not None:
            results[name]["deleted_vs_unseen"] = compare_groups(ens, gone, unseen, bootstrap, seed)
    summary = summarize(run, manifest, live, results, ref_info, holdout, deleted)
    summary["per_shard"] = shard_table(live, members, unseen)
    ens_logp = aggregate_log_probs(model_log_probs(live, unseen.features), live)
    summary["ensemble_holdout_accuracy"] = round(float((ens_logp.argmax(-1) == unseen.labels).mean()), 4)
    return Audit(summary, results)


def shard_table(ens: Ensemble, members: Group, unseen: Group) -> list[dict]:
    """Per shard model: holdout accuracy and the loss attack on its own members vs every unseen record."""
    lm, lu = model_log_probs(ens, members.features), model_log_probs(ens, unseen.features)
    out = []
    for i, s in enumerate(ens.shards):
        own = members.target == i
        row = {"shard": s, "members_sampled": int(own.sum())}
        row["holdout_accuracy"] = round(float((lu[i].argmax(-1) == unseen.labels).mean()), 4)
        if own.sum() >= 2:
            r = evaluate_attack(
                loss_score(lm[i][own], members.labels[own]), loss_score(lu[i], unseen.labels), 0
            )
            row.update(loss_auc=round(r.auc, 4), loss_auc_ci=[round(v, 4) for v in r.auc_ci])
        out.append(row)
    return out


def summarize(
    run: RunDir,
    manifest: dict,
    live: Ensemble,
    results: dict[str, dict[str, dict[str, AttackResult]]],
    ref_info: dict,
    holdout: str | Path,
    deleted: str | Path | None,
) -> dict:
    """The JSON result: headline numbers (live and reference), verdicts, every attack, conventions, notes."""
    head = headline_attack(live)
    summary: dict = {
        "run": str(run.root),
        "generation": manifest["generation"],
        "shards_serving": live.shards,
    }
    summary["headline_attack"] = head
    notes = []
    for model in results:
        target = summary if model == "live" else summary.setdefault("reference", {})
        for comp in ("members_vs_unseen", "deleted_vs_unseen"):
            r = results[model].get(comp, {}).get(head)
            target[f"{comp}_auc"] = round(r.auc, 4) if r else None
            target[f"{comp}_ci"] = [round(v, 4) for v in r.auc_ci] if r else None
            if model == "live":
                for key, value in (r.to_dict() if r else {}).items():
                    if key.startswith("tpr_at_"):
                        target[f"{comp}_{key}"] = value
    if "reference" in summary:
        summary["reference"].update(ref_info)
        summary["reference"]["what"] = (
            "an ensemble retrained from scratch, in a temporary folder, on the run's current records with the "
            "same config, seed and placement; it never saw the deleted records"
        )
    else:
        notes.append("no retrained-from-scratch reference was computed (--no-reference)")
    if deleted is None:
        notes.append(
            "part (b) deleted-vs-unseen skipped: the run erased the deleted rows by design; pass --deleted FILE "
            "with the deleted records' features and labels (kept by the requester) to run it"
        )
    n_neg = results["live"]["members_vs_unseen"][head].n_neg
    if n_neg < 1000:
        notes.append(f"{n_neg} unseen records: TPR at 0.1% FPR is the TPR at zero false positives")
    summary["holdout"] = str(holdout)
    summary["verdict"] = verdict(results, head)
    summary["attacks"] = {
        m: {c: {a: r.to_dict() for a, r in comp.items()} for c, comp in res.items()}
        for m, res in results.items()
    }
    summary["conventions"] = CONVENTIONS
    summary["notes"] = notes
    return summary


def verdict(results: dict, head: str) -> dict:
    """Plain-language reading of the headline attack's intervals."""
    power = results["live"]["members_vs_unseen"][head]
    out = {
        "attack_power": (
            f"the attack tells training members from never-seen records (AUC {_f(power.auc)}, CI above 0.5)"
            if power.verdict() == "above chance"
            else f"the attack finds no membership signal even on training members (AUC {_f(power.auc)}); "
            "a null result on deleted records is then weak evidence"
        )
    }
    gone = results["live"].get("deleted_vs_unseen", {}).get(head)
    if gone is not None:
        lo, hi = gone.auc_ci
        out["forgetting"] = {
            "chance": "deleted records are indistinguishable from never-seen records (CI contains 0.5)",
            "above chance": "UNDER-FORGETTING: deleted records still look like training members (CI above 0.5)",
            "below chance": "OVER-FORGETTING: deleted records look less familiar than never-seen ones "
            "(CI below 0.5)",
        }[gone.verdict()] + f"; AUC {_f(gone.auc)} [{_f(lo)}, {_f(hi)}]"
        ref = results.get("reference", {}).get("deleted_vs_unseen", {}).get(head)
        if ref is not None:
            out["forgetting"] += f"; retrained-from-scratch reference AUC {_f(ref.auc)}"
    return out


def _f(x: float) -> str:
    """Three decimals of the 4-decimal value the JSON shows, so text and JSON never disagree."""
    return f"{round(float(x), 4):.3f}"


def describe(summary: dict) -> str:
    """A short human-readable audit summary for the terminal."""
    lines = [
        f"audit of {summary['run']} (generation {summary['generation']}); attack {summary['headline_attack']}"
    ]
    ref = summary.get("reference", {})
    for comp in ("members_vs_unseen", "deleted_vs_unseen"):
        auc, ci = summary[f"{comp}_auc"], summary[f"{comp}_ci"]
        if auc is None:
            continue
        text = f"  {comp:<18} AUC {auc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        if ref.get(f"{comp}_auc") is not None:
            text += f"   retrained reference {ref[f'{comp}_auc']:.3f}"
        lines.append(text)
    if "bit_identical_to_live" in ref:
        lines.append(f"  reference bit-identical to the live ensemble: {ref['bit_identical_to_live']}")
    lines += [f"  {k}: {v}" for k, v in summary["verdict"].items()]
    lines += [f"  note: {n}" for n in summary["notes"]]
    return "\n".join(lines)
