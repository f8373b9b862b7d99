"""The task-affinity report: how the tasks' gradients on the shared parameters relate during training.

With ``train.affinity_every: N``, every ``N`` updates, on that update's batch and at the
parameters the update starts from (just before it), two ``T x T`` matrices:

* **gradient cosine** ``C[i, j] = cos(g_i, g_j)``, ``g_t = d L_t / d theta_s`` the gradient
  of task ``t``'s (unweighted) loss on the shared parameters ``theta_s``, all of them
  flattened into one vector: symmetric, 1 on the diagonal; negative where two tasks pull
  the shared weights apart (what PCGrad projects away).
* **lookahead affinity** (Fifty et al., "Efficiently Identifying Task Groupings for
  Multi-Task Learning", NeurIPS 2021): ``Z[i, j] = 1 - L_j(theta_s - lr g_i, theta_j) /
  L_j(theta_s, theta_j)``, how much one plain SGD step on task ``i``'s gradient (learning
  rate ``train.lr``; ``train.embedding_lr`` for embedding rows) lowers task ``j``'s loss on
  the same batch, the task-specific parameters ``theta_j`` unchanged. Positive: a step for
  ``i`` helps ``j``; negative: it hurts. Not symmetric. With an SGD step of the dense rate
  the values are small (about ``lr * g_i . g_j / L_j``): compare them with each other.

The shared parameters are the model's dense shared ones (``shared_parameters()``, what
GradNorm and PCGrad use: the backbone, never the embedding tables). A model without any
whose one input layer every task reads (``shared_embedding``) is measured on that input
layer instead: the embedding rows the batch looks up (plus the layer's dense cross and
attention weights, if any). A model that shares nothing (``independent``) has nothing to
measure: its matrices stay undefined (``null``) and the report says so.

A task without a row of its sample space in the batch (CVR when no row clicked) has
undefined (NaN) entries in that measurement, as has a pair whose gradient is exactly 0 or
whose loss is 0; the per-epoch and run averages are over the defined values of each entry.

The measurement runs on a float64 *shadow* of the model: a copy of its dense layers in
float64 that reads the model's own embedding tables (not copied; their lookups are
converted), refreshed from the model before each measurement. In fp32 a loss changes by
~1e-7 of itself from rounding alone, as much as a lookahead step of ``lr = 1e-3`` changes
it; in float64 the lookahead is exact to ~1e-12. Nothing of the model is written: not its
parameters (a step on embedding rows is a float64 addition to the shadow's lookups), buffers
(batch-norm statistics), gradients or optimisers; the random generators are restored.
The shadow's passes run in the model's training mode (dropout and all), each from the
same saved random state (the same masks in every pass, so the lookahead losses
differ from the base ones by the step alone). The run trains the same weights with the
measurement on or off.

Cost per measurement: one forward and ``T`` backward passes (float64) for the gradients
and ``T + 1`` forward passes without gradients for the lookahead; memory: the dense
parameters again in float64. On ``configs/synthetic/mmoe.yaml`` (batch 2048, 491k shared
values, 3 tasks) one measurement takes ~0.65 s on one CPU thread, about 5-6 training steps
(bf16 autocast): ``affinity_every: 50`` adds ~10 % to the training time (counted in the
epoch's rows/s). Under torchrun rank 0 measures, on its own batches.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from mtrec.batch import Batch
from mtrec.models.base import FeatureInput
from mtrec.nn.embedding import FusedEmbedding
from mtrec.nn.gates import take_penalties
from mtrec.schema import Task
from mtrec.training.losses import task_losses
from mtrec.training.step import loss_denominators
from mtrec.weighting import parameter_grads

__all__ = ["SharedSet", "TaskAffinity", "affinity_summary", "float64_shadow", "shared_set"]

MATRICES = ("gradient_cosine", "lookahead_affinity")


@dataclass(frozen=True)
class SharedSet:
    """What the measurement differentiates and steps.

    ``kind``: ``dense`` (the model's dense shared parameters), ``input`` (the one input layer
    every task reads: its embedding rows and dense weights) or ``none`` (nothing shared).
    ``tables`` are the embedding modules whose weights are among ``params`` (their rows get
    ``embedding_lr``).
    """

    kind: str
    params: tuple[nn.Parameter, ...]
    tables: tuple[FusedEmbedding, ...] = ()

    def table_of(self, p: nn.Parameter) -> FusedEmbedding | None:
        return next((t for t in self.tables if t.weight is p), None)

    @property
    def values(self) -> int:
        """Dense parameter values measured (a table's are not counted: only its looked-up rows are)."""
        return sum(p.numel() for p in self.params if self.table_of(p) is None)


def shared_set(model: nn.Module) -> SharedSet:
    """The parameters a model's affinity is measured on (see the module docstring)."""
    dense = tuple(p for p in cast(Any, model).shared_parameters() if p.requires_grad)
    if dense:
        return SharedSet("dense", dense)
    features = getattr(model, "features", None)
    if isinstance(features, FeatureInput) and features.copies == 1:
        tables = tuple(m for m in features.modules() if isinstance(m, FusedEmbedding))
        params = tuple(p for p in features.parameters() if p.requires_grad)
        if params:  # (all of it frozen, train.freeze: nothing shared is trained, nothing to measure)
            return SharedSet("input", params, tables)
    return SharedSet("none", ())


class _Float64Lookup(FusedEmbedding):
    """A shadow's embedding: the model's own (fp32) table, its lookups returned in float64,
    plus ``delta`` (``(rows, values)``: sorted fused row indices and float64 ``(n, D)``
    additions), a lookahead step on those rows that leaves the table itself alone."""

    delta: tuple[torch.Tensor, torch.Tensor] | None = None

    def _plus_delta(self, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = out.double()
        if self.delta is None:
            return out
        stepped, values = self.delta
        at = torch.searchsorted(stepped, rows).clamp(max=len(stepped) - 1)
        return out + torch.where((stepped[at] == rows).unsqueeze(-1), values[at], 0.0)

    # (the fused rows are the ones FusedEmbedding.forward and lookup_columns read)
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._plus_delta(super().forward(ids), ids + self.column_offsets)

    def lookup_columns(self, ids: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        rows = ids + self.column_offsets.index_select(0, columns)
        return self._plus_delta(super().lookup_columns(ids, columns), rows)


def float64_shadow(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every dense parameter and floating buffer in float64, reading
    ``model``'s embedding tables themselves (sparse gradients, lookups in float64); no hooks
    and no compiled forward of the model's are copied. Build it before the model is compiled."""
    tables = {id(m.weight): m.weight for m in model.modules() if isinstance(m, FusedEmbedding)}
    shadow = copy.deepcopy(model, cast(dict[int, Any], dict(tables)))
    for m in shadow.modules():
        m.__dict__.pop("forward", None)
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        for name, p in list(m._parameters.items()):
            if p is not None and id(p) not in tables:
                m._parameters[name] = nn.Parameter(p.detach().double(), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.double()
        if isinstance(m, FusedEmbedding):
            m.__class__ = _Float64Lookup
            m.sparse = True  # the looked-up rows only
    return shadow


def _float64_batch(batch: Batch) -> Batch:
    w = batch.sample_weight
    return Batch(
        batch.sparse,
        batch.dense.double(),
        batch.sequences,
        batch.seq_lengths,
        batch.labels.double(),
        batch.label_mask,
        None if w is None else w.double(),
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _rng_get(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_set(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextmanager
def _same_random_state(device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yields the random state (CPU, and ``device``'s on CUDA), restored on the way out."""
    state = _rng_get(device)
    try:
        yield state
    finally:
        _rng_set(state, device)


@dataclass
class _Step:
    """Task gradients as dense float64 blocks: per dense parameter the whole gradient, per
    table the block of its rows ``rows`` (zeros where a task's loss does not reach a row)."""

    params: tuple[nn.Parameter, ...]
    tables: list[_Float64Lookup | None]  # per parameter: its shadow embedding, None for a dense one
    rows: list[torch.Tensor | None]  # per parameter: the table rows of its block
    rates: list[float]
    blocks: list[list[torch.Tensor]]  # per task: one block per parameter

    def flat(self) -> torch.Tensor:
        """``(tasks, P)`` float64."""
        return torch.stack([torch.cat([b.reshape(-1) for b in task]) for task in self.blocks])

    @torch.no_grad()
    def apply(self, task: int) -> None:
        """``theta_s -= rate * g_task``: in place on the shadow's dense parameters, as a ``delta``
        of each table's lookups (the model's own table is never written)."""
        parts = zip(self.params, self.tables, self.rows, self.rates, self.blocks[task], strict=True)
        for p, table, rows, rate, g in parts:
            if table is None:
                p.add_(g, alpha=-rate)
            else:
                table.delta = (cast(torch.Tensor, rows), -rate * g)

    @torch.no_grad()
    def undo(self, source_of: dict[int, torch.Tensor]) -> None:
        """Back to ``theta_s``: each dense parameter copied again from the model's (``source_of[id(p)]``)."""
        for p, table in zip(self.params, self.tables, strict=True):
            if table is None:
                p.copy_(source_of[id(p)])
            else:
                table.delta = None


def _task_step(shared: SharedSet, grads: list[list[torch.Tensor]], lr: float, embedding_lr: float) -> _Step:
    """Turns each task's gradients (coalesced sparse ones for a table) into dense blocks over the same rows."""
    rows: list[torch.Tensor | None] = []
    blocks: list[list[torch.Tensor]] = [[] for _ in grads]
    tables = [shared.table_of(p) for p in shared.params]
    for k, (p, table) in enumerate(zip(shared.params, tables, strict=True)):
        if table is None:
            rows.append(None)
            for task, g in zip(blocks, grads, strict=True):
                task.append(g[k].double())
            continue
        parts = [g[k] for g in grads]  # sparse, or dense zeros where a loss does not reach the table
        idx = [q.indices()[0] if q.is_sparse else q.new_zeros(0, dtype=torch.int64) for q in parts]
        union = torch.unique(torch.cat(idx))
        rows.append(union)
        for task, q, i in zip(blocks, parts, idx, strict=True):
            block = p.new_zeros(len(union), p.shape[1], dtype=torch.float64)
            if q.is_sparse:
                block[torch.searchsorted(union, i)] = q.values().double()
            task.append(block)
    rates = [lr if r is None else embedding_lr for r in rows]
    return _Step(shared.params, cast(list[_Float64Lookup | None], tables), rows, rates, blocks)


def _cosine(flat: torch.Tensor) -> np.ndarray:
    """``(n, n)`` cosine similarities of the rows of ``flat``; NaN where a row is 0."""
    gram = (flat @ flat.T).cpu().numpy()
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = gram / np.outer(norms, norms)
    cos[~np.isfinite(cos)] = np.nan
    return np.clip(cos, -1.0, 1.0)


class _NanMean:
    """Entrywise mean over the defined (finite) values of the matrices added, with their counts."""

    def __init__(self, n: int) -> None:
        self.sum, self.count = np.zeros((n, n)), np.zeros((n, n), dtype=np.int64)

    def add(self, matrix: np.ndarray, count: np.ndarray | None = None) -> None:
        """One matrix (``count`` None) or a mean of ``count`` values per entry."""
        ok = np.isfinite(matrix) & (count is None or count > 0)
        weight = np.ones_like(self.count) if count is None else count
        self.sum[ok] += matrix[ok] * weight[ok]
        self.count[ok] += weight[ok]

    def mean(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.count > 0, self.sum / np.maximum(self.count, 1), np.nan)


def _to_json(matrix: np.ndarray) -> list[list[float | None]]:
    return [[float(v) if math.isfinite(v) else None for v in row] for row in matrix]


def _from_json(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float64)


class TaskAffinity:
    """Measures a training run's task affinity every ``every`` updates and averages it per epoch.

    Build it before the model is compiled or wrapped in hooks (it copies the model into its
    float64 shadow). Call :meth:`due` with the number of the update about to run and, when it
    says so, :meth:`measure` with its batch before the update; :meth:`epoch_record` after each
    epoch. :meth:`matrices` is one measurement, not recorded.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: tuple[Task, ...],
        *,
        every: int,
        lr: float,
        embedding_lr: float | None = None,
        normalization: str = "sample_space",
    ) -> None:
        if every < 1:
            raise ValueError(f"every: expected >= 1, got {every}")
        self.model, self.tasks, self.every = model, tasks, every
        self.lr, self.embedding_lr, self.normalization = lr, embedding_lr, normalization
        self.shadow = float64_shadow(model)
        self.shared = shared_set(self.shadow)
        params = list(zip(self.shadow.named_parameters(), model.named_parameters(), strict=True))
        buffers = list(zip(self.shadow.named_buffers(), model.named_buffers(), strict=True))
        if any(a[0] != b[0] for a, b in params + buffers):
            raise ValueError("the shadow's parameters are not the model's")
        # shadow tensor -> the model's (a table is the model's own: nothing to copy)
        self._sources = [(s, m) for (_, s), (_, m) in params + buffers if s is not m]
        self._source_of = {id(s): m for s, m in self._sources}
        self._reset()

    def _reset(self) -> None:
        self.means = {name: _NanMean(len(self.tasks)) for name in MATRICES}
        self.measurements, self.seconds = 0, 0.0

    def due(self, update: int) -> bool:
        """Whether update number ``update`` (counted from 1 over the whole run) is measured."""
        return self.shared.kind != "none" and update % self.every == 0

    def _losses(self, batch: Batch, rng: Any, grad: bool = False) -> dict[str, torch.Tensor]:
        """The shadow's task losses on ``batch`` from random state ``rng``."""
        _rng_set(rng, _device(self.model))
        with torch.set_grad_enabled(grad):
            logits = self.shadow(batch)
        return task_losses(logits, batch.labels, batch.label_mask, self.tasks, batch.sample_weight, self.normalization)

    def matrices(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """The gradient cosine and the lookahead affinity ``(T, T)`` of one batch (NaN where undefined)."""
        T, shared = len(self.tasks), self.shared
        cos, look = np.full((T, T), np.nan), np.full((T, T), np.nan)
        live = [t for t, w in enumerate(loss_denominators(batch, "sample_space").tolist()) if w > 0]
        if shared.kind == "none" or not live:
            return cos, look
        with torch.no_grad():
            for s, m in self._sources:
                s.copy_(m)
        for mine, theirs in zip(self.shadow.modules(), self.model.modules(), strict=True):
            mine.training = theirs.training  # module by module: frozen batch norms stay in eval mode
        b = _float64_batch(batch)
        with _same_random_state(_device(self.model)) as rng:
            parts = self._losses(b, rng, grad=True)
            what = "task affinity: shared parameters"
            grads = [parameter_grads(parts[self.tasks[t].name], shared.params, what=what, sparse=True) for t in live]
            del parts  # the graph goes with it
            rate = self.lr if self.embedding_lr is None else self.embedding_lr
            step = _task_step(shared, grads, self.lr, rate)
            del grads
            cos[np.ix_(live, live)] = _cosine(step.flat())
            base = self._losses(b, rng)
            for k, i in enumerate(live):
                step.apply(k)
                try:
                    after = self._losses(b, rng)
                finally:
                    step.undo(self._source_of)
                for j in live:
                    before, then = float(base[self.tasks[j].name]), float(after[self.tasks[j].name])
                    if before > 0 and math.isfinite(then):
                        look[i, j] = 1.0 - then / before
        take_penalties(self.shadow)  # the shadow's layer penalties are never used
        return cos, look

    def measure(self, batch: Batch) -> None:
        """One measurement, added to the epoch's averages."""
        t0 = time.perf_counter()
        for name, matrix in zip(MATRICES, self.matrices(batch), strict=True):
            self.means[name].add(matrix)
        self.measurements += 1
        self.seconds += time.perf_counter() - t0

    def epoch_record(self) -> dict[str, Any]:
        """The epoch's averages (``null`` where undefined), with their counts; starts the next epoch."""
        record: dict[str, Any] = {"measurements": self.measurements, "seconds": self.seconds}
        record |= {name: _to_json(mean.mean()) for name, mean in self.means.items()}
        record["counts"] = {name: mean.count.tolist() for name, mean in self.means.items()}
        self._reset()
        return record


def affinity_summary(history: Sequence[dict[str, Any]], affinity: TaskAffinity) -> dict[str, Any]:
    """``affinity.json``: the run's averages over the epochs' records in ``history`` (each epoch's
    means weighted by their counts), the settings, and the per-epoch records."""
    names = [t.name for t in affinity.tasks]
    per_epoch = [{"epoch": r["epoch"], **r["affinity"]} for r in history if "affinity" in r]
    means = {name: _NanMean(len(names)) for name in MATRICES}
    for r in per_epoch:
        for name in MATRICES:
            means[name].add(_from_json(r[name]), np.array(r["counts"][name], dtype=np.int64))
    measurements = sum(r["measurements"] for r in per_epoch)
    seconds = sum(r["seconds"] for r in per_epoch)
    return {
        "every": affinity.every,
        "shared": affinity.shared.kind,
        "shared_dense_values": affinity.shared.values,
        "lr": affinity.lr,
        "embedding_lr": affinity.embedding_lr if affinity.shared.tables else None,
        "measurements": measurements,
        "seconds_per_measurement": seconds / measurements if measurements else None,
        "tasks": names,
        **{name: _to_json(mean.mean()) for name, mean in means.items()},
        "per_epoch": per_epoch,
    }
