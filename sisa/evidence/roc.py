"""ROC statistics for membership-inference attacks: AUC with a DeLong interval, TPR at a fixed low FPR with a
bootstrap interval, and the ROC curve.

Convention: positives are members and a higher score means "more likely a member". AUC is the probability that a
random positive outscores a random negative, ties counting half (the Mann-Whitney statistic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..exceptions import DataError

Z95 = 1.959963984540054
FPRS = (0.01, 0.001)


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def delong(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """ROC AUC and its DeLong standard error (fast midrank form, Sun & Xu 2014)."""
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        raise DataError("audit", [f"need at least 2 positives and 2 negatives, got {m} and {n}"])
    tz = midranks(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:m] - midranks(pos)) / n
    v01 = 1.0 - (tz[m:] - midranks(neg)) / m
    return float(auc), math.sqrt(max(v10.var(ddof=1) / m + v01.var(ddof=1) / n, 0.0))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    """TPR of the threshold that lets at most ``floor(fpr * n_neg)`` negatives score above it."""
    k = int(math.floor(fpr * len(neg) + 1e-9))
    if k >= len(neg):
        return 1.0
    threshold = np.sort(neg)[::-1][k]
    return float((pos > threshold).mean())


def roc_curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], is_pos[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    return np.r_[0.0, fp / len(neg)], np.r_[0.0, tp / len(pos)]


@dataclass
class AttackResult:
    """One attack on one comparison: AUC with CI, TPR at low FPR with CI, and the ROC curve (for plots)."""

    auc: float
    auc_ci: tuple[float, float]
    tpr: dict[str, tuple[float, float, float]]  # fpr -> (tpr, lo, hi)
    n_pos: int
    n_neg: int
    roc: tuple[np.ndarray, np.ndarray] = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "auc": round(self.auc, 4),
            "auc_ci": [round(v, 4) for v in self.auc_ci],
            **{f"tpr_at_{k}_fpr": round(v[0], 4) for k, v in self.tpr.items()},
            **{f"tpr_at_{k}_fpr_ci": [_r(v[1]), _r(v[2])] for k, v in self.tpr.items()},
            "n_positives": self.n_pos,
            "n_negatives": self.n_neg,
        }

    def verdict(self) -> str:
        lo, hi = self.auc_ci
        if lo > 0.5:
            return "above chance"
        return "below chance" if hi < 0.5 else "chance"


def evaluate_attack(pos: np.ndarray, neg: np.ndarray, bootstrap: int = 200, seed: int = 0) -> AttackResult:
    """AUC (DeLong CI), TPR at 1% and 0.1% FPR (stratified bootstrap CI), ROC curve."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    auc, se = delong(pos, neg)
    rng = np.random.default_rng(seed)
    tpr = {}
    for f in FPRS:
        boot = [tpr_at_fpr(rng.choice(pos, len(pos)), rng.choice(neg, len(neg)), f) for _ in range(bootstrap)]
        lo, hi = np.quantile(boot, [0.025, 0.975]) if boot else (np.nan, np.nan)
        tpr[f"{f:g}"] = (tpr_at_fpr(pos, neg, f), float(lo), float(hi))
    ci = (max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se))
    return AttackResult(auc, ci, tpr, len(pos), len(neg), roc_curve(pos, neg))


def _r(x: float) -> float | None:
    """4 decimals; None for an interval that was not computed (no bootstrap), so the JSON stays valid."""
    return None if math.isnan(x) else round(x, 4)
