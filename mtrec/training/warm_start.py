"""Warm start (``train.init_from``) and frozen parts (``train.freeze``).

A new run starts from a trained model directory: every parameter of the new model is matched
by name (a tower by its task's name, not its position; see :mod:`mtrec.models.parts`) with
the saved one, and

* ``loaded``: same name and shape, copied whole;
* ``remapped``: an embedding table, copied row by row through the two vocabularies by raw ID
  (a refitted vocabulary keeps what was learned for every ID both know; new IDs keep their
  fresh rows), or a parameter stacked by task, copied block by block by task name (a new
  task's block stays fresh, a removed task's block is left behind);
* ``new``: nothing to copy (a new task's tower, a different shape, parts that follow a task
  order that changed), left as initialised;
* ``dropped``: saved parameters the new model has no use for (a removed task's tower).

The table of all four is printed and saved as ``init_from.json`` in the new model directory.
Frozen parameters (``train.freeze``) stop requiring gradients and are left out of the
optimisers, so they do not change at all; loaded parts may learn at a lower rate
(``train.init_lr_scale``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from mtrec.data.preprocess import Preprocessor
from mtrec.errors import ConfigError, DataError, ModelError
from mtrec.model_dir import LoadedModel, load_model_dir
from mtrec.models.parts import ModelParts, Table, freeze_groups, model_parts

__all__ = ["Transfer", "freeze", "frozen_norms", "loaded_parameters", "read_source", "transfer_weights"]

LOADED, REMAPPED, NEW, DROPPED = "loaded", "remapped", "new", "dropped"


@dataclass
class Transfer:
    """What a warm start did, parameter by parameter (buffers included)."""

    source: str
    entries: list[dict[str, str]] = field(default_factory=list)
    partial: dict[str, str] = field(default_factory=dict)  # name -> what in it is fresh (stacked tensors)

    def add(self, name: str, status: str, detail: str = "", shown: str | None = None) -> None:
        """Records parameter ``name`` (shown as ``shown``, its matching name, where that differs)."""
        entry = {"name": name, "status": status, "detail": detail}
        if shown is not None and shown != name:
            entry["matched_as"] = shown
        self.entries.append(entry)

    def status(self, name: str) -> str | None:
        return next((e["status"] for e in self.entries if e["name"] == name), None)

    def counts(self) -> dict[str, int]:
        return {s: sum(e["status"] == s for e in self.entries) for s in (LOADED, REMAPPED, NEW, DROPPED)}

    def summary(self) -> str:
        """One line of counts, then one line per entry that was not loaded whole."""
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        lines = [f"init_from {self.source}: {counts}"]
        for e in self.entries:
            if e["status"] != LOADED:
                name = e.get("matched_as", e["name"])
                lines.append(f"  {e['status']:<8} {name}" + (f": {e['detail']}" if e["detail"] else ""))
        return "\n".join(lines)

    def to_json(self) -> str:
        doc = {"source": self.source, "counts": self.counts(), "parameters": self.entries, "partial": self.partial}
        return json.dumps(doc, indent=2)

    @classmethod
    def read(cls, path: Path) -> Transfer:
        """The report a run wrote (``init_from.json``), for resuming it without its source."""
        try:
            doc = json.loads(path.read_text())
            report = cls(str(doc["source"]), [dict(e) for e in doc["parameters"]], dict(doc.get("partial", {})))
            if not all(isinstance(e.get("name"), str) and isinstance(e.get("status"), str) for e in report.entries):
                raise ValueError("an entry without name or status")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{path}: cannot read the warm start's report ({exc})") from None
        return report


def read_source(directory: str) -> LoadedModel:
    """The model directory ``train.init_from`` names; anything else is one line."""
    try:
        return load_model_dir(directory)
    except ModelError as exc:
        raise ConfigError(f"train.init_from: {exc}; expected a model directory written by `mtrec train`") from None


def _row_map(pre: Preprocessor, name: str, new: pa.Array, old: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(new_rows, old_rows)`` of the IDs both vocabularies know (row 0, the unseen
    row, included), by raw ID: the new vocabulary looked up in the old one as encoding does."""
    try:
        found = pre._lookup("init_from", name, new, old)  # old row of each new ID, 0: unknown
    except DataError:  # IDs of another type: none can be matched
        return np.zeros(1, np.int64), np.zeros(1, np.int64)
    known = np.flatnonzero(found)
    return np.concatenate([[0], known + 1]), np.concatenate([[0], found[known]])


def _copy_table(
    name: str,
    new_w: torch.Tensor,
    old_w: torch.Tensor,
    tables: tuple[Table, Table],
    pres: tuple[Preprocessor, Preprocessor],
    report: Transfer,
) -> None:
    """Copies an embedding table row by row by raw ID (each task's copy from its own)."""
    (new_t, old_t), (new_pre, old_pre) = tables, pres
    if new_w.shape[1] != old_w.shape[1]:
        report.add(name, NEW, f"embedding width {old_w.shape[1]} saved, {new_w.shape[1]} here")
        return
    if old_t.copy_tasks and not new_t.copy_tasks:
        report.add(name, NEW, "saved with one table set per task, shared here")
        return
    old_keys = {key[0]: (i, key[1]) for i, key in enumerate(old_pre.table_owners())}
    new_starts, old_starts = np.cumsum([0, *new_t.sizes]), np.cumsum([0, *old_t.sizes])
    kept = known = 0
    missing: list[str] = []  # tables that start fresh: a feature the source lacks, other buckets
    copies = [(c, 0 if not old_t.copy_tasks else _index(old_t.copy_tasks, task)) for c, task in _copy_list(new_t)]
    same = new_w.shape == old_w.shape and all(c == old_c for c, old_c in copies)  # row for row?
    for i, (feature, buckets) in enumerate(new_pre.table_owners()):
        j, old_buckets = old_keys.get(feature, (None, None))
        known += new_t.sizes[i] - 1
        if j is None or buckets != old_buckets:
            same = False
            missing.append(feature)
            continue
        if buckets is None:
            new_rows, old_rows = _row_map(old_pre, feature, new_pre.vocabs[feature], old_pre.vocabs[feature])
            if len(new_rows) == 1 and new_t.sizes[i] > 1:
                missing.append(feature)  # (IDs of another type: none can be matched)
        else:
            new_rows = old_rows = np.arange(buckets + 1)
        kept += len(new_rows) - 1
        same = same and i == j and len(new_rows) == new_t.sizes[i] and np.array_equal(new_rows, old_rows)
        for c, old_c in copies:
            if old_c is None:
                continue
            dst = torch.from_numpy(new_rows + new_starts[i] + c * new_starts[-1]).to(new_w.device)
            src = torch.from_numpy(old_rows + old_starts[j] + old_c * old_starts[-1])
            new_w.index_copy_(0, dst, old_w.index_select(0, src).to(new_w.device, new_w.dtype))
    fresh = [task for c, task in _copy_list(new_t) if copies[c][1] is None]
    detail = f"{kept:,} of {known:,} IDs kept by raw ID"
    if fresh:
        detail += f"; the table sets of new tasks {', '.join(fresh)} are fresh"
        report.partial[name] = f"the table sets of {', '.join(fresh)} are new"
    if missing:
        detail += f"; {', '.join(missing)} fresh (not in the saved model, other hash buckets or ID type)"
        report.partial[name] = f"the tables of {', '.join(missing)} are new"
    report.add(name, LOADED if same else REMAPPED, "the same IDs in the same rows" if same else detail)


def _copy_list(table: Table) -> list[tuple[int, str]]:
    return list(enumerate(table.copy_tasks)) if table.copy_tasks else [(0, "")]


def _index(tasks: tuple[str, ...], task: str) -> int | None:
    return tasks.index(task) if task in tasks else None


def _copy_stacked(
    name: str,
    new_w: torch.Tensor,
    old_w: torch.Tensor,
    parts: tuple[ModelParts, ModelParts],
    old_name: str,
    report: Transfer,
) -> None:
    new_s, old_s = parts[0].stacked[name], parts[1].stacked[old_name]
    if (new_s.shared, new_s.per_task) != (old_s.shared, old_s.per_task) or new_w.shape[1:] != old_w.shape[1:]:
        report.add(name, NEW, f"shape {tuple(old_w.shape)} saved, {tuple(new_w.shape)} here")
        return
    if new_s.tasks == old_s.tasks and new_w.shape == old_w.shape:
        new_w.copy_(old_w)
        report.add(name, LOADED)
        return
    new_w[: new_s.shared].copy_(old_w[: old_s.shared])
    both = [t for t in new_s.tasks if t in old_s.tasks]
    for task in both:
        new_w[new_s.block(task)].copy_(old_w[old_s.block(task)])
    fresh = [t for t in new_s.tasks if t not in old_s.tasks]
    detail = f"blocks of {', '.join(both) or 'no task'} loaded" + (f"; {', '.join(fresh)} new" if fresh else "")
    if fresh:
        report.partial[name] = f"the blocks of {', '.join(fresh)} are new"
    report.add(name, REMAPPED, detail)


def transfer_weights(
    source: nn.Module, source_pre: Preprocessor, model: nn.Module, preprocessor: Preprocessor, where: str
) -> Transfer:
    """Copies what the trained ``source`` (encoded by ``source_pre``) knows into ``model`` (in
    place; encoded by ``preprocessor``) and reports it as coming from ``where`` (see the module
    docstring)."""
    report = Transfer(where)
    new_parts, old_parts = model_parts(model), model_parts(source)
    old_state = source.state_dict()
    by_canon = {_canon(old_parts, k): k for k in old_state}
    used: set[str] = set()
    with torch.no_grad():
        for name, new_w in model.state_dict().items():
            shown = _canon(new_parts, name)
            old_name = by_canon.get(shown)
            if old_name is None:
                task = new_parts.tower_task.get(name)
                report.add(
                    name, NEW, f"task {task} is new" if task else "not in the saved model", _canon(new_parts, name)
                )
                continue
            used.add(old_name)
            old_w = old_state[old_name]
            if name in new_parts.tables and old_name in old_parts.tables:
                pair = (new_parts.tables[name], old_parts.tables[old_name])
                _copy_table(name, new_w, old_w, pair, (preprocessor, source_pre), report)
            elif name in new_parts.stacked and old_name in old_parts.stacked:
                _copy_stacked(name, new_w, old_w, (new_parts, old_parts), old_name, report)
            elif name in new_parts.ordered and new_parts.ordered[name] != old_parts.ordered.get(old_name):
                report.add(name, NEW, "follows the task order, which changed", shown)
            elif new_w.shape != old_w.shape:
                report.add(name, NEW, f"shape {tuple(old_w.shape)} saved, {tuple(new_w.shape)} here", shown)
            else:
                new_w.copy_(old_w.to(new_w.device, new_w.dtype))
                report.add(name, LOADED, "", shown)
    for old_name in old_state:
        if old_name not in used:
            task = old_parts.tower_task.get(old_name)
            why = f"task {task} is not trained here" if task else "not in this model"
            report.add(old_name, DROPPED, why, _canon(old_parts, old_name))
    return report


def _canon(parts: ModelParts, key: str) -> str:
    """The matching name: towers by task, and an ESMM wrapper's ``inner.`` prefix dropped (a
    model trained without ESMM warm-starts one with it, and back)."""
    return parts.canonical(key).removeprefix("inner.")


def freeze(model: nn.Module, names: tuple[str, ...], report: Transfer) -> list[nn.Parameter]:
    """Freezes the parts ``names`` name (``train.freeze``; :func:`~mtrec.models.parts.freeze_groups`)
    and returns the frozen parameters. A name this model has no part of, or a part the warm start
    did not load whole (a new or reshaped parameter, a new task's block), is one line."""
    groups = freeze_groups(model)
    params = dict(model.named_parameters())
    frozen: dict[str, nn.Parameter] = {}
    for name in names:
        if name not in groups:
            raise ConfigError(
                f"train.freeze: {name!r} matches nothing in this model; expected some of {', '.join(groups)}"
            )
        for pname in groups[name]:
            status = report.status(pname)
            if status == NEW:
                detail = next(e["detail"] for e in report.entries if e["name"] == pname)
                raise ConfigError(
                    f"train.freeze: {name} includes {pname}, which init_from did not load ({detail}); "
                    "it would stay as initialised"
                )
            if pname in report.partial:
                raise ConfigError(
                    f"train.freeze: {name} includes {pname}, of which {report.partial[pname]}; "
                    "it would stay as initialised"
                )
            frozen[pname] = params[pname]
    for p in frozen.values():
        p.requires_grad_(False)
    return list(frozen.values())


def frozen_norms(model: nn.Module) -> list[nn.Module]:
    """The batch-norm layers whose parameters are all frozen (HoME's expert norms under a frozen
    ``experts``): kept in evaluation mode while training, so that their running statistics,
    which are buffers rather than parameters, stay as loaded too."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and any(True for _ in m.parameters())
        and not any(p.requires_grad for p in m.parameters())
    ]


def loaded_parameters(model: nn.Module, report: Transfer) -> set[int]:
    """Ids of the parameters a warm start loaded (what ``init_lr_scale`` scales): whole, or
    remapped with nothing of them new (an embedding table whose only fresh rows are new IDs
    counts; a tensor holding a new task's block, a new task's table set or a new feature's
    table does not, and learns at the full rate)."""
    done = {e["name"] for e in report.entries if e["status"] in (LOADED, REMAPPED) and e["name"] not in report.partial}
    return {id(p) for name, p in model.named_parameters() if name in done}
