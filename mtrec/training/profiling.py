"""Counting host syncs in training steps, without a GPU.

A GPU trains fast only while the host queues kernels ahead of the device. Anything that
reads a device value on the host (``float(loss)``, ``.item()``, ``nonzero``, boolean
indexing, the ``coalesce`` of a sparse gradient, whose row count becomes a host-side
size) drains that queue and leaves the GPU idle while Python launches the next kernels.
The trainer marks each step with ``record_function(STEP_RANGE)``; :class:`HostSyncCounter`
counts what inside those ranges would sync on CUDA, on any device, so that a CPU test can
keep the GPU step free of them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["BOOLEAN_INDEXING", "HOST_READS", "STEP_RANGE", "SYNC_OPS", "HostSyncCounter"]

STEP_RANGE = "mtrec.train_step"

# Tensor methods that read a value on the host (seen as Python calls).
HOST_READS = {
    "__float__": "float() of a tensor",
    "__int__": "int() of a tensor",
    "__bool__": "bool() of a tensor (also `if tensor:`)",
    "item": "tensor.item()",
    "tolist": "tensor.tolist()",
    "numpy": "tensor.numpy() (a GPU tensor must be copied first)",
    "cpu": "tensor.cpu()",
}

# Operators whose CUDA implementation reads a device value on the host (seen as operators).
SYNC_OPS = {
    "aten::nonzero": "output size depends on the data (also boolean indexing)",
    "aten::masked_select": "output size depends on the data",
    "aten::_unique2": "output size depends on the data",
    "aten::unique_dim": "output size depends on the data",
    "aten::unique_consecutive": "output size depends on the data",
    "aten::_coalesce": "sparse gradient coalesce: row count read on the host",
    "aten::repeat_interleave": "output size depends on the data",
    "aten::bincount": "output size depends on the data",
    "aten::equal": "returns a host bool",
    "aten::allclose": "returns a host bool",
    "aten::lift_fresh": "a tensor made from Python data (torch.tensor): a blocking copy to a GPU",
}

# Indexing with a boolean mask (``x[mask]``, ``x[mask] = v``) runs ``nonzero`` inside the kernel.
_INDEXING = ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")
BOOLEAN_INDEXING = "aten::index (boolean mask)"


def _boolean_mask_index(name: str, args: tuple) -> bool:
    if name.split(".")[0] not in _INDEXING or len(args) < 2 or not isinstance(args[1], list | tuple):
        return False
    return any(getattr(index, "dtype", None) == torch.bool for index in args[1])


class HostSyncCounter:
    """Counts, per :data:`STEP_RANGE` range, the reads and operators that sync a GPU.

    Two watchers run while the context is open: a ``TorchFunctionMode`` sees Python's reads
    of tensor values, a ``TorchDispatchMode`` sees each operator that Python and autograd
    issue (not those a kernel calls internally, e.g. the CPU fused Adam reading its step
    count, which the CUDA kernel reads on the device) and the ``record_function`` markers
    that open and close steps. Slow: for tests and benchmarks only.

    On a CPU run every tensor is on the host, so reads of tensors that the code keeps on
    the host on purpose count as well (e.g. PCGrad's ``T x T`` surgery after its one copy
    to the host, or a CPU-side step counter); those are not GPU syncs. ``operators`` counts
    every operator issued inside steps, a proxy for the kernel launches of a GPU step.

    Example:
        >>> import torch
        >>> x = torch.ones(3)
        >>> with HostSyncCounter() as counter:
        ...     with torch.profiler.record_function(STEP_RANGE):
        ...         loss = (x * 2).sum()
        ...         seen = float(loss)
        ...     outside = float(loss)  # not in a step: not counted
        >>> counter.steps, counter.per_step()
        (1, {'Tensor.__float__': 1.0})
    """

    def __init__(self) -> None:
        self.steps = 0
        self.operators = 0
        self.counts: Counter[str] = Counter()
        self._ranges: list[bool] = []  # open record_function ranges: is each a step?
        self._modes: list[Any] = []

    def _in_step(self) -> bool:
        return any(self._ranges)

    def __enter__(self) -> HostSyncCounter:
        counter = self

        class Operators(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.name()
                if name.startswith("profiler::_record_function_enter"):
                    counter._ranges.append(STEP_RANGE in args)
                    counter.steps += counter._ranges[-1]
                elif name.startswith("profiler::_record_function_exit"):
                    if counter._ranges:
                        counter._ranges.pop()
                elif counter._in_step():
                    counter.operators += 1
                    base = name.split(".")[0]
                    if base in SYNC_OPS:
                        counter.counts[base] += 1
                    elif _boolean_mask_index(name, args):
                        counter.counts[BOOLEAN_INDEXING] += 1
                return func(*args, **(kwargs or {}))

        class Reads(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in HOST_READS and counter._in_step():
                    counter.counts[f"Tensor.{name}"] += 1
                return func(*args, **(kwargs or {}))

        self._modes = [Reads(), Operators()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []

    def per_step(self) -> dict[str, float]:
        """``{what: count per step}`` over the steps seen."""
        n = max(self.steps, 1)
        return {name: c / n for name, c in sorted(self.counts.items())}

    def operators_per_step(self) -> float:
        """Operators issued per step (a GPU launches about one kernel for each)."""
        return self.operators / max(self.steps, 1)
