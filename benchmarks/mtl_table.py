"""The multi-task table: architectures, gate options and loss weightings, each against `independent`.

Every row is a shipped config of the section's folder (``configs/synthetic/``,
``configs/census_income/``) with, for a variant, ``--set`` overrides on top; a row whose config
the folder lacks is left out of that section. Each seed trains every row, chooses its best
epoch on the validation rows and scores the test rows once; per seed, every row is compared
with the same seed's ``independent`` model by paired DeLong on each task's own sample space
(the machinery of ``transfer_study.py``). Gated rows also carry their gate diagnostics on the
test rows: the largest mean weight a task's gate puts on one expert (1.0: collapsed), the mean
gate entropy as a share of its maximum (1.0: uniform), and the experts' output similarity.

The rows (``ROWS``): the architectures; MMoE with each gate option (DSelect-k, the importance
load-balancing loss, HoME's expert normalisation); the input blocks (DCN-v2 cross layers,
DIN target attention where the data has a behaviour sequence) and every loss weighting on
the section's recommended config. Each option at one fixed setting chosen before the run
(no tuning on any split).

Usage:
    python benchmarks/mtl_table.py                          # every row, both sections, 3 seeds
    python benchmarks/mtl_table.py --only census --rows independent,mmoe,mmoe_dselect_k
    python benchmarks/mtl_table.py --markdown-only          # rewrite the Markdown and plot from the JSON
writes benchmarks/results/mtl_table.json, .md and .png (``--output``) and prints the JSON.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import ROOT  # noqa: E402 - the benchmarks folder is not a package
from train_throughput import WEIGHTINGS  # noqa: E402 - every weighting but fixed, one list for both
from transfer_study import ALPHA, BASELINE, TITLES, _fmt, _vs, run_rows  # noqa: E402

SECTIONS = {"synthetic": ROOT / "configs" / "synthetic", "census": ROOT / "configs" / "census_income"}
ROWS: dict[str, tuple[str, list[str]]] = {
    **{
        name: (name, [])
        for name in (
            "independent",
            "shared_embedding",
            "shared_bottom",
            "omoe",
            "mmoe",
            "cgc",
            "ple",
            "cross_stitch",
            "stem_net",
            "dbmtl",
            "adatt",
            "pepnet",
            "aitm",
        )
    },
    "mmoe_dselect_k": ("mmoe", ["model.gate=dselect_k", "model.gate_k=2", "model.gate_entropy=0.01"]),
    "mmoe_balance": ("mmoe", ["model.expert_balance=0.1"]),
    "mmoe_home_norm": ("mmoe", ["model.expert_norm=true"]),
    "recommended": ("recommended", []),
    "recommended_dcn_v2": ("recommended", ["features.interaction={name: dcn_v2, layers: 2}"]),
    "recommended_din": (
        "recommended",
        ["features.sequence.hist_item_ids.pooling=target_attention", "features.sequence.hist_item_ids.target=item_id"],
    ),
    **{f"recommended_{w}": ("recommended", [f"train.loss_weighting={{name: {w}}}"]) for w in WEIGHTINGS},
    # Rows on other tasks than independent's, each against a baseline on its own tasks: ESCM2
    # against the ESMM it adds its risk to (ESMM over independent models is refused: it shares
    # nothing for the product to learn from), AITM against separate models on its two tasks.
    "esmm_ple": ("esmm_ple", []),
    "escm2_ips_ple": ("esmm_ple", ["esmm.counterfactual=ips"]),
    "escm2_dr_ple": ("esmm_ple", ["esmm.counterfactual=dr"]),
    "independent_aitm": (
        "independent",
        ["tasks=[{name: ctr, label: click, type: binary}, {name: ctcvr, label: conversion, type: binary}]"],
    ),
}
# The baseline of each row trained on other tasks (a baseline is its own); every other row's is independent.
BASELINE_OF = {
    "esmm_ple": "esmm_ple",
    "escm2_ips_ple": "esmm_ple",
    "escm2_dr_ple": "esmm_ple",
    "independent_aitm": "independent_aitm",
    "aitm": "independent_aitm",
}
# Rows that need what only some sections' data has (a behaviour sequence).
ONLY_IN = {"recommended_din": ("synthetic",)}
GROUPS = {
    "architectures": [k for k, (c, o) in ROWS.items() if not o and c != "recommended" and k not in BASELINE_OF],
    "gate options on mmoe": ["mmoe_dselect_k", "mmoe_balance", "mmoe_home_norm"],
    "input blocks on the recommended config": ["recommended", "recommended_dcn_v2", "recommended_din"],
    "loss weighting on the recommended config": ["recommended", *(f"recommended_{w}" for w in WEIGHTINGS)],
}


def plot_table(result: dict[str, Any], path: Path) -> None:
    """One horizontal bar chart per section and task: each row's test AUC minus that of
    ``independent`` (mean ± std over the seeds), rows named on the axis in the table's order,
    bars in blue where a majority of the seeds won significantly, red where they lost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SECTIONS if n in result]
    panels = [(n, t) for n in names for t in result[n]["models"][BASELINE]["test_auc"]]
    order = [r for r in ROWS if any(r in result[n]["models"] for n in names)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 0.28 * len(order) + 1.6), squeeze=False)
    for ax, (name, task) in zip(axes[0], panels, strict=True):
        models = result[name]["models"]
        base = models[BASELINE]["test_auc"][task]["mean"]
        rows = [r for r in order if r in models and models[r].get("baseline", BASELINE) == BASELINE]
        means = [models[r]["test_auc"][task]["mean"] - base for r in rows]
        stds = [models[r]["test_auc"][task]["std"] for r in rows]
        verdicts = [(models[r].get("vs_independent") or {}).get(task, {}).get("verdict", "") for r in rows]
        colors = ["#3b75af" if v == "win" else "#c0392b" if v == "loss" else "#9a9a9a" for v in verdicts]
        ax.barh(range(len(rows)), means, xerr=stds, color=colors, capsize=2)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0][0] or name != panels[0][0] else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_title(f"{TITLES[name].split(':')[0].split(',')[0]}: {task}", fontsize=9)
        ax.set_xlabel("test AUC − independent", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_rows(name: str, labels: list[str]) -> list[tuple[str, Path, list[str]]]:
    """The rows ``labels`` whose config section ``name``'s folder has, independent first."""
    folder = SECTIONS[name]
    rows = []
    for label in [BASELINE, *(lab for lab in labels if lab != BASELINE)]:
        config, overrides = ROWS[label]
        if (folder / f"{config}.yaml").is_file() and name in ONLY_IN.get(label, (name,)):
            rows.append((label, folder / f"{config}.yaml", overrides))
    # A baseline of other tasks is trained where a row it is the baseline of is (and only there).
    present = {label for label, _, _ in rows}
    needed = {BASELINE_OF[lab] for lab in present if lab in BASELINE_OF and BASELINE_OF[lab] != lab}
    rows = [r for r in rows if BASELINE_OF.get(r[0]) != r[0] or r[0] in needed]
    for base in sorted(needed - present):
        config, overrides = ROWS[base]
        rows.insert(1, (base, folder / f"{config}.yaml", overrides))
    return rows


def _gate_cell(res: dict[str, Any]) -> str:
    g = res.get("gates")
    if not g:
        return "—"
    sim = g["expert_similarity"]
    sim_text = "—" if sim is None else f"{sim['mean']:.2f}"
    return f"{g['largest_share']['mean']:.2f} / {g['entropy_ratio']['mean']:.2f} / {sim_text}"


def markdown(result: dict[str, Any]) -> str:
    seeds = result["seeds"]
    lines = [
        f"# Multi-task table: each row against `independent` ({seeds} seeds)",
        "",
        "Produced by "
        + " and ".join(f"`{c}`" for c in result.get("commands", [result["command"]]))
        + f" in {result['seconds'] / 60:.1f} min of runs on {result['machine']}.",
        "",
        "Test AUC mean ± std over the seeds, each task on its own sample space. Against `independent`: "
        "the mean AUC difference, the median per-seed p of the paired DeLong test (each seed's model vs "
        f"the same seed's independent model, same test rows), and in how many seeds it was a significant "
        f"(p < {ALPHA}) win ↑ or loss ↓; **win** / **loss** when a majority of the seeds agree. "
        "Gates: largest mean expert weight of any task's gate / gate entropy as a share of its maximum / "
        "mean cosine similarity of the experts' outputs, on the test rows, mean over seeds. s/epoch: "
        "training seconds per epoch, mean over the runs (a shared 2-core machine).",
    ]
    for name in SECTIONS:
        if name not in result:
            continue
        models = result[name]["models"]
        tasks = list(models[BASELINE]["test_auc"])
        lines += ["", f"## {TITLES[name]}", "", _data_line(result[name]["data"], tasks), ""]
        head = "| row | " + " | ".join(f"{t} AUC" for t in tasks)
        head += " | " + " | ".join(f"{t} vs independent" for t in tasks) + " | gates | s/epoch | epochs |"
        lines += [head, "|---|" + "---|" * (2 * len(tasks) + 3)]
        for group, labels in GROUPS.items():
            present = [lab for lab in labels if lab in models and (lab != BASELINE or group == "architectures")]
            if not present:
                continue
            lines.append(f"| *{group}* |" + " |" * (2 * len(tasks) + 3))
            lines += [_row_line(label, models[label], tasks, seeds) for label in present]
        for base in sorted({b for lab, b in BASELINE_OF.items() if lab in models}):
            own = [base, *(lab for lab in ROWS if BASELINE_OF.get(lab) == base and lab != base and lab in models)]
            tasks = list(models[base]["test_auc"])
            lines += ["", f"Rows on other tasks, against `{base}` (on the same tasks):", ""]
            head = "| row | " + " | ".join(f"{t} AUC" for t in tasks)
            head += " | " + " | ".join(f"{t} vs {base}" for t in tasks) + " | gates | s/epoch | epochs |"
            lines += [head, "|---|" + "---|" * (2 * len(tasks) + 3)]
            lines += [_row_line(label, models[label], tasks, seeds) for label in own]
        lines += [
            "",
            "Rows: "
            + "; ".join(
                f"`{lab}` = {ROWS[lab][0]}.yaml {' '.join(ROWS[lab][1])}".rstrip() for lab in models if ROWS[lab][1]
            )
            + ".",
        ]
    if result.get("timing_note"):
        lines += ["", f"Timing: {result['timing_note']}."]
    if result.get("reading"):
        lines += ["", "## Reading", "", result["reading"]]
    return "\n".join(lines) + "\n"


def _row_line(label: str, res: dict[str, Any], tasks: list[str], seeds: int) -> str:
    cells = [_fmt(res["test_auc"][t]) for t in tasks]
    versus = res.get("vs_independent")
    cells += [_vs(versus[t], seeds) if versus else "(baseline)" for t in tasks]
    return (
        f"| {label} | "
        + " | ".join(cells)
        + f" | {_gate_cell(res)} | {res['seconds_per_epoch']:.1f} | {res['epochs_run']:.1f} |"
    )


def _data_line(data: dict[str, Any], tasks: list[str]) -> str:
    if "train_rows" in data:
        best = data["best_achievable_auc"]
        return (
            f"{data['train_rows']:,} training rows (10 % held out to choose the best epoch), {data['test_rows']:,} "
            f"test rows from the same world (sample seed {data['test_sample_seed']}); best achievable AUC: "
            + ", ".join(f"{t} {best[t]:.4f}" for t in tasks if t in best)
            + "."
        )
    rows = {k: v["rows"] for k, v in data["splits"].items()}
    return f"{rows['train']:,} / {rows['valid']:,} / {rows['test']:,} rows, {data['protocol']}."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", choices=list(SECTIONS), action="append", help="run these sections (default: all)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row labels (default: all)")
    p.add_argument("--synthetic-rows", type=int, default=500_000)
    p.add_argument("--synthetic-test-rows", type=int, default=200_000)
    p.add_argument("--census-source", type=Path, default=ROOT.parent / "shared" / "data" / "census-income-kdd")
    p.add_argument("--census-data", type=Path, default=ROOT / "data" / "census-income", help="prepared folder")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "mtl_table")
    p.add_argument("--reading", type=Path, default=None, help="a Markdown file with the reading, added at the end")
    p.add_argument("--markdown-only", action="store_true", help="rewrite OUTPUT.md/.png from OUTPUT.json")
    args = p.parse_args()
    json_path = args.output.with_suffix(".json")
    labels = args.rows.split(",")
    unknown = sorted(set(labels) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {', '.join(unknown)} (expected some of {', '.join(ROWS)})")
    if args.markdown_only:
        result = json.loads(json_path.read_text())
    else:
        import torch

        result = {
            "benchmark": "mtl_table",
            "seeds": args.seeds,
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}",
            "rows": {lab: {"config": ROWS[lab][0], "overrides": ROWS[lab][1]} for lab in labels},
        }
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="mtrec-mtl-") as tmp:
            for name in SECTIONS:
                if args.only is None or name in args.only:
                    s0 = time.perf_counter()
                    rows = section_rows(name, labels)
                    result[name] = run_rows(name, rows, args, Path(tmp), gates=True, baseline_of=BASELINE_OF)
                    result[name]["seconds"] = time.perf_counter() - s0
        result["seconds"] = time.perf_counter() - t0
        if args.only is not None and json_path.is_file():
            # --only updates its sections of an existing table (read now, so that runs of
            # different sections one after the other both land).
            kept = json.loads(json_path.read_text())
            for name in args.only:
                # rows of one section from several runs: each seed's models are compared with
                # that run's own independent model (training is deterministic per seed on the CPU)
                if name in kept:
                    old_models = kept[name]["models"]
                    result[name]["models"] = {**old_models, **result[name]["models"]}
                    result[name]["seconds"] += kept[name].get("seconds", 0.0)
                kept[name] = result[name]
            kept["rows"] = {**kept.get("rows", {}), **result["rows"]}
            kept["seconds"] = sum(kept[n]["seconds"] for n in SECTIONS if n in kept)
            kept["commands"] = sorted({*kept.get("commands", [kept["command"]]), result["command"]})
            result = kept
    if args.reading is not None:
        result["reading"] = args.reading.read_text().strip()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result))
    plot_table(result, args.output.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
