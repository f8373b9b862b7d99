"""Batch scoring of Parquet with a saved model: :func:`score_parquet` streams Parquet files
slice by slice through a :class:`~mtrec.inference.ranker.Ranker` and writes the predictions
(and pass-through ``keep`` columns) to Parquet, atomically.

The result's ``timings`` give the seconds of each stage: ``load_s`` (the model, the inputs'
schemas and the check of ``precision="bf16"``), ``read_s`` (Parquet decoding), ``encode_s``
(the preprocessor), ``forward_s`` (the network and calibration) and ``write_s`` (output
columns, rank score, Parquet writing); closing the writer and the final rename are in
``seconds`` only.

Output columns: the ``keep`` columns unchanged (same Arrow type), one ``float32`` column per
task named by the task (probability / value), then ``rank_score`` (float64) if a rank formula
is given. Multiclass tasks are written as one ``float32`` column per class, ``<task>_c0`` ..
``<task>_c<C-1>``: flat numeric columns can be read, filtered and sorted by any Parquet
consumer (SQL engines, pandas, spreadsheets' importers) without unnesting a list.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtrec.data.parquet import open_parquet, resolve_paths
from mtrec.errors import DataError, MtrecError
from mtrec.files import claim_output, staged_dir, write_file
from mtrec.inference.rank import check_rank, parse_rank, rank_score
from mtrec.inference.ranker import Ranker, load_model
from mtrec.progress import Progress

__all__ = ["score_parquet"]

RANK_COLUMN = "rank_score"
SCORES_KIND = "scores"
# Rows decoded and encoded at a time when streaming Parquet: large enough that the
# per-call costs of the vocabulary lookups (a hash set per feature) vanish, small
# enough that memory stays a few tens of MB whatever the row-group size of the input.
_READ_ROWS = 65536


def _type_problem(name: str, t: pa.DataType, kind: str, vocab_type: pa.DataType | None) -> str | None:
    """What is wrong with column ``name`` of type ``t`` for a feature of ``kind``; None if fine."""
    if pa.types.is_dictionary(t):
        t = t.value_type

    def is_id(x: pa.DataType) -> bool:
        return pa.types.is_integer(x) or pa.types.is_string(x) or pa.types.is_large_string(x)

    if kind == "dense":
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            return None
        return f"column {name!r} has type {t}, expected a number"
    if kind == "sequence":
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not is_id(t.value_type):
            return f"column {name!r} has type {t}, expected a list of ints or strings"
        t = t.value_type
    elif not is_id(t):
        return f"column {name!r} has type {t}, expected int or string IDs"
    if vocab_type is not None and pa.types.is_integer(t) != pa.types.is_integer(vocab_type):
        return f"column {name!r} has type {t} but the model was trained on {vocab_type}"
    return None


@dataclass
class _Job:
    """One input file and where its scores go."""

    source: Path
    target: Path
    keep_types: list[pa.Field]
    num_rows: int


def _check_input(ranker: Ranker, path: Path, pf: pq.ParquetFile, keep: Sequence[str]) -> list[pa.Field]:
    schema = pf.schema_arrow
    names = set(schema.names)
    missing_keep = [c for c in keep if c not in names]
    if missing_keep:
        raise DataError(f"{path}: --keep column(s) {', '.join(map(repr, missing_keep))} not in the file")
    missing = [c for c in ranker.feature_columns if c not in names]
    if missing:
        raise DataError(f"{path}: missing feature column(s) {', '.join(map(repr, missing))}")
    s = ranker.config.schema
    vocabs = ranker.preprocessor.vocabs
    kinds = [("sparse", f.name, f.name if f.hash_buckets is None else None) for f in s.sparse]
    kinds += [("dense", f.name, None) for f in s.dense]
    for q in s.sequence:
        hashed = any(f.name == q.vocab_from and f.hash_buckets is not None for f in s.sparse)
        kinds.append(("sequence", q.name, None if hashed else (q.vocab_from or q.name)))
    for kind, name, vocab_name in kinds:
        vocab_type = vocabs[vocab_name].type if vocab_name is not None and vocab_name in vocabs else None
        problem = _type_problem(name, schema.field(name).type, kind, vocab_type)
        if problem:
            raise DataError(f"{path}: {problem}")
    return [schema.field(c) for c in keep]


def _output_fields(ranker: Ranker, keep_fields: list[pa.Field], rank: bool) -> list[pa.Field]:
    fields = list(keep_fields)
    for t in ranker.tasks:
        fields += [pa.field(name, pa.float32()) for name in t.kind.output_columns(t)]
    if rank:
        fields.append(pa.field(RANK_COLUMN, pa.float64()))
    return fields


def _plan(
    ranker: Ranker, input: str | Path, output: Path, keep: Sequence[str], rank: bool, overwrite: bool
) -> tuple[list[_Job], bool]:
    """Every input file, its output name and checked schema, before anything is written.

    The output's own checks (``--overwrite``, never an input, a folder only if mtrec
    wrote it) are :func:`mtrec.files.claim_output`'s, made by the caller.
    """
    text = str(input)
    as_folder = Path(text).is_dir()
    paths = resolve_paths(text)
    if as_folder:
        base = Path(text)
    elif len(paths) > 1:
        # A glob matching several files scores into a folder, named relative to their common parent.
        base = Path(os.path.commonpath([str(p.parent) for p in paths]))
        as_folder = True
    else:
        base = paths[0].parent
    if as_folder and output.exists() and not output.is_dir():
        raise MtrecError(f"{output}: exists and is not a folder (the input {text} is several files)")
    if not as_folder and output.is_dir():
        raise MtrecError(f"{output}: is a folder, expected a Parquet file name (the input is one file)")
    keep = list(dict.fromkeys(keep))
    produced = {f.name for f in _output_fields(ranker, [], rank)}
    clash = [c for c in keep if c in produced]
    if clash:
        raise MtrecError(f"--keep column(s) {', '.join(map(repr, clash))} clash with prediction column names")
    jobs = []
    for p in paths:
        pf = open_parquet(p)
        try:
            keep_fields = _check_input(ranker, p, pf, keep)
            num_rows = pf.metadata.num_rows
        finally:
            # Reopened when scored: a folder of thousands of files must not hold thousands of handles.
            pf.close()
        target = output / p.relative_to(base) if as_folder else output
        jobs.append(_Job(p, target, keep_fields, num_rows))
    return jobs, as_folder


class _Progress(Progress):
    """Rows scored of ``total``: a tqdm bar on a terminal, a plain line every ``every`` seconds otherwise."""

    def __init__(self, total: int, stream: TextIO, enabled: bool, every: float = 5.0) -> None:
        super().__init__(total, desc="scoring", unit="row", stream=stream, enabled=enabled, unit_scale=True)
        self.every = every

    def update(self, rows: int) -> None:
        self.advance(self.done + rows)
        if self.due(self.every):
            rate = self.rate(self.done)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            pct = 100.0 * self.done / self.total if self.total else 100.0
            self.line(f"scored {self.done:,}/{self.total:,} rows ({pct:.1f} %) rows/s {rate:,.0f} eta {eta:,.0f}s")


def _iter_chunks(job: _Job, columns: list[str], rows: int = _READ_ROWS) -> Iterator[pa.Table]:
    """Fixed-size slices of a file in row order; only one slice is decoded at a time."""
    try:
        # pre_buffer=False: with pyarrow's default (True) the reader keeps the buffered
        # column chunks of every row group read so far, so memory grew ~5 MB per 64k rows
        # (measured with pa.total_allocated_bytes on 2M rows); without it memory is flat.
        pf = pq.ParquetFile(job.source, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{job.source}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    try:
        for rb in pf.iter_batches(batch_size=rows, columns=columns, use_threads=True):
            yield pa.Table.from_batches([rb])
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{job.source}: cannot be decoded ({str(exc).splitlines()[0]})") from None
    finally:
        pf.close()


def _score_file(
    ranker: Ranker,
    job: _Job,
    target: Path,
    *,
    formula: Mapping[str, Any] | None,
    batch_size: int,
    progress: _Progress,
    timings: dict[str, float],
) -> int:
    """Scores one file into ``target``; adds its seconds per stage to ``timings``."""
    keep = [f.name for f in job.keep_types]
    schema = pa.schema(_output_fields(ranker, job.keep_types, formula is not None))
    columns = list(dict.fromkeys([*keep, *ranker.feature_columns]))
    rows = 0
    clock = time.perf_counter
    with pq.ParquetWriter(target, schema) as writer:
        chunks = _iter_chunks(job, columns)
        while True:
            t0 = clock()
            table = next(chunks, None)
            if table is None:
                break
            t1 = clock()
            enc = ranker.preprocessor.transform(table, source=str(job.source), with_labels=False)
            t2 = clock()
            preds = ranker.predict_encoded(enc, batch_size=batch_size)
            t3 = clock()
            arrays: list[pa.Array | pa.ChunkedArray] = [table.column(c) for c in keep]
            for t in ranker.tasks:
                v = preds[t.name]  # (N,) or (N, C): one output column per class
                arrays += [pa.array(v)] if v.ndim == 1 else [pa.array(v[:, k]) for k in range(v.shape[1])]
            if formula is not None:
                try:
                    arrays.append(pa.array(rank_score(preds, formula)))
                except DataError as exc:
                    raise DataError(f"{job.source}: {exc}") from None
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            rows += table.num_rows
            progress.update(table.num_rows)
            for key, seconds in (
                ("read_s", t1 - t0),
                ("encode_s", t2 - t1),
                ("forward_s", t3 - t2),
                ("write_s", clock() - t3),
            ):
                timings[key] += seconds
    return rows


# bf16 is checked on the first rows of the inputs: its largest difference from fp32 must stay
# under 1e-3 / 1.5, because the largest difference grows with the rows compared (on the
# benchmark MMoE: 6.3e-4 on the first 65,536 rows, 8.3e-4 over 1M). A check, not a bound.
# The difference is absolute for probabilities and relative beyond 1 (regression values).
BF16_ROWS = _READ_ROWS
BF16_TOLERANCE = 6.5e-4
PRECISIONS = ("fp32", "bf16")


def _first_rows(ranker: Ranker, jobs: list[_Job]) -> tuple[pa.Table, _Job] | None:
    """The first :data:`BF16_ROWS` rows of the first input file that has any."""
    for job in jobs:
        for table in _iter_chunks(job, list(ranker.feature_columns), rows=BF16_ROWS):
            if table.num_rows:
                return table, job
    return None


def _bf16_difference(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, str]:
    """The largest ``|bf16 - fp32| / max(1, |fp32|)`` over every output (NaN where both are NaN
    counts as equal), and the task it is in."""
    worst = (0.0, next(iter(ref)))
    for name, r in ref.items():
        d = np.abs(got[name].astype(np.float64) - r) / np.maximum(1.0, np.abs(r))
        both_nan = np.isnan(got[name]) & np.isnan(r)
        d = np.where(both_nan, 0.0, np.nan_to_num(d, nan=np.inf))
        worst = max(worst, (float(d.max()), name))
    return worst


def _choose_precision(ranker: Ranker, jobs: list[_Job], precision: str, batch_size: int) -> dict[str, Any]:
    """``precision: bf16`` runs the experts' matrix products in bf16 only where that is exact
    enough: the first :data:`BF16_ROWS` rows are scored both ways, and unless every output is
    within :data:`BF16_TOLERANCE` of fp32 the run stays fp32. Returns what ran and why."""
    if precision == "fp32":
        return {"precision": "fp32"}
    from mtrec.nn.experts import bf16_gemms_supported, use_bf16_gemms

    if not bf16_gemms_supported(ranker.device):
        return {"precision": "fp32", "precision_note": f"{ranker.device} has no native bf16 matrix products: fp32"}
    if use_bf16_gemms(ranker.module, False) == 0:
        return {"precision": "fp32", "precision_note": "the model has no expert layers to run in bf16: fp32"}
    first = _first_rows(ranker, jobs)
    if first is None:
        return {"precision": "fp32", "precision_note": "no rows to check bf16 on: fp32"}
    table, job = first
    enc = ranker.preprocessor.transform(table, source=str(job.source), with_labels=False)
    ref = ranker.predict_encoded(enc, batch_size=batch_size)
    use_bf16_gemms(ranker.module)
    diff, task = _bf16_difference(ref, ranker.predict_encoded(enc, batch_size=batch_size))
    check = {"rows": table.num_rows, "max_diff": diff, "task": task, "tolerance": BF16_TOLERANCE}
    if diff <= BF16_TOLERANCE:
        return {"precision": "bf16", "bf16_check": check}
    use_bf16_gemms(ranker.module, False)
    note = (
        f"bf16 differs from fp32 by up to {diff:.1e} (task {task!r}) > {BF16_TOLERANCE:.1e} "
        f"on the first {table.num_rows:,} rows: fp32"
    )
    return {"precision": "fp32", "bf16_check": check, "precision_note": note}


def _check_arguments(batch_size: int, precision: str) -> None:
    if batch_size < 1:
        raise MtrecError(f"--batch-size: expected a positive number, got {batch_size}")
    if precision not in PRECISIONS:
        raise MtrecError(f"--precision: expected fp32 or bf16, got {precision!r}")


def _formula(rank: str | Mapping[str, Any] | None, ranker: Ranker) -> dict[str, Any] | None:
    """The rank formula, checked against the model's tasks (None without ``rank``)."""
    if rank is None:
        return None
    formula = parse_rank(rank) if isinstance(rank, str) else dict(rank)
    check_rank(formula, ranker.tasks)
    return formula


def score_parquet(
    model_dir: str | Path,
    input: str | Path,
    output: str | Path,
    *,
    keep: Sequence[str] = (),
    batch_size: int = 4096,
    rank: str | Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
    device: str = "cpu",
    calibrated: bool = True,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Scores Parquet file(s) with a saved model and writes the predictions as Parquet (binary
    tasks calibrated where the model has ``train.calibration``, unless ``calibrated`` is false).

    The input is streamed in slices of 64k rows (memory stays flat however large it is).
    Every input file's schema is checked (``keep`` columns, feature columns and their
    types) before anything is written. Output is written to a temporary name in the
    destination folder and renamed when complete, so a failed or interrupted run leaves
    nothing under the output name.

    The output's columns are the module docstring's; rows are in input order.

    Args:
        model_dir: A model directory written by training.
        input: A Parquet file, a folder (every ``*.parquet`` below it) or a glob.
        output: A Parquet file when the input is one file (or a glob matching one file);
            a folder with one file per input file (same relative names) otherwise.
        keep: Input columns copied to the output, e.g. ``("user_id", "item_id")``.
        batch_size: Rows per forward pass (4096: lighter than 16384 by ~150 MB, and faster).
        rank: A rank expression (``"ctr^1*cvr^0.5"``, ``"0.7*ctr+0.3*cvr"``) or a formula
            dict (see :func:`rank_score`), written as the column ``rank_score``.
        overwrite: Replace an existing output (a folder only if it holds only ``*.parquet``).
        progress: Print rows/s and ETA on ``stream`` (default stderr).
        stream, device: Where progress goes; where the network runs.
        precision: ``fp32``, or ``bf16`` for the experts' matrix products where the first
            rows say it is exact enough (:func:`_choose_precision`; the result says which ran).

    Returns:
        ``{"output", "files", "rows", "seconds", "rows_per_second", "timings"}`` (``timings``:
        the seconds of each stage, as the module docstring names them).

    Raises:
        MtrecError: Bad arguments, existing output, unreadable input, missing or mistyped columns, unknown rank task.
    """
    _check_arguments(batch_size, precision)
    t0 = time.perf_counter()
    output = Path(output)
    ranker = load_model(model_dir, device=device)
    ranker.calibration = ranker.calibration if calibrated else {}
    formula = _formula(rank, ranker)
    jobs, as_folder = _plan(ranker, input, output, keep, formula is not None, overwrite)
    chosen = _choose_precision(ranker, jobs, precision, batch_size)
    timings = {"load_s": time.perf_counter() - t0, "read_s": 0.0, "encode_s": 0.0, "forward_s": 0.0, "write_s": 0.0}
    inputs = [j.source for j in jobs] + ([input] if as_folder and Path(str(input)).is_dir() else [])
    bar = _Progress(sum(j.num_rows for j in jobs), stream or sys.stderr, progress)
    kind = SCORES_KIND if as_folder else None
    with claim_output(output, kind=kind, overwrite=overwrite, inputs=inputs, what="a folder of mtrec scores") as out:
        try:
            rows = _write_scores(ranker, jobs, output, out, as_folder, formula, batch_size, bar, timings)
        except OSError as exc:
            # A full disk while writing a folder of scores: the staging folder goes on the next run.
            raise MtrecError(f"{output}: cannot write ({exc.strerror or exc}); nothing was replaced") from None
        finally:
            bar.close()
    seconds = time.perf_counter() - t0
    return {
        "output": str(output),
        "files": len(jobs),
        "rows": rows,
        "seconds": seconds,
        "rows_per_second": rows / seconds if seconds > 0 else float("nan"),
        "timings": timings,
        **chosen,
    }


def _write_scores(
    ranker: Ranker,
    jobs: list[_Job],
    output: Path,
    out: Path,
    as_folder: bool,
    formula: dict[str, Any] | None,
    batch_size: int,
    bar: _Progress,
    timings: dict[str, float],
) -> int:
    """Scores every job into ``out`` (a staged folder, or one atomically written file); returns rows."""
    if not as_folder:
        rows = 0

        def write(tmp: Path) -> None:
            nonlocal rows
            rows = _score_file(
                ranker, jobs[0], tmp, formula=formula, batch_size=batch_size, progress=bar, timings=timings
            )

        write_file(out, write)
        return rows
    rows = 0
    with staged_dir(out, SCORES_KIND) as staging:
        for job in jobs:
            target = staging / job.target.relative_to(output)
            target.parent.mkdir(parents=True, exist_ok=True)
            rows += _score_file(
                ranker, job, target, formula=formula, batch_size=batch_size, progress=bar, timings=timings
            )
    return rows
