"""``train.tensorboard: DIR``: the training log as TensorBoard scalars, through torch's
``SummaryWriter`` (the optional ``tensorboard`` extra).

What the trainer logs to ``log.jsonl`` is mirrored here, keyed by the global step (updates
since the start of training):

* every ``train.log_every`` steps: ``train/loss`` (the epoch's running mean, as printed) and
  ``weights/<task>`` (the loss weighting's current task weights);
* every epoch: ``train/loss``, ``train/loss/<task>``, ``valid/loss``, ``valid/<task>/<metric>``
  for every numeric metric (AUC, log loss, calibration, ...), ``weights/<task>``, and for gated
  models ``gates/<task>/entropy_share`` (the gate's mean entropy over its maximum, on the first
  :data:`GATE_ROWS` validation rows) and ``gates/expert_similarity``.

Only rank 0 writes. The directory is checked before training starts: a directory that cannot
be written, or a missing ``tensorboard`` package, is a :class:`~mtrec.errors.ConfigError`.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from mtrec.errors import ConfigError

__all__ = ["GATE_ROWS", "TensorBoardLog", "open_tensorboard"]

GATE_ROWS = 4096
"""Validation rows the per-epoch gate entropy is measured on (a bounded cost per epoch)."""


def open_tensorboard(directory: str | Path) -> TensorBoardLog:
    """A :class:`TensorBoardLog` writing to ``directory`` (created if missing).

    Raises:
        ConfigError: The ``tensorboard`` package is missing, or ``directory`` cannot be
            created or written.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.tensorboard: needs the tensorboard package (pip install 'mtrec-rank[tensorboard]')"
        ) from None
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".mtrec-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"train.tensorboard: {path} cannot be written ({exc.strerror or exc})") from None
    return TensorBoardLog(SummaryWriter(log_dir=str(path)), lambda **kw: SummaryWriter(log_dir=str(path), **kw))


class TensorBoardLog:
    """Receives the trainer's log records (:meth:`record`) and writes them as scalars."""

    def __init__(self, writer: Any, reopen: Any = None) -> None:
        self.writer, self._reopen = writer, reopen

    def purge_after(self, step: int) -> None:
        """On resume: TensorBoard drops the events past ``step`` that the interrupted run wrote."""
        if self._reopen is not None:
            self.writer.close()
            self.writer = self._reopen(purge_step=step + 1)

    def record(self, record: dict[str, Any], step: int) -> None:
        """Writes one ``log.jsonl`` record at global step ``step``."""
        event = record.get("event")
        if event == "step":
            self._scalar("train/loss", record.get("loss"), step)
            self._weights(record.get("task_weights"), step)
        elif event == "epoch":
            self._scalar("train/loss", record.get("train_loss"), step)
            for task, value in (record.get("train_task_loss") or {}).items():
                self._scalar(f"train/loss/{task}", value, step)
            self._scalar("valid/loss", record.get("valid_loss"), step)
            for task, metrics in (record.get("valid") or {}).items():
                for name, value in metrics.items():
                    self._scalar(f"valid/{task}/{name}", value, step)
            self._weights(record.get("task_weights"), step)
            gates = record.get("gates")
            if gates:
                for task, entry in gates["tasks"].items():
                    if entry["max_entropy"] > 0:
                        self._scalar(f"gates/{task}/entropy_share", entry["entropy"] / entry["max_entropy"], step)
                self._scalar("gates/expert_similarity", gates.get("expert_similarity"), step)
            self.writer.flush()

    def _weights(self, weights: dict[str, float] | None, step: int) -> None:
        for task, value in (weights or {}).items():
            self._scalar(f"weights/{task}", value, step)

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return  # None or NaN (an undefined metric) is left out
        self.writer.add_scalar(tag, float(value), global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
