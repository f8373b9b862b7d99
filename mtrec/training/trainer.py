"""The training run: data, the loop, early stopping, resume state, logs, progress and the model directory."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from mtrec._version import __version__
from mtrec.batch import Batch
from mtrec.checkpoint import (
    RESUME,
    WEIGHTS,
    build_model,
    check_state_tensors,
    claim_model_dir,
    commit_model_dir,
    has_resume_state,
    load_resume_state,
    save_model_files,
    save_resume_state,
    save_weights,
)
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
from mtrec.evaluate import compute_metrics, predict_logits, summary_metric
from mtrec.files import atomic_write_text, is_sealed, output_path, remove_owned, staging_dir
from mtrec.models.base import MultiTaskModel
from mtrec.training.distributed import (
    DistContext,
    all_reduce_array,
    all_reduce_grads,
    barrier,
    broadcast_parameters,
    check_loss_weighting,
    check_same,
    fail_fast,
    gather_rows,
    global_mean_scale,
    init_distributed,
    shard_bounds,
    shutdown,
    sync_sparse_grads,
    wrap_model,
)
from mtrec.training.labels import format_correlations, label_correlations
from mtrec.training.losses import multitask_loss, task_losses
from mtrec.training.optim import make_lr_schedulers, make_optimizers
from mtrec.training.policy import resolve_device, resolve_embedding_optimizer, resolve_precision
from mtrec.training.profiling import STEP_RANGE
from mtrec.weighting import create_weighting

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    output: Path
    best_epoch: int
    best_metrics: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]


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


def _fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt_metrics(metrics: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, m in metrics.items():
        if "auc" in m:
            parts.append(f"{name} auc {m['auc']:.4f}" if m["auc"] is not None else f"{name} auc n/a")
        elif "rmse" in m:
            parts.append(f"{name} rmse {m['rmse']:.4f}")
        elif "accuracy" in m:
            parts.append(f"{name} acc {m['accuracy']:.4f}")
    return ", ".join(parts)


class _Progress:
    """A tqdm bar on a terminal, plain periodic lines otherwise."""

    def __init__(self, total: int, epoch: int, epochs: int, every: int, stream: TextIO, enabled: bool) -> None:
        self.total, self.epoch, self.epochs, self.every = total, epoch, epochs, every
        self.stream = stream
        self.start = time.perf_counter()
        self.shown = self.start
        self.bar = None
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="step", file=stream, leave=False)
        self.enabled = enabled

    def update(self, step: int, rows: int, loss: Callable[[], float]) -> None:
        """Moves the bar to ``step``; ``loss()`` (a host read of a device value) is called
        only when the loss is shown: every ``every`` steps, or every 0.5 s on a terminal."""
        now = time.perf_counter()
        elapsed = now - self.start
        rate = rows / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if now - self.shown >= 0.5 or step == self.total:
                self.shown = now
                self.bar.set_postfix(loss=f"{loss():.4f}", rows_s=f"{rate:,.0f}")
        elif self.enabled and (step % self.every == 0 or step == self.total):
            eta = elapsed / step * (self.total - step)
            print(
                f"epoch {self.epoch}/{self.epochs} step {step}/{self.total} loss {loss():.4f} "
                f"rows/s {rate:,.0f} eta {_fmt_seconds(eta)}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
                    return _train(
                        config, out_dir, staging, progress and ctx.is_main, stream, on_epoch, ctx, device, state
                    )
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


def _say(stream: TextIO, enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=stream, flush=True)


def _train(
    config: Config,
    out_dir: Path,
    staging: Path | None,
    progress: bool,
    stream: TextIO,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    ctx: DistContext,
    device: torch.device,
    resume: dict[str, Any] | None,
) -> TrainResult:
    t = config.train
    # Ranks on one machine share its cores.
    torch.set_num_threads(t.threads or max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    generator = _seed_everything(t.seed)
    schema = config.schema
    tasks = schema.output_tasks
    task_names = tuple(t.name for t in tasks)

    t0 = time.perf_counter()
    d = config.data
    mode, size_mb = resolve_data_mode(d.mode, schema, d.train, d.memory_budget_mb)
    if ctx.enabled:
        mode = "stream"  # each rank reads its own share of the row groups
    data: TrainingData | StreamingData
    if mode == "memory":
        data = load_training_data(schema, d.train, d.valid, valid_fraction=d.valid_fraction, seed=t.seed)
        batches: _MemoryBatches | ParquetStream = _MemoryBatches(
            data.train, t.batch_size, generator, device=device, gpu_share=t.gpu_data_share
        )
        train_rows = data.train.num_rows
        labelled, labelled_what = data.train, "training"
    else:
        data = load_streaming_data(
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
        )
        batches = data.train
        train_rows = data.train.total_rows
        # The training rows are never held at once; label statistics come from validation.
        labelled, labelled_what = data.valid, "validation"
    load_s = time.perf_counter() - t0
    layout = data.preprocessor.layout()
    check_same(dataclasses.asdict(layout), ctx, "the fitted preprocessing (input layout)")
    how = (
        "read and encoded"
        if mode == "memory"
        else f"stream mode: encoded size ~{size_mb:,.0f} MiB, budget {d.memory_budget_mb:,.0f} MiB; fitted"
    )
    _say(
        stream,
        progress,
        f"data: {train_rows:,} training rows{_ranks(ctx)}, {data.valid.num_rows:,} validation rows "
        f"({how} in {load_s:.1f}s); embedding rows {sum(layout.table_sizes):,}",
    )
    for j, task in enumerate(tasks):
        space = labelled.label_mask[:, j]
        rate = float(labelled.labels[space, j].mean()) if space.any() else float("nan")
        what = "positive rate" if task.type == "binary" else "mean label"
        _say(
            stream,
            progress,
            f"task {task.name}: {int(space.sum()):,} {labelled_what} rows in its sample space, {what} {rate:.4f}",
        )

    correlations = label_correlations(labelled.labels, labelled.label_mask, tasks)
    if len(correlations) > 1:
        _say(stream, progress, format_correlations(correlations))

    torch.manual_seed(t.seed)
    try:
        model = build_model(config, layout).to(device)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"model: {str(exc).splitlines()[0]}") from None
    weighting_cfg = dict(t.loss_weighting)
    weighting = create_weighting(
        weighting_cfg.pop("name"), task_names, tuple(task.weight for task in tasks), **weighting_cfg
    ).to(device)
    table_values = sum(table.numel() for table in model.embedding_tables())
    embedding_optimizer = resolve_embedding_optimizer(t.embedding_optimizer, device, table_values, ctx.world_size)
    model.use_sparse_embedding_grads(embedding_optimizer == "sparse")
    # DDP for the dense weights (and a table with dense gradients); a table with sparse
    # gradients is kept out of DDP and averaged by sync_sparse_grads (see mtrec.training.distributed).
    replica = wrap_model(model, ctx, device)
    broadcast_parameters(weighting, ctx)
    embedding_params = model.embedding_parameters()
    optimizers = make_optimizers(model, config)
    if weighting.extra_parameters():
        # Own group without weight decay: decay would pull the log-variances towards 0.
        optimizers[0].add_param_group({"params": weighting.extra_parameters(), "weight_decay": 0.0})
    # Per-step warm-up and decay of every optimiser's rates (none by default); built after the
    # last param group is added, as LambdaLR records each group's base rate.
    schedulers = make_lr_schedulers(
        optimizers,
        warmup_steps=t.warmup_steps,
        decay=t.lr_decay,
        total_steps=_total_steps(batches, t.epochs) if t.lr_decay != "none" else 0,
        min_lr_ratio=t.min_lr_ratio,
    )
    shared_params, last_shared = model.shared_parameters(), model.last_shared_parameters()
    n_params = sum(p.numel() for p in model.parameters())
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}[
        resolve_precision(t.precision, device)
    ]
    where = ", training data resident on the GPU" if getattr(batches, "resident", False) else ""
    compiled = ", torch.compile" if t.compile else ""
    _say(
        stream,
        progress,
        f"model: {config.model.name}, {n_params:,} parameters, device {device}, {precision}, "
        f"{embedding_optimizer} embedding gradients{compiled}{where}",
    )

    meta = {
        "mtrec_version": __version__,
        "torch_version": torch.__version__,
        "model": config.model.name,
        "task_names": list(task_names),
        "layout": dataclasses.asdict(layout),
        "train_rows": train_rows,
        "data_mode": mode,
        "valid_rows": data.valid.num_rows,
        "train_files": [str(p) for p in data.train_files],
        "precision": precision,
        "embedding_optimizer": embedding_optimizer,
        "label_correlations": correlations,
    }
    log_fh: TextIO | None = None
    if resume is not None:
        # SparseAdam and LazyAdam keep the same state (step, exp_avg, exp_avg_sq), so a run
        # may continue with the other embedding update (e.g. on a GPU after a CPU start).
        _check_resumable(resume, staging_dir(out_dir), config, data.preprocessor, mode, ctx)
    elif staging is not None:  # rank 0 writes the model directory and its log
        save_model_files(staging, config, data.preprocessor, meta)
    if staging is not None:
        log_fh = (staging / "log.jsonl").open("a")

    def log(record: dict[str, Any]) -> None:
        if log_fh is not None:
            log_fh.write(json.dumps(record) + "\n")
            log_fh.flush()

    valid_cols = TensorColumns.from_encoded(data.valid)
    if t.compile:
        _compile_backbones(model)
    forward = replica
    amp_dtype = resolve_precision(t.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else None
    dense_params = model.dense_parameters()  # what grad_clip clips (never the table)

    history: list[dict[str, Any]] = []
    best_value: float | None = None
    best_epoch = 0
    best_metrics: dict[str, dict[str, Any]] = {}
    bad_epochs = 0
    first_epoch = 1
    if resume is not None:
        # load_resume_state checked the structure; whether it fits this model is known only here.
        saved = staging_dir(out_dir) / RESUME
        check_state_tensors(model.state_dict(), resume["model"], saved)
        try:
            model.load_state_dict(resume["model"])
            for opt, state in zip(optimizers, resume["optimizers"], strict=True):
                opt.load_state_dict(state)
            saved_schedulers = resume.get("schedulers") or []
            if len(saved_schedulers) != len(schedulers):
                raise ValueError(
                    f"{len(saved_schedulers)} learning-rate scheduler state(s) saved, {len(schedulers)} configured"
                )
            for scheduler, state in zip(schedulers, saved_schedulers, strict=True):
                scheduler.load_state_dict(state)
            weighting.load_state_dict(resume["weighting"])
            generator.set_state(resume["generator"])
            if scaler is not None and resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
            torch.set_rng_state(resume["torch_rng"])
            if device.type == "cuda" and resume["cuda_rng"] is not None:
                torch.cuda.set_rng_state(torch.as_tensor(resume["cuda_rng"][ctx.rank]), device)
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"{saved}: the resume state does not fit the model or optimizers ({first})") from None
        history = list(resume["history"])
        best_value, best_epoch = resume["best_value"], resume["best_epoch"]
        best_metrics, bad_epochs = resume["best_metrics"], resume["bad_epochs"]
        # A run that had already stopped early (and was interrupted while finishing) stays stopped.
        first_epoch = resume["epoch"] + 1 if bad_epochs <= t.patience else t.epochs + 1
        if best_epoch == resume["epoch"] and staging is not None:
            save_weights(model, staging / WEIGHTS)  # the state's own weights are the best ones
        _say(stream, progress, f"resuming after epoch {resume['epoch']} (best epoch so far {best_epoch})")
        log({"event": "resume", "after_epoch": resume["epoch"], "time": time.time()})
    else:
        log({"event": "start", "config_model": config.model.name, "train_rows": train_rows, "time": time.time()})
    higher_better = t.monitor == "mean_auc" or t.monitor.endswith((".auc", ".accuracy"))
    try:
        for epoch in range(first_epoch, t.epochs + 1):
            model.train()
            steps = batches.num_batches(epoch)
            bar = _Progress(steps, epoch, t.epochs, t.log_every, stream, progress)
            # Loss sums stay on the device: reading them (a host sync that stalls the GPU
            # queue) happens only where a progress line or log record needs them.
            sums = _LossSums(task_names, device)
            e0 = time.perf_counter()
            source = batches.iter_batches(epoch)
            if not getattr(batches, "resident", False):  # resident batches are already on the GPU
                source = prefetch_to_device(source, device)
            step = 0
            for step, batch in enumerate(source, start=1):
                with torch.profiler.record_function(STEP_RANGE):  # see mtrec.training.profiling
                    if autocast is not None:
                        with autocast:
                            logits = forward(batch)
                    else:
                        logits = forward(batch)
                    parts = task_losses(
                        logits, batch.labels, batch.label_mask, tasks, batch.sample_weight, t.loss_normalization
                    )
                    if ctx.enabled:
                        # Each task's loss becomes the mean over all ranks' rows of its sample space
                        # (impressions: the sum over them divided by the global batch's rows).
                        scale = global_mean_scale(_loss_denominators(batch, t.loss_normalization), ctx)
                        scale = scale.to(torch.float32)
                        parts = {name: part * scale[j] for j, (name, part) in enumerate(parts.items())}
                    aux = model.auxiliary_loss(logits, batch)
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    if scaler is None:
                        loss = weighting.backward(parts, shared=shared_params, last_shared=last_shared, extra=aux)
                    else:
                        # fp16: the objective is linear in the losses (fixed/dwa weighting), so
                        # scaling each loss is scaling the objective, as GradScaler.scale does.
                        factor = scaler.scale(torch.ones((), device=device))
                        scaled = {name: part * factor for name, part in parts.items()}
                        extra = None if aux is None else aux * factor
                        loss = weighting.backward(scaled, shared=shared_params, last_shared=last_shared, extra=extra)
                        loss = loss / factor
                    sync_sparse_grads(embedding_params, ctx)
                    all_reduce_grads(weighting.extra_parameters(), ctx)
                    sums.add(loss, parts, len(batch))
                    if scaler is not None:
                        for opt in optimizers:
                            scaler.unscale_(opt)
                    if t.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(dense_params, t.grad_clip)
                    if scaler is None:
                        for opt in optimizers:
                            opt.step()
                    else:
                        for opt in optimizers:
                            scaler.step(opt)  # skipped when a gradient overflowed
                        scaler.update()
                    for scheduler in schedulers:  # host arithmetic only: no device read
                        scheduler.step()
                bar.update(step, sums.rows, functools.partial(sums.mean_loss, epoch, step))
                if step % t.log_every == 0:
                    log({"event": "step", "epoch": epoch, "step": step, "loss": sums.mean_loss(epoch, step)})
            loss_sum, rows = sums.loss_sum(epoch, step), sums.rows
            epoch_task_loss = sums.task_sums()
            bar.close()
            train_s = time.perf_counter() - e0
            if ctx.enabled:  # every rank logs and balances with the totals of all ranks
                totals = all_reduce_array([loss_sum, rows, *epoch_task_loss.values()], ctx)
                loss_sum, rows = float(totals[0]), int(totals[1])
                epoch_task_loss = {name: float(v) for name, v in zip(task_names, totals[2:], strict=True)}
            weighting.epoch_end({name: value / max(rows, 1) for name, value in epoch_task_loss.items()})
            v0 = time.perf_counter()
            logits = _predict_valid(model, valid_cols, task_names, t.eval_batch_size, device, ctx)
            v = data.valid
            valid_loss = _masked_loss(logits, v.labels, v.label_mask, tasks, v.sample_weight, t.loss_normalization)
            metrics = compute_metrics(logits, v.labels, v.label_mask, tasks, v.sample_weight)
            valid_s = time.perf_counter() - v0
            value = summary_metric(metrics, t.monitor, valid_loss)
            improved = value is not None and (
                best_value is None or (value > best_value if higher_better else value < best_value)
            )
            record = {
                "event": "epoch",
                "epoch": epoch,
                "train_loss": loss_sum / max(rows, 1),
                "train_task_loss": {name: value / max(rows, 1) for name, value in epoch_task_loss.items()},
                "task_weights": weighting.weights(),
                "valid_loss": valid_loss,
                "valid": metrics,
                "monitor": t.monitor,
                "monitor_value": value,
                "improved": improved,
                "train_seconds": train_s,
                "valid_seconds": valid_s,
                "rows_per_second": rows / train_s if train_s > 0 else None,
            }
            history.append(record)
            log(record)
            mark = " *" if improved else ""
            _say(
                stream,
                progress,
                f"epoch {epoch}/{t.epochs}: train loss {record['train_loss']:.4f}, valid loss {valid_loss:.4f}, "
                f"{_fmt_metrics(metrics)}, {rows / train_s:,.0f} rows/s, {train_s:.1f}s{mark}",
            )
            if improved:
                best_value, best_epoch, best_metrics = value, epoch, metrics
                bad_epochs = 0
            else:
                bad_epochs += 1
            # Every rank's own CUDA generator (a collective: called on all ranks).
            cuda_rng = (
                gather_rows(torch.cuda.get_rng_state(device).numpy()[None], ctx) if device.type == "cuda" else None
            )
            if staging is not None:
                # Everything needed to continue after this epoch as if never interrupted.
                save_resume_state(
                    staging,
                    {
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizers": [opt.state_dict() for opt in optimizers],
                        "schedulers": [scheduler.state_dict() for scheduler in schedulers],
                        "weighting": weighting.state_dict(),
                        "generator": generator.get_state(),
                        "scaler": None if scaler is None else scaler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": None if cuda_rng is None else torch.from_numpy(cuda_rng),
                        "world_size": ctx.world_size,
                        "data_mode": mode,
                        "embedding_optimizer": embedding_optimizer,
                        "best_value": best_value,
                        "best_epoch": best_epoch,
                        "best_metrics": best_metrics,
                        "bad_epochs": bad_epochs,
                        "history": history,
                    },
                )
            if improved and staging is not None:
                # After the resume state: a crash in between leaves a state whose best epoch is
                # its own epoch, and resuming rewrites the best weights from it.
                save_weights(model, staging / WEIGHTS)
            if on_epoch is not None:
                on_epoch(record)
            if bad_epochs > t.patience:
                _say(stream, progress, f"early stop: {t.monitor} has not improved for {bad_epochs} epochs")
                break
        if best_epoch == 0:
            # The monitored metric was never defined (e.g. one class only): keep the last weights.
            best_epoch, best_metrics = len(history), history[-1]["valid"]
            if staging is not None:
                save_weights(model, staging / WEIGHTS)
        if staging is not None:
            _finish_dir(
                staging,
                model,
                valid_cols,
                device,
                t.eval_batch_size,
                meta,
                best_epoch,
                best_metrics,
                history,
                t.monitor,
                stream,
                progress,
            )
        log({"event": "end", "best_epoch": best_epoch, "time": time.time()})
    finally:
        if log_fh is not None:
            log_fh.close()
    if staging is not None:
        commit_model_dir(staging, out_dir)
    # Every rank returns only once the model directory exists.
    barrier(ctx)
    _say(stream, progress, f"best epoch {best_epoch}: {_fmt_metrics(best_metrics)}")
    _say(stream, progress, f"model saved to {out_dir}")
    return TrainResult(out_dir, best_epoch, best_metrics, history)


def _finish_dir(
    staging: Path,
    model: nn.Module,
    valid_cols: TensorColumns,
    device: torch.device,
    eval_batch_size: int,
    meta: dict[str, Any],
    best_epoch: int,
    best_metrics: dict[str, dict[str, Any]],
    history: list[dict[str, Any]],
    monitor: str,
    stream: TextIO,
    progress: bool,
) -> None:
    """Rank 0: gate diagnostics of the saved (best) weights, metrics.json and meta.json."""
    best = load_file(str(staging / WEIGHTS), device=str(device))
    check_state_tensors(model.state_dict(), best, staging / WEIGHTS)
    model.load_state_dict(best)
    gates = gate_diagnostics(model, valid_cols, batch_size=eval_batch_size)
    if gates is not None:
        atomic_write_text(staging / "diagnostics.json", json.dumps({"gates": gates}, indent=2))
        _say(stream, progress, format_gates(gates))
    summary = {
        "best_epoch": best_epoch,
        "monitor": monitor,
        "best": best_metrics,
        "history": [{k: v for k, v in h.items() if k != "event"} for h in history],
    }
    atomic_write_text(staging / "metrics.json", json.dumps(summary, indent=2))
    meta["best_epoch"] = best_epoch
    atomic_write_text(staging / "meta.json", json.dumps(meta, indent=2))


def _check_resumable(
    state: dict[str, Any], staging: Path, config: Config, pre: Preprocessor, mode: str, ctx: DistContext
) -> None:
    """Refuses to resume on other data, preprocessing or process layout than the saved run."""
    if state.get("world_size", 1) != ctx.world_size or state.get("data_mode", mode) != mode:
        raise ConfigError(
            f"{staging}: the run was trained with {state.get('world_size', 1)} process(es) in "
            f"{state.get('data_mode')} mode; resume it the same way (now {ctx.world_size}, {mode})"
        )

    saved = Preprocessor.load(config.schema, staging / "preprocess")
    same = saved.vocabs.keys() == pre.vocabs.keys() and all(saved.vocabs[k].equals(pre.vocabs[k]) for k in pre.vocabs)
    same = same and json.dumps(saved.dense_stats, sort_keys=True) == json.dumps(pre.dense_stats, sort_keys=True)
    if not same:
        raise DataError(
            f"{config.data.train}: the training data no longer gives the preprocessing of the run being resumed "
            f"(vocabularies or statistics changed since {staging / 'preprocess'} was fitted)"
        )


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


def _space_weights(batch: Batch) -> torch.Tensor:
    """``(T,)`` the denominators of the task means of a batch (rows, or sample-weight sums)."""
    if batch.sample_weight is None:
        return batch.label_mask.sum(0).to(torch.float64)
    return torch.where(batch.label_mask, batch.sample_weight, 0.0).sum(0).to(torch.float64)


def _loss_denominators(batch: Batch, normalization: str) -> torch.Tensor:
    """``(T,)`` what each task's loss of this rank's batch was divided by (see :mod:`mtrec.training.losses`):
    the sample-space weights, or the batch rows for every task (``impressions``), which
    :func:`mtrec.training.distributed.global_mean_scale` turns into the global batch's."""
    if normalization == "impressions":
        rows = float(len(batch))  # a host number: no device read
        return torch.full(batch.label_mask.shape[1:], rows, dtype=torch.float64, device=batch.labels.device)
    return _space_weights(batch)


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
