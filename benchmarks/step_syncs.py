"""Host syncs per training step: the operators that make the CPU wait for a GPU (prints JSON).

A GPU step is fast only while the host queues kernels ahead of the device. Any operator
whose result the host must read (``.item()``/``float()`` of a tensor, ``nonzero``, boolean
indexing, ``unique``, the ``coalesce`` of a sparse gradient, whose row count is a host-side
size) drains that queue and leaves the GPU idle while Python launches the next kernels.
At the issue's target (5M rows/s at batch 16384, about 3.3 ms a step) a handful of such
syncs per step is the difference between overlapping and serialising host and device.

This counts them without a GPU: ``mtrec.train`` runs on the CPU under
:class:`mtrec.training.profiling.HostSyncCounter`, which counts, inside each training step, the
reads of tensor values and the operators whose CUDA kernels need a host read. The code
path is the device-independent one the GPU runs (``embedding_optimizer`` is set
explicitly, as ``auto`` picks ``dense`` only on CUDA).

Usage:
    python benchmarks/step_syncs.py [--rows 20000] [--output results.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mtrec.quickstart import benchmark_model

MMOE = benchmark_model()  # the throughput benchmark's MMoE

CASES: dict[str, dict] = {
    "mmoe_sparse_embedding": {"model": MMOE, "train": {"embedding_optimizer": "sparse"}},
    "mmoe_dense_embedding": {"model": MMOE, "train": {"embedding_optimizer": "dense"}},
    "ple_dense_embedding": {"model": {"name": "ple"}, "train": {"embedding_optimizer": "dense"}},
    # AITM chains tasks over the same impressions: every task covers every row.
    "aitm_dense_embedding": {"model": {"name": "aitm"}, "train": {"embedding_optimizer": "dense"}, "no_where": True},
    "esmm_mmoe_dense_embedding": {
        "model": MMOE,
        "train": {"embedding_optimizer": "dense"},
        "esmm": {"ctr": "ctr", "cvr": "cvr", "name": "ctcvr"},
    },
    "mmoe_dense_embedding_grad_clip": {
        "model": MMOE,
        "train": {"embedding_optimizer": "dense", "grad_clip": 1.0},
    },
    "mmoe_dense_embedding_dwa": {
        "model": MMOE,
        "train": {"embedding_optimizer": "dense", "loss_weighting": {"name": "dwa"}},
    },
    "mmoe_dense_embedding_uncertainty": {
        "model": MMOE,
        "train": {"embedding_optimizer": "dense", "loss_weighting": {"name": "uncertainty"}},
    },
    "mmoe_dense_embedding_gradnorm": {
        "model": MMOE,
        "train": {"embedding_optimizer": "dense", "loss_weighting": {"name": "gradnorm"}},
    },
    "mmoe_dense_embedding_pcgrad": {
        "model": MMOE,
        "train": {"embedding_optimizer": "dense", "loss_weighting": {"name": "pcgrad"}},
    },
    "mmoe_dense_embedding_rlw": {
        "model": MMOE,
        "train": {"embedding_optimizer": "dense", "loss_weighting": {"name": "rlw"}},
    },
    "mmoe_dense_embedding_famo": {
        "model": MMOE,
        "train": {"embedding_optimizer": "dense", "loss_weighting": {"name": "famo"}},
    },
    "mmoe_gated_dense_embedding": {
        "model": {
            **MMOE,
            "gate": "dselect_k",
            "gate_entropy": 0.01,
            "expert_balance": 0.1,
            "expert_norm": True,
        },
        "train": {"embedding_optimizer": "dense"},
    },
    "mmoe_dense_embedding_fp16": {
        "model": MMOE,
        "train": {"embedding_optimizer": "dense", "precision": "fp16"},
    },
}


def _config(data: str, case: dict, batch_size: int):
    from mtrec.config import config_from_dict
    from mtrec.quickstart import synthetic_features, synthetic_tasks

    raw = {
        "data": {"train": data, "valid_fraction": 0.1, "mode": "memory"},
        "features": synthetic_features(),
        "tasks": [{k: v for k, v in t.items() if k != "where" or not case.get("no_where")} for t in synthetic_tasks()],
        "model": {"embedding_dim": 16, **case["model"]},
        "train": {"epochs": 1, "batch_size": batch_size, "seed": 0, "threads": 1, **case["train"]},
    }
    if "esmm" in case:
        raw["esmm"] = case["esmm"]
    return config_from_dict(raw)


def count_syncs(config, workdir: Path) -> dict:
    """Trains ``config``; host syncs per training step (see :class:`mtrec.training.profiling.HostSyncCounter`)."""
    import mtrec
    from mtrec.training.profiling import HostSyncCounter

    with HostSyncCounter() as counter:
        result = mtrec.train(config, output=workdir / "model", overwrite=True, progress=False)
    per_step = counter.per_step()
    return {
        "steps": counter.steps,
        "embedding_optimizer": mtrec.load_model_dir(result.output).meta["embedding_optimizer"],
        "syncs_per_step": sum(per_step.values()),
        "by_operator_per_step": per_step,
        "operators_per_step": counter.operators_per_step(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--output", default=None, help="also write the JSON here")
    args = p.parse_args()

    from mtrec.data.synthetic import write_click_log
    from mtrec.training.profiling import HOST_READS, SYNC_OPS

    results = {}
    with tempfile.TemporaryDirectory(prefix="mtrec-syncs-") as tmp:
        data = str(Path(tmp) / "clicks.parquet")
        write_click_log(data, args.rows, seed=0)
        for name in args.cases:
            results[name] = count_syncs(_config(data, CASES[name], args.batch_size), Path(tmp) / name)
    out = {
        "benchmark": "step_syncs",
        "notes": {
            "gradnorm": "Tensor.item is the step count of its weights' Adam, a CPU tensor: not a GPU sync",
            "pcgrad": "one Tensor.cpu of the T x T Gram matrix is a GPU sync; the other reads are of host tensors",
            "fp16": "GradScaler reads whether a gradient overflowed (one sync per step)",
            "sparse": "coalesce of the sparse embedding gradient reads its row count (one sync per step)",
        },
        "rows": args.rows,
        "batch_size": args.batch_size,
        "host_reads": HOST_READS,
        "sync_operators": SYNC_OPS,
        "cases": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
