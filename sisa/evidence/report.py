"""A self-contained HTML report of a run for a compliance reviewer (``sisa report``).

One HTML file with the plots embedded as base64 PNGs (matplotlib, Agg backend, no pyplot global state): per-shard
accuracy, the deletion history and its cost (from the journal receipts: seconds and samples retrained per
request, against the cost of a full retrain), and the membership-inference ROC curves of :mod:`sisa.evidence.audit`; plus
the key numbers and what they mean. The report holds aggregate numbers only: no record IDs and no record data.
It is written where ``--out`` says, never inside the run directory when deleted rows were supplied.
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

import numpy as np

from ..estimator import run_status
from ..exceptions import SisaError
from ..store.files import atomic_write_bytes
from ..store.journal import Journal, kind_of
from ..store.rundir import RunDir
from .audit import Audit, check_outside_run, run_audit


def _figure(width: float = 7.0, height: float = 3.6):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SisaError("sisa report needs matplotlib: pip install 'sisa[report]'") from None
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---- plots --------------------------------------------------------------------------------------------------
def plot_shard_accuracy(per_shard: list[dict], ensemble_acc: float | None, records: list[int]) -> bytes:
    """Holdout accuracy of every shard model, with the ensemble's as a line and shard sizes on the bars."""
    fig = _figure()
    ax = fig.add_subplot()
    shards = [r["shard"] for r in per_shard]
    acc = [r["holdout_accuracy"] for r in per_shard]
    bars = ax.bar([str(s) for s in shards], acc, color="#4c72b0", label="shard model")
    for bar, s in zip(bars, shards, strict=True):
        n = records[s] if s < len(records) else 0
        ax.annotate(f"{n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7, xytext=(0, 2), textcoords="offset points")  # fmt: skip
    if ensemble_acc is not None:
        ax.axhline(ensemble_acc, color="#dd8452", lw=2, label=f"ensemble {ensemble_acc:.3f}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("shard (number on bar: records)")
    ax.set_ylabel("accuracy on never-seen records")
    ax.set_title("Per-shard accuracy")
    ax.legend(loc="lower right", fontsize=8)
    return png(fig)


def deletion_history(entries: list[dict], epochs: float, active_now: int) -> list[dict]:
    """One row per applied request, in order, with the samples a full retrain would have cost at that time."""
    applied = [e for e in entries if e.get("status") == "applied" and "receipt" in e]
    rows, later = [], 0
    for e in reversed(applied):
        r = e["receipt"]
        rows.append({
            "request_id": e["request_id"],
            "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["created"])),
            "records": int(r.get("records_deleted", e.get("records", 0))),
            "shards": len(r.get("shards_retrained", {})),
            "seconds": float(r.get("seconds", 0.0)),
            "samples": int(r.get("samples_retrained", 0)),
            "full_retrain_samples": int(round(epochs * (active_now + later))),
        })  # fmt: skip
        later += rows[-1]["records"]
    return rows[::-1]


def plot_deletions(history: list[dict]) -> bytes:
    """Seconds per request, and samples retrained per request against a full retrain's samples."""
    fig = _figure(7.0, 4.6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(1, len(history) + 1)
    if not history:
        top.text(0.5, 0.5, "no deletion requests yet", ha="center", va="center", transform=top.transAxes)
    top.bar(x, [h["seconds"] for h in history], color="#55a868")
    top.set_ylabel("seconds")
    top.set_title("Deletion requests: wall time and retraining cost")
    bottom.bar(x, [h["samples"] for h in history], color="#4c72b0", label="samples retrained (SISA)")
    bottom.plot(x, [h["full_retrain_samples"] for h in history], "k--", marker="o", ms=3,
                label="full retrain (epochs x records)")  # fmt: skip
    bottom.set_ylabel("samples")
    bottom.set_xlabel("request (chronological)")
    bottom.set_xlim(0.4, max(len(history), 5) + 0.6)
    bottom.set_xticks(x)
    bottom.legend(fontsize=8, loc="lower right")
    return png(fig)


def plot_roc(audit: Audit) -> bytes:
    """ROC curves of the headline attack (and the ensemble loss attack), linear and log-log axes."""
    head = audit.summary["headline_attack"]
    fig = _figure(8.0, 3.8)
    axes = fig.subplots(1, 2)
    curves = [
        ("live", "members_vs_unseen", head, "members vs unseen", "#4c72b0", "-"),
        ("live", "members_vs_unseen", "ensemble/loss", "members vs unseen (ensemble loss)", "#8172b3", ":"),
        ("live", "deleted_vs_unseen", head, "deleted vs unseen", "#c44e52", "-"),
        ("reference", "deleted_vs_unseen", head, "deleted vs unseen, retrained reference", "#dd8452", "--"),
    ]
    for ax, log in zip(axes, (False, True), strict=True):
        for model, comp, attack, label, color, style in curves:
            r = audit.results.get(model, {}).get(comp, {}).get(attack)
            if r is None:
                continue
            fpr, tpr = r.roc
            if log:
                fpr, tpr = np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4)
            ax.plot(fpr, tpr, style, color=color, lw=1.5, label=f"{label} (AUC {r.auc:.3f})")
        lim = (1e-4, 1) if log else (0, 1)
        ax.plot(lim, lim, color="grey", lw=0.8, label="chance")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlim(*lim)
        ax.set_ylim(*lim)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{head}{' (log-log)' if log else ''}", fontsize=9)
    axes[0].legend(fontsize=6.5, loc="lower right")
    return png(fig)


# ---- HTML ---------------------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}
th{background:#f2f2f2;text-align:left}img{max-width:100%}
.note{color:#555;font-size:13px}"""


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p class=note>none</p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"
    return html.escape("-" if v is None else str(v))


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _auc(summary: dict, comp: str) -> str:
    auc, ci = summary.get(f"{comp}_auc"), summary.get(f"{comp}_ci")
    return "not run" if auc is None else f"{auc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def render_html(status: dict, audit: Audit, history: list[dict], images: dict[str, bytes]) -> str:
    s, ref = audit.summary, audit.summary.get("reference", {})
    key = [
        {"": "run", "value": status["run"]},
        {"": "generation", "value": status["generation"]},
        {"": "shards serving", "value": f"{len(status['shards_serving'])} of {status['shards']}"},
        {"": "records active / deleted", "value": f"{status['records_active']} / {status['records_deleted']}"},
        {"": "deletion requests (pending)", "value": f"{status['deletion_requests']} ({status['deletions_pending']})"},
        {"": "ensemble accuracy on the never-seen records", "value": s["ensemble_holdout_accuracy"]},
        {"": f"MIA AUC members vs unseen ({s['headline_attack']})", "value": _auc(s, "members_vs_unseen")},
        {"": "MIA AUC deleted vs unseen", "value": _auc(s, "deleted_vs_unseen")},
        {"": "same, retrained-from-scratch reference", "value": _auc(ref, "deleted_vs_unseen") if ref else "not run"},
        {"": "reference bit-identical to live ensemble", "value": ref.get("bit_identical_to_live", "not run")},
    ]  # fmt: skip
    attacks = [
        {"model": m, "comparison": c, "attack": a, **{k: v for k, v in r.items() if not k.endswith("_ci") or k == "auc_ci"}}
        for m, comps in s["attacks"].items() for c, rs in comps.items() for a, r in rs.items()
    ]  # fmt: skip
    verdicts = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in s["verdict"].items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in s["notes"])
    conventions = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in s["conventions"].items()
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>sisa report: {html.escape(status["run"])}</title>
<style>{CSS}</style></head><body>
<h1>Unlearning report</h1><p class=note>generated {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
by sisa; aggregate numbers only (no record IDs or data)</p>
<h2>Key numbers</h2>{_table(key)}<ul>{verdicts}</ul>
<h2>Per-shard accuracy</h2>{_img(images["shards"], "per-shard accuracy")}
{_table(s["per_shard"])}
<h2>Deletion history and cost</h2>{_img(images["deletions"], "deletion history")}
{_table(history)}
<h2>Membership inference</h2>{_img(images["roc"], "ROC curves")}
{_table(attacks)}
<h3>How to read this</h3><ul>{conventions}</ul>
<h3>Notes</h3><ul>{notes or "<li>none</li>"}</ul>
</body></html>
"""


def build_report(
    root: str | Path,
    out: str | Path,
    *,
    deleted: str | Path | None = None,
    holdout: str | Path | None = None,
    reference: bool = True,
) -> Path:
    """Run the audit and write the HTML report to ``out`` (a .html file, or a folder that gets report.html and
    the PNGs). Returns the HTML path."""
    run = RunDir(root)
    out = Path(out)
    path = out if out.suffix.lower() in (".html", ".htm") else out / "report.html"
    if deleted is not None:
        check_outside_run(run.root, path)
    audit = run_audit(root, holdout, deleted, reference=reference)
    status = run_status(root)
    history = deletion_history(
        [e for e in Journal(run.journal_dir).entries() if kind_of(e) == "delete"],
        run.config().training.epochs,
        status["records_active"],
    )
    images = {
        "shards": plot_shard_accuracy(
            audit.summary["per_shard"], audit.summary["ensemble_holdout_accuracy"], status["shard_records"]
        ),
        "deletions": plot_deletions(history),
        "roc": plot_roc(audit),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, render_html(status, audit, history, images).encode())
    if path != out:  # a folder: the PNGs go beside the HTML
        for name, data in images.items():
            atomic_write_bytes(out / f"{name}.png", data)
    return path
