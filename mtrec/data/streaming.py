"""Training data larger than memory: Parquet row groups streamed through a shuffle buffer.

The unit of work is one (file, row group) pair from the Parquet metadata. Every epoch:

1. all row groups are permuted with a generator seeded by ``(seed, epoch)``, identical on
   every rank;
2. the permuted row groups are dealt to the ranks, each to the rank with the fewest rows
   so far (ties: the lowest rank), so ranks get about the same number of rows; with
   DataLoader workers, a rank's share is dealt to its workers the same way;
3. each reader (the rank, or each worker) reads, filters (hold-out) and encodes its row
   groups in order, feeds the encoded rows to a shuffle buffer and emits batches of
   randomly permuted buffer rows.

Memory is bounded by the shuffle buffer plus the row groups read ahead, whatever the size
of the data. The number of steps per epoch, :meth:`ParquetStream.num_batches`, is known
from the metadata and the hold-out draws alone and is the same on every rank, so that
distributed training never waits on a rank that ran out of data.

Example:
    >>> stream = ParquetStream(paths, pre, batch_size=2048, seed=0, holdout=(0.1, 0))  # doctest: +SKIP
    >>> for epoch in range(1, 4):  # doctest: +SKIP
    ...     for batch in stream.iter_batches(epoch):
    ...         ...
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtrec.batch import Batch
from mtrec.data.batches import TensorColumns, run_ahead
from mtrec.data.parquet import _check_columns, open_parquet
from mtrec.data.preprocess import EncodedColumns, Preprocessor
from mtrec.errors import DataError
from mtrec.schema import Schema

__all__ = ["ParquetStream", "fit_preprocessor_stream", "holdout_draws", "iter_tables"]

# Tags that keep the generators of different purposes apart for the same (seed, epoch).
_ORDER_TAG = 0x6F72646572  # "order"
_SHUFFLE_TAG = 0x73687566  # "shuf"
# Open files kept per reader: enough for runs of row groups from a few files, far below
# any file-descriptor limit.
_OPEN_FILES = 4
_THREAD_NAME = "mtrec-parquet-read-ahead"


def _seed_entropy(*values: int) -> list[int]:
    # SeedSequence wants non-negative entropy; a negative seed keeps its 64-bit pattern.
    return [int(v) & 0xFFFF_FFFF_FFFF_FFFF for v in values]


def holdout_draws(seed: int, offset: int, n: int) -> np.ndarray:
    """Draws ``offset .. offset + n`` of ``np.random.default_rng(seed).random(total)``.

    The in-memory loader holds out ``default_rng(seed).random(total_rows) < fraction``
    over all rows of all files in file order; this returns the slice of that one stream
    of draws that belongs to the rows ``[offset, offset + n)`` without drawing the rows
    before them: PCG64 skips ahead in O(log offset) and every float64 draw consumes
    exactly one 64-bit output, so the values are bit-identical to the big call.

    Args:
        seed: The hold-out seed (``np.random.default_rng(seed)``).
        offset: Global index of the first row (rows of all files, in file order).
        n: Number of rows.

    Returns:
        ``(n,)`` float64 draws in ``[0, 1)``.
    """
    bits = np.random.PCG64(seed)
    bits.advance(offset)
    return np.random.Generator(bits).random(n)


@dataclass(frozen=True)
class _RowGroup:
    path: Path
    index: int  # row group in the file
    rows: int  # rows in the file's row group
    offset: int  # global row index of its first row (all files, in file order)
    kept: int  # rows kept after the hold-out, for the stream's ``keep``


@dataclass(frozen=True)
class _Failure:
    """A DataError raised in a DataLoader worker, sent as data: the DataLoader would wrap
    the exception in a multi-line traceback message."""

    message: str


def _describe(paths: Sequence[Path]) -> str:
    """How error messages name a list of files."""
    return str(paths[0]) if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more files)"


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


class _Reader:
    """Reads row groups, keeping a few files open; every failure is a one-line DataError."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self.files: OrderedDict[Path, pq.ParquetFile] = OrderedDict()

    def _file(self, path: Path, index: int) -> pq.ParquetFile:
        pf = self.files.get(path)
        if pf is not None:
            self.files.move_to_end(path)
            return pf
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: row group {index} cannot be read ({_reason(exc)})") from None
        self.files[path] = pf
        if len(self.files) > _OPEN_FILES:
            self.files.popitem(last=False)[1].close()
        return pf

    def read(self, path: Path, index: int, expected_rows: int) -> pa.Table:
        pf = self._file(path, index)
        if index >= pf.num_row_groups or pf.metadata.row_group(index).num_rows != expected_rows:
            # The hold-out masks and the step counts were planned from the old metadata.
            raise DataError(f"{path}: row group {index} changed since the stream was opened (file rewritten?)")
        try:
            return pf.read_row_group(index, columns=self.columns)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: row group {index} cannot be decoded ({_reason(exc)})") from None

    def close(self) -> None:
        for pf in self.files.values():
            pf.close()
        self.files.clear()


def _row_groups(paths: Sequence[Path], columns: Sequence[str]) -> list[tuple[Path, int, int]]:
    """``(file, row group, rows)`` of every file, from the metadata; checks the columns."""
    out: list[tuple[Path, int, int]] = []
    for path in paths:
        with open_parquet(path) as pf:
            _check_columns(path, pf, columns)
            md = pf.metadata
            out.extend((path, i, md.row_group(i).num_rows) for i in range(md.num_row_groups))
    return out


def _keep_mask(rg: _RowGroup, holdout: tuple[float, int], keep: str) -> np.ndarray:
    held = holdout_draws(holdout[1], rg.offset, rg.rows) < holdout[0]
    return held if keep == "holdout" else ~held


def iter_tables(
    paths: Sequence[Path],
    columns: Sequence[str],
    *,
    holdout: tuple[float, int] | None = None,
    keep: Literal["train", "holdout"] = "train",
) -> Iterator[pa.Table]:
    """Yields the rows of ``paths`` row group by row group, in file order, only ``columns``.

    Args:
        paths: Parquet files, in the order that defines the global row index.
        columns: Columns to read; every file must have them.
        holdout: ``(fraction, seed)``: drop (``keep="train"``) or keep only
            (``keep="holdout"``) the rows that :func:`mtrec.data.loading.load_training_data`
            holds out for validation with ``valid_fraction=fraction`` and ``seed``.
        keep: Which side of the hold-out to yield.

    Raises:
        DataError: One line naming the file (and row group) that cannot be read.
    """
    draws = np.random.default_rng(holdout[1]) if holdout is not None else None
    reader = _Reader(columns)
    try:
        for path, index, rows in _row_groups(paths, columns):
            table = reader.read(path, index, rows)
            if holdout is not None and draws is not None:
                # One generator in file order: the same draws as one call over all rows.
                held = draws.random(rows) < holdout[0]
                table = table.filter(pa.array(held if keep == "holdout" else ~held))
            yield table
    finally:
        reader.close()


def fit_preprocessor_stream(
    schema: Schema,
    paths: Sequence[Path],
    *,
    holdout: tuple[float, int] | None = None,
    source: str | None = None,
) -> Preprocessor:
    """Fits preprocessing on the training rows of ``paths`` without loading them.

    With ``holdout=(valid_fraction, seed)`` the rows that the in-memory path holds out for
    validation are skipped, so the result equals ``Preprocessor.fit`` in
    :func:`mtrec.data.loading.load_training_data` (vocabularies exactly, dense statistics
    to float rounding).

    Args:
        schema: Features and tasks.
        paths: Training files in order (as :func:`mtrec.data.parquet.resolve_paths` gives them).
        holdout: ``(fraction, seed)`` of the validation hold-out, or ``None`` for all rows.
        source: Names the data in error messages; default the file (or the first file).
    """
    if not paths:
        raise DataError("training data: no files")
    where = source or _describe(paths)
    columns = list(dict.fromkeys(schema.input_columns()))
    return Preprocessor.fit_stream(schema, iter_tables(paths, columns, holdout=holdout), source=where)


def _deal(items: Sequence[int], weights: Sequence[int], parts: int) -> list[list[int]]:
    """Deals ``items`` in order, each to the part with the least weight so far (ties: lowest part).

    Deterministic, so every rank computes every rank's share; the parts differ in weight
    by at most the largest item.
    """
    heap = [(0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for item in items:
        load, p = heapq.heappop(heap)
        out[p].append(item)
        heapq.heappush(heap, (load + weights[item], p))
    return out


class _ShuffleBuffer:
    """Encoded rows in, batches of randomly permuted rows out.

    Rows accumulate until the buffer holds at least ``max(capacity, batch_size)``; then
    the buffer is concatenated, permuted, and every full batch is emitted; the remainder
    (fewer than ``batch_size`` rows, already in random order) stays for the next round.
    ``drain(final=True)`` emits what is left, the last batch partial unless ``drop_last``.
    ``peak_rows`` is the most rows ever held: below ``max(capacity, batch_size)`` plus
    the largest chunk pushed.
    """

    def __init__(self, batch_size: int, capacity: int, rng: np.random.Generator, *, drop_last: bool) -> None:
        self.batch_size = batch_size
        self.threshold = max(capacity, batch_size)
        self.rng = rng
        self.drop_last = drop_last
        self.chunks: list[EncodedColumns] = []
        self.rows = 0
        self.peak_rows = 0

    def add(self, enc: EncodedColumns) -> None:
        if enc.num_rows:
            self.chunks.append(enc)
            self.rows += enc.num_rows
            self.peak_rows = max(self.peak_rows, self.rows)

    @property
    def ready(self) -> bool:
        return self.rows >= self.threshold

    def drain(self, *, final: bool = False) -> Iterator[Batch]:
        """Emits the full batches (all rows with ``final``) of a fresh permutation of the buffer."""
        if self.rows:
            yield from self._emit(final=final)

    def _emit(self, *, final: bool) -> Iterator[Batch]:
        enc = EncodedColumns.concat(self.chunks)
        self.chunks, self.rows = [], 0
        n, bs = enc.num_rows, self.batch_size
        order = self.rng.permutation(n)
        stop = n - n % bs if (not final or self.drop_last) else n
        if not final and stop < n:
            rest = enc.take(order[stop:])
            self.chunks, self.rows = [rest], rest.num_rows
        cols = TensorColumns.from_encoded(enc)
        index = torch.from_numpy(order)
        for start in range(0, stop, bs):
            # gather, never a slice: a view would keep (and, from a worker, send) the whole buffer.
            yield cols.gather(index[start : start + bs])


class _WorkerShares(IterableDataset):
    """One epoch of one rank, for a DataLoader: each worker streams its share of row groups."""

    def __init__(self, stream: ParquetStream, epoch: int, groups: list[int]) -> None:
        super().__init__()
        self.stream, self.epoch, self.groups = stream, epoch, groups

    def __iter__(self) -> Iterator[Batch | _Failure]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        share = self.stream._split(self.groups, workers)[worker]
        try:
            yield from self.stream._batches(self.epoch, share, worker=worker, workers=workers)
        except DataError as exc:
            yield _Failure(str(exc))


class ParquetStream:
    """Shuffled batches of encoded Parquet rows, streamed row group by row group.

    Args:
        paths: Parquet files in order (as :func:`mtrec.data.parquet.resolve_paths` gives
            them); the order defines the global row index the hold-out refers to.
        preprocessor: Fitted preprocessing (see :func:`fit_preprocessor_stream`).
        batch_size: Rows per batch.
        seed: Seed of the row-group order (with the epoch) and of the shuffle buffers (with
            the epoch, rank and worker).
        shuffle_buffer: Rows mixed at a time by each rank (split evenly between its
            DataLoader workers). Larger mixes better and costs memory.
        read_ahead: With ``num_workers == 0``: row groups a background thread reads and
            encodes ahead of training (0: read in the consumer, no thread). With workers:
            the DataLoader's ``prefetch_factor`` (batches per worker, at least 1).
        num_workers: DataLoader worker processes per rank (0: a thread, see ``read_ahead``).
        rank: This process's rank in ``[0, world_size)``.
        world_size: Number of ranks sharing the data.
        holdout: ``(fraction, seed)``: the rows that
            :func:`mtrec.data.loading.load_training_data` holds out for validation with
            ``valid_fraction=fraction`` and ``seed`` (the same rows exactly).
        keep: ``"train"`` streams the rows not held out, ``"holdout"`` the held-out ones
            (needs ``holdout``). For exact validation metrics use ``world_size=1`` (for
            example on rank 0 only): with several ranks, steps are equalised by cutting rows.
        drop_last: Each reader (the rank, or each of its workers) drops its final partial
            batch. Default: ``False`` for one rank, ``True`` for several.

    Raises:
        DataError: A file that is not Parquet or lacks a column, no rows to stream, a
            hold-out that keeps all or none of the rows, or fewer non-empty row groups
            than ranks.

    ``num_rows(epoch)`` and ``num_batches(epoch)`` take the epoch because the row groups
    are dealt to the ranks anew every epoch. ``num_batches`` is the same on every rank and
    is exactly what :meth:`iter_batches` yields.

    Example:
        >>> stream = ParquetStream([Path("clicks.parquet")], pre, batch_size=2048, seed=0)  # doctest: +SKIP
        >>> steps = stream.num_batches(epoch=1)  # doctest: +SKIP
        >>> for batch in stream.iter_batches(epoch=1):  # doctest: +SKIP
        ...     logits = model(batch.to(device))
    """

    def __init__(
        self,
        paths: Sequence[Path],
        preprocessor: Preprocessor,
        *,
        batch_size: int,
        seed: int,
        shuffle_buffer: int = 262_144,
        read_ahead: int = 2,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        holdout: tuple[float, int] | None = None,
        keep: Literal["train", "holdout"] = "train",
        drop_last: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 0 or read_ahead < 0 or num_workers < 0:
            raise ValueError("shuffle_buffer, read_ahead and num_workers must be >= 0")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if keep not in ("train", "holdout"):
            raise ValueError(f"keep must be 'train' or 'holdout', got {keep!r}")
        if keep == "holdout" and holdout is None:
            raise ValueError("keep='holdout' needs holdout=(fraction, seed)")
        if holdout is not None and not 0.0 < holdout[0] < 1.0:
            raise ValueError(f"holdout fraction must be in (0, 1), got {holdout[0]}")
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DataError("training data: no files")
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.read_ahead = read_ahead
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.holdout = holdout
        self.keep = keep
        self.drop_last = world_size > 1 if drop_last is None else drop_last
        self.columns = preprocessor.schema.read_columns()
        self.peak_buffered_rows = 0  # most rows in this process's shuffle buffer (num_workers == 0)

        where = _describe(self.paths)
        groups: list[_RowGroup] = []
        offset = 0
        draws = np.random.default_rng(holdout[1]) if holdout is not None else None
        held_total = 0
        for path, index, rows in _row_groups(self.paths, self.columns):
            kept = rows
            if holdout is not None and draws is not None:
                # One pass of the draws in file order (O(rows), bounded by one row group at
                # a time); the per-row-group masks are recomputed when each is read.
                held = int(np.count_nonzero(draws.random(rows) < holdout[0]))
                held_total += held
                kept = held if keep == "holdout" else rows - held
            groups.append(_RowGroup(path, index, rows, offset, kept))
            offset += rows
        if offset == 0:
            raise DataError(f"{where}: no rows")
        if holdout is not None and held_total in (0, offset):
            raise DataError(f"{where}: too few rows ({offset}) to hold out a validation split")
        # Row groups with nothing to keep are never scheduled (nor read).
        self._groups = [g for g in groups if g.kept > 0]
        if len(self._groups) < world_size:
            raise DataError(
                f"{where}: {len(self._groups)} non-empty row group(s) cannot be shared by {world_size} ranks "
                f"(write the files with smaller row groups)"
            )

    # ----------------------------------------------------------------- planning (metadata only)
    @property
    def total_rows(self) -> int:
        """Rows of all ranks together per epoch (after the hold-out, before equalising steps)."""
        return sum(g.kept for g in self._groups)

    def _split(self, items: list[int], parts: int) -> list[list[int]]:
        return _deal(items, [g.kept for g in self._groups], parts)

    def _plan(self, epoch: int) -> list[list[int]]:
        """Every rank's row groups (indices into ``self._groups``) for ``epoch``, in reading order."""
        rng = np.random.default_rng(_seed_entropy(self.seed, epoch, _ORDER_TAG))
        order = rng.permutation(len(self._groups)).tolist()
        return self._split(order, self.world_size)

    def _reader_rows(self, groups: list[int]) -> list[int]:
        """Rows of each reader (DataLoader worker, or the rank itself) of a rank's row groups."""
        parts = self._split(groups, self.num_workers) if self.num_workers > 0 else [groups]
        return [sum(self._groups[i].kept for i in part) for part in parts]

    def _reader_batches(self, rows: int) -> int:
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def row_groups(self, epoch: int) -> list[tuple[Path, int]]:
        """This rank's ``(file, row group)`` pairs for ``epoch``, in the order they are read.

        Row groups without a row to keep (all held out, or none with ``keep="holdout"``)
        are never scheduled.
        """
        return [(self._groups[i].path, self._groups[i].index) for i in self._plan(epoch)[self.rank]]

    def num_rows(self, epoch: int) -> int:
        """Rows dealt to this rank for ``epoch`` (after the hold-out).

        With several ranks, :meth:`iter_batches` may yield fewer: it stops after
        :meth:`num_batches` steps.
        """
        return sum(self._groups[i].kept for i in self._plan(epoch)[self.rank])

    def num_batches(self, epoch: int) -> int:
        """Steps of ``epoch``: the same on every rank, and exactly what :meth:`iter_batches` yields.

        Each reader (the rank, or each of its DataLoader workers) yields
        ``ceil(rows / batch_size)`` batches, or ``floor`` with ``drop_last``; a rank
        yields the sum over its readers; all ranks stop after the minimum over ranks.
        With one rank and no workers that is ``ceil(rows / batch_size)`` (every row, the
        last batch partial), or ``floor`` with ``drop_last``. Computed from the metadata
        and the hold-out draws, without reading data.
        """
        return min(sum(self._reader_batches(r) for r in self._reader_rows(groups)) for groups in self._plan(epoch))

    # ----------------------------------------------------------------- reading
    def _encoded(self, groups: list[int]) -> Iterator[EncodedColumns]:
        """Reads, filters and encodes row groups in order."""
        reader = _Reader(self.columns)
        try:
            for i in groups:
                g = self._groups[i]
                table = reader.read(g.path, g.index, g.rows)
                if self.holdout is not None:
                    table = table.filter(pa.array(_keep_mask(g, self.holdout, self.keep)))
                yield self.preprocessor.transform(table, source=f"{g.path} row group {g.index}", with_labels=True)
        finally:
            reader.close()

    def _batches(self, epoch: int, groups: list[int], *, worker: int, workers: int) -> Generator[Batch, None, None]:
        """Batches of one reader: its row groups through its own shuffle buffer."""
        rng = np.random.default_rng(_seed_entropy(self.seed, epoch, _SHUFFLE_TAG, self.rank, worker))
        capacity = -(-self.shuffle_buffer // workers)
        buffer = _ShuffleBuffer(self.batch_size, capacity, rng, drop_last=self.drop_last)
        chunks: Iterator[EncodedColumns] = self._encoded(groups)
        if workers == 1 and self.num_workers == 0 and self.read_ahead > 0:
            chunks = run_ahead(chunks, self.read_ahead, name=_THREAD_NAME)
        try:
            for enc in chunks:
                buffer.add(enc)
                self.peak_buffered_rows = max(self.peak_buffered_rows, buffer.peak_rows)
                if buffer.ready:
                    yield from buffer.drain()
            yield from buffer.drain(final=True)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _worker_batches(self, epoch: int, groups: list[int]) -> Generator[Batch, None, None]:
        loader = DataLoader(
            _WorkerShares(self, epoch, groups),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=max(1, self.read_ahead),
        )
        for item in loader:
            if isinstance(item, _Failure):
                raise DataError(item.message)
            yield item

    def iter_batches(self, epoch: int) -> Iterator[Batch]:
        """Yields this rank's batches of ``epoch`` (CPU tensors, see :class:`mtrec.batch.Batch`).

        Exactly :meth:`num_batches` batches of ``batch_size`` rows (a reader's last one
        may be partial unless ``drop_last``). Deterministic for the same seed, epoch,
        rank, world size and number of workers. Stopping early (closing the generator)
        stops the read-ahead thread or the workers.

        Raises:
            DataError: One line naming the file and row group that cannot be read or
                encoded, or a file that changed since the stream was opened.
        """
        steps = self.num_batches(epoch)
        groups = self._plan(epoch)[self.rank]
        self.peak_buffered_rows = 0
        batches = (
            self._worker_batches(epoch, groups)
            if self.num_workers > 0
            else self._batches(epoch, groups, worker=0, workers=1)
        )
        done = 0
        try:
            if steps == 0:
                return
            for batch in batches:
                yield batch
                done += 1
                if done == steps:
                    return
        finally:
            batches.close()
        # Fewer batches than planned would leave other ranks waiting in a collective.
        raise DataError(f"{self.paths[0]}: epoch {epoch} ended after {done} of {steps} planned batches")
