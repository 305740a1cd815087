"""Membership-inference attacks: per-record scores computed from a model's outputs (no run directory, no I/O).

:mod:`sisa.evidence.audit` decides which records to compare and assembles the result; this module only turns an ensemble's
outputs into per-record attack scores, so the attacks can be reused (``sisa compare`` scores with them too) and
tested on their own. The statistics over those scores (ROC, DeLong, bootstrap) live in :mod:`sisa.evidence.roc`.

Attacks: ``loss`` (score = log-probability of the true label, Yeom et al. 2018), ``confidence`` (score = the
largest predicted probability, label-free, Salem et al. 2019), each on the aggregated ensemble output and on the
record's own shard model; and an offline LiRA-style test (Carlini et al. 2022) on shard models that uses the other
shards' models as free reference models: each record was never seen by S-1 of them, so a Gaussian fitted to their
logit-confidences phi = log p_y - log(1 - p_y) is the record's "out" distribution, and the target model's phi is
scored by its z-value (monotone in the one-sided likelihood ratio, so it gives the same ROC).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..aggregation import Ensemble
from .roc import AttackResult, evaluate_attack


# ---- per-record signals --------------------------------------------------------------------------------------
@torch.no_grad()
def model_log_probs(ensemble: Ensemble, X: np.ndarray, batch: int = 4096) -> np.ndarray:
    """[S, n, C] float64 log-probabilities of every serving shard model (log-softmax in float64: no saturation)."""
    out = []
    for m in ensemble.models.values():
        m.eval()
        parts = [
            m(torch.tensor(X[i : i + batch], dtype=torch.float32, device=ensemble.device)).double().cpu()
            for i in range(0, len(X), batch)
        ]
        out.append(torch.log_softmax(torch.cat(parts), dim=-1).numpy())
    return np.stack(out)


def aggregate_log_probs(shard_logp: np.ndarray, ensemble: Ensemble) -> np.ndarray:
    """[n, C] log of the ensemble's output: weighted mean of probabilities (soft) or vote shares (hard)."""
    w = ensemble.weights().double().numpy()
    if ensemble.config.aggregation.method == "hard":
        votes = np.eye(shard_logp.shape[-1])[shard_logp.argmax(-1)]
        return np.log(np.clip((votes * w[:, None, None]).sum(0) / w.sum(), 1e-6, 1.0))
    lw = np.log(np.where(w > 0, w / w.sum(), 1e-300))[:, None, None]
    return np.logaddexp.reduce(shard_logp + lw, axis=0)


def loss_score(logp: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log p_y = minus the cross-entropy loss; works on [n, C] or [S, n, C]."""
    return np.take_along_axis(logp, np.broadcast_to(labels[..., None], (*logp.shape[:-1], 1)), -1)[..., 0]


def confidence_score(logp: np.ndarray) -> np.ndarray:
    """Largest predicted log-probability (label-free)."""
    return logp.max(-1)


def logit_confidence(logp: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = log p_y - log(1 - p_y), with log(1 - p_y) as a log-sum-exp over the other classes (stable)."""
    own = loss_score(logp, labels)
    onehot = np.eye(logp.shape[-1], dtype=bool)[labels]
    rest = np.logaddexp.reduce(np.where(onehot, -np.inf, logp), axis=-1)
    return own - rest


def lira_scores(phi: np.ndarray, target: np.ndarray) -> np.ndarray:
    """z-value of the target model's phi under a Gaussian fitted to the other models' phi (fixed variance).

    ``phi`` is [S, n]; ``target[i]`` the row of record i's target model. With few references a per-record
    variance is too noisy, so one pooled variance is used (Carlini et al.'s "fixed variance" variant).
    """
    S, n = phi.shape
    cols = np.arange(n)
    mask = np.ones((S, n), dtype=bool)
    mask[target, cols] = False
    refs = np.where(mask, phi, np.nan)
    mu = np.nanmean(refs, axis=0)
    sigma = float(np.sqrt(np.nanmean((refs - mu) ** 2) * (S - 1) / max(S - 2, 1)))
    return (phi[target, cols] - mu) / max(sigma, 1e-6)


@dataclass
class Group:
    """Records of one role (members, unseen, deleted): features, labels and each record's target shard row."""

    features: np.ndarray
    labels: np.ndarray
    target: np.ndarray  # row in the ensemble's shard list scoring the record as "its own" model


def attack_scores(ensemble: Ensemble, pos: Group, neg: Group) -> tuple[dict, dict]:
    """Every attack's score for every record of ``pos`` and of ``neg``.

    LiRA's pooled variance is fitted on both groups together: one sigma for the whole comparison, so it scales
    every score alike and the ROC depends on (phi - mu) only, never on a group's own variance estimate."""
    out, phis = [], []
    for group in (pos, neg):
        logp = model_log_probs(ensemble, group.features)
        agg = aggregate_log_probs(logp, ensemble)
        cols = np.arange(len(group.labels))
        out.append({
            "ensemble/loss": loss_score(agg, group.labels),
            "ensemble/confidence": confidence_score(agg),
            "shard/loss": loss_score(logp, group.labels)[group.target, cols],
            "shard/confidence": confidence_score(logp)[group.target, cols],
        })  # fmt: skip
        phis.append(logit_confidence(logp, group.labels))
    if len(ensemble.models) >= 3:
        z = lira_scores(np.concatenate(phis, axis=1), np.concatenate([pos.target, neg.target]))
        out[0]["shard/lira"], out[1]["shard/lira"] = z[: len(pos.labels)], z[len(pos.labels) :]
    return out[0], out[1]


def compare_groups(
    ensemble: Ensemble, pos: Group, neg: Group, bootstrap: int, seed: int
) -> dict[str, AttackResult]:
    ps, ns = attack_scores(ensemble, pos, neg)
    return {k: evaluate_attack(ps[k], ns[k], bootstrap, seed) for k in ps}


def headline_attack(ensemble: Ensemble) -> str:
    """Fixed before looking at results: the strongest attack available (LiRA needs >= 3 shard models)."""
    return "shard/lira" if len(ensemble.models) >= 3 else "shard/loss"
