"""The training run (:class:`Trainer`): data, model and optimisers, the epochs with validation and early
stopping, the resume state after each, the log and the model directory. The step itself is
:mod:`mtrec.training.step`; what is carried between epochs, :mod:`mtrec.training.state`."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from mtrec._version import __version__
from mtrec.batch import Batch
from mtrec.calibration import check_calibration_data, fit_calibrator
from mtrec.config import Config
from mtrec.data.batches import TensorColumns, prefetch_to_device
from mtrec.data.loading import (
    StreamingData,
    TrainingData,
    load_streaming_data,
    load_training_data,
    resolve_data_mode,
)
from mtrec.data.preprocess import EncodedColumns, Preprocessor
from mtrec.data.streaming import ParquetStream
from mtrec.diagnostics import format_gates, gate_diagnostics
from mtrec.errors import ConfigError, DataError, ModelError, MtrecError
from mtrec.files import atomic_write_text, is_sealed, output_path, remove_owned, staging_dir
from mtrec.metrics.functional import sigmoid
from mtrec.model_dir import (
    AFFINITY,
    CALIBRATION,
    DIAGNOSTICS,
    INIT_FROM,
    LOG,
    META,
    METRICS,
    PREPROCESS,
    RESUME,
    WEIGHTS,
    LoadedModel,
    build_model,
    check_state_tensors,
    claim_model_dir,
    commit_model_dir,
    has_resume_state,
    load_resume_state,
    save_calibration,
    save_model_files,
    save_resume_state,
    save_weights,
)
from mtrec.models.base import MultiTaskModel
from mtrec.predict import predict_logits
from mtrec.progress import Progress, format_seconds, say
from mtrec.schema import Task
from mtrec.tables import format_affinity
from mtrec.tasks import compute_metrics, higher_is_better, summary_metric
from mtrec.training.affinity import TaskAffinity, affinity_summary
from mtrec.training.distributed import (
    DistContext,
    all_reduce_array,
    barrier,
    broadcast_parameters,
    check_loss_weighting,
    check_same,
    fail_fast,
    gather_rows,
    init_distributed,
    shard_bounds,
    shutdown,
    wrap_model,
)
from mtrec.training.labels import format_correlations, label_correlations
from mtrec.training.losses import multitask_loss
from mtrec.training.optim import HasEmbeddingTables, make_lr_schedulers, make_optimizers
from mtrec.training.policy import resolve_device, resolve_embedding_optimizer, resolve_precision
from mtrec.training.state import ResumableState, RunRecord
from mtrec.training.step import TrainStep
from mtrec.training.tensorboard import GATE_ROWS, TensorBoardLog, open_tensorboard
from mtrec.training.warm_start import Transfer, freeze, frozen_norms, loaded_parameters, read_source, transfer_weights
from mtrec.weighting import create_weighting

__all__ = ["TrainResult", "train"]

DIAGNOSTIC_ROWS = 8192
"""The validation rows (the first ones) the saved gate diagnostics are measured on: a bounded cost
after the last epoch (0.43 s on 30k rows of the benchmark MMoE, a second validation pass), and
mean expert weights known to ~0.005 on that many rows."""


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    output: Path
    best_epoch: int
    best_metrics: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds of each stage (``meta.json``'s ``timings``, see :meth:`Trainer.run`, and ``commit_s``)."""


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class _LossSums:
    """Row-weighted sums of the training loss and task losses of an epoch, kept on the device.

    Adding is asynchronous; the values are read (one host sync) only when asked for, and a
    read that finds a non-finite sum stops the run.
    """

    def __init__(self, task_names: tuple[str, ...], device: torch.device) -> None:
        self.task_names = task_names
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.tasks = torch.zeros(len(task_names), dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], rows: int) -> None:
        self.total += loss.detach().to(torch.float64) * rows
        self.tasks += torch.stack([parts[name].detach() for name in self.task_names]).to(torch.float64) * rows
        self.rows += rows

    def loss_sum(self, epoch: int, step: int) -> float:
        value = float(self.total)
        if not math.isfinite(value):
            raise MtrecError(
                f"training diverged in epoch {epoch} by step {step} (loss {value}); "
                "lower train.lr or set train.grad_clip"
            )
        return value

    def mean_loss(self, epoch: int, step: int) -> float:
        return self.loss_sum(epoch, step) / max(self.rows, 1)

    def task_sums(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.tasks.tolist(), strict=True))


def _fmt_metrics(metrics: dict[str, dict[str, Any]], tasks: tuple[Task, ...]) -> str:
    """``ctr auc 0.7213, dwell rmse 1.0412``: each task's headline metric."""
    shown = ((task.name, task.kind.short(metrics[task.name])) for task in tasks if task.name in metrics)
    return ", ".join(f"{name} {text}" for name, text in shown if text is not None)


class _EpochProgress(Progress):
    """The steps of one epoch: a bar with loss and rows/s on a terminal, a line every ``every`` steps otherwise."""

    def __init__(self, total: int, epoch: int, epochs: int, every: int, stream: TextIO, enabled: bool) -> None:
        super().__init__(total, desc=f"epoch {epoch}/{epochs}", unit="step", stream=stream, enabled=enabled)
        self.epoch, self.epochs, self.every = epoch, epochs, every

    def update(self, step: int, rows: int, loss: Callable[[], float]) -> None:
        """Moves to ``step``; ``loss()`` (a host read of a device value) is called only when the
        loss is shown: every ``every`` steps, or every 0.5 s on a terminal."""
        rate = self.rate(rows)
        self.advance(step, lambda: {"loss": f"{loss():.4f}", "rows_s": f"{rate:,.0f}"})
        if self.plain and (step % self.every == 0 or step == self.total):
            eta = self.elapsed() / step * (self.total - step)
            self.line(
                f"epoch {self.epoch}/{self.epochs} step {step}/{self.total} loss {loss():.4f} "
                f"rows/s {rate:,.0f} eta {format_seconds(eta)}"
            )


def train(
    config: Config,
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    debug: bool = False,
    resume: bool = False,
) -> TrainResult:
    """Trains the model a config describes and writes its model directory.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains one DDP replica on its
    own share of the Parquet row groups; only rank 0 writes the model directory and
    progress, and a failing rank ends the job with one line (see :mod:`mtrec.training.distributed`).

    Args:
        config: A validated config (see :func:`mtrec.config.load_config`).
        output: Model directory; default ``config.output`` or ``runs/<model name>``.
        overwrite: Replace an existing directory (only once the new one is complete).
        progress: Show progress and per-epoch lines on ``stream``.
        stream: Where progress goes (default stderr).
        on_epoch: Called with each epoch's record.
        debug: Under torchrun, print tracebacks of failing ranks.
        resume: Continue the interrupted run whose last good state is in
            ``output.incomplete/resume/`` (same result as an uninterrupted run for the
            same seed). ``config`` must be the run's own (``output.incomplete/config.yaml``).
    """
    stream = stream or sys.stderr
    out_dir = output_path(output or config.output or f"runs/{config.model.name}")
    device = resolve_device(config.train.device)
    ctx, device = init_distributed(device, timeout_s=config.train.dist_timeout_s)
    try:
        with fail_fast(ctx, debug=debug):
            check_loss_weighting(str(config.train.loss_weighting.get("name", "fixed")), ctx)
            if config.train.batch_size % ctx.world_size:
                raise ConfigError(
                    f"train.batch_size: {config.train.batch_size} is the global batch and must divide evenly "
                    f"among {ctx.world_size} ranks"
                )
            with ExitStack() as claim:
                staging = None
                if ctx.is_main:
                    # Rank 0 alone writes: it holds the output (one writer at a time) for the whole run.
                    staging = claim.enter_context(
                        claim_model_dir(out_dir, overwrite=overwrite, resume=resume, inputs=_data_inputs(config))
                    )
                state = None
                if resume:
                    # On the CPU: generator states must be CPU tensors; load_state_dict moves the rest.
                    resumable = staging_dir(out_dir)
                    if not has_resume_state(resumable):
                        raise MtrecError(f"{out_dir}: nothing to resume (no {resumable}/resume/state.json)")
                    state = load_resume_state(resumable, map_location="cpu")
                try:
                    trainer = Trainer(config, out_dir, staging, progress and ctx.is_main, stream, ctx, device)
                    return trainer.run(on_epoch, state)
                except (MtrecError, OSError) as exc:
                    if isinstance(exc, OSError):  # a full disk while writing the model: one line, like bad input
                        exc = MtrecError(f"{exc.filename or out_dir}: cannot write ({exc.strerror or exc})")
                    if staging is not None and has_resume_state(staging) and not isinstance(exc, ModelError):
                        # A file that vanished or broke mid-run: the last good epoch stays resumable.
                        raise MtrecError(
                            f"{exc} (the state after the last complete epoch is kept: "
                            f"continue with `mtrec train --resume {out_dir}`)"
                        ) from None
                    # Bad input before any epoch: nothing worth keeping. (A crash keeps DIR.incomplete.)
                    if staging is not None and not resume and staging.exists() and not is_sealed(staging):
                        remove_owned(staging)  # (a sealed one is the finished run: recover() swaps it in)
                    raise exc from None
    finally:
        shutdown(ctx)


def _data_inputs(config: Config) -> list[str]:
    """The training and validation files or folders (not globs), which the output may not touch."""
    return [spec for spec in (config.data.train, config.data.valid) if spec and not any(c in spec for c in "*?[")]


@dataclass
class _EpochTotals:
    """One epoch's training sums over all ranks."""

    loss_sum: float
    rows: int
    task_loss: dict[str, float]
    seconds: float


class Trainer:
    """One training run in stages: :meth:`setup` (data, model, optimisers, the model directory),
    then :meth:`fit` (each epoch trained, validated, checkpointed; early stopping), then
    :meth:`finish` (best weights, diagnostics, metrics and meta files).

    Rank 0 alone has a ``staging`` folder and writes; every rank trains.
    """

    def __init__(
        self,
        config: Config,
        out_dir: Path,
        staging: Path | None,
        progress: bool,
        stream: TextIO,
        ctx: DistContext,
        device: torch.device,
    ) -> None:
        self.config, self.t = config, config.train
        self.out_dir, self.staging = out_dir, staging
        self.progress, self.stream = progress, stream
        self.ctx, self.device = ctx, device
        self.tasks = config.schema.output_tasks
        self.task_names = tuple(task.name for task in self.tasks)
        self.log_fh: TextIO | None = None
        self.tensorboard: TensorBoardLog | None = None
        self.affinity: TaskAffinity | None = None
        self.global_step = 0  # updates since the start of training (TensorBoard's x axis)
        self.timings: dict[str, float] = {}
        self.best_logits: dict[str, np.ndarray] | None = None  # the best epoch's validation logits

    def say(self, text: str) -> None:
        say(self.stream, self.progress, text)

    def log(self, record: dict[str, Any], **tensorboard_only: Any) -> None:
        """Appends ``record`` to ``log.jsonl`` (and, with ``train.tensorboard``, writes it and
        ``tensorboard_only``'s entries as scalars)."""
        if self.log_fh is not None:
            self.log_fh.write(json.dumps(record) + "\n")
            self.log_fh.flush()
        if self.tensorboard is not None:
            self.tensorboard.record({**record, **tensorboard_only}, self.global_step)

    def run(self, on_epoch: Callable[[dict[str, Any]], None] | None, resume: dict[str, Any] | None) -> TrainResult:
        """Trains and writes the model directory. ``self.timings`` (saved in ``meta.json``) has the
        seconds of each stage: ``read_encode_s`` (the data read and encoded, preprocessing
        fitted), ``setup_s`` (the rest before the first step: label statistics, the model, the
        model directory's first files), ``train_s`` and ``validate_s`` (summed over the epochs),
        ``checkpoint_s`` (resume states and best weights), ``post_loop_s`` (best weights read
        back, diagnostics, calibration, metrics) and, in the result only, ``commit_s``."""
        try:
            t0 = time.perf_counter()
            self.setup(resume)
            self.timings["setup_s"] = time.perf_counter() - t0 - self.timings.get("read_encode_s", 0.0)
            self.fit(on_epoch)
            self.finish()
        finally:
            if self.log_fh is not None:
                self.log_fh.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        t0 = time.perf_counter()
        if self.staging is not None:
            commit_model_dir(self.staging, self.out_dir)
        self.timings["commit_s"] = time.perf_counter() - t0
        # Every rank returns only once the model directory exists.
        barrier(self.ctx)
        record = self.state.record
        self.say(f"best epoch {record.best_epoch}: {_fmt_metrics(record.best_metrics, self.tasks)}")
        self.say(f"model saved to {self.out_dir}")
        return TrainResult(self.out_dir, record.best_epoch, record.best_metrics, record.history, dict(self.timings))

    # ------------------------------------------------------------------------------- setup
    def setup(self, resume: dict[str, Any] | None) -> None:
        # Ranks on one machine share its cores.
        torch.set_num_threads(self.t.threads or max(1, (os.cpu_count() or 1) // self.ctx.local_world_size))
        self.generator = _seed_everything(self.t.seed)
        warm = _import_in_background("torch._dynamo")  # what building the optimisers imports (~1 s)
        self.source: LoadedModel | None = None
        self.transfer: Transfer | None = None
        if self.t.init_from is not None and resume is None:
            self.source = read_source(self.t.init_from)
        elif self.t.init_from is not None:  # resumed: what was loaded is known, the source is not read again
            self.transfer = Transfer.read(staging_dir(self.out_dir) / INIT_FROM)
        self.frozen_norms: list[nn.Module] = []
        self._load_data()
        self._check_calibration_data()
        self._describe_labels()
        if warm is not None:
            warm.join()
        self._build_model()
        self._start_affinity()  # (it copies the model: before compiling and before the step's hooks)
        if self.t.tensorboard is not None and self.staging is not None:  # rank 0, before anything is written
            self.tensorboard = open_tensorboard(self.t.tensorboard)
        self._open_model_dir(resume)
        self.valid_cols = TensorColumns.from_encoded(self.data.valid)
        if self.t.compile:
            _compile_backbones(self.model)
        self.step = TrainStep(
            self.model,
            self.replica,
            self.weighting,
            self.optimizers,
            self.schedulers,
            tasks=self.tasks,
            train=self.t,
            ctx=self.ctx,
            device=self.device,
        )
        run = {
            "world_size": self.ctx.world_size,
            "data_mode": self.mode,
            "embedding_optimizer": self.embedding_optimizer,
        }
        self.state = ResumableState(
            self.model,
            self.optimizers,
            self.schedulers,
            self.weighting,
            self.generator,
            self.step.scaler,
            self.ctx,
            self.device,
            RunRecord(),
            run,
        )
        self.first_epoch = 1
        if resume is not None:
            self._restore(resume)
            self.global_step = sum(self.batches.num_batches(e) for e in range(1, self.first_epoch))
            if self.tensorboard is not None:  # drop what the interrupted run wrote past the resumed state
                self.tensorboard.purge_after(self.global_step)
        else:
            self.log(
                {
                    "event": "start",
                    "config_model": self.config.model.name,
                    "train_rows": self.train_rows,
                    "time": time.time(),
                }
            )

    def _start_affinity(self) -> None:
        """With ``train.affinity_every``, rank 0 measures the task affinity (see :mod:`mtrec.training.affinity`)."""
        if self.t.affinity_every is None or self.staging is None:
            return
        lr, embedding_lr = self.t.lr, self.t.embedding_lr
        self.affinity = TaskAffinity(
            self.model,
            self.tasks,
            every=self.t.affinity_every,
            lr=lr,
            embedding_lr=lr if embedding_lr is None else embedding_lr,
            normalization=self.t.loss_normalization,
        )
        if self.affinity.shared.kind == "none":
            self.say(f"task affinity: {self.config.model.name} shares no parameters between tasks; nothing to measure")

    def _load_data(self) -> None:
        t, d, schema, ctx = self.t, self.config.data, self.config.schema, self.ctx
        t0 = time.perf_counter()
        mode, size_mb = resolve_data_mode(d.mode, schema, d.train, d.memory_budget_mb)
        if ctx.enabled:
            mode = "stream"  # each rank reads its own share of the row groups
        self.mode = mode
        self.data: TrainingData | StreamingData
        reused = self._reused_preprocessing()
        if mode == "memory":
            self.data = load_training_data(
                schema, d.train, d.valid, valid_fraction=d.valid_fraction, seed=t.seed, preprocessor=reused
            )
            self.batches: _MemoryBatches | ParquetStream = _MemoryBatches(
                self.data.train, t.batch_size, self.generator, device=self.device, gpu_share=t.gpu_data_share
            )
            self.train_rows = self.data.train.num_rows
            self.labelled, self.labelled_what = self.data.train, "training"
            how = "read and encoded"
        else:
            self.data = load_streaming_data(
                schema,
                d.train,
                d.valid,
                valid_fraction=d.valid_fraction,
                seed=t.seed,
                batch_size=t.batch_size // ctx.world_size,  # train.batch_size is the global batch
                shuffle_buffer=d.shuffle_buffer,
                read_ahead=d.read_ahead,
                num_workers=d.num_workers,
                rank=ctx.rank,
                world_size=ctx.world_size,
                preprocessor=reused,
            )
            self.batches = self.data.train
            self.train_rows = self.data.train.total_rows
            # The training rows are never held at once; label statistics come from validation.
            self.labelled, self.labelled_what = self.data.valid, "validation"
            how = f"stream mode: encoded size ~{size_mb:,.0f} MiB, budget {d.memory_budget_mb:,.0f} MiB; fitted"
        load_s = time.perf_counter() - t0
        self.timings["read_encode_s"] = load_s
        self.layout = self.data.preprocessor.layout()
        check_same(dataclasses.asdict(self.layout), ctx, "the fitted preprocessing (input layout)")
        self.say(
            f"data: {self.train_rows:,} training rows{_ranks(ctx)}, {self.data.valid.num_rows:,} validation rows "
            f"({how} in {load_s:.1f}s); embedding rows {sum(self.layout.table_sizes):,}"
        )

    def _reused_preprocessing(self) -> Preprocessor | None:
        """``init_from_preprocessing: reuse``: the warm start's saved preprocessing (that of the
        run being resumed, once it has started), for this config's features, which must be the
        saved ones; this config's tasks."""
        if self.t.init_from is None or self.t.init_from_preprocessing != "reuse":
            return None
        if self.source is None:  # resuming: the run's own preprocessing is the reused one
            return Preprocessor.load(self.config.schema, staging_dir(self.out_dir) / PREPROCESS)
        saved, here = self.source.config.schema, self.config.schema
        for kind in ("sparse", "dense", "sequence"):
            old = {f.name: f for f in getattr(saved, kind)}
            for f in getattr(here, kind):
                same = f.name in old and (
                    _encoding(old[f.name]) == _encoding(f) if kind == "sequence" else old[f.name] == f
                )
                if not same:
                    raise ConfigError(
                        f"train.init_from_preprocessing: reuse encodes with {self.t.init_from}'s preprocessing, "
                        f"which has no {kind} feature {f.name!r} as this config declares it; use refit"
                    )
            if len(old) != len(getattr(here, kind)):
                raise ConfigError(
                    f"train.init_from_preprocessing: reuse needs the {kind} features of {self.t.init_from} "
                    f"({', '.join(old) or 'none'}); use refit"
                )
        pre = self.source.preprocessor
        return Preprocessor(here, pre.vocabs, pre.dense_stats)

    def _warm_start(self, model: nn.Module) -> set[int] | None:
        """``train.init_from``: copies the source's weights into ``model``, freezes
        ``train.freeze`` and returns the ids of the loaded parameters (``None`` without one)."""
        if self.source is not None:
            source, where = self.source, str(self.t.init_from)
            self.transfer = transfer_weights(source.model, source.preprocessor, model, self.data.preprocessor, where)
            self.source = None  # (its weights are no longer needed)
            self.say(self.transfer.summary())
        if self.transfer is None:
            return None
        frozen = {id(p) for p in freeze(model, tuple(self.t.freeze), self.transfer)}
        layer = cast(Any, model).representation_layer() if self.weighting.needs_representation else None
        net, method = cast(Any, model), self.t.loss_weighting["name"]
        needs = {
            "gradnorm": [getattr(e, "param", e) for e in net.last_shared_parameters()],
            "pcgrad": net.shared_parameters(),
        }.get(method, [])
        if layer is not None:
            needs = list(layer[0].parameters())
        if (any if method != "pcgrad" else all)(id(p) in frozen for p in needs) and needs:
            raise ConfigError(
                f"train.freeze: {', '.join(self.t.freeze)} freezes the shared layer where loss_weighting "
                f"{method} works on the task gradients; leave it trainable or use another weighting"
            )
        if frozen:
            self.say(f"frozen: {', '.join(self.t.freeze)} ({len(frozen)} parameter tensors)")
        self.frozen_norms = frozen_norms(model)
        return loaded_parameters(model, self.transfer)

    def _check_calibration_data(self) -> None:
        """``train.calibration`` is fitted on the validation split after training: refuse now,
        before any epoch, a binary task whose validation sample space cannot be calibrated."""
        if self.t.calibration == "none":
            return
        v = self.data.valid
        for j, task in enumerate(self.tasks):
            if task.kind.ranks:
                check_calibration_data(task.name, v.labels[v.label_mask[:, j], j], "the validation split")

    def _calibrate(self, staging: Path) -> None:
        """Rank 0: fits each binary task's calibrator on the validation rows it holds (the best
        weights are loaded) and writes them to the model directory."""
        method, v = self.t.calibration, self.data.valid
        logits = self.best_logits  # the best epoch's, from its validation (none after a resume)
        if logits is None:
            logits = predict_logits(
                self.model, self.valid_cols, self.task_names, batch_size=self.t.eval_batch_size, device=self.device
            )
        fitted, lines = {}, []
        for j, task in enumerate(self.tasks):
            if not task.kind.ranks:
                continue
            space = v.label_mask[:, j]
            w = None if v.sample_weight is None else v.sample_weight[space]
            y, z = v.labels[space, j], logits[task.name][space]
            cal = fit_calibrator(method, z, y, w, task=task.name)
            fitted[task.name] = cal
            raw, calibrated = sigmoid(z.astype(np.float64)), cal.apply_logits(z)
            rate = float(np.average(y, weights=w))
            lines.append(
                f"{task.name} {float(np.average(raw, weights=w)) / rate:.3f} -> "
                f"{float(np.average(calibrated, weights=w)) / rate:.3f}"
            )
        save_calibration(staging / CALIBRATION, method, fitted)
        self.say(f"calibration ({method}, on the validation split): mean prediction / rate " + ", ".join(lines))

    def _describe_labels(self) -> None:
        labelled = self.labelled
        for j, task in enumerate(self.tasks):
            space = labelled.label_mask[:, j]
            rate = float(labelled.labels[space, j].mean()) if space.any() else float("nan")
            what = task.kind.label_mean
            self.say(
                f"task {task.name}: {int(space.sum()):,} {self.labelled_what} rows in its sample space, "
                f"{what} {rate:.4f}"
            )
        self.correlations = label_correlations(labelled.labels, labelled.label_mask, self.tasks)
        if len(self.correlations) > 1:
            self.say(format_correlations(self.correlations))

    def _build_model(self) -> None:
        t, device, ctx = self.t, self.device, self.ctx
        torch.manual_seed(t.seed)
        try:
            model = build_model(self.config, self.layout).to(device)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"model: {str(exc).splitlines()[0]}") from None
        self.model = model
        weighting_cfg = dict(t.loss_weighting)
        self.weighting = create_weighting(
            weighting_cfg.pop("name"), self.task_names, tuple(task.weight for task in self.tasks), **weighting_cfg
        ).to(device)
        if self.weighting.needs_representation and cast(Any, model).representation_layer() is None:
            raise ConfigError(
                f"train.loss_weighting: {t.loss_weighting['name']} combines the task gradients on a representation "
                f"the tasks share, and {self.config.model.name} (embedding {self.config.model.embedding}) shares none; "
                "use a model with shared layers, or fixed, uncertainty, dwa, rlw or famo"
            )
        loaded = self._warm_start(model)
        table_values = sum(table.numel() for table in cast(HasEmbeddingTables, model).embedding_tables())
        self.embedding_optimizer = resolve_embedding_optimizer(
            t.embedding_optimizer, device, table_values, ctx.world_size
        )
        cast(HasEmbeddingTables, model).use_sparse_embedding_grads(self.embedding_optimizer == "sparse")
        # DDP for the dense weights (and a table with dense gradients); a table with sparse
        # gradients is kept out of DDP and averaged by sync_sparse_grads (see mtrec.training.distributed).
        self.replica = wrap_model(model, ctx, device)
        broadcast_parameters(self.weighting, ctx)
        self.optimizers = make_optimizers(model, self.config, loaded)
        if self.weighting.extra_parameters():
            # Own group without weight decay: decay would pull the log-variances towards 0.
            self.optimizers[0].add_param_group({"params": self.weighting.extra_parameters(), "weight_decay": 0.0})
        # Per-step warm-up and decay of every optimiser's rates (none by default); built after the
        # last param group is added, as LambdaLR records each group's base rate.
        self.schedulers = make_lr_schedulers(
            self.optimizers,
            warmup_steps=t.warmup_steps,
            decay=t.lr_decay,
            total_steps=_total_steps(self.batches, t.epochs) if t.lr_decay != "none" else 0,
            min_lr_ratio=t.min_lr_ratio,
        )
        n_params = sum(p.numel() for p in model.parameters())
        self.precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}[
            resolve_precision(t.precision, device)
        ]
        where = ", training data resident on the GPU" if getattr(self.batches, "resident", False) else ""
        compiled = ", torch.compile" if t.compile else ""
        self.say(
            f"model: {self.config.model.name}, {n_params:,} parameters, device {device}, {self.precision}, "
            f"{self.embedding_optimizer} embedding gradients{compiled}{where}"
        )

    def _open_model_dir(self, resume: dict[str, Any] | None) -> None:
        self.meta = {
            "mtrec_version": __version__,
            "torch_version": torch.__version__,
            "model": self.config.model.name,
            "task_names": list(self.task_names),
            "layout": dataclasses.asdict(self.layout),
            "train_rows": self.train_rows,
            "data_mode": self.mode,
            "valid_rows": self.data.valid.num_rows,
            "train_files": [str(p) for p in self.data.train_files],
            "precision": self.precision,
            "embedding_optimizer": self.embedding_optimizer,
            "label_correlations": self.correlations,
        }
        if self.transfer is not None:
            self.meta["init_from"] = {"source": self.transfer.source, **self.transfer.counts()}
        if resume is not None:
            # SparseAdam and LazyAdam keep the same state (step, exp_avg, exp_avg_sq), so a run
            # may continue with the other embedding update (e.g. on a GPU after a CPU start).
            pre = self.data.preprocessor
            _check_resumable(resume, staging_dir(self.out_dir), self.config, pre, self.mode, self.ctx)
        elif self.staging is not None:  # rank 0 writes the model directory and its log
            save_model_files(self.staging, self.config, self.data.preprocessor, self.meta)
            if self.transfer is not None:
                atomic_write_text(self.staging / INIT_FROM, self.transfer.to_json())
        if self.staging is not None:
            self.log_fh = (self.staging / LOG).open("a")

    def _restore(self, resume: dict[str, Any]) -> None:
        # load_resume_state checked the structure; whether it fits this model is known only here.
        self.state.restore(resume, staging_dir(self.out_dir) / RESUME)
        record, after = self.state.record, resume["epoch"]
        # A run that had already stopped early (and was interrupted while finishing) stays stopped.
        self.first_epoch = after + 1 if record.bad_epochs <= self.t.patience else self.t.epochs + 1
        if record.best_epoch == after and self.staging is not None:
            save_weights(self.model, self.staging / WEIGHTS)  # the state's own weights are the best ones
        self.say(f"resuming after epoch {after} (best epoch so far {record.best_epoch})")
        self.log({"event": "resume", "after_epoch": after, "time": time.time()})

    # --------------------------------------------------------------------------------- fit
    def fit(self, on_epoch: Callable[[dict[str, Any]], None] | None) -> None:
        t = self.t
        for epoch in range(self.first_epoch, t.epochs + 1):
            totals = self.train_epoch(epoch)
            record = self.validate(epoch, totals)
            self.state.record.add(record)
            c0 = time.perf_counter()
            self.checkpoint(epoch, record["improved"])
            self.timings["checkpoint_s"] = self.timings.get("checkpoint_s", 0.0) + time.perf_counter() - c0
            for key, part in (("train_s", "train_seconds"), ("validate_s", "valid_seconds")):
                self.timings[key] = self.timings.get(key, 0.0) + record[part]
            if on_epoch is not None:
                on_epoch(record)
            bad_epochs = self.state.record.bad_epochs
            if bad_epochs > t.patience:
                self.say(f"early stop: {t.monitor} has not improved for {bad_epochs} epochs")
                break

    def train_epoch(self, epoch: int) -> _EpochTotals:
        self.model.train()
        for norm in self.frozen_norms:  # (their running statistics are part of what is frozen)
            norm.eval()
        steps = self.batches.num_batches(epoch)
        bar = _EpochProgress(steps, epoch, self.t.epochs, self.t.log_every, self.stream, self.progress)
        # Loss sums stay on the device: reading them (a host sync that stalls the GPU
        # queue) happens only where a progress line or log record needs them.
        sums = _LossSums(self.task_names, self.device)
        e0 = time.perf_counter()
        source = self.batches.iter_batches(epoch)
        if not getattr(self.batches, "resident", False):  # resident batches are already on the GPU
            source = prefetch_to_device(source, self.device)
        step = 0
        for step, batch in enumerate(source, start=1):
            if self.affinity is not None and self.affinity.due(self.global_step + 1):
                self.affinity.measure(batch)  # at the parameters this update starts from
            loss, parts = self.step(batch)
            self.global_step += 1
            sums.add(loss, parts, len(batch))
            bar.update(step, sums.rows, functools.partial(sums.mean_loss, epoch, step))
            if step % self.t.log_every == 0:
                extra = {"task_weights": self.weighting.weights()} if self.tensorboard is not None else {}
                self.log({"event": "step", "epoch": epoch, "step": step, "loss": sums.mean_loss(epoch, step)}, **extra)
        loss_sum, rows, task_loss = sums.loss_sum(epoch, step), sums.rows, sums.task_sums()
        bar.close()
        seconds = time.perf_counter() - e0
        if self.ctx.enabled:  # every rank logs and balances with the totals of all ranks
            totals = all_reduce_array([loss_sum, rows, *task_loss.values()], self.ctx)
            loss_sum, rows = float(totals[0]), int(totals[1])
            task_loss = {name: float(v) for name, v in zip(self.task_names, totals[2:], strict=True)}
        self.weighting.epoch_end({name: value / max(rows, 1) for name, value in task_loss.items()})
        return _EpochTotals(loss_sum, rows, task_loss, seconds)

    def validate(self, epoch: int, totals: _EpochTotals) -> dict[str, Any]:
        """The epoch's record: validation loss and metrics, the monitored value and whether it improved."""
        t, v, rows, train_s = self.t, self.data.valid, totals.rows, totals.seconds
        v0 = time.perf_counter()
        logits = _predict_valid(self.model, self.valid_cols, self.task_names, t.eval_batch_size, self.device, self.ctx)
        valid_loss = _masked_loss(logits, v.labels, v.label_mask, self.tasks, v.sample_weight, t.loss_normalization)
        metrics = compute_metrics(logits, v.labels, v.label_mask, self.tasks, v.sample_weight)
        valid_s = time.perf_counter() - v0
        value = summary_metric(metrics, t.monitor, valid_loss)
        higher_better = higher_is_better(t.monitor)
        improved = self.state.record.improves(value, higher_better)
        if improved and self.t.calibration != "none":  # what calibration is fitted on, kept (not re-predicted)
            self.best_logits = logits
        record = {
            "event": "epoch",
            "epoch": epoch,
            "train_loss": totals.loss_sum / max(rows, 1),
            "train_task_loss": {name: value / max(rows, 1) for name, value in totals.task_loss.items()},
            "task_weights": self.weighting.weights(),
            "valid_loss": valid_loss,
            "valid": metrics,
            "monitor": t.monitor,
            "monitor_value": value,
            "improved": improved,
            "train_seconds": train_s,
            "valid_seconds": valid_s,
            "rows_per_second": rows / train_s if train_s > 0 else None,
        }
        if self.affinity is not None:
            record["affinity"] = self.affinity.epoch_record()
        gates = None
        if self.tensorboard is not None:
            gates = gate_diagnostics(self.model, self.valid_cols, batch_size=t.eval_batch_size, max_rows=GATE_ROWS)
        self.log(record, gates=gates)
        mark = " *" if improved else ""
        self.say(
            f"epoch {epoch}/{t.epochs}: train loss {record['train_loss']:.4f}, valid loss {valid_loss:.4f}, "
            f"{_fmt_metrics(metrics, self.tasks)}, {rows / train_s:,.0f} rows/s, {train_s:.1f}s{mark}"
        )
        return record

    def checkpoint(self, epoch: int, improved: bool) -> None:
        """Saves the resume state after ``epoch`` (and the weights, when they are the best)."""
        state = self.state.capture(epoch)  # a collective: on every rank
        if self.staging is None:
            return
        save_resume_state(self.staging, state)
        if improved:
            # After the resume state: a crash in between leaves a state whose best epoch is
            # its own epoch, and resuming rewrites the best weights from it.
            save_weights(self.model, self.staging / WEIGHTS)

    # ------------------------------------------------------------------------------ finish
    def finish(self) -> None:
        self.finish_t0 = time.perf_counter()
        record = self.state.record
        if record.best_epoch == 0:
            # The monitored metric was never defined (e.g. one class only): keep the last weights.
            record.best_epoch, record.best_metrics = len(record.history), record.history[-1]["valid"]
            if self.staging is not None:
                save_weights(self.model, self.staging / WEIGHTS)
        if self.staging is not None:
            self._write_results(self.staging)
        self.log({"event": "end", "best_epoch": record.best_epoch, "time": time.time()})

    def _write_results(self, staging: Path) -> None:
        """Rank 0: gate diagnostics of the saved (best) weights, affinity.json, metrics.json and meta.json."""
        model, record = self.model, self.state.record
        best = load_file(str(staging / WEIGHTS), device=str(self.device))
        check_state_tensors(model.state_dict(), best, staging / WEIGHTS)
        model.load_state_dict(best)
        gates = gate_diagnostics(model, self.valid_cols, batch_size=self.t.eval_batch_size, max_rows=DIAGNOSTIC_ROWS)
        if gates is not None:
            atomic_write_text(staging / DIAGNOSTICS, json.dumps({"gates": gates}, indent=2))
            self.say(format_gates(gates))
        if self.t.calibration != "none":
            self._calibrate(staging)
        if self.affinity is not None:
            doc = affinity_summary(record.history, self.affinity)
            atomic_write_text(staging / AFFINITY, json.dumps(doc, indent=2))
            self.say(format_affinity(doc))
        summary = {
            "best_epoch": record.best_epoch,
            "monitor": self.t.monitor,
            "best": record.best_metrics,
            "history": [{k: v for k, v in h.items() if k != "event"} for h in record.history],
        }
        atomic_write_text(staging / METRICS, json.dumps(summary, indent=2))
        self.meta["best_epoch"] = record.best_epoch
        self.timings["post_loop_s"] = time.perf_counter() - self.finish_t0
        self.meta["timings"] = dict(self.timings)
        atomic_write_text(staging / META, json.dumps(self.meta, indent=2))


def _check_resumable(
    state: dict[str, Any], staging: Path, config: Config, pre: Preprocessor, mode: str, ctx: DistContext
) -> None:
    """Refuses to resume on other data, preprocessing or process layout than the saved run."""
    if state.get("world_size", 1) != ctx.world_size or state.get("data_mode", mode) != mode:
        raise ConfigError(
            f"{staging}: the run was trained with {state.get('world_size', 1)} process(es) in "
            f"{state.get('data_mode')} mode; resume it the same way (now {ctx.world_size}, {mode})"
        )

    saved = Preprocessor.load(config.schema, staging / PREPROCESS)
    same = saved.vocabs.keys() == pre.vocabs.keys() and all(saved.vocabs[k].equals(pre.vocabs[k]) for k in pre.vocabs)
    same = same and json.dumps(saved.dense_stats, sort_keys=True) == json.dumps(pre.dense_stats, sort_keys=True)
    if not same:
        raise DataError(
            f"{config.data.train}: the training data no longer gives the preprocessing of the run being resumed "
            f"(vocabularies or statistics changed since {staging / PREPROCESS} was fitted)"
        )


def _import_in_background(name: str) -> threading.Thread | None:
    """Imports module ``name`` in a thread (``None`` if it is imported already): torch's
    optimisers import ``torch._dynamo`` when the first one is built, about a second of Python
    that runs here while the data is read and encoded (pyarrow releases the GIL), not after."""
    if name in sys.modules:
        return None

    def load() -> None:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S110 - the optimiser's own import then raises it where it belongs
            pass

    thread = threading.Thread(target=load, name="mtrec-import", daemon=True)
    thread.start()
    return thread


def _encoding(s: Any) -> tuple[Any, ...]:
    """What of a list feature its encoding depends on (not its pooling, a model choice)."""
    return (s.name, s.max_len, s.vocab_from, s.min_freq)


def _compile_backbones(model: nn.Module) -> None:
    """``torch.compile`` the backbones (experts, gates) in place, leaving the embedding eager.

    Inductor cannot compile the sparse embedding gradient, and the backbone is where the
    time goes. Replacing the bound ``forward`` keeps parameter names (and so the saved
    weights) unchanged.
    """
    for module in model.modules():
        if isinstance(module, MultiTaskModel):
            module.backbone.forward = torch.compile(module.backbone.forward)


def _ranks(ctx: DistContext) -> str:
    return f" on {ctx.world_size} ranks" if ctx.enabled else ""


def _total_steps(batches: Any, epochs: int) -> int:
    """Training steps of a whole run of ``epochs`` epochs (what ``lr_decay`` decays over)."""
    return sum(batches.num_batches(epoch) for epoch in range(1, epochs + 1))


def _predict_valid(
    model: nn.Module,
    valid: TensorColumns,
    task_names: tuple[str, ...],
    batch_size: int,
    device: torch.device,
    ctx: DistContext,
) -> dict[str, np.ndarray]:
    """Validation logits of every row; under DDP each rank predicts a slice and all gather."""
    if not ctx.enabled:
        return predict_logits(model, valid, task_names, batch_size=batch_size, device=device)
    lo, hi = shard_bounds(valid.num_rows, ctx)
    local = predict_logits(model, TensorColumns(valid.slice(lo, hi)), task_names, batch_size=batch_size, device=device)
    return {name: gather_rows(z, ctx) for name, z in local.items()}


class _MemoryBatches:
    """Encoded training rows held in memory, served in a fresh random order each epoch.

    On CUDA, when the columns take at most ``gpu_share`` of the free GPU memory, they are
    copied to the GPU once and every batch is an index gather there (``resident``).
    """

    def __init__(
        self,
        encoded: EncodedColumns,
        batch_size: int,
        generator: torch.Generator,
        *,
        device: torch.device,
        gpu_share: float,
    ) -> None:
        self.columns = TensorColumns.from_encoded(encoded)
        self.batch_size = batch_size
        self.generator = generator
        self.resident = False
        if device.type == "cuda" and gpu_share > 0:
            free, _ = torch.cuda.mem_get_info(device)
            if encoded.nbytes <= gpu_share * free:
                self.columns = self.columns.to(device)
                self.resident = True

    def num_batches(self, epoch: int) -> int:
        return self.columns.num_batches(self.batch_size)

    def iter_batches(self, epoch: int) -> Iterator[Batch]:
        return self.columns.iter_batches(self.batch_size, shuffle=True, generator=self.generator)


def _masked_loss(
    logits: dict[str, np.ndarray],
    labels: np.ndarray,
    mask: np.ndarray,
    tasks: Any,
    weights: np.ndarray | None,
    normalization: str = "sample_space",
) -> float:
    total, _ = multitask_loss(
        {name: torch.from_numpy(z) for name, z in logits.items()},
        torch.from_numpy(labels),
        torch.from_numpy(mask),
        tasks,
        None if weights is None else torch.from_numpy(weights),
        normalization,
    )
    return float(total)
