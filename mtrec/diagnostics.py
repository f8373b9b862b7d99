"""Seeing inside mixture-of-experts models: gate utilisation and expert collapse.

For every task, the mean weight its gate puts on each expert and the mean gate entropy
over a data set; plus how similar the experts' outputs are. Warnings flag a gate that
puts more than 90 % of its weight on one expert and experts whose outputs are nearly
identical (collapse: the mixture then has nothing to choose from).
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from mtrec.data.batches import TensorColumns
from mtrec.models.base import TaskAwareInput

__all__ = ["gate_diagnostics"]


class _GateReporting(Protocol):
    """A backbone with gates: what :func:`gate_diagnostics` asks of it."""

    def gate_report(
        self, x: Any, task_names: tuple[str, ...] | None = ...
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[list[int]]]: ...


DOMINANT_SHARE = 0.9
COLLAPSE_SIMILARITY = 0.95


def _input_mode(inner: nn.Module) -> str:
    """``model.embedding`` of a built model: ``shared``, ``per_task`` or ``stem``."""
    return inner.features.mode if isinstance(inner.features, TaskAwareInput) else "shared"


def _backbone(model: nn.Module) -> _GateReporting | None:
    inner = getattr(model, "inner", model)
    if _input_mode(inner) == "per_task":
        return None  # each task's gate reads its own input: no one set of expert outputs to report
    backbone = getattr(inner, "backbone", None)
    return backbone if hasattr(backbone, "gate_report") else None


def _backbone_input(inner: nn.Module, batch: Any) -> torch.Tensor:
    x = cast(nn.Module, inner.features)(batch)
    # stem gives every task the same input values (T, B, d): the gates of all tasks are on x[0]
    return x[0] if _input_mode(inner) == "stem" else x


@torch.no_grad()
def gate_diagnostics(
    model: nn.Module, columns: TensorColumns, *, batch_size: int = 16384, max_rows: int | None = None
) -> dict[str, Any] | None:
    """Gate utilisation per task over ``columns`` (its first ``max_rows`` rows, if given, in
    whole batches); ``None`` for models without gates.

    Returns:
        ``{"experts": [labels], "tasks": {task: {"mean_weight": {expert: w}, "entropy": h,
        "max_entropy": log(E_t)}}, "expert_similarity": s, "warnings": [...]}``, where
        ``s`` is the mean cosine similarity between pairs of expert outputs on the same row.
    """
    backbone = _backbone(model)
    if backbone is None:
        return None
    inner = getattr(model, "inner", model)
    was_training = model.training
    model.eval()
    sums: np.ndarray | None = None
    entropy: np.ndarray | None = None
    similarity = 0.0
    rows = 0
    labels: list[str] = []
    covers: list[list[int]] = []
    try:
        size = batch_size if max_rows is None else max(1, min(batch_size, max_rows))
        for batch in columns.iter_batches(size):
            if max_rows is not None and rows >= max_rows:
                break
            x = _backbone_input(inner, batch)
            gates, experts, labels, covers = backbone.gate_report(x, tuple(cast("tuple[str, ...]", inner.task_names)))
            g = gates.float()
            batch_sum = g.sum(0).cpu().numpy()  # (T, E_t)
            batch_ent = -(g * g.clamp_min(1e-12).log()).sum(-1).sum(0).cpu().numpy()  # (T,)
            sums = batch_sum if sums is None else sums + batch_sum
            entropy = batch_ent if entropy is None else entropy + batch_ent
            unit = nn.functional.normalize(experts.float(), dim=-1)  # (B, E, H)
            cos = torch.bmm(unit, unit.transpose(1, 2))  # (B, E, E)
            E = cos.shape[-1]
            if E > 1:
                off = cos.sum(dim=(1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)
                similarity += float((off / (E * (E - 1))).sum())
            rows += len(batch)
    finally:
        model.train(was_training)
    if sums is None or entropy is None or rows == 0:
        return None
    task_names = list(cast("tuple[str, ...]", inner.task_names))
    report: dict[str, Any] = {"experts": labels, "tasks": {}, "rows": rows, "warnings": []}
    for t, name in enumerate(task_names):
        mean = sums[t] / rows
        names = [labels[e] for e in covers[t]]
        report["tasks"][name] = {
            "mean_weight": {n: float(w) for n, w in zip(names, mean, strict=True)},
            "entropy": float(entropy[t] / rows),
            "max_entropy": float(np.log(len(names))),
        }
        top = int(mean.argmax())
        if mean[top] > DOMINANT_SHARE:
            report["warnings"].append(
                f"task {name}: its gate puts {mean[top]:.0%} of its weight on {names[top]} (a collapsed gate)"
            )
    report["expert_similarity"] = similarity / rows if len(labels) > 1 else None
    if report["expert_similarity"] is not None and report["expert_similarity"] > COLLAPSE_SIMILARITY:
        report["warnings"].append(
            f"experts' outputs are nearly identical (mean cosine similarity {report['expert_similarity']:.3f}): "
            "expert collapse"
        )
    return report


def format_gates(report: dict[str, Any]) -> str:
    """A tasks x experts table of mean gate weights, with entropies and warnings."""
    experts = report["experts"]
    width = max(len(e) for e in experts)
    tasks = list(report["tasks"])
    lines = ["gate utilisation (mean weight per expert):", " " * (width + 2) + "  ".join(f"{t:>10s}" for t in tasks)]
    for e in experts:
        cells = []
        for t in tasks:
            w = report["tasks"][t]["mean_weight"].get(e)
            cells.append(f"{w:10.3f}" if w is not None else f"{'-':>10s}")
        lines.append(f"  {e:<{width}s}" + "  ".join(cells))
    ent = "  ".join(f"{report['tasks'][t]['entropy']:5.2f}/{report['tasks'][t]['max_entropy']:4.2f}" for t in tasks)
    lines.append(f"  {'entropy':<{width}s}{ent}")
    if report.get("expert_similarity") is not None:
        lines.append(f"expert output similarity (mean cosine): {report['expert_similarity']:.3f}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
