"""Batch-scoring throughput and memory of ``mtrec score`` (prints JSON).

The model is the benchmark MMoE of ``benchmarks/train_throughput.py`` (20 sparse
features with cardinalities 10 to 150k, 10 dense features, 3 binary tasks, embedding dim
16, 4 experts [256, 128], towers [64]) trained for one epoch on a small file: scoring
speed depends on the model's size, not on how well it is trained.

Each scoring run is a fresh process (so that its peak RSS is its own) that runs
:func:`mtrec.score_parquet` end to end: load the model directory, stream the input
Parquet file, write the output Parquet file (``--keep user_id,item_id`` and a product
rank score), after keeping freed memory for the next batch as the ``mtrec score`` command
does (:mod:`mtrec.allocator`; ``MTREC_KEEP_MALLOC=1`` measures glibc's defaults). Inputs of
0.5M and 2M rows measure whether memory stays flat with input size; ``breakdown_seconds``
is the big input's time per stage (load, read, encode, forward, write).

Usage:
    python benchmarks/score_throughput.py [--rows 2000000] [--small-rows 500000] [--threads 2]
        [--workdir DIR] [--repeats 3] [--output results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(model: str, data: str, output: str, threads: int, batch_size: int, precision: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    import mtrec
    from mtrec.allocator import retain_freed_memory

    retain_freed_memory()  # as `mtrec score` does (MTREC_KEEP_MALLOC=1: glibc's defaults)

    t0 = time.perf_counter()
    result = mtrec.score_parquet(
        model,
        data,
        output,
        keep=("user_id", "item_id"),
        rank="ctr^1*cvr^0.5*satisfaction^0.5",
        batch_size=batch_size,
        precision=precision,
        overwrite=True,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "rows": result["rows"],
        "seconds": seconds,
        "rows_per_s": result["rows"] / seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "timings": result["timings"],
        "precision": result["precision"],
        **({"bf16_check": result["bf16_check"]} if "bf16_check" in result else {}),
    }


def _peak_rss_mb() -> float:
    """The process's own high-water mark (VmHWM).

    ``getrusage``'s ``ru_maxrss`` survives ``execve`` on Linux, so a child started by a
    parent that trained the model would report the parent's peak; VmHWM belongs to the
    new address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_child(model: Path, data: Path, output: Path, threads: int, batch_size: int, precision: str = "fp32") -> dict:
    cmd = [sys.executable, __file__, "--child", *map(str, (model, data, output, threads, batch_size, precision))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _parity(model: Path, data: Path, scored: Path, args: argparse.Namespace) -> dict:
    """Every task's largest |bf16 - fp32| over the whole big input: ``scored`` (the last bf16
    output of ``data``) against an fp32 run of the same file."""
    import pyarrow.parquet as pq

    reference = scored.with_name("scores_fp32_reference.parquet")
    _run_child(model, data, reference, args.threads, args.batch_size, "fp32")
    low, ref = pq.read_table(scored), pq.read_table(reference)
    return {
        c: float(abs(low.column(c).to_numpy() - ref.column(c).to_numpy()).max())
        for c in ref.column_names
        if c not in ("user_id", "item_id")
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, data, output, threads, batch_size, precision = sys.argv[2:8]
        print(json.dumps(_child(model, data, output, int(threads), int(batch_size), precision)))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--small-rows", type=int, default=500_000)
    p.add_argument("--train-rows", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="score_parquet's precision")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per input; the median is reported")
    p.add_argument("--workdir", type=Path, default=None, help="reuse data and model from here (default: a temp dir)")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()

    sys.path.insert(0, str(HERE))
    from train_throughput import _config  # the benchmark model, defined once

    import mtrec
    from mtrec.data.synthetic import write_click_log

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mtrec-score-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    train_file = workdir / f"train_{args.train_rows}.parquet"
    if not train_file.exists():
        write_click_log(train_file, args.train_rows, seed=0)
    model = workdir / "model"
    if not (model / "meta.json").exists():
        t0 = time.perf_counter()
        mtrec.train(_config(str(train_file), args.threads, epochs=1), output=model, overwrite=True, progress=False)
        print(f"trained the benchmark model in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    inputs = {}
    for rows in (args.small_rows, args.rows):
        path = workdir / f"score_{rows}.parquet"
        if not path.exists():
            t0 = time.perf_counter()
            write_click_log(path, rows, seed=0, sample_seed=1)
            print(f"wrote {rows:,} rows in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        inputs[rows] = path

    runs: dict[int, list[dict]] = {}
    for _ in range(args.repeats):
        for rows, path in inputs.items():
            out = workdir / f"scores_{rows}.parquet"
            run = _run_child(model, path, out, args.threads, args.batch_size, args.precision)
            runs.setdefault(rows, []).append(run)
            print(f"{rows:,} rows: {runs[rows][-1]}", file=sys.stderr)

    def med(rows: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[rows])

    big, small = args.rows, args.small_rows
    rss_growth = med(big, "peak_rss_mb") / med(small, "peak_rss_mb") - 1.0
    result = {
        "benchmark": "score_throughput",
        "config": {
            "model": "mmoe, 4 experts [256, 128], towers [64], embedding dim 16",
            "sparse_features": 20,
            "dense_features": 10,
            "tasks": 3,
            "train_rows": args.train_rows,
            "threads": args.threads,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "keep": ["user_id", "item_id"],
            "rank": "ctr^1*cvr^0.5*satisfaction^0.5",
            "repeats": args.repeats,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "end_to_end_rows_per_s": med(big, "rows_per_s"),
        "end_to_end_seconds": med(big, "seconds"),
        "breakdown_seconds": {
            k: statistics.median(r["timings"][k] for r in runs[big]) for k in runs[big][0]["timings"]
        },
        "target_end_to_end_rows_per_s": 100_000,
        "malloc": "glibc defaults (MTREC_KEEP_MALLOC=1)" if os.environ.get("MTREC_KEEP_MALLOC") == "1" else "kept",
        "target_rows_per_s": 60_000,
        "peak_rss_mb": {str(small): med(small, "peak_rss_mb"), str(big): med(big, "peak_rss_mb")},
        "rss_growth_small_to_big": rss_growth,
        "target_rss_growth": 0.15,
        "runs": {str(k): v for k, v in runs.items()},
    }
    if args.precision == "bf16":
        result["parity_vs_fp32"] = _parity(model, inputs[big], workdir / f"scores_{big}.parquet", args)
        result["target_parity"] = 1e-3
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
