"""Which parts of a built model belong to which task, and the names its parts are frozen by.

What a warm start (``train.init_from``, :mod:`mtrec.training.warm_start`) and ``train.freeze``
need to know of any registered architecture, read from the built module tree:

* a tower belongs to one task: a module with ``task_names`` and a ``towers`` list of as many
  entries holds task ``t``'s tower at ``towers.<t>``, whatever position the task has in
  another model (:attr:`ModelParts.tower_task`);
* a parameter may be stacked by task along dim 0 (``T`` batched networks, one gate per task):
  a layer says so in a ``task_axes()`` method, ``{name: (shared, per_task)}`` relative to
  itself, meaning the first ``shared`` rows are common to all tasks and then come ``per_task``
  rows per task, in its model's task order (:attr:`ModelParts.stacked`);
* a layer may hold parts that follow the task order (AITM's transfer chain, DBMTL's relation
  layers, whose inputs grow with the tasks before them; gates and cross-stitch units indexed by
  task on two axes): ``ordered_parts()`` names them (parameters or modules), and they carry
  over only to a model with the same tasks in the same order;
* embedding tables (:class:`~mtrec.nn.FusedEmbedding`) with one copy per task.

The freeze groups (:func:`freeze_groups`) are what ``train.freeze`` accepts: ``embedding``
(every embedding table), ``features`` (the whole input layer: tables, cross layers, the
attention pooling), ``backbone``, ``experts`` (the backbone's expert groups and per-task
networks), ``gates`` (every backbone parameter of a gate), ``towers`` and ``towers.<task>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from mtrec.nn.embedding import FusedEmbedding
from mtrec.nn.experts import ExpertGroup

__all__ = ["ModelParts", "Stacked", "Table", "freeze_groups", "model_parts"]


@dataclass(frozen=True)
class Stacked:
    """A parameter stacked by task along dim 0: ``shared`` common rows, then ``per_task`` rows
    for each of ``tasks`` in order."""

    tasks: tuple[str, ...]
    shared: int
    per_task: int

    def block(self, task: str) -> slice:
        start = self.shared + self.tasks.index(task) * self.per_task
        return slice(start, start + self.per_task)


@dataclass(frozen=True)
class Table:
    """A fused embedding table: its logical table sizes (one copy) and, with one copy per
    task, the task of each copy (``()``: one copy every task reads)."""

    sizes: tuple[int, ...]
    copy_tasks: tuple[str, ...] = ()

    @property
    def copies(self) -> int:
        return max(1, len(self.copy_tasks))


@dataclass
class ModelParts:
    """A built model's task structure by state-dict key (see the module docstring)."""

    tower_task: dict[str, str] = field(default_factory=dict)
    stacked: dict[str, Stacked] = field(default_factory=dict)
    ordered: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)

    def canonical(self, key: str) -> str:
        """``key`` with a tower's position replaced by its task (``towers[cvr].out.weight``):
        the name a parameter is matched by between two models."""
        task = self.tower_task.get(key)
        if task is None:
            return key
        head, _, rest = key.partition("towers.")
        return f"{head}towers[{task}].{rest.partition('.')[2]}"


def _owners(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Module path -> the task names of the nearest enclosing module that has them."""
    found: dict[str, tuple[str, ...]] = {}
    for path, module in model.named_modules():
        names = getattr(module, "task_names", None)
        if names is None:
            parent = path.rpartition(".")[0] if "." in path else ""
            names = found.get(parent, ()) if path else ()
        found[path] = tuple(names)
    return found


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def model_parts(model: nn.Module) -> ModelParts:
    """Reads the task structure of ``model`` (any registered architecture, ESMM-wrapped or not)."""
    parts, owners = ModelParts(), _owners(model)
    keys = set(model.state_dict())
    for path, module in model.named_modules():
        tasks = owners[path]
        towers = getattr(module, "towers", None)
        if getattr(module, "task_names", None) is not None and isinstance(towers, nn.ModuleList):
            if len(towers) == len(module.task_names):  # a chain's own tower lists are declared below
                for i, task in enumerate(module.task_names):
                    prefix = _join(path, f"towers.{i}") + "."
                    parts.tower_task.update({k: task for k in keys if k.startswith(prefix)})
        axes = getattr(module, "task_axes", None)
        if callable(axes):
            for name, (shared, per_task) in axes().items():
                parts.stacked[_join(path, name)] = Stacked(tasks, shared, per_task)
        ordered = getattr(module, "ordered_parts", None)
        if callable(ordered):
            for name in ordered():
                whole = _join(path, name)
                parts.ordered.update({k: tasks for k in keys if k == whole or k.startswith(whole + ".")})
        if isinstance(module, FusedEmbedding):
            copies = getattr(_parent(model, path), "copies", 1)
            sizes = module.table_sizes[: len(module.table_sizes) // max(copies, 1)]
            parts.tables[_join(path, "weight")] = Table(sizes, tasks if copies > 1 else ())
    return parts


def _is_gate(name: str) -> bool:
    """A gate's parameter: softmax gates, CGC's task gates, DSelect-k gates, PEPNet's Gate NUs."""
    return "gate" in name or ".dselect." in name


def _parent(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path.rpartition(".")[0]) if "." in path else model


def freeze_groups(model: nn.Module) -> dict[str, list[str]]:
    """``train.freeze`` name -> the parameter names it freezes (names with no parameter in this
    model are left out, so a name that matches nothing can be refused)."""
    parts = model_parts(model)
    names = [name for name, _ in model.named_parameters()]
    modules = dict(model.named_modules())
    features = next((p for p, m in modules.items() if p.split(".")[-1] == "features"), "features")
    backbone = next((p for p, m in modules.items() if p.split(".")[-1] == "backbone"), "backbone")
    expert_paths = [p + "." for p, m in modules.items() if isinstance(m, ExpertGroup) and p.startswith(backbone)]
    groups: dict[str, list[str]] = {
        "embedding": [k for k in parts.tables if k in names],
        "features": [n for n in names if n.startswith(features + ".")],
        "backbone": [n for n in names if n.startswith(backbone + ".")],
        "experts": [n for n in names if any(n.startswith(p) for p in expert_paths)],
        "gates": [n for n in names if n.startswith(backbone + ".") and _is_gate(n.removeprefix(backbone))],
        "towers": [n for n in names if n in parts.tower_task],
    }
    for name in names:
        task = parts.tower_task.get(name)
        if task is not None:
            groups.setdefault(f"towers.{task}", []).append(name)
    return {k: v for k, v in groups.items() if v}
