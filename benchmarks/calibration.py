"""Calibration on held-out rows: does ``train.calibration`` bring each task's mean prediction to
its observed rate on data the calibration never saw?

The synthetic log's world gives three files: a training file, a validation file (what the
best epoch is chosen on and the calibration is fitted on) and a test file (fresh rows of the
same world). One model (``configs/synthetic/mmoe.yaml``) is trained per method; each test
task's calibration ratio (mean prediction / label mean on its sample space) is reported raw
and calibrated, with its standard error from the label noise of the test and the validation
rows (the target, within 2 % of 1, is only decidable where that error is well below 2 %),
the log loss raw and calibrated, and a reliability plot (binned mean prediction against the
observed rate).

Usage:
    python benchmarks/calibration.py                              # 1M train, 2M valid, 2M test rows
    python benchmarks/calibration.py --train-rows 60000 --valid-rows 60000 --test-rows 60000
writes benchmarks/results/calibration.json (and .png) and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("platt", "isotonic")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _ratio_se(mean_pred: float, y: np.ndarray, valid_positives: int) -> float:
    """Standard error of mean(pred) / mean(y): the test labels' noise and that of the validation
    labels the calibration matched (both binomial)."""
    p = float(y.mean())
    test = (1 - p) / (y.size * p)
    valid = (1 - p) / max(valid_positives, 1)
    return mean_pred / p * math.sqrt(test + valid)


def _bins(p: np.ndarray, y: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Equal-count bins of the prediction: mean prediction and observed rate in each."""
    order = np.argsort(p, kind="stable")
    out = []
    for part in np.array_split(order, bins):
        if part.size:
            out.append({"mean_pred": float(p[part].mean()), "rate": float(y[part].mean()), "rows": int(part.size)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-rows", type=int, default=1_000_000)
    p.add_argument("--valid-rows", type=int, default=2_000_000)
    p.add_argument("--test-rows", type=int, default=2_000_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "calibration")
    args = p.parse_args()

    import pyarrow.parquet as pq
    import torch

    from mtrec.config import load_config
    from mtrec.data.synthetic import write_click_log
    from mtrec.evaluation.evaluate import evaluate_model_dir
    from mtrec.model_dir import load_model_dir
    from mtrec.training import train

    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "calibration",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}",
        "config": "configs/synthetic/mmoe.yaml",
        "rows": {"train": args.train_rows, "valid": args.valid_rows, "test": args.test_rows},
        "methods": {},
    }
    with tempfile.TemporaryDirectory(prefix="mtrec-calibration-") as tmp:
        work = Path(tmp)
        files = {}
        for name, rows, sample in (
            ("train", args.train_rows, None),
            ("valid", args.valid_rows, 1),
            ("test", args.test_rows, 2),
        ):
            files[name] = work / f"{name}.parquet"
            _say(f"generating {name}: {rows:,} rows")
            write_click_log(files[name], rows, seed=0, sample_seed=sample)
        valid = pq.read_table(files["valid"], columns=["click", "conversion", "satisfied"])
        v_click = valid.column("click").to_numpy() == 1
        valid_positives = {
            "ctr": int(v_click.sum()),
            "cvr": int((valid.column("conversion").to_numpy()[v_click] == 1).sum()),
            "satisfaction": int((valid.column("satisfied").to_numpy()[v_click] == 1).sum()),
        }
        result["valid_positives"] = valid_positives
        for method in args.methods.split(","):
            overrides = [
                f"data.train={files['train']}",
                f"data.valid={files['valid']}",
                f"train.epochs={args.epochs}",
                f"train.threads={args.threads}",
                f"train.calibration={method}",
            ]
            config = load_config(ROOT / "configs" / "synthetic" / "mmoe.yaml", overrides)
            out = work / f"model-{method}"
            m0 = time.perf_counter()
            _say(f"training mmoe with calibration {method}")
            train(config, output=out, progress=False)
            ev = evaluate_model_dir(out, str(files["test"]), keep_predictions=True)
            preds = ev.pop("predictions")
            entry: dict[str, Any] = {"seconds": time.perf_counter() - m0, "tasks": {}}
            for j, task in enumerate(preds["tasks"]):
                if task.name not in ev["calibrated"]:
                    continue
                mask = preds["mask"][:, j]
                y = preds["labels"][mask, j].astype(np.float64)
                raw = 1.0 / (1.0 + np.exp(-preds["logits"][task.name][mask].astype(np.float64)))
                calibrator = load_model_dir(out).calibration[task.name]
                cal = calibrator.apply(raw).astype(np.float64)
                raw_m, cal_m = ev["tasks"][task.name], ev["calibrated"][task.name]
                se = _ratio_se(cal_m["mean_pred"], y, valid_positives.get(task.name, 0))
                entry["tasks"][task.name] = {
                    "test_rows": int(y.size),
                    "test_positives": int(y.sum()),
                    "ratio_raw": raw_m["calibration"],
                    "ratio_calibrated": cal_m["calibration"],
                    "ratio_se": se,
                    "within_2pct": abs(cal_m["calibration"] - 1) <= 0.02,
                    "logloss_raw": raw_m["logloss"],
                    "logloss_calibrated": cal_m["logloss"],
                    "auc_raw": raw_m["auc"],
                    "auc_calibrated": cal_m["auc"],
                    "reliability_raw": _bins(raw, y),
                    "reliability_calibrated": _bins(cal, y),
                }
                _say(
                    f"{method} {task.name}: ratio {raw_m['calibration']:.4f} -> {cal_m['calibration']:.4f} "
                    f"(se {se:.4f}), logloss {raw_m['logloss']:.4f} -> {cal_m['logloss']:.4f}"
                )
            result["methods"][method] = entry
    result["seconds"] = time.perf_counter() - t0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, args.output.with_suffix(".png"))
    print(json.dumps(result, indent=2))


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    tasks = list(next(iter(result["methods"].values()))["tasks"]) if methods else []
    fig, axes = plt.subplots(len(methods), len(tasks), figsize=(4 * len(tasks), 3.6 * len(methods)), squeeze=False)
    for r, method in enumerate(methods):
        for c, task in enumerate(tasks):
            ax, entry = axes[r][c], result["methods"][method]["tasks"][task]
            for key, label in (("reliability_raw", "raw"), ("reliability_calibrated", method)):
                pts = entry[key]
                ax.plot([b["mean_pred"] for b in pts], [b["rate"] for b in pts], "o-", label=label)
            top = max(
                max(b["mean_pred"], b["rate"]) for k in ("reliability_raw", "reliability_calibrated") for b in entry[k]
            )
            ax.plot([0, top], [0, top], "k--", lw=0.8)
            ax.set_title(f"{task}: ratio {entry['ratio_raw']:.3f} → {entry['ratio_calibrated']:.3f}")
            ax.set_xlabel("mean prediction (test, 10 equal-count bins)")
            ax.set_ylabel("observed rate")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
