"""Does one multi-task model beat separate single-task models? Test AUC over seeds, with tests.

For each dataset, every seed trains ``independent`` (own tables, network and tower per
task: the single-task baseline), ``shared_embedding``, ``mmoe``, ``ple`` and the
``recommended`` config of its config folder, chooses each model's best epoch on the
validation rows, and scores the test rows once. Then, per seed, every model is compared
with that seed's ``independent`` model by ``mtrec.evaluation.compare`` on the same test rows: the
paired DeLong test of the AUC difference on each task's own sample space.

* synthetic: ``configs/synthetic/``, a generated log of ``--synthetic-rows`` training rows
  (10 % held out for early stopping) and a separate test file drawn from the same world
  with another sample seed (``mtrec datasets synthetic --sample-seed 1``).
* census: ``configs/census_income/`` (group 1: income, never married) and
  ``configs/census_income/group2/`` (college, never married) on the prepared split.

Significance is per seed (each seed's model against the same seed's ``independent``, paired
DeLong on the test rows): a task is a significant win (loss) when p < 0.05 with a positive
(negative) difference in a majority of the seeds. The table also gives a paired t-test of
the per-seed differences across seeds (the seed-to-seed spread, which DeLong on one test
set does not see).

Usage:
    python benchmarks/transfer_study.py                 # everything, 5 seeds
    python benchmarks/transfer_study.py --only synthetic --seeds 2 --synthetic-rows 50000
    python benchmarks/transfer_study.py --markdown-only # rewrite the Markdown and plot from the JSON
writes benchmarks/results/transfer_study.json, .md and .png and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import ROOT, _census_data, _mean_std, _say  # noqa: E402 - the benchmarks folder is not a package

MODELS = ("independent", "shared_embedding", "mmoe", "ple", "recommended")
BASELINE = "independent"
ALPHA = 0.05
SECTIONS = {
    "synthetic": ROOT / "configs" / "synthetic",
    "census": ROOT / "configs" / "census_income",
    "census_group2": ROOT / "configs" / "census_income" / "group2",
}
# The targets for the recommended config.
TARGETS = {"synthetic": {"ctr": 0.725}, "census": {"income": 0.945}, "census_group2": {}}


def _train(config: Path, overrides: list[str], out: Path) -> dict[str, Any]:
    from mtrec.config import load_config
    from mtrec.training import train

    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    result = train(cfg, output=out, overwrite=True, progress=False)
    return {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "seconds_per_epoch": statistics.fmean(h["train_seconds"] for h in result.history),
        "rows_per_second": statistics.fmean(h["rows_per_second"] for h in result.history),
        "seconds": time.perf_counter() - t0,
    }


def _parameters(model_dir: Path) -> int:
    import mtrec

    return sum(p.numel() for p in mtrec.load_model_dir(model_dir).model.parameters())


def _section_data(name: str, args: argparse.Namespace, work: Path) -> tuple[list[str], Path, dict[str, Any]]:
    """Overrides naming the training data, the test file, and what the data was."""
    if name == "synthetic":
        from mtrec.data.synthetic import write_click_log

        train_file, test_file = work / "synthetic-train.parquet", work / "synthetic-test.parquet"
        rows, test_rows = args.synthetic_rows, args.synthetic_test_rows
        _say(f"generating the synthetic log: {rows:,} training rows, {test_rows:,} test rows (sample seed 1)")
        write_click_log(train_file, rows, seed=0)
        truth = write_click_log(test_file, test_rows, seed=0, sample_seed=1)
        info = {"train_rows": rows, "test_rows": test_rows, "world_seed": 0, "test_sample_seed": 1}
        info["best_achievable_auc"] = {
            "ctr": truth["best_auc"]["click"],
            "cvr": truth["best_auc"]["conversion"],
            "satisfaction": truth["best_auc"]["satisfied"],
        }
        return [f"data.train={train_file}"], test_file, info
    data, manifest = _census_data(args)
    base = [f"data.train={data / 'train.parquet'}", f"data.valid={data / 'valid.parquet'}"]
    return base, data / "test.parquet", {"splits": manifest["splits"], "protocol": manifest["protocol"]}


def run_section(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    folder = SECTIONS[name]
    rows = [(m, folder / f"{m}.yaml", []) for m in args.models.split(",") if (folder / f"{m}.yaml").is_file()]
    return run_rows(name, rows, args, work)


Row = tuple[str, Path, list[str]]
"""A table row: its label, the config file and the ``--set`` overrides on top of it."""


def run_rows(
    name: str,
    rows: list[Row],
    args: argparse.Namespace,
    work: Path,
    *,
    gates: bool = False,
    baseline_of: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Trains every row with seeds ``0 .. args.seeds - 1`` on section ``name``'s data, scores
    the test rows, compares each seed's models with its ``independent`` row (paired DeLong),
    and with ``gates`` records the gate diagnostics of gated models on the test rows.

    A row trained on other tasks than ``independent`` (AITM's ``ctcvr``, ESMM's product task)
    names in ``baseline_of`` the row it is compared with instead: separate models on its own
    tasks (a baseline row maps to itself)."""
    from mtrec.evaluation.compare import compare_models

    labels = [label for label, _, _ in rows]
    if BASELINE not in labels:
        raise SystemExit(f"{name}: the study needs an {BASELINE} row")
    base, test_file, info = _section_data(name, args, work)
    base.append(f"train.threads={args.threads}")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in labels}
    total, done, t0 = len(rows) * args.seeds, 0, time.perf_counter()
    for seed in range(args.seeds):
        dirs = {}
        for label, config, overrides in rows:
            out = work / f"{name}-{label}-{seed}"
            run = _train(config, [*base, *overrides, f"train.seed={seed}"], out)
            if seed == 0:
                run["parameters"] = _parameters(out)
            if gates:
                run["gates"] = _gate_summary(out, test_file)
            dirs[label] = out
            runs[label].append(run)
            done += 1
            _say(
                f"[{done}/{total}] {name} {label} seed {seed}: {run['epochs_run']} epochs, best {run['best_epoch']}, "
                f"{run['seconds']:.0f}s (elapsed {(time.perf_counter() - t0) / 60:.1f} min)"
            )
        groups: dict[str, list[str]] = {}
        for label in labels:
            groups.setdefault((baseline_of or {}).get(label, BASELINE), []).append(label)
        for anchor, members in groups.items():  # (each group against its own baseline row)
            comparison = compare_models([str(dirs[m]) for m in members], str(test_file), baseline=str(dirs[anchor]))
            for label in members:
                tasks = comparison["models"][str(dirs[label])]["tasks"]
                runs[label][-1]["test_auc"] = {t: e["value"] for t, e in tasks.items()}
                runs[label][-1]["baseline"] = anchor
                if label != anchor:
                    runs[label][-1]["vs_independent"] = {
                        t: {k: e.get(k) for k in ("delta", "ci_low", "ci_high", "p_value")} for t, e in tasks.items()
                    }
        aucs = "; ".join(f"{m} " + " ".join(f"{v:.4f}" for v in runs[m][-1]["test_auc"].values()) for m in labels)
        _say(f"{name} seed {seed} test AUC: {aucs}")
        for out in dirs.values():
            shutil.rmtree(out, ignore_errors=True)
    summary = {m: _summarise(rs) for m, rs in runs.items()}
    return {"data": info, "models": summary, "targets": _targets(name, summary)}


def _gate_summary(model_dir: Path, test_file: Path) -> dict[str, Any] | None:
    """The gate diagnostics of a gated model on the test rows, in four numbers: the largest
    mean weight any task's gate puts on one expert, the mean gate entropy as a share of its
    maximum, the experts' mean output similarity, and the number of warnings."""
    import pyarrow.parquet as pq

    import mtrec
    from mtrec.data.batches import TensorColumns
    from mtrec.diagnostics import gate_diagnostics

    loaded = mtrec.load_model_dir(model_dir)
    enc = loaded.preprocessor.transform(pq.read_table(test_file))
    report = gate_diagnostics(loaded.model, TensorColumns.from_encoded(enc))
    if report is None:
        return None
    tasks = report["tasks"].values()
    return {
        "largest_share": max(max(t["mean_weight"].values()) for t in tasks),
        "entropy_ratio": statistics.fmean(t["entropy"] / t["max_entropy"] if t["max_entropy"] else 0.0 for t in tasks),
        "expert_similarity": report["expert_similarity"],
        "warnings": len(report["warnings"]),
    }


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    from scipy import stats

    tasks = list(runs[0]["test_auc"])
    out: dict[str, Any] = {
        "test_auc": {t: _mean_std([r["test_auc"][t] for r in runs]) for t in tasks},
        "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in runs),
        "rows_per_second": statistics.fmean(r["rows_per_second"] for r in runs),
        "epochs_run": statistics.fmean(r["epochs_run"] for r in runs),
        "best_epoch": statistics.fmean(r["best_epoch"] for r in runs),
        "parameters": runs[0].get("parameters"),
        "runs": runs,
    }
    if runs[0].get("baseline", BASELINE) != BASELINE:
        out["baseline"] = runs[0]["baseline"]
    gate_runs = [r["gates"] for r in runs if r.get("gates")]
    if gate_runs:
        out["gates"] = {k: _mean_std([g[k] for g in gate_runs]) for k in ("largest_share", "entropy_ratio")}
        sims = [g["expert_similarity"] for g in gate_runs if g["expert_similarity"] is not None]
        out["gates"]["expert_similarity"] = _mean_std(sims) if sims else None
        out["gates"]["warnings"] = sum(g["warnings"] for g in gate_runs)
    if "vs_independent" in runs[0]:
        versus = {}
        for t in tasks:
            per_seed = [r["vs_independent"][t] for r in runs]
            deltas = [d["delta"] for d in per_seed]
            ps = [d["p_value"] for d in per_seed]
            wins = sum(1 for d, p in zip(deltas, ps, strict=True) if p is not None and p < ALPHA and d > 0)
            losses = sum(1 for d, p in zip(deltas, ps, strict=True) if p is not None and p < ALPHA and d < 0)
            # one-sample t-test of the per-seed differences (none when they do not vary)
            t_p = float(stats.ttest_1samp(deltas, 0.0).pvalue) if len(set(deltas)) > 1 else None
            majority = len(deltas) // 2 + 1
            versus[t] = {
                "delta": _mean_std(deltas),
                "delong_p": ps,
                "median_delong_p": statistics.median(p for p in ps if p is not None)
                if any(p is not None for p in ps)
                else None,
                "significant_wins": wins,
                "significant_losses": losses,
                "seed_t_test_p": t_p,
                "verdict": "win" if wins >= majority else "loss" if losses >= majority else "no significant difference",
            }
        out["vs_independent"] = versus
    return out


def _targets(name: str, models: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for ``recommended``: >= independent on every task with no significant
    loss (and, on the synthetic log, a significant win), plus the AUC floors."""
    if "recommended" not in models:
        return {}
    rec, ind = models["recommended"], models[BASELINE]
    checks: dict[str, Any] = {}
    for task, vs in rec["vs_independent"].items():
        diff = rec["test_auc"][task]["mean"] - ind["test_auc"][task]["mean"]
        checks[f"recommended.{task} >= independent.{task}"] = {"value": round(diff, 5), "met": diff >= 0}
        checks[f"no significant loss on {task}"] = {"value": vs["verdict"], "met": vs["verdict"] != "loss"}
    if name == "synthetic":
        verdicts = [vs["verdict"] for vs in rec["vs_independent"].values()]
        checks["a significant win on at least one task"] = {"value": verdicts, "met": "win" in verdicts}
    for task, floor in TARGETS[name].items():
        mean = rec["test_auc"][task]["mean"]
        checks[f"recommended.{task} >= {floor}"] = {"value": round(mean, 4), "met": mean >= floor}
    return checks


# --- Markdown and plot ---------------------------------------------------------------------

TITLES = {
    "synthetic": "Synthetic click log",
    "census": "Census-income (KDD), group 1: income > 50K, never married",
    "census_group2": "Census-income (KDD), group 2: at least some college, never married",
}


def _fmt(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def _vs(v: dict[str, Any], seeds: int) -> str:
    d = v["delta"]["mean"]
    p = v["median_delong_p"]
    p_text = "—" if p is None else f"{p:.2g}"
    word = {"win": "**win**", "loss": "**loss**"}.get(v["verdict"], "n.s.")
    return f"{d:+.4f} (p {p_text}; {v['significant_wins']}↑ {v['significant_losses']}↓ of {seeds}) {word}"


def markdown(result: dict[str, Any]) -> str:
    seeds = result["seeds"]
    lines = [
        f"# Transfer study: multi-task vs separate single-task models ({seeds} seeds)",
        "",
        "Produced by "
        + " and ".join(f"`{c}`" for c in result.get("commands", [result["command"]]))
        + f" in {result['seconds'] / 60:.1f} min of runs on {result['machine']}.",
        "",
        "Test AUC mean ± std over the seeds, each task on its own sample space (CVR and satisfaction on "
        "clicked rows). Against `independent`: the mean AUC difference, the median per-seed p of the "
        "paired DeLong test (each seed's model vs the same seed's independent model, same test rows), "
        f"and in how many seeds it was a significant (p < {ALPHA}) win ↑ or loss ↓; **win** / **loss** "
        "when a majority of the seeds agree. s/epoch: training seconds per epoch, mean over the runs.",
    ]
    for name in SECTIONS:
        if name not in result:
            continue
        sec = result[name]
        models = sec["models"]
        tasks = list(models[BASELINE]["test_auc"])
        lines += ["", f"## {TITLES[name]}", ""]
        data = sec["data"]
        if name == "synthetic":
            best = data["best_achievable_auc"]
            lines += [
                f"{data['train_rows']:,} training rows (10 % held out to choose the best epoch), "
                f"{data['test_rows']:,} test rows drawn from the same world with sample seed "
                f"{data['test_sample_seed']}. Best achievable AUC (true probabilities): "
                + ", ".join(f"{t} {best[t]:.4f}" for t in tasks if t in best)
                + ".",
                "",
            ]
        else:
            rows = {k: v["rows"] for k, v in data["splits"].items()}
            lines += [f"{rows['train']:,} / {rows['valid']:,} / {rows['test']:,} rows, {data['protocol']}.", ""]
        head = "| model | " + " | ".join(f"{t} AUC" for t in tasks)
        head += " | " + " | ".join(f"{t} vs independent" for t in tasks) + " | s/epoch | epochs | parameters |"
        lines += [head, "|---|" + "---|" * (2 * len(tasks) + 3)]
        for model, res in models.items():
            cells = [_fmt(res["test_auc"][t]) for t in tasks]
            versus = res.get("vs_independent")
            cells += [_vs(versus[t], seeds) if versus else "(baseline)" for t in tasks]
            params = f"{res['parameters']:,}" if res.get("parameters") else "—"
            lines.append(
                f"| {model} | " + " | ".join(cells) + f" | {res['seconds_per_epoch']:.1f} "
                f"| {res['epochs_run']:.1f} | {params} |"
            )
        if sec["targets"]:
            lines += ["", "Targets (recommended config):", ""]
            for check, v in sec["targets"].items():
                lines.append(f"- {check}: {v['value']} → {'met' if v['met'] else '**missed**'}")
    if result.get("reading"):
        lines += ["", "## Reading", "", result["reading"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """One panel per dataset: per-task test AUC, mean ± std over the seeds, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SECTIONS if n in result]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        models = result[name]["models"]
        tasks = list(models[BASELINE]["test_auc"])
        width = 0.8 / len(models)
        for i, (model, res) in enumerate(models.items()):
            means = [res["test_auc"][t]["mean"] - models[BASELINE]["test_auc"][t]["mean"] for t in tasks]
            stds = [res["test_auc"][t]["std"] for t in tasks]
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(tasks))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=model)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_title(TITLES[name].split(":")[0])
        ax.set_ylabel("test AUC − independent (mean ± std over seeds)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--only", choices=list(SECTIONS), action="append", help="run these sections (default: all)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated config names")
    p.add_argument("--synthetic-rows", type=int, default=500_000)
    p.add_argument("--synthetic-test-rows", type=int, default=200_000)
    p.add_argument("--census-source", type=Path, default=ROOT.parent / "shared" / "data" / "census-income-kdd")
    p.add_argument("--census-data", type=Path, default=ROOT / "data" / "census-income", help="prepared folder")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "transfer_study")
    p.add_argument("--reading", type=Path, default=None, help="a Markdown file with the reading, added at the end")
    p.add_argument("--markdown-only", action="store_true", help="rewrite OUTPUT.md/.png from OUTPUT.json")
    args = p.parse_args()
    json_path = args.output.with_suffix(".json")
    if args.markdown_only:
        result = json.loads(json_path.read_text())
        for name in SECTIONS:
            if name in result:  # the checks as this version of the script states them
                result[name]["targets"] = _targets(name, result[name]["models"])
        if args.reading is not None:
            result["reading"] = args.reading.read_text().strip()
            json_path.write_text(json.dumps(result, indent=2) + "\n")
        args.output.with_suffix(".md").write_text(markdown(result))
        plot(result, args.output.with_suffix(".png"))
        return

    import torch

    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    result: dict[str, Any] = {
        "benchmark": "transfer_study",
        "seeds": args.seeds,
        "command": command,
        "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}",
        "significance": (
            f"per seed: paired DeLong on the test rows against the same seed's independent model; "
            f"win/loss = p < {ALPHA} with that sign in a majority of seeds; seed_t_test_p: t-test "
            "of the per-seed AUC differences against 0"
        ),
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtrec-transfer-") as tmp:
        for name in SECTIONS:
            if args.only is None or name in args.only:
                s0 = time.perf_counter()
                result[name] = run_section(name, args, Path(tmp))
                result[name]["seconds"] = time.perf_counter() - s0
    result["seconds"] = time.perf_counter() - t0
    if args.only is not None and json_path.is_file():
        # --only updates its sections of an existing study (read now, so that two runs of
        # different sections, one after the other or side by side, both land).
        kept = json.loads(json_path.read_text())
        kept.update({k: v for k, v in result.items() if k in args.only})
        kept["seconds"] = sum(kept[n]["seconds"] for n in SECTIONS if n in kept)
        kept["commands"] = sorted({*kept.get("commands", [kept["command"]]), command})
        result = kept
    if args.reading is not None:
        result["reading"] = args.reading.read_text().strip()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result))
    plot(result, args.output.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
