"""Training: the loop, devices, early stopping, checkpoints, logs and progress."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from mtrec import __version__
from mtrec.batch import Batch
from mtrec.checkpoint import WEIGHTS, build_model, prepare_output, save_model_files, save_weights
from mtrec.config import Config
from mtrec.data.batches import TensorColumns
from mtrec.data.loading import (
    StreamingData,
    TrainingData,
    load_streaming_data,
    load_training_data,
    resolve_data_mode,
)
from mtrec.data.preprocess import EncodedColumns
from mtrec.data.streaming import ParquetStream
from mtrec.diagnostics import format_gates, gate_diagnostics
from mtrec.errors import ConfigError, MtrecError
from mtrec.evaluate import compute_metrics, predict_logits, summary_metric
from mtrec.files import atomic_write_text, finalize_dir
from mtrec.losses import multitask_loss, task_losses
from mtrec.weighting import create_weighting

__all__ = ["TrainResult", "make_optimizers", "native_bf16", "resolve_device", "resolve_precision", "train"]


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    output: Path
    best_epoch: int
    best_metrics: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but no CUDA device is available")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (fast)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Without AVX512-BF16 or AMX, bf16 matmuls are emulated and slower than fp32.
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training, or ``None`` for plain fp32."""
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return None
    return torch.bfloat16


def make_optimizers(model: nn.Module, config: Config) -> list[torch.optim.Optimizer]:
    """Adam (fused where supported) for dense weights, sparse Adam for embedding rows.

    Sparse Adam updates only the rows a batch touched, so its cost follows the batch, not
    the size of the tables (a dense Adam step over millions of embedding rows costs more
    than the whole MLP on a CPU).
    """
    t = config.train
    dense = model.dense_parameters()
    try:
        opt = torch.optim.Adam(dense, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(dense, lr=t.lr, weight_decay=t.weight_decay)
    optimizers: list[torch.optim.Optimizer] = [opt]
    sparse = model.embedding_parameters()
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=t.embedding_lr or t.lr))
    return optimizers


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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
        self.bar = None
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="step", file=stream, leave=False)
        self.enabled = enabled

    def update(self, step: int, rows: int, loss: float) -> None:
        elapsed = time.perf_counter() - self.start
        rate = rows / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step == self.total:
                self.bar.set_postfix(loss=f"{loss:.4f}", rows_s=f"{rate:,.0f}")
        elif self.enabled and (step % self.every == 0 or step == self.total):
            eta = elapsed / step * (self.total - step)
            print(
                f"epoch {self.epoch}/{self.epochs} step {step}/{self.total} loss {loss:.4f} "
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
) -> TrainResult:
    """Trains the model a config describes and writes its model directory.

    Args:
        config: A validated config (see :func:`mtrec.config.load_config`).
        output: Model directory; default ``config.output`` or ``runs/<model name>``.
        overwrite: Replace an existing directory (only once the new one is complete).
        progress: Show progress and per-epoch lines on ``stream``.
        stream: Where progress goes (default stderr).
        on_epoch: Called with each epoch's record.
    """
    stream = stream or sys.stderr
    out_dir = Path(output or config.output or f"runs/{config.model.name}")
    # A failed run leaves DIR.incomplete (with its log) and never touches DIR itself.
    staging = prepare_output(out_dir, overwrite=overwrite)
    try:
        return _train(config, out_dir, staging, progress, stream, on_epoch)
    except MtrecError:
        # Bad input: nothing worth keeping. (A crash keeps DIR.incomplete and its log.)
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _say(stream: TextIO, enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=stream, flush=True)


def _train(
    config: Config,
    out_dir: Path,
    staging: Path,
    progress: bool,
    stream: TextIO,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    t = config.train
    torch.set_num_threads(t.threads or os.cpu_count() or 1)
    generator = _seed_everything(t.seed)
    device = resolve_device(t.device)
    schema = config.schema
    tasks = schema.output_tasks
    task_names = tuple(t.name for t in tasks)

    t0 = time.perf_counter()
    d = config.data
    mode, size_mb = resolve_data_mode(d.mode, schema, d.train, d.memory_budget_mb)
    data: TrainingData | StreamingData
    if mode == "memory":
        data = load_training_data(schema, d.train, d.valid, valid_fraction=d.valid_fraction, seed=t.seed)
        batches: _MemoryBatches | ParquetStream = _MemoryBatches(data.train, t.batch_size, generator)
        train_rows = data.train.num_rows
        labelled, labelled_what = data.train, "training"
    else:
        data = load_streaming_data(
            schema,
            d.train,
            d.valid,
            valid_fraction=d.valid_fraction,
            seed=t.seed,
            batch_size=t.batch_size,
            shuffle_buffer=d.shuffle_buffer,
            read_ahead=d.read_ahead,
            num_workers=d.num_workers,
        )
        batches = data.train
        train_rows = data.train.total_rows
        # The training rows are never held at once; label statistics come from validation.
        labelled, labelled_what = data.valid, "validation"
    load_s = time.perf_counter() - t0
    layout = data.preprocessor.layout()
    how = (
        "read and encoded"
        if mode == "memory"
        else f"stream mode: encoded size ~{size_mb:,.0f} MiB, budget {d.memory_budget_mb:,.0f} MiB; fitted"
    )
    _say(
        stream,
        progress,
        f"data: {train_rows:,} training rows, {data.valid.num_rows:,} validation rows "
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
        _say(stream, progress, _fmt_correlations(correlations))

    torch.manual_seed(t.seed)
    try:
        model = build_model(config, layout).to(device)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    weighting_cfg = dict(t.loss_weighting)
    weighting = create_weighting(
        weighting_cfg.pop("name"), task_names, tuple(task.weight for task in tasks), **weighting_cfg
    ).to(device)
    optimizers = make_optimizers(model, config)
    if weighting.extra_parameters():
        # Own group without weight decay: decay would pull the log-variances towards 0.
        optimizers[0].add_param_group({"params": weighting.extra_parameters(), "weight_decay": 0.0})
    shared_params, last_shared = model.shared_parameters(), model.last_shared_parameters()
    n_params = sum(p.numel() for p in model.parameters())
    precision = "bf16 autocast" if resolve_precision(t.precision, device) is not None else "fp32"
    _say(stream, progress, f"model: {config.model.name}, {n_params:,} parameters, device {device}, {precision}")

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
        "label_correlations": correlations,
    }
    save_model_files(staging, config, data.preprocessor, meta)
    log_path = staging / "log.jsonl"
    log_fh = log_path.open("a")

    def log(record: dict[str, Any]) -> None:
        log_fh.write(json.dumps(record) + "\n")
        log_fh.flush()

    valid_cols = TensorColumns.from_encoded(data.valid)
    use_cuda = device.type == "cuda"
    amp_dtype = resolve_precision(t.precision, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else None
    dense_params = model.dense_parameters()

    history: list[dict[str, Any]] = []
    best_value: float | None = None
    best_epoch = 0
    best_metrics: dict[str, dict[str, Any]] = {}
    bad_epochs = 0
    higher_better = t.monitor == "mean_auc" or t.monitor.endswith((".auc", ".accuracy"))
    log({"event": "start", "config_model": config.model.name, "train_rows": train_rows, "time": time.time()})
    try:
        for epoch in range(1, t.epochs + 1):
            model.train()
            steps = batches.num_batches(epoch)
            bar = _Progress(steps, epoch, t.epochs, t.log_every, stream, progress)
            loss_sum = 0.0
            rows = 0
            epoch_task_loss = dict.fromkeys(task_names, 0.0)
            e0 = time.perf_counter()
            for step, batch in enumerate(batches.iter_batches(epoch), start=1):
                if use_cuda:
                    batch = batch.pin_memory().to(device, non_blocking=True)
                if autocast is not None:
                    with autocast:
                        logits = model(batch)
                else:
                    logits = model(batch)
                parts = task_losses(logits, batch.labels, batch.label_mask, tasks, batch.sample_weight)
                aux = model.auxiliary_loss(logits, batch)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss = weighting.backward(parts, shared=shared_params, last_shared=last_shared, extra=aux)
                for name, part in parts.items():
                    epoch_task_loss[name] += float(part.detach()) * len(batch)
                if t.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(dense_params, t.grad_clip)
                for opt in optimizers:
                    opt.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise MtrecError(
                        f"training diverged at epoch {epoch} step {step} (loss {value}); "
                        "lower train.lr or set train.grad_clip"
                    )
                loss_sum += value * len(batch)
                rows += len(batch)
                bar.update(step, rows, loss_sum / rows)
                if step % t.log_every == 0:
                    log({"event": "step", "epoch": epoch, "step": step, "loss": loss_sum / rows})
            bar.close()
            train_s = time.perf_counter() - e0
            weighting.epoch_end({name: value / max(rows, 1) for name, value in epoch_task_loss.items()})
            v0 = time.perf_counter()
            logits = predict_logits(model, valid_cols, task_names, batch_size=t.eval_batch_size, device=device)
            v = data.valid
            valid_loss = _masked_loss(logits, v.labels, v.label_mask, tasks, v.sample_weight)
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
            if on_epoch is not None:
                on_epoch(record)
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
                save_weights(model, staging / WEIGHTS)
            else:
                bad_epochs += 1
                if bad_epochs > t.patience:
                    _say(stream, progress, f"early stop: {t.monitor} has not improved for {bad_epochs} epochs")
                    break
        if best_epoch == 0:
            # The monitored metric was never defined (e.g. one class only): keep the last weights.
            best_epoch, best_metrics = len(history), history[-1]["valid"]
            save_weights(model, staging / WEIGHTS)
        # Diagnostics of the model that is saved: the best epoch's weights.
        model.load_state_dict(load_file(str(staging / WEIGHTS), device=str(device)))
        gates = gate_diagnostics(model, valid_cols, batch_size=t.eval_batch_size)
        if gates is not None:
            atomic_write_text(staging / "diagnostics.json", json.dumps({"gates": gates}, indent=2))
            _say(stream, progress, format_gates(gates))
        summary = {
            "best_epoch": best_epoch,
            "monitor": t.monitor,
            "best": best_metrics,
            "history": [{k: v for k, v in h.items() if k != "event"} for h in history],
        }
        atomic_write_text(staging / "metrics.json", json.dumps(summary, indent=2))
        meta["best_epoch"] = best_epoch
        atomic_write_text(staging / "meta.json", json.dumps(meta, indent=2))
        log({"event": "end", "best_epoch": best_epoch, "time": time.time()})
    finally:
        log_fh.close()
    finalize_dir(staging, out_dir)
    _say(stream, progress, f"best epoch {best_epoch}: {_fmt_metrics(best_metrics)}")
    _say(stream, progress, f"model saved to {out_dir}")
    return TrainResult(out_dir, best_epoch, best_metrics, history)


class _MemoryBatches:
    """Encoded training rows held in memory, served in a fresh random order each epoch."""

    def __init__(self, encoded: EncodedColumns, batch_size: int, generator: torch.Generator) -> None:
        self.columns = TensorColumns.from_encoded(encoded)
        self.batch_size = batch_size
        self.generator = generator

    def num_batches(self, epoch: int) -> int:
        return self.columns.num_batches(self.batch_size)

    def iter_batches(self, epoch: int) -> Iterator[Batch]:
        return self.columns.iter_batches(self.batch_size, shuffle=True, generator=self.generator)


def _masked_loss(
    logits: dict[str, np.ndarray], labels: np.ndarray, mask: np.ndarray, tasks: Any, weights: np.ndarray | None
) -> float:
    total, _ = multitask_loss(
        {name: torch.from_numpy(z) for name, z in logits.items()},
        torch.from_numpy(labels),
        torch.from_numpy(mask),
        tasks,
        None if weights is None else torch.from_numpy(weights),
    )
    return float(total)


def label_correlations(labels: np.ndarray, mask: np.ndarray, tasks: Any) -> dict[str, dict[str, float | None]]:
    """Pearson correlation of every pair of labels over the rows both tasks cover.

    It tells whether tasks are related enough to share (MMoE's advantage grows as they
    become less related). Multiclass labels are skipped; ``None`` where undefined.
    """
    names = [t.name for t in tasks if t.type != "multiclass"]
    cols = [j for j, t in enumerate(tasks) if t.type != "multiclass"]
    out: dict[str, dict[str, float | None]] = {}
    for a, ja in zip(names, cols, strict=True):
        out[a] = {}
        for b, jb in zip(names, cols, strict=True):
            both = mask[:, ja] & mask[:, jb]
            x, y = labels[both, ja].astype(np.float64), labels[both, jb].astype(np.float64)
            if both.sum() < 2 or x.std() == 0 or y.std() == 0:
                out[a][b] = None
            else:
                out[a][b] = float(np.corrcoef(x, y)[0, 1])
    return out


def _fmt_correlations(corr: dict[str, dict[str, float | None]]) -> str:
    names = list(corr)
    width = max(len(n) for n in names)
    lines = ["label correlation (rows both tasks cover):", " " * (width + 2) + "  ".join(f"{n:>8s}" for n in names)]
    for a in names:
        cells = "  ".join("     n/a" if corr[a][b] is None else f"{corr[a][b]:8.3f}" for b in names)
        lines.append(f"  {a:<{width}s}{cells}")
    return "\n".join(lines)
