"""Training: from a validated config to a model directory.

* :mod:`~mtrec.training.trainer`: :func:`train`, the run (data, loop, early stopping,
  resume state, logs, progress, the model directory);
* :mod:`~mtrec.training.policy`: device, precision and embedding-update choices;
* :mod:`~mtrec.training.optim`: the optimisers and learning-rate schedules;
* :mod:`~mtrec.training.losses`: per-task losses on each task's sample space;
* :mod:`~mtrec.training.labels`: label statistics shown before a run;
* :mod:`~mtrec.training.distributed`: torchrun / DDP;
* :mod:`~mtrec.training.profiling`: counting host syncs of a training step.
"""

from mtrec.training.optim import make_optimizers
from mtrec.training.policy import (
    DENSE_EMBEDDING_MAX_VALUES,
    native_bf16,
    resolve_device,
    resolve_embedding_optimizer,
    resolve_precision,
)
from mtrec.training.trainer import TrainResult, train

__all__ = [
    "DENSE_EMBEDDING_MAX_VALUES",
    "TrainResult",
    "make_optimizers",
    "native_bf16",
    "resolve_device",
    "resolve_embedding_optimizer",
    "resolve_precision",
    "train",
]
