"""Does a warm start pay? Adding a task to a trained ranker against training all tasks from scratch,
and the task-affinity matrices that say which tasks to share.

Warm start, on the synthetic log, for each seed:

1. ``configs/synthetic/warm_start/ctr_cvr.yaml``: MMoE on CTR and CVR (the ranker that exists);
2. ``scratch``: ``configs/synthetic/mmoe.yaml`` on all three tasks from scratch;
3. the same config with ``train.init_from`` the first model and its preprocessing reused:
   ``warm_frozen_embedding`` with its embedding frozen (the README's example), ``warm`` with
   everything trained;

(2) and (3) for ``--epochs`` epochs without early stopping, validated after each. The
new task's target is the best validation AUC the scratch model reaches for it; for each run
the steps and training seconds until an epoch's validation AUC of the new task reaches it (None:
never). The test rows score every model once: the old tasks' AUC before (model 1) and after
(the warm model), and the warm model against the scratch one by paired DeLong (``mtrec
compare``).

Affinity: ``mmoe`` and ``independent`` with ``train.affinity_every`` on the synthetic log (and on
census-income with ``--census``): the averaged gradient cosine and lookahead affinity of each
pair of tasks (:mod:`mtrec.training.affinity`).

Usage:
    python benchmarks/warm_start.py                                # 3 seeds, 200k rows, census too
    python benchmarks/warm_start.py --seeds 1 --rows 20000 --no-census --output /tmp/ws
writes benchmarks/results/warm_start.json, .md and .png (``--output``) and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import ROOT, _census_data, _mean_std, _say  # noqa: E402 - the benchmarks folder is not a package

NEW_TASK = "satisfaction"
OLD_TASKS = ("ctr", "cvr")
SOURCE = ROOT / "configs" / "synthetic" / "warm_start" / "ctr_cvr.yaml"
FULL = ROOT / "configs" / "synthetic" / "mmoe.yaml"
# The warm starts, each from the CTR+CVR model: the README's (embedding frozen) and one that trains everything.
WARM = {
    "warm_frozen_embedding": ["train.freeze=[embedding]", "train.init_from_preprocessing=reuse"],
    "warm": ["train.init_from_preprocessing=reuse"],
}
RUNS = ("scratch", *WARM)


def _train(config: Path, overrides: list[str], out: Path) -> list[dict[str, Any]]:
    from mtrec.config import load_config
    from mtrec.training import train

    return train(load_config(config, overrides), output=out, overwrite=True, progress=False).history


def _reach(history: list[dict[str, Any]], target: float, steps_per_epoch: int) -> dict[str, Any]:
    """Steps and training seconds until the new task's validation AUC first reaches ``target``."""
    seconds = 0.0
    for h in history:
        seconds += h["train_seconds"]
        if h["valid"][NEW_TASK]["auc"] >= target:
            return {"epoch": h["epoch"], "steps": h["epoch"] * steps_per_epoch, "seconds": seconds}
    return {"epoch": None, "steps": None, "seconds": None}


def _test_auc(dirs: dict[str, Path], test_file: Path, baseline: str) -> dict[str, Any]:
    from mtrec.evaluation.compare import compare_models

    paths = {name: str(path) for name, path in dirs.items()}
    comparison = compare_models(list(paths.values()), str(test_file), baseline=paths[baseline])
    out = {}
    for name, path in paths.items():
        tasks = comparison["models"][path]["tasks"]
        out[name] = {t: {k: e.get(k) for k in ("value", "delta", "p_value")} for t, e in tasks.items()}
    return out


def warm_start_seed(seed: int, base: list[str], test_file: Path, work: Path, epochs: int) -> dict[str, Any]:
    """One seed of the warm-start study (module docstring)."""
    run = [*base, f"train.seed={seed}"]
    fixed = [f"train.epochs={epochs}", f"train.patience={epochs}"]
    source = work / f"source-{seed}"
    dirs = {name: work / f"{name}-{seed}" for name in RUNS}
    t0 = time.perf_counter()
    _train(SOURCE, run, source)
    source_s = time.perf_counter() - t0
    histories = {"scratch": _train(FULL, [*run, *fixed], dirs["scratch"])}
    for name, keys in WARM.items():
        histories[name] = _train(FULL, [*run, *fixed, f"train.init_from={source}", *keys], dirs[name])
    scratch = dirs["scratch"]
    rows = json.loads((scratch / "meta.json").read_text())["train_rows"]
    batch = yaml.safe_load((scratch / "config.yaml").read_text())["train"]["batch_size"]
    steps_per_epoch = -(-rows // batch)
    target = max(h["valid"][NEW_TASK]["auc"] for h in histories["scratch"])
    before = _test_auc({"source": source}, test_file, "source")["source"]
    after = _test_auc(dirs, test_file, "scratch")
    return {
        "seed": seed,
        "target_valid_auc": target,
        "steps_per_epoch": steps_per_epoch,
        "source_seconds": source_s,
        "reach": {name: _reach(h, target, steps_per_epoch) for name, h in histories.items()},
        "valid_curve": {name: [h["valid"][NEW_TASK]["auc"] for h in hs] for name, hs in histories.items()},
        "old_tasks_test_auc": {
            t: {"before": before[t]["value"], **{name: after[name][t]["value"] for name in WARM}} for t in OLD_TASKS
        },
        "test_auc": after,
    }


def affinity(name: str, configs: dict[str, Path], base: list[str], work: Path, every: int) -> dict[str, Any]:
    """The averaged affinity matrices of each model on one dataset (seed 0)."""
    out = {}
    for model, config in configs.items():
        path = work / f"affinity-{name}-{model}"
        _say(f"affinity: {name} {model}")
        _train(config, [*base, f"train.affinity_every={every}"], path)
        doc = json.loads((path / "affinity.json").read_text())
        out[model] = {k: doc[k] for k in ("tasks", "gradient_cosine", "lookahead_affinity", "measurements", "shared")}
        out[model]["label_correlations"] = json.loads((path / "meta.json").read_text())["label_correlations"]
    return out


def summarise(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(values: list[Any]) -> dict[str, Any]:
        known = [v for v in values if v is not None]
        return {**(_mean_std(known) if known else {}), "reached": len(known), "of": len(values)}

    out: dict[str, Any] = {"reach": {}, "test_auc": {}, "old_tasks": {}, "vs_scratch": {}}
    for name in RUNS:
        out["reach"][name] = {k: stat([s["reach"][name][k] for s in seeds]) for k in ("steps", "seconds")}
        tasks = seeds[0]["test_auc"][name]
        out["test_auc"][name] = {t: _mean_std([s["test_auc"][name][t]["value"] for s in seeds]) for t in tasks}
    for t in OLD_TASKS:
        keys = ("before", *WARM)
        out["old_tasks"][t] = {k: _mean_std([s["old_tasks_test_auc"][t][k] for s in seeds]) for k in keys}
    for name in WARM:
        deltas = {t: [s["test_auc"][name][t] for s in seeds] for t in seeds[0]["test_auc"][name]}
        out["vs_scratch"][name] = {
            t: {
                "delta": _mean_std([d["delta"] for d in ds]),
                "significant_wins": sum(d["p_value"] < 0.05 and d["delta"] > 0 for d in ds),
                "significant_losses": sum(d["p_value"] < 0.05 and d["delta"] < 0 for d in ds),
            }
            for t, ds in deltas.items()
        }
    return out


def _f(x: dict[str, Any] | None, digits: int = 4) -> str:
    if not x or "mean" not in x:
        return "—"
    return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"


def _matrix(tasks: list[str], m: list[list[Any]], fmt: str) -> list[str]:
    lines = ["| | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for t, row in zip(tasks, m, strict=True):
        lines.append(f"| {t} | " + " | ".join("—" if v is None else format(v, fmt) for v in row) + " |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    s, seeds = result["summary"], result["seeds"]
    warm = "; ".join(f"`{name}`: `{' '.join(keys)}`" for name, keys in WARM.items())
    lines = [
        f"# Warm start: add `{NEW_TASK}` to a CTR+CVR MMoE, against all three tasks from scratch",
        "",
        "Produced by "
        + " and ".join(f"`{c}`" for c in result.get("commands", [result["command"]]))
        + (" (the affinity study by the first)" if "commands" in result else "")
        + f" in {result['seconds'] / 60:.1f} min on {result['machine']}; "
        f"{seeds} seeds, {result['data']['train_rows']:,} training rows, {result['data']['test_rows']:,} "
        f"test rows, {result['epochs']} epochs each without early stopping, validated after each epoch "
        f"(so steps are known to the epoch). Each warm start begins from the CTR+CVR model of the same seed "
        f"(`configs/synthetic/warm_start/ctr_cvr.yaml`, its own 3 epochs not counted); {warm}.",
        "",
        f"## Steps to the scratch model's best validation AUC on `{NEW_TASK}`",
        "",
        "| run | steps | training seconds | reached in |",
        "|---|---|---|---|",
    ]
    for name in RUNS:
        r = s["reach"][name]
        lines.append(
            f"| {name} | {_f(r['steps'], 0)} | {_f(r['seconds'], 1)} | {r['steps']['reached']} of {r['steps']['of']} |"
        )
    tasks = list(s["test_auc"]["scratch"])
    lines += ["", "## Test AUC (mean ± std over the seeds)", ""]
    lines += ["| run | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += [f"| {name} | " + " | ".join(_f(s["test_auc"][name][t]) for t in tasks) + " |" for name in RUNS]
    lines += ["", "Against scratch, per seed (paired DeLong on the test rows; wins / losses at p < 0.05):", ""]
    lines += ["| run | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, versus in s["vs_scratch"].items():
        cells = [
            f"{_f(v['delta'])} ({v['significant_wins']} / {v['significant_losses']} of {seeds})"
            for v in (versus[t] for t in tasks)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Old tasks, test AUC before (the CTR+CVR model) and after each warm start:", ""]
    lines += ["| task | before | " + " | ".join(WARM) + " |", "|---|---|" + "---|" * len(WARM)]
    for t, v in s["old_tasks"].items():
        lines.append(f"| {t} | {_f(v['before'])} | " + " | ".join(_f(v[name]) for name in WARM) + " |")
    for name, models in result.get("affinity", {}).items():
        lines += ["", f"## Task affinity on {name}"]
        for model, doc in models.items():
            lines += ["", f"`{model}` ({doc['measurements']} measurements, shared: {doc['shared']}):", ""]
            if doc["shared"] == "none":
                lines.append("shares no parameters between tasks: nothing to measure.")
                continue
            lines += ["gradient cosine:", "", *_matrix(doc["tasks"], doc["gradient_cosine"], ".3f"), ""]
            lines += ["lookahead affinity:", "", *_matrix(doc["tasks"], doc["lookahead_affinity"], ".2e")]
    if result.get("reading"):
        lines += ["", "## Reading", "", result["reading"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """The new task's validation AUC per epoch, scratch and warm, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for s in result["runs"]:
        for name, color in zip(RUNS, ("#9a9a9a", "#3b75af", "#2e8b57"), strict=False):
            curve = s["valid_curve"][name]
            steps = [(i + 1) * s["steps_per_epoch"] for i in range(len(curve))]
            ax.plot(steps, curve, marker="o", color=color, label=name if s["seed"] == 0 else None)
    ax.set_xlabel("training steps")
    ax.set_ylabel(f"validation AUC, {NEW_TASK}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--test-rows", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--affinity-every", type=int, default=20)
    p.add_argument("--no-census", action="store_true", help="leave census-income out of the affinity study")
    p.add_argument(
        "--affinity-from",
        type=Path,
        default=None,
        help="take the affinity study from this earlier JSON instead of running it",
    )
    p.add_argument("--census-source", type=Path, default=ROOT.parent / "shared" / "data" / "census-income-kdd")
    p.add_argument("--census-data", type=Path, default=ROOT / "data" / "census-income", help="prepared folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra overrides for every run")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "warm_start")
    p.add_argument("--reading", type=Path, default=None)
    p.add_argument("--markdown-only", action="store_true")
    args = p.parse_args()
    json_path = args.output.with_suffix(".json")
    if args.markdown_only:
        result = json.loads(json_path.read_text())
    else:
        result = run(args)
    if args.reading is not None:
        result["reading"] = args.reading.read_text().strip()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result))
    plot(result, args.output.with_suffix(".png"))
    print(json.dumps(result, indent=2))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mtrec.data.synthetic import write_click_log

    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "warm_start",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}",
        "seeds": args.seeds,
        "epochs": args.epochs,
        "data": {"train_rows": args.rows, "test_rows": args.test_rows, "world_seed": 0, "test_sample_seed": 1},
    }
    with tempfile.TemporaryDirectory(prefix="mtrec-warm-") as tmp:
        work = Path(tmp)
        train_file, test_file = work / "train.parquet", work / "test.parquet"
        write_click_log(train_file, args.rows, seed=0)
        write_click_log(test_file, args.test_rows, seed=0, sample_seed=1)
        base = [f"data.train={train_file}", f"train.threads={args.threads}", *args.overrides]
        runs = []
        for seed in range(args.seeds):
            runs.append(warm_start_seed(seed, base, test_file, work, args.epochs))
            r = runs[-1]["reach"]
            _say(f"seed {seed}: steps to target scratch {r['scratch']['steps']}, warm {r['warm']['steps']}")
        result["runs"], result["summary"] = runs, summarise(runs)
        if args.affinity_from is not None:
            earlier = json.loads(args.affinity_from.read_text())
            result["affinity"], result["commands"] = earlier["affinity"], [earlier["command"], result["command"]]
            result["seconds"] = time.perf_counter() - t0 + earlier.get("affinity_seconds", earlier["seconds"])
            return result
        a0 = time.perf_counter()
        folder = ROOT / "configs" / "synthetic"
        models = {m: folder / f"{m}.yaml" for m in ("mmoe", "independent")}
        result["affinity"] = {"synthetic": affinity("synthetic", models, base, work, args.affinity_every)}
        if not args.no_census:
            data, _ = _census_data(args)
            census = [f"data.train={data / 'train.parquet'}", f"data.valid={data / 'valid.parquet'}"]
            census += [f"train.threads={args.threads}", *args.overrides]
            folder = ROOT / "configs" / "census_income"
            models = {m: folder / f"{m}.yaml" for m in ("mmoe", "independent")}
            result["affinity"]["census"] = affinity("census", models, census, work, args.affinity_every)
    result["affinity_seconds"] = time.perf_counter() - a0
    result["seconds"] = time.perf_counter() - t0
    return result


if __name__ == "__main__":
    main()
