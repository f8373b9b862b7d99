"""A self-contained HTML evaluation report (figures embedded as PNG data URIs).

Sections: the metrics table, per-task ROC curves, calibration (reliability) plots, the
training curves from the model's ``log.jsonl``, the gate-utilisation heatmap for models
with gates, and the task relations: heatmaps of the label correlations (``meta.json``) and,
for a model trained with ``train.affinity_every``, of the task affinity (``affinity.json``:
gradient cosine and lookahead affinity). Every heatmap is drawn by :func:`_heatmap`.
Figures are drawn with matplotlib, needed for reports only.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtrec.errors import MtrecError
from mtrec.metrics import calibration, roc_curve_points, sigmoid
from mtrec.model_dir import LOG, META, load_affinity
from mtrec.tables import cell

__all__ = ["SECTIONS", "write_report"]

SECTIONS = ("metrics", "roc", "calibration", "training", "gates", "relations")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MtrecError("--report needs matplotlib: pip install matplotlib") from None
    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _binary_tasks(predictions: dict[str, Any]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for j, task in enumerate(predictions["tasks"]):
        if not task.kind.ranks:
            continue
        m = predictions["mask"][:, j]
        y = predictions["labels"][m, j]
        if m.any() and 0 < y.sum() < len(y):
            out.append((task.name, y, predictions["logits"][task.name][m]))
    return out


def _roc_figure(tasks: list[tuple[str, np.ndarray, np.ndarray]], metrics: dict[str, Any]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, y, z in tasks:
        fpr, tpr = roc_curve_points(y, z, max_points=400)
        ax.plot(fpr, tpr, label=f"{name} (AUC {metrics[name]['auc']:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, each task on its sample space")
    ax.legend(loc="lower right")
    return _png(fig)


def _calibration_figure(tasks: list[tuple[str, np.ndarray, np.ndarray]]) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4), squeeze=False)
    for ax, (name, y, z) in zip(axes[0], tasks, strict=True):
        p = sigmoid(z.astype(np.float64))
        cal = calibration(y, p, bins=10, strategy="quantile")
        xs = [b["mean_pred"] for b in cal["bins"]]
        ys = [b["mean_label"] for b in cal["bins"]]
        top = max(max(xs), max(ys)) * 1.05
        ax.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1)
        ax.plot(xs, ys, marker="o")
        ax.set(xlabel="mean prediction", ylabel="observed rate", title=f"{name}: pred/label {cal['ratio']:.3f}")
    fig.suptitle("Calibration (10 quantile bins)")
    return _png(fig)


def _training_figure(log_path: Path) -> str | None:
    if not log_path.exists():
        return None
    epochs = [r for r in map(json.loads, log_path.read_text().splitlines()) if r.get("event") == "epoch"]
    if not epochs:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["epoch"] for r in epochs]
    left.plot(x, [r["train_loss"] for r in epochs], marker="o", label="train")
    left.plot(x, [r["valid_loss"] for r in epochs], marker="o", label="validation")
    left.set(xlabel="epoch", ylabel="weighted loss", title="Loss")
    left.legend()
    for task in epochs[0]["valid"]:
        values = [r["valid"][task].get("auc") for r in epochs]
        if all(v is not None for v in values):
            right.plot(x, values, marker="o", label=task)
    right.set(xlabel="epoch", ylabel="validation AUC", title="Validation AUC")
    right.legend()
    return _png(fig)


def _heatmap(
    fig: Any,
    ax: Any,
    grid: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    title: str,
    label: str,
    vmin: float,
    vmax: float,
    cmap: str = "RdBu",
    fmt: str = ".2f",
    light: Callable[[float], bool] = lambda v: False,
) -> None:
    """One annotated heatmap of ``grid`` (``rows x cols``; NaN cells blank) on ``ax``, with
    its colour bar: the one drawing of every heatmap of the report. ``light(v)``: white text."""
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for k in range(len(cols)):
            v = grid[i, k]
            if not np.isnan(v):
                ax.text(k, i, format(v, fmt), ha="center", va="center", color="white" if light(v) else "black")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)


def _gates_figure(gates: dict[str, Any]) -> str:
    plt = _pyplot()
    tasks = list(gates["tasks"])
    experts = gates["experts"]
    grid = np.full((len(tasks), len(experts)), np.nan)
    for i, t in enumerate(tasks):
        for e, w in gates["tasks"][t]["mean_weight"].items():
            grid[i, experts.index(e)] = w
    fig, ax = plt.subplots(figsize=(1.1 * len(experts) + 2.5, 0.6 * len(tasks) + 1.8))
    _heatmap(
        fig,
        ax,
        grid,
        tasks,
        experts,
        title="Gate utilisation (tasks x experts)",
        label="mean gate weight",
        vmin=0,
        vmax=1,
        cmap="viridis",
        light=lambda v: v < 0.6,
    )
    return _png(fig)


def _matrix(rows: Any, n: int) -> np.ndarray:
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float64).reshape(n, n)


@dataclass(frozen=True)
class _Panel:
    """One task x task heatmap of the relations figure."""

    title: str
    names: list[str]
    grid: np.ndarray
    label: str
    fmt: str = ".2f"
    top: float = 1.0  # the colour scale: [-top, top]


def _relation_panels(model_dir: Path, affinity: dict[str, Any] | None) -> list[_Panel]:
    """The label correlations (``meta.json``) and the task affinity, as heatmaps."""
    panels = []
    meta_path = model_dir / META
    corr = json.loads(meta_path.read_text()).get("label_correlations") if meta_path.is_file() else None
    if isinstance(corr, dict) and len(corr) > 1 and all(isinstance(r, dict) for r in corr.values()):
        names = list(corr)
        grid = _matrix([[corr[a].get(b) for b in names] for a in names], len(names))
        panels.append(_Panel("Label correlation", names, grid, "correlation"))
    if affinity is not None and affinity["shared"] != "none":
        names = list(affinity["tasks"])
        panels.append(_Panel("Gradient cosine", names, _matrix(affinity["gradient_cosine"], len(names)), "cosine"))
        look = _matrix(affinity["lookahead_affinity"], len(names))
        size = np.abs(look[np.isfinite(look)])
        top = float(size.max()) if size.size and size.max() > 0 else 1.0
        label = "1 - L_j after / L_j before"
        panels.append(_Panel("Lookahead affinity (row i -> column j)", names, look, label, ".1e", top))
    return panels


def _strong(v: float, limit: float) -> bool:
    return abs(v) > limit


def _relations_figure(panels: list[_Panel]) -> str:
    plt = _pyplot()
    side = 0.8 * max(len(p.names) for p in panels) + 2.5
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels) + 1, side), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        light = functools.partial(_strong, limit=0.7 * p.top)
        _heatmap(
            fig,
            ax,
            p.grid,
            p.names,
            p.names,
            title=p.title,
            label=p.label,
            vmin=-p.top,
            vmax=p.top,
            fmt=p.fmt,
            light=light,
        )
    fig.tight_layout()
    return _png(fig)


def _relations_section(model_dir: Path) -> str:
    affinity = load_affinity(model_dir)
    panels = _relation_panels(model_dir, affinity)
    notes = []
    if affinity is None:
        notes.append("No task affinity recorded (train with <code>train.affinity_every: N</code>).")
    elif affinity["shared"] == "none":
        notes.append("Task affinity: this model shares no parameters between tasks (nothing to measure).")
    else:
        notes.append(
            f"Task affinity over {affinity['measurements']} training measurement(s), every {affinity['every']} "
            "steps: the cosine of the task gradients on the shared parameters, and the lookahead affinity "
            "(Fifty et al. 2021) of one SGD step on task i's gradient (rows) on task j's loss (columns); "
            "positive: the step helps j."
        )
    figure = f"<img src='{_relations_figure(panels)}'>" if panels else "<p>No label correlations recorded.</p>"
    return figure + "".join(f"<p class='note'>{n}</p>" for n in notes)


def _metrics_table(result: dict[str, Any]) -> str:
    cols = [
        "count",
        "positives",
        "auc",
        "logloss",
        "normalized_entropy",
        "pr_auc",
        "calibration",
        "rmse",
        "mae",
        "accuracy",
        "mean_pred",
        "mean_label",
    ]
    tasks = result["tasks"]
    used = [c for c in cols if any(c in m for m in tasks.values())]
    has_gauc = any("gauc" in m for m in tasks.values())
    head = "".join(f"<th>{c}</th>" for c in ["task", *used, *(["gauc"] if has_gauc else [])])
    body = []
    for name, m in tasks.items():
        cells = []
        for c in used:
            cells.append(cell(m.get(c), missing="-"))
        if has_gauc:
            g = m.get("gauc", {}).get("gauc")
            cells.append("-" if g is None or g != g else f"{g:.4f}")
        body.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    notes = [f"{html.escape(n)}: {html.escape(m['note'])}" for n, m in tasks.items() if m.get("note")]
    note_html = "".join(f"<p class='note'>{n}</p>" for n in notes)
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{note_html}"


def write_report(directory: Path, result: dict[str, Any], predictions: dict[str, Any], model_dir: Path) -> Path:
    """Writes ``directory/report.html`` and returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    binary = _binary_tasks(predictions)
    parts = [
        ("metrics", "Metrics", _metrics_table(result)),
    ]
    if binary:
        parts.append(("roc", "ROC curves", f"<img src='{_roc_figure(binary, result['tasks'])}'>"))
        parts.append(("calibration", "Calibration", f"<img src='{_calibration_figure(binary)}'>"))
    else:
        parts.append(("roc", "ROC curves", "<p>No binary task with both classes.</p>"))
        parts.append(("calibration", "Calibration", "<p>No binary task with both classes.</p>"))
    training = _training_figure(Path(model_dir) / LOG)
    parts.append(("training", "Training curves", f"<img src='{training}'>" if training else "<p>No training log.</p>"))
    if result.get("gates"):
        warnings = "".join(f"<p class='warn'>{html.escape(w)}</p>" for w in result["gates"]["warnings"])
        parts.append(("gates", "Gate utilisation", f"<img src='{_gates_figure(result['gates'])}'>{warnings}"))
    else:
        parts.append(("gates", "Gate utilisation", "<p>This architecture has no gates.</p>"))
    parts.append(("relations", "Task relations", _relations_section(Path(model_dir))))
    sections = "\n".join(f"<section id='{sid}'><h2>{title}</h2>{content}</section>" for sid, title, content in parts)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mtrec evaluation: {html.escape(str(model_dir))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }} img {{ max-width: 100%; }}
.note {{ color: #666; }} .warn {{ color: #b00; }}
</style></head><body>
<h1>mtrec evaluation</h1>
<p>Model <code>{html.escape(str(model_dir))}</code> on <code>{html.escape(str(result["data"]))}</code>,
{result["rows"]:,} rows. Each task is evaluated on its own sample space.</p>
{sections}
</body></html>
"""
    path = directory / "report.html"
    from mtrec.files import atomic_write_text

    atomic_write_text(path, page)
    return path
