"""What a run carries from epoch to epoch, and the one capture/restore of it for ``--resume``.

:class:`RunRecord` is the bookkeeping (history, best epoch, early-stopping count);
:class:`ResumableState` names every part of the resume state once, with how it is read
from and written back to the live objects. The file format (safetensors + JSON, checked on
load) is :mod:`mtrec.model_dir`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtrec.errors import ModelError
from mtrec.model_dir import check_state_tensors
from mtrec.training.distributed import DistContext, gather_rows

__all__ = ["ResumableState", "RunRecord"]


@dataclass
class RunRecord:
    """The epochs so far: their records, the best one and how long since it improved."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = 0
    best_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad_epochs: int = 0

    def improves(self, value: float | None, higher_better: bool) -> bool:
        if value is None:
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if higher_better else value < self.best_value

    def add(self, record: dict[str, Any]) -> None:
        """Appends an epoch record (with ``epoch``, ``monitor_value``, ``valid``, ``improved``)."""
        self.history.append(record)
        if record["improved"]:
            self.best_value, self.best_epoch, self.best_metrics = (
                record["monitor_value"],
                record["epoch"],
                record["valid"],
            )
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(RunRecord))


@dataclass
class ResumableState:
    """The live objects of a run whose state is saved after every epoch."""

    model: Any
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[Any]
    weighting: Any
    generator: torch.Generator
    scaler: torch.amp.GradScaler | None
    ctx: DistContext
    device: torch.device
    record: RunRecord
    # What the run must be resumed the same way with (checked before restoring).
    run: dict[str, Any]

    def _parts(self) -> dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]]:
        """Each restorable part by its key in the state: (read it, write it back), in restore order."""
        return {
            "model": (self.model.state_dict, self.model.load_state_dict),
            "optimizers": (lambda: [o.state_dict() for o in self.optimizers], self._load_optimizers),
            "schedulers": (lambda: [s.state_dict() for s in self.schedulers], self._load_schedulers),
            "weighting": (self.weighting.state_dict, self.weighting.load_state_dict),
            "generator": (self.generator.get_state, self.generator.set_state),
            "scaler": (lambda: None if self.scaler is None else self.scaler.state_dict(), self._load_scaler),
            "torch_rng": (torch.get_rng_state, torch.set_rng_state),
            "cuda_rng": (self._cuda_rng, self._load_cuda_rng),
        }

    def capture(self, epoch: int) -> dict[str, Any]:
        """Everything needed to continue after ``epoch`` as if never interrupted.

        A collective under torchrun (every rank's CUDA generator is gathered): call it on all ranks.
        """
        state = {"epoch": epoch, **{key: read() for key, (read, _) in self._parts().items()}, **self.run}
        return state | {name: getattr(self.record, name) for name in _RECORD_FIELDS}

    def restore(self, state: dict[str, Any], source: Path) -> None:
        """Loads a state :meth:`capture` made (checked for structure by the loader) into the live
        objects; one :class:`ModelError` naming ``source`` if it does not fit them."""
        check_state_tensors(self.model.state_dict(), state["model"], source)
        try:
            for key, (_, write) in self._parts().items():
                write(state.get(key))
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"{source}: the resume state does not fit the model or optimizers ({first})") from None
        fields = {name: state[name] for name in _RECORD_FIELDS}
        self.record = RunRecord(**{**fields, "history": list(fields["history"])})

    def _load_optimizers(self, saved: list[dict[str, Any]]) -> None:
        for opt, state in zip(self.optimizers, saved, strict=True):
            opt.load_state_dict(state)

    def _load_schedulers(self, saved: list[dict[str, Any]] | None) -> None:
        saved = saved or []
        if len(saved) != len(self.schedulers):
            raise ValueError(f"{len(saved)} learning-rate scheduler state(s) saved, {len(self.schedulers)} configured")
        for scheduler, state in zip(self.schedulers, saved, strict=True):
            scheduler.load_state_dict(state)

    def _load_scaler(self, saved: dict[str, Any] | None) -> None:
        if self.scaler is not None and saved:
            self.scaler.load_state_dict(saved)

    def _cuda_rng(self) -> torch.Tensor | None:
        if self.device.type != "cuda":
            return None
        return torch.from_numpy(gather_rows(torch.cuda.get_rng_state(self.device).numpy()[None], self.ctx))

    def _load_cuda_rng(self, saved: torch.Tensor | None) -> None:
        if self.device.type == "cuda" and saved is not None:
            torch.cuda.set_rng_state(torch.as_tensor(saved[self.ctx.rank]), self.device)
