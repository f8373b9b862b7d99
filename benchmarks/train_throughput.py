"""Training throughput of mtrec vs a minimal hand-written PyTorch MMoE (prints JSON).

Benchmark configuration (issue 2): 500k synthetic rows, 20 sparse features
(cardinalities 10 to 150k), 10 dense features, 3 binary tasks (CTR on all rows, CVR and
satisfaction on clicked rows); embedding dim 16; MMoE with 4 experts [256, 128], towers
[64]; batch 2048; Adam lr 1e-3; one epoch; 2 threads.

Each measurement runs in its own process so that peak RSS is its own:

* ``mtrec``: ``mtrec train --config`` in a fresh process, from the Parquet file on disk to a
  written model directory (end to end, its wall time, with where it went: interpreter and
  imports, read + encode, the rest before the first step, the loop, validation and the work
  after it, saving), and the training loop alone (rows/s of the epoch, as the trainer logs
  it), with the default ``precision: auto`` (bf16 autocast where the CPU has native bf16)
  and again with ``precision: fp32``.
* ``baseline``: the same model written the way one would by hand in plain PyTorch
  (one ``nn.Embedding`` per feature, a Python loop over expert MLPs, Adam on every
  parameter), trained on tensors preloaded in memory (the same encoded columns); end to end,
  its process from start to exit: imports, the same read and encoding, the epoch, the
  validation AUC, saving the weights and vocabularies.

Usage:
    python benchmarks/train_throughput.py [--rows 500000] [--threads 2] [--output results.json]
    python benchmarks/train_throughput.py --embeddings shared,per_task,stem   # the cost of each model.embedding
    python benchmarks/train_throughput.py --variants mmoe,dcn_v2,famo   # input blocks, gates, weightings
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_T0 = time.perf_counter()  # (a part's own clock starts before torch is imported)

# What --variants measures: the benchmark configuration with one of these laid over it.
WEIGHTINGS = (
    "uncertainty",
    "gradnorm",
    "dwa",
    "rlw",
    "famo",
    "pcgrad",
    "mgda",
    "cagrad",
    "nash_mtl",
    "aligned_mtl",
    "db_mtl",
)
_HISTORY = {"name": "hist_item_ids", "max_len": 20, "vocab_from": "item_id"}
VARIANTS: dict[str, dict] = {
    "mmoe": {},
    "dcn_v2": {"features": {"interaction": {"name": "dcn_v2", "layers": 2}}},
    "dcn_v2_rank32": {"features": {"interaction": {"name": "dcn_v2", "layers": 2, "rank": 32}}},
    # the behaviour sequence (20 recent items, sharing item_id's table), mean-pooled or by DIN
    "history_mean": {"features": {"sequence": [{**_HISTORY, "pooling": "mean"}]}},
    "history_din": {"features": {"sequence": [{**_HISTORY, "pooling": "target_attention", "target": "item_id"}]}},
    "dselect_k": {"model": {"gate": "dselect_k", "gate_k": 2, "gate_entropy": 0.01}},
    "expert_balance": {"model": {"expert_balance": 0.1}},
    "expert_norm": {"model": {"expert_norm": True}},
    **{w: {"train": {"loss_weighting": {"name": w}}} for w in WEIGHTINGS},
}


def _relative_to_first(runs: dict[str, dict], *, seconds: bool = False) -> dict[str, dict[str, float]]:
    """Each run's rows/s (and training seconds) and parameters as multiples of the first run's."""
    first = next(iter(runs.values()))
    keys = {"rows_per_s": "train_loop_rows_per_s", **({"seconds_per_step": "train_loop_seconds"} if seconds else {})}
    keys["parameters"] = "parameters"
    return {name: {k: r[src] / first[src] for k, src in keys.items()} for name, r in runs.items()}


def _median(name: str, runs: list[dict]) -> dict:
    """The median of one measurement's runs (by end-to-end seconds where it has them, else by
    the loop's rows/s), with every run's figures beside it."""
    by = "end_to_end_seconds" if name in ("mtrec_cli", "baseline") else "train_loop_rows_per_s"
    runs = sorted(runs, key=lambda r: r[by])
    best = dict(runs[len(runs) // 2])
    best["train_loop_rows_per_s_all_runs"] = [r["train_loop_rows_per_s"] for r in runs]
    if "end_to_end_seconds" in best:
        best["end_to_end_seconds_all_runs"] = [r["end_to_end_seconds"] for r in runs]
    return best


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _config(
    data: str,
    threads: int,
    epochs: int,
    precision: str = "auto",
    device: str = "cpu",
    batch_size: int = 2048,
    embedding_optimizer: str = "auto",
    embedding: str = "shared",
    variant: str = "mmoe",
):
    from mtrec.config import config_from_dict
    from mtrec.quickstart import benchmark_model, synthetic_features, synthetic_tasks

    extra = VARIANTS[variant]
    return config_from_dict(
        {
            "data": {"train": data, "valid_fraction": 0.1},
            "features": {**synthetic_features(history=False), **extra.get("features", {})},
            "tasks": synthetic_tasks(),
            "model": {**benchmark_model(), "embedding": embedding, **extra.get("model", {})},
            "train": {
                **extra.get("train", {}),
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": 1e-3,
                "embedding_lr": 1e-3,
                "threads": threads,
                "seed": 0,
                "device": device,
                "precision": precision,
                "embedding_optimizer": embedding_optimizer,
            },
        }
    )


def run_mtrec(
    data: str,
    threads: int,
    workdir: str,
    precision: str,
    device: str = "cpu",
    batch_size: int = 2048,
    embedding_optimizer: str = "auto",
    embedding: str = "shared",
    variant: str = "mmoe",
) -> dict:
    import torch

    import mtrec

    cfg = _config(data, threads, 1, precision, device, batch_size, embedding_optimizer, embedding, variant)
    t0 = time.perf_counter()
    result = mtrec.train(cfg, output=Path(workdir) / "model", overwrite=True, progress=False)
    total = time.perf_counter() - t0
    epoch = result.history[0]
    loaded = mtrec.load_model_dir(result.output)
    meta = loaded.meta
    train_rows = meta["train_rows"]
    tables = loaded.model.embedding_tables()
    return {
        "embedding": embedding,
        "variant": variant,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "embedding_parameters": sum(t.numel() for t in tables),
        "precision": meta["precision"],
        "embedding_optimizer": meta["embedding_optimizer"],
        "end_to_end_seconds": total,
        "end_to_end_rows_per_s": train_rows / total,
        "train_loop_seconds": epoch["train_seconds"],
        "train_loop_rows_per_s": epoch["rows_per_second"],
        "valid_auc": {k: v.get("auc") for k, v in epoch["valid"].items()},
        "train_rows": train_rows,
        "peak_rss_mb": _peak_rss_mb(),
        "batch_size": batch_size,
        "device": device,
        "gpu_peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
    }


def run_mtrec_cli(data: str, threads: int, workdir: str, precision: str) -> dict:
    """``mtrec train`` as a user runs it (a fresh process: Parquet on disk to a model directory),
    its wall time and where it went: the stages the trainer times (``meta.json``) and the rest
    (interpreter start, imports, config, claiming and committing the directory)."""
    import yaml

    from mtrec.config import config_to_dict

    config = Path(workdir) / f"bench-{precision}.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(_config(data, threads, 1, precision)), sort_keys=False))
    out = Path(workdir) / f"model-cli-{precision}"
    cmd = [sys.executable, "-m", "mtrec", "train", "--config", str(config), "--output", str(out), "--overwrite"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--quiet"], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    meta = json.loads((out / "meta.json").read_text())
    epoch = json.loads((out / "metrics.json").read_text())["history"][0]
    timed = meta["timings"]
    # from starting a process to the end of its imports (not its exit, as mtrec ends with os._exit)
    probe = "import time, os, mtrec.training.trainer; print(time.time(), flush=True); os._exit(0)"
    t0 = time.time()
    import_s = float(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True).stdout) - t0
    return {
        "precision": meta["precision"],
        "embedding_optimizer": meta["embedding_optimizer"],
        "end_to_end_seconds": wall,
        "end_to_end_rows_per_s": meta["train_rows"] / wall,
        "train_loop_seconds": epoch["train_seconds"],
        "train_loop_rows_per_s": epoch["rows_per_second"],
        "breakdown_seconds": {
            "interpreter_and_imports": import_s,
            "read_encode": timed["read_encode_s"],
            "pre_loop": timed["setup_s"],
            "loop": timed["train_s"],
            "post_loop": timed["validate_s"] + timed["post_loop_s"],
            "save": timed["checkpoint_s"],
            "rest": wall - import_s - sum(timed.values()),
        },
        "valid_auc": {k: v.get("auc") for k, v in epoch["valid"].items()},
        "train_rows": meta["train_rows"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
    }


def run_baseline(data: str, threads: int, workdir: str) -> dict:
    """The hand-written script end to end: imports, the same read and encoding, one epoch, the
    validation AUC, and saving the weights and vocabularies."""
    import torch
    from torch import nn

    from mtrec.data.loading import load_training_data

    import_s = time.perf_counter() - _T0
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = _config(data, threads, epochs=1)
    r0 = time.perf_counter()
    prepared = load_training_data(cfg.schema, data, None, valid_fraction=0.1, seed=0)
    read_encode_s = time.perf_counter() - r0
    layout = prepared.preprocessor.layout()
    enc = prepared.train
    sparse = torch.from_numpy(enc.sparse)
    dense = torch.from_numpy(enc.dense)
    labels = torch.from_numpy(enc.labels)
    mask = torch.from_numpy(enc.label_mask).float()

    class HandMMoE(nn.Module):
        def __init__(self, cards, n_dense, dim=16, n_exp=4, n_tasks=3):
            super().__init__()
            self.embs = nn.ModuleList(nn.Embedding(c, dim) for c in cards)
            d_in = len(cards) * dim + n_dense
            self.experts = nn.ModuleList(
                nn.Sequential(nn.Linear(d_in, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU()) for _ in range(n_exp)
            )
            self.gates = nn.ModuleList(nn.Linear(d_in, n_exp) for _ in range(n_tasks))
            self.towers = nn.ModuleList(
                nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1)) for _ in range(n_tasks)
            )

        def forward(self, s, d):
            x = torch.cat([e(s[:, i]) for i, e in enumerate(self.embs)] + [d], dim=1)
            ex = torch.stack([e(x) for e in self.experts], dim=1)
            outs = []
            for g, t in zip(self.gates, self.towers, strict=True):
                w = torch.softmax(g(x), dim=1).unsqueeze(-1)
                outs.append(t((w * ex).sum(1)).squeeze(-1))
            return torch.stack(outs, dim=1)

    model = HandMMoE(layout.table_sizes, dense.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss(reduction="none")
    n = sparse.shape[0]
    t0 = time.perf_counter()
    perm = torch.randperm(n)
    for start in range(0, n, 2048):
        idx = perm[start : start + 2048]
        logits = model(sparse[idx], dense[idx])
        m = mask[idx]
        loss = ((bce(logits, labels[idx]) * m).sum(0) / m.sum(0).clamp(min=1)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    from mtrec.metrics import auc

    model.eval()
    with torch.no_grad():
        v = prepared.valid
        z = model(torch.from_numpy(v.sparse), torch.from_numpy(v.dense)).numpy()
    valid_auc = {
        t.name: auc(v.labels[v.label_mask[:, j], j], z[v.label_mask[:, j], j]) for j, t in enumerate(cfg.tasks)
    }
    valid_s = time.perf_counter() - t0 - seconds
    s0 = time.perf_counter()
    folder = Path(workdir) / "model-hand"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")  # and the vocabularies, to score with later
    prepared.preprocessor.save(folder / "preprocess")
    save_s = time.perf_counter() - s0
    return {
        "end_to_end_seconds_in_process": time.perf_counter() - _T0,
        "breakdown_seconds": {
            "imports": import_s,
            "read_encode": read_encode_s,
            "loop": seconds,
            "post_loop": valid_s,
            "save": save_s,
        },
        "valid_auc": valid_auc,
        "train_loop_seconds": seconds,
        "train_loop_rows_per_s": n / seconds,
        "train_rows": n,
        "final_batch_loss": loss.item(),
        "peak_rss_mb": _peak_rss_mb(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=None, help="existing synthetic Parquet file (default: generate one)")
    p.add_argument("--output", default=None, help="also write the JSON here")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    p.add_argument("--part", choices=["mtrec", "mtrec_cli", "baseline"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help="cpu, or cuda: mtrec alone at batch 2048 and --large-batch")
    p.add_argument("--large-batch", type=int, default=16384, help="the large batch of --device cuda")
    p.add_argument("--batch-size", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument(
        "--embedding-optimizer",
        choices=["auto", "sparse", "dense"],
        default="auto",
        help="train.embedding_optimizer of the mtrec runs (auto: dense on CUDA, sparse on CPU)",
    )
    p.add_argument(
        "--embeddings",
        default=None,
        help="comma-separated model.embedding modes (e.g. shared,stem): mtrec alone, the cost of each mode",
    )
    p.add_argument("--embedding", default="shared", help=argparse.SUPPRESS)
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated variants of the benchmark configuration (of {', '.join(VARIANTS)}): mtrec alone",
    )
    p.add_argument("--variant", default="mmoe", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.part == "mtrec":
        a = args
        result = run_mtrec(
            a.data,
            a.threads,
            a.workdir,
            a.precision,
            a.device,
            a.batch_size,
            a.embedding_optimizer,
            a.embedding,
            a.variant,
        )
        print(json.dumps(result))
        return
    if args.part == "mtrec_cli":
        print(json.dumps(run_mtrec_cli(args.data, args.threads, args.workdir, args.precision)))
        return
    if args.part == "baseline":
        print(json.dumps(run_baseline(args.data, args.threads, args.workdir)))
        return

    with tempfile.TemporaryDirectory(prefix="mtrec-bench-") as tmp:
        data = args.data
        if data is None:
            from mtrec.data.synthetic import write_click_log

            data = str(Path(tmp) / "clicks.parquet")
            write_click_log(data, args.rows, seed=0)

        def part(
            name: str, precision: str = "auto", batch_size: int = 2048, embedding: str = "shared", variant: str = "mmoe"
        ) -> dict:
            cmd = [sys.executable, __file__, "--part", name, "--data", data, "--threads", str(args.threads)]
            cmd += ["--workdir", tmp, "--precision", precision, "--device", args.device]
            cmd += ["--batch-size", str(batch_size), "--embedding-optimizer", args.embedding_optimizer]
            cmd += ["--embedding", embedding, "--variant", variant]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ})
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if name == "baseline":  # its process is the hand-written script, from start to exit
                result["end_to_end_seconds"] = time.perf_counter() - t0
                result["end_to_end_rows_per_s"] = result["train_rows"] / result["end_to_end_seconds"]
            return result

        def medians(*specs: tuple) -> list[dict]:
            """The median run of each spec (``part``'s arguments). This shared 2-core VM drifts by
            up to ~20 % within an hour, so every run is a fresh process and the specs take turns
            (one run of each, then the next round), so that a drift reaches all of them alike."""
            rounds = [[part(*spec) for spec in specs] for _ in range(args.repeats)]
            return [_median(spec[0], [r[i] for r in rounds]) for i, spec in enumerate(specs)]

        if args.variants:
            names = args.variants.split(",")
            variants = dict(zip(names, medians(*[("mtrec", "auto", 2048, "shared", v) for v in names]), strict=True))
        elif args.embeddings:
            names = args.embeddings.split(",")
            modes = dict(zip(names, medians(*[("mtrec", "auto", 2048, m) for m in names]), strict=True))
        elif args.device != "cpu":
            sizes = (2048, args.large_batch)
            gpu = dict(zip(map(str, sizes), medians(*[("mtrec", "auto", b) for b in sizes]), strict=True))
        else:
            mt, mt_fp32, base = medians(("mtrec_cli",), ("mtrec_cli", "fp32"), ("baseline",))
    import torch

    if args.variants:
        result = {
            "benchmark": "train_throughput_variants",
            "config": "the benchmark configuration (MMoE, batch 2048) with one variant laid over it",
            "variants": {v: VARIANTS[v] for v in variants},
            "device": args.device,
            "rows": args.rows,
            "threads": args.threads,
            "repeats": args.repeats,
            "by_variant": variants,
            "relative_to_first": _relative_to_first(variants, seconds=True),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        }
        print(json.dumps(result, indent=2))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.embeddings:
        result = {
            "benchmark": "train_throughput_embeddings",
            "config": "the benchmark configuration (MMoE, 500k rows, batch 2048), model.embedding varied",
            "device": args.device,
            "rows": args.rows,
            "threads": args.threads,
            "by_embedding": modes,
            "relative_to_first": _relative_to_first(modes),
        }
        print(json.dumps(result, indent=2))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.device != "cpu":
        result = {
            "benchmark": "train_throughput",
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "rows": args.rows,
            "by_batch_size": gpu,
            "target_rows_per_s_large_batch": 5_000_000,
        }
        print(json.dumps(result, indent=2))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        return

    result = {
        "benchmark": "train_throughput",
        "config": {
            "rows": args.rows,
            "sparse_features": 20,
            "dense_features": 10,
            "tasks": 3,
            "embedding_dim": 16,
            "experts": 4,
            "expert_hidden": [256, 128],
            "tower_hidden": [64],
            "batch_size": 2048,
            "epochs": 1,
            "threads": args.threads,
            "repeats": args.repeats,
        },
        "mtrec": mt,
        "mtrec_fp32": mt_fp32,
        "handwritten_pytorch": base,
        "train_loop_speedup": mt["train_loop_rows_per_s"] / base["train_loop_rows_per_s"],
        "train_loop_speedup_fp32": mt_fp32["train_loop_rows_per_s"] / base["train_loop_rows_per_s"],
        "target_speedup": 1.5,
        # `mtrec train` (a fresh process, Parquet to model directory) against the hand-written
        # script's process from start to exit, each the median of its runs
        "end_to_end_speedup": base["end_to_end_seconds"] / mt["end_to_end_seconds"],
        "end_to_end_speedup_fp32": base["end_to_end_seconds"] / mt_fp32["end_to_end_seconds"],
        "target_end_to_end_speedup": 1.3,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
