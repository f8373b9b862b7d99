"""Encoded columns as tensors, and batches as slices or index gathers of them.

There is no per-row ``__getitem__`` and no collate: a training batch is one
``index_select`` per column with a slice of a fresh permutation, an evaluation batch
is a view.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

from mtrec.batch import Batch
from mtrec.data.preprocess import EncodedColumns

__all__ = ["TensorColumns", "prefetch_to_device", "run_ahead"]

T = TypeVar("T")


class TensorColumns:
    """All rows of a dataset as column tensors (on CPU or on a device).

    Example:
        >>> import numpy as np
        >>> enc = EncodedColumns(np.zeros((5, 2), np.int64), np.zeros((5, 1), np.float32), [],
        ...                      np.zeros((5, 0), np.int64), np.zeros((5, 1), np.float32), np.ones((5, 1), bool))
        >>> cols = TensorColumns.from_encoded(enc)
        >>> [len(b) for b in cols.iter_batches(2)]
        [2, 2, 1]
    """

    def __init__(self, batch: Batch) -> None:
        self.all = batch

    @classmethod
    def from_encoded(cls, enc: EncodedColumns) -> TensorColumns:
        """Wraps numpy columns without copying."""
        return cls(
            Batch(
                torch.from_numpy(enc.sparse),
                torch.from_numpy(enc.dense),
                tuple(torch.from_numpy(s) for s in enc.sequences),
                torch.from_numpy(enc.seq_lengths),
                torch.from_numpy(enc.labels),
                torch.from_numpy(enc.label_mask),
                None if enc.sample_weight is None else torch.from_numpy(enc.sample_weight),
            )
        )

    @property
    def num_rows(self) -> int:
        return len(self.all)

    def to(self, device: torch.device | str) -> TensorColumns:
        """Copies every column to ``device``."""
        return TensorColumns(self.all.to(device))

    def gather(self, index: torch.Tensor) -> Batch:
        """Rows at ``index`` (1-D int64 on the columns' device)."""
        a = self.all
        return Batch(
            a.sparse.index_select(0, index),
            a.dense.index_select(0, index),
            tuple(s.index_select(0, index) for s in a.sequences),
            a.seq_lengths.index_select(0, index),
            a.labels.index_select(0, index),
            a.label_mask.index_select(0, index),
            None if a.sample_weight is None else a.sample_weight.index_select(0, index),
        )

    def slice(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` as views."""
        a = self.all
        return Batch(
            a.sparse[start:stop],
            a.dense[start:stop],
            tuple(s[start:stop] for s in a.sequences),
            a.seq_lengths[start:stop],
            a.labels[start:stop],
            a.label_mask[start:stop],
            None if a.sample_weight is None else a.sample_weight[start:stop],
        )

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        """Number of batches :meth:`iter_batches` yields."""
        n = self.num_rows
        return n // batch_size if drop_last else -(-n // batch_size)

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Yields batches in order (views) or in a fresh random order (gathers)."""
        n = self.num_rows
        stop = n - n % batch_size if drop_last else n
        if not shuffle:
            for start in range(0, stop, batch_size):
                yield self.slice(start, min(start + batch_size, n))
            return
        order = torch.randperm(n, generator=generator).to(self.all.labels.device)
        for start in range(0, stop, batch_size):
            yield self.gather(order[start : start + batch_size])


def run_ahead(items: Iterable[T], depth: int, *, name: str) -> Iterator[T]:
    """Runs ``items`` in a background thread, at most ``depth`` items ahead of the consumer.

    Exceptions in the thread are re-raised in the consumer; closing this generator stops
    the thread (after the item it is producing) and closes ``items``.
    """
    source = iter(items)
    slots: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def put(kind: str, value: object) -> bool:
        while not stop.is_set():
            try:
                slots.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in source:
                if not put("item", item):
                    return
            put("done", None)
        except BaseException as exc:  # noqa: BLE001 - handed over to the consumer, which re-raises it
            put("error", exc)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # e.g. a stream's own reader

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "item":
                yield value  # type: ignore[misc]
            elif kind == "error":
                raise value  # type: ignore[misc]
            else:
                return
    finally:
        stop.set()
        thread.join()


def prefetch_to_device(batches: Iterable[Batch], device: torch.device, *, depth: int = 2) -> Iterator[Batch]:
    """Batches copied to a CUDA device ahead of use; on other devices, ``batches`` as they are.

    A background thread (:func:`run_ahead`) pins each batch and copies it with
    ``non_blocking=True`` on a side CUDA stream, up to ``depth`` batches ahead, so
    host-to-device copies overlap the training step. The consumer's stream waits on each
    copy's event before using it, and the tensors are marked as used by that stream so the
    allocator never reuses them early.
    """
    if device.type != "cuda":
        yield from batches
        return
    copy_stream = torch.cuda.Stream(device)

    def copies() -> Iterator[tuple[Batch, torch.cuda.Event]]:
        source = iter(batches)
        try:
            with torch.cuda.stream(copy_stream):
                for batch in source:
                    moved = batch.pin_memory().to(device, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(copy_stream)
                    yield moved, done
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    for moved, done in run_ahead(copies(), depth, name="mtrec-prefetch"):
        current = torch.cuda.current_stream(device)
        current.wait_event(done)
        for tensor in moved.tensors():
            tensor.record_stream(current)
        yield moved
