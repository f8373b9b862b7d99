"""The ``mtrec`` command line: thin wrappers over the Python API.

Bad input (config, data, model directory) prints one line ``mtrec: error: ...`` and
exits with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NoReturn

from mtrec.errors import MtrecError
from mtrec.tables import format_metrics

__all__ = ["main", "run"]

EXAMPLES = {
    "main": """\
examples:
  mtrec quickstart                                  # synthetic log -> MMoE -> AUC, in ./mtrec-quickstart
  mtrec datasets synthetic --rows 200000 --output data/synthetic/clicks.parquet
  mtrec train --config configs/synthetic/mmoe.yaml --set train.epochs=3 --output runs/mmoe
  mtrec evaluate --model runs/mmoe --data data/synthetic/clicks.parquet
  mtrec models
""",
    "quickstart": """\
example:
  mtrec quickstart --rows 200000 --model ple --workdir /tmp/qs
writes WORKDIR/clicks.parquet (+ .truth.json with the best achievable AUC) and the
model directory WORKDIR/model.
""",
    "synthetic": """\
example:
  mtrec datasets synthetic --rows 500000 --seed 1 --output data/synthetic/clicks.parquet
Columns: user/item/author/category/... IDs (Zipf-like, int64 and strings), numeric
features, the list column hist_item_ids, and labels click, conversion (only where
click = 1), dwell_time and satisfied. The AUC of the true probabilities (the best any
model can reach) is written to OUTPUT.truth.json.
""",
    "train": """\
examples:
  mtrec train --config configs/synthetic/mmoe.yaml
  mtrec train --config configs/synthetic/ple.yaml --set train.epochs=5 --set model.num_levels=3 \\
      --output runs/ple --overwrite
  mtrec train --config cfg.yaml --set tasks.cvr.weight=2 --set data.train=data/day1.parquet
  mtrec train --resume runs/ple                     # after an interruption: continue from the last epoch
  torchrun --nproc-per-node 4 -m mtrec train --config configs/synthetic/mmoe.yaml   # DDP on 4 GPUs/processes
--set takes dotted keys; list items are addressed by index or by their name.
""",
    "tune": """\
example:
  mtrec tune --config configs/synthetic/mmoe.yaml --space space.yaml --trials 20 --output runs/tune
space.yaml:
  space:
    train.lr: {type: log, low: 1.0e-4, high: 1.0e-2}
    model.num_experts: {type: int, low: 2, high: 8}
    train.loss_weighting: {type: categorical, choices: [{name: fixed}, {name: famo}]}
  objective: {weights: {ctr.auc: 1.0, cvr.auc: 0.5}}   # optional; default train.monitor
Each trial is a model directory OUTPUT/trial-NNNN; OUTPUT/best.yaml is the best config (for
mtrec train --config), trials.csv and summary.json list every trial, importance.png ranks the
keys. The study is stored in OUTPUT/study.db: the same command again continues it.
""",
    "export": """\
example:
  mtrec export --model runs/mmoe --format onnx --output serve/mmoe.onnx
Inputs: sparse (B, F) int64, dense (B, Dn) float32, seq_lengths (B, S) int64, one (B, L)
int64 tensor per list feature; outputs: one logit tensor per task. OUTPUT.preprocess/
holds the vocabularies, statistics and signature.json.
""",
    "compare": """\
example:
  mtrec compare runs/independent runs/mmoe runs/ple --data data/synthetic/test.parquet --group-by user_id
Lift is the AUC difference to the baseline (and relative, in %), on each task's own rows; its
95% CI and p come from the paired DeLong test (GAUC: a paired bootstrap over groups). "negative
transfer" / "positive transfer" only where the CI excludes 0, else "no significant difference".
--affinity also prints each model's task affinity (gradient cosine and lookahead affinity), from
the affinity.json that `mtrec train` writes with train.affinity_every.
""",
    "evaluate": """\
example:
  mtrec evaluate --model runs/mmoe --data data/synthetic/test.parquet --output metrics.json
Each task is evaluated on its own sample space (e.g. CVR on clicked rows only).
""",
    "score": """\
examples:
  mtrec score --model runs/mmoe --input data/today.parquet --output scores.parquet --keep user_id,item_id
  mtrec score --model runs/mmoe --input data/day=2026-11-23/ --output scores/ --rank "ctr^1*cvr^0.5"
  mtrec score --model runs/mmoe --input "data/*.parquet" --output scores/ --rank "0.7*ctr+0.3*cvr" --overwrite
Output columns: the --keep columns unchanged, one float32 column per task (probability for
binary tasks, value for regression tasks, <task>_c0.. per class for multiclass tasks), then
rank_score with --rank. A folder (or a glob of several files) is scored into a folder, one
file per input file. Nothing is written until every input file's columns have been checked,
and the output appears only when complete.
""",
}


_FMT = argparse.RawDescriptionHelpFormatter


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtrec",
        description="Multi-task recommender ranking (MMoE, PLE, Shared-Bottom) on Parquet click logs.",
        epilog=EXAMPLES["main"],
        formatter_class=_FMT,
    )
    from mtrec._version import __version__

    p.add_argument("--version", action="version", version=f"mtrec {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_quickstart(sub)
    _add_datasets(sub)
    _add_train(sub)
    _add_tune(sub)
    _add_evaluate(sub)
    _add_compare(sub)
    _add_score(sub)
    _add_export(sub)
    sub.add_parser("models", help="list the registered architectures", description="List the architectures.")
    return p


def _command(sub: argparse._SubParsersAction, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """Adds the subcommand ``name``, with ``EXAMPLES[name]`` as its epilog."""
    return sub.add_parser(name, help=summary, description=description, epilog=EXAMPLES[name], formatter_class=_FMT)


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    q = _command(
        sub,
        "quickstart",
        "generate a synthetic click log, train a model, print validation AUC",
        "Generate a synthetic click log, train a multi-task model on it and save the model.",
    )
    q.add_argument("--rows", type=int, default=200_000, help="rows of synthetic data (default 200000)")
    q.add_argument("--model", default="mmoe", help="architecture (see `mtrec models`; default mmoe)")
    q.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    q.add_argument("--seed", type=int, default=0, help="seed of data and training (default 0)")
    q.add_argument("--workdir", type=Path, default=Path("mtrec-quickstart"), help="default ./mtrec-quickstart")
    q.add_argument("--overwrite", action="store_true", help="replace an existing WORKDIR/model")


def _add_datasets(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("datasets", help="generate or prepare datasets", description="Generate or prepare datasets.")
    dsub = d.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    s = _command(
        dsub,
        "synthetic",
        "write a synthetic click log with known ground truth",
        "Write a realistic synthetic click log (one row per impression) as Parquet.",
    )
    s.add_argument("--rows", type=int, required=True, help="number of impressions")
    s.add_argument("--output", type=Path, required=True, help="Parquet file to write")
    s.add_argument("--seed", type=int, default=0, help="seed of the ground-truth world and the rows (default 0)")
    s.add_argument(
        "--sample-seed", type=int, default=None, help="draw other rows from the same world (e.g. a test file)"
    )
    s.add_argument("--overwrite", action="store_true", help="replace an existing file")
    for name, (_, _, summary, example) in PREPARERS.items():
        r = dsub.add_parser(name, help=summary, description=summary + ".", epilog=example, formatter_class=_FMT)
        r.add_argument("--source", type=Path, required=True, help="folder (or file) with the original data")
        r.add_argument("--output", type=Path, required=True, help="folder to write (train/valid/test Parquet)")
        r.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
        r.add_argument("--overwrite", action="store_true", help="replace a folder written by `mtrec datasets`")


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = _command(
        sub,
        "train",
        "train a model from a YAML config",
        "Train a multi-task model from a YAML config and write one model directory.",
    )
    t.add_argument("--config", type=Path, default=None, help="YAML config (see configs/)")
    t.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue an interrupted run of model directory DIR from its last complete epoch",
    )
    t.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="start from the trained model directory DIR (train.init_from: a warm start)",
    )
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override")
    t.add_argument("--output", type=Path, default=None, help="model directory (default: config output)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing model directory when done")
    t.add_argument("--quiet", action="store_true", help="no progress output")


def _add_tune(sub: argparse._SubParsersAction) -> None:
    t = _command(
        sub,
        "tune",
        "search hyper-parameters of a config (Optuna)",
        "Search any dotted config keys with Optuna (TPE, median pruning per epoch); each trial is a model directory.",
    )
    t.add_argument("--config", type=Path, required=True, help="YAML config the trials start from")
    t.add_argument("--space", type=Path, required=True, help="YAML search space (see the example)")
    t.add_argument("--trials", type=int, required=True, help="trials to run now (added to a study in OUTPUT)")
    t.add_argument("--timeout", type=float, default=None, metavar="S", help="stop starting trials after S seconds")
    t.add_argument("--output", type=Path, default=Path("runs/tune"), help="study folder (default runs/tune)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override")
    t.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    t.add_argument("--quiet", action="store_true", help="no progress output")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = _command(
        sub,
        "evaluate",
        "per-task AUC and log loss of a saved model on labelled data",
        "Evaluate a saved model on labelled Parquet data: a table on stdout and a JSON file.",
    )
    e.add_argument("--model", type=Path, required=True, help="model directory written by `mtrec train`")
    e.add_argument("--data", required=True, help="Parquet file, folder or glob with the label columns")
    e.add_argument("--output", type=Path, default=None, help="JSON file (default MODEL/evaluations/<data name>.json)")
    e.add_argument("--batch-size", type=int, default=None, help="rows per prediction batch")
    e.add_argument("--group-by", default=None, metavar="COLUMN", help="also report group AUC, e.g. user_id")
    e.add_argument(
        "--gauc-weighting", choices=["impressions", "clicks"], default="impressions", help="GAUC group weights"
    )
    e.add_argument("--report", type=Path, default=None, metavar="DIR", help="write an HTML report into DIR")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --output file or --report folder")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    c = _command(
        sub,
        "compare",
        "evaluate several models on the same data, with lift over a baseline and its significance",
        "Evaluate several models on the same labelled data: one table of per-task metrics, each "
        "model's lift over a baseline with a 95% CI and p-value (paired DeLong for AUC, paired bootstrap over "
        "groups for GAUC), and negative or positive transfer where the CI excludes 0.",
    )
    c.add_argument("models", nargs="+", type=Path, metavar="DIR", help="model directories")
    c.add_argument("--data", required=True, help="Parquet file, folder or glob with the label columns")
    c.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="baseline model (default: an independent model, else shared_embedding/single_task, else the first)",
    )
    c.add_argument("--group-by", default=None, metavar="COLUMN", help="also compare group AUC")
    c.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="GAUC bootstrap resamples (default: 1000)")
    c.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the GAUC bootstrap (default: 0)")
    c.add_argument("--output", type=Path, default=None, help="also write the comparison as JSON")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    c.add_argument(
        "--affinity",
        action="store_true",
        help="also show each model's task affinity (its affinity.json, from train.affinity_every)",
    )


def _add_score(sub: argparse._SubParsersAction) -> None:
    sc = _command(
        sub,
        "score",
        "batch-score Parquet files with a saved model",
        "Score Parquet file(s) with a saved model, streaming, into Parquet: kept columns, one "
        "prediction column per task and an optional rank score.",
    )
    sc.add_argument("--model", type=Path, required=True, help="model directory written by `mtrec train`")
    sc.add_argument("--input", required=True, help="Parquet file, folder or glob")
    sc.add_argument("--output", type=Path, required=True, help="Parquet file (one input file) or folder")
    sc.add_argument(
        "--keep", default="", metavar="COLS", help="comma-separated input columns to copy, e.g. user_id,item_id"
    )
    sc.add_argument("--batch-size", type=int, default=4096, help="rows per forward pass (default 4096)")
    sc.add_argument(
        "--rank", default=None, metavar="EXPR", help='rank score, e.g. "ctr^1*cvr^0.5" or "0.7*ctr+0.3*cvr"'
    )
    sc.add_argument("--overwrite", action="store_true", help="replace an existing output")
    sc.add_argument(
        "--uncalibrated", action="store_true", help="the raw probabilities of a model trained with train.calibration"
    )
    sc.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: the experts' matrix products in bfloat16 if the first 65,536 rows agree with fp32 "
        "within 6.5e-4 (else fp32, with a note); default fp32",
    )
    sc.add_argument("--quiet", action="store_true", help="no progress output")


def _add_export(sub: argparse._SubParsersAction) -> None:
    x = _command(
        sub,
        "export",
        "export a model to TorchScript or ONNX for serving",
        "Export the network on encoded inputs, with the preprocessing state beside it.",
    )
    x.add_argument("--model", type=Path, required=True, help="model directory")
    x.add_argument("--format", dest="fmt", choices=["torchscript", "onnx"], required=True, help="export format")
    x.add_argument("--output", type=Path, required=True, help="file to write (state goes to OUTPUT.preprocess/)")
    x.add_argument("--overwrite", action="store_true", help="replace existing files")


# Real datasets: name -> (module, function, summary, example). Each function takes
# (source, output, *, seed, overwrite) and returns the manifest it wrote.
PREPARERS: dict[str, tuple[str, str, str, str]] = {
    "census-income": (
        "mtrec.data.census",
        "prepare_census_income",
        "split UCI census-income (KDD) into train/valid/test Parquet with income, never_married and college labels",
        "example:\n  mtrec datasets census-income --source ../shared/data/census-income-kdd --output data/census\n",
    ),
    "ali-ccp": (
        "mtrec.data.logs",
        "prepare_ali_ccp",
        "convert Ali-CCP CSV files (click, purchase) to Parquet",
        "example:\n  mtrec datasets ali-ccp --source ../shared/data/samples/ali-ccp --output data/ali-ccp\n",
    ),
    "aliexpress": (
        "mtrec.data.logs",
        "prepare_aliexpress",
        "convert AliExpress-format CSV files (click, conversion) to Parquet",
        "example:\n  mtrec datasets aliexpress --source ../shared/data/samples/aliexpress --output data/aliexpress\n",
    ),
    "byterec": (
        "mtrec.data.logs",
        "prepare_byterec",
        "convert the ByteDance short-video log (finish, like; tab-separated) to Parquet",
        "example:\n  mtrec datasets byterec --source ../shared/data/samples/byterec --output data/byterec\n",
    ),
}


def _cmd_datasets(args: argparse.Namespace) -> int:
    if args.dataset == "synthetic":
        return _cmd_synthetic(args)
    import importlib

    module, function, _, _ = PREPARERS[args.dataset]
    prepare = getattr(importlib.import_module(module), function)
    t0 = time.perf_counter()
    manifest = prepare(args.source, args.output, seed=args.seed, overwrite=args.overwrite)
    rows = ", ".join(f"{name} {info['rows']:,}" for name, info in manifest["splits"].items())
    print(f"wrote {args.output}: {rows} rows in {time.perf_counter() - t0:.1f}s")
    for task, rate in manifest.get("positive_rate", {}).items():
        print(f"  {task}: {rate:.2%} positive")
    return 0


def _cmd_synthetic(args: argparse.Namespace) -> int:
    from mtrec.data.synthetic import write_click_log
    from mtrec.files import claim_output

    if args.rows < 1:
        raise MtrecError(f"--rows: expected a positive number, got {args.rows}")
    t0 = time.perf_counter()
    with claim_output(args.output, kind=None, overwrite=args.overwrite) as out:
        truth = write_click_log(out, args.rows, seed=args.seed, sample_seed=args.sample_seed)
    best = ", ".join(f"{k} {v:.4f}" for k, v in truth["best_auc"].items())
    print(f"wrote {args.rows:,} rows to {args.output} in {time.perf_counter() - t0:.1f}s")
    print(f"click rate {truth['rates']['click']:.4f}; best achievable AUC: {best}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mtrec.config import load_config
    from mtrec.training import train

    if args.resume is not None:
        from mtrec.files import read_marker, recover, staging_dir
        from mtrec.model_dir import CONFIG

        if args.config is not None or args.overrides or args.output is not None or args.init_from is not None:
            raise MtrecError(
                "--resume DIR: continues with the run's own config; drop --config, --set, --output and --init-from"
            )
        recover(args.resume)  # a run that was killed while it swapped its model in is finished first
        saved = staging_dir(args.resume) / CONFIG
        if not saved.is_file():
            done = read_marker(Path(args.resume))
            if done is not None and done["complete"]:
                raise MtrecError(f"{args.resume}: the run has finished (the model directory is complete)")
            raise MtrecError(f"{args.resume}: nothing to resume (no {saved})")
        config = load_config(saved)
        train(config, output=args.resume, progress=not args.quiet, debug=args.debug, resume=True)
        return 0
    if args.config is None:
        raise MtrecError("train: --config is required (or --resume DIR)")
    overrides = list(args.overrides)
    if args.init_from is not None:  # last, so the flag wins; a JSON string is a YAML string: any path stays text
        overrides.append(f"train.init_from={json.dumps(str(args.init_from))}")
    config = load_config(args.config, overrides)
    train(config, output=args.output, overwrite=args.overwrite, progress=not args.quiet, debug=args.debug)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from mtrec.tuning import tune

    if args.timeout is not None and not args.timeout > 0:
        raise MtrecError(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    summary = tune(
        args.config,
        args.space,
        trials=args.trials,
        output=args.output,
        timeout=args.timeout,
        overrides=tuple(args.overrides),
        seed=args.seed,
        progress=not args.quiet,
    )
    best = summary["best"]
    print(f"best trial {best['trial']}: {best['value']:.4f} with {json.dumps(best['params'])}")
    print(f"best config written to {summary['best_config']} ({len(summary['trials'])} trials in {args.output})")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mtrec.evaluation.evaluate import evaluate_model_dir
    from mtrec.files import atomic_write_text, claim_member, claim_output
    from mtrec.model_dir import EVALUATIONS

    if args.batch_size is not None and args.batch_size < 1:
        raise MtrecError(f"--batch-size: expected a positive number, got {args.batch_size}")
    inputs = [args.model, *_literal_paths(args.data)]
    with ExitStack() as claims:
        # Every output is claimed (checked, locked) before the work, so a refusal costs nothing.
        if args.output is not None:
            out = claims.enter_context(claim_output(args.output, kind=None, overwrite=args.overwrite, inputs=inputs))
        else:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(args.data).rstrip("/")).stem) or "data"
            out = claims.enter_context(claim_member(args.model, f"{EVALUATIONS}/{name}.json"))
        report = None
        if args.report is not None:
            report = claims.enter_context(
                claim_output(
                    args.report, kind="report", overwrite=args.overwrite, inputs=inputs, what="an mtrec report"
                )
            )
        result = evaluate_model_dir(
            args.model,
            args.data,
            batch_size=args.batch_size,
            group_by=args.group_by,
            gauc_weighting=args.gauc_weighting,
            keep_predictions=report is not None,
        )
        predictions = result.pop("predictions", None)
        # The file first: a reader of stdout that stops early (`| head`) must not lose it.
        atomic_write_text(out, json.dumps(result, indent=2))
        page = None
        if report is not None and predictions is not None:
            from mtrec.evaluation.report import write_report
            from mtrec.files import staged_dir

            with staged_dir(report, "report") as staging:
                write_report(staging, result, predictions, args.model)
            page = report / "report.html"
    print(format_metrics(result["tasks"]))
    for name, cal in result.get("calibrated", {}).items():
        raw = result["tasks"][name]
        parts = [
            f"{key} {cal[key]:.4f} (raw {raw[key]:.4f})"
            for key in ("calibration", "logloss", "auc")
            if cal.get(key) is not None and raw.get(key) is not None
        ]
        print(f"calibrated {name}: " + ", ".join(parts))
    if "gates" in result:
        from mtrec.diagnostics import format_gates

        print()
        print(format_gates(result["gates"]))
    print(f"metrics written to {out}")
    if page is not None:
        print(f"report written to {page}")
    return 0


def _literal_paths(spec: str) -> list[str]:
    """A data argument as paths the outputs may not touch (a glob has none of its own)."""
    return [] if any(c in spec for c in "*?[") else [spec]


def _cmd_compare(args: argparse.Namespace) -> int:
    from mtrec.evaluation.compare import compare_models, format_comparison
    from mtrec.files import atomic_write_text, claim_output

    with ExitStack() as claims:
        out = None
        if args.output is not None:
            inputs = [*args.models, *_literal_paths(args.data)]
            out = claims.enter_context(claim_output(args.output, kind=None, overwrite=args.overwrite, inputs=inputs))
        comparison = compare_models(
            args.models,
            args.data,
            baseline=args.baseline,
            group_by=args.group_by,
            bootstrap=args.bootstrap,
            seed=args.seed,
            affinity=args.affinity,
        )
        print(format_comparison(comparison))
        if out is not None:
            atomic_write_text(out, json.dumps(comparison, indent=2))
            print(f"comparison written to {args.output}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from mtrec.data.synthetic import write_click_log
    from mtrec.files import claim_output
    from mtrec.quickstart import quickstart_config
    from mtrec.training import train

    workdir: Path = args.workdir
    model_dir = workdir / "model"
    data = workdir / "clicks.parquet"
    # Both outputs are checked (and held) before anything is generated.
    with (
        claim_output(model_dir, kind="model", overwrite=args.overwrite, what="an mtrec model directory"),
        claim_output(data, kind=None, overwrite=args.overwrite) as data_out,
    ):
        print(f"1/2 generating {args.rows:,} synthetic impressions -> {data}", flush=True)
        truth = write_click_log(data_out, args.rows, seed=args.seed)
        config = quickstart_config(str(data), model=args.model, epochs=args.epochs, seed=args.seed)
        print(f"2/2 training {args.model} for up to {args.epochs} epoch(s)", flush=True)
        result = train(config, output=model_dir, overwrite=args.overwrite)
    print()
    print("validation metrics of the best epoch (each task on its own sample space):")
    print(format_metrics(result.best_metrics))
    print(
        "best achievable AUC (true probabilities): " + ", ".join(f"{k} {v:.4f}" for k, v in truth["best_auc"].items())
    )
    print(f"model directory: {model_dir}")
    print(f"next: mtrec evaluate --model {model_dir} --data {data}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mtrec.inference.export import export_model

    signature = export_model(args.model, args.output, fmt=args.fmt, overwrite=args.overwrite)
    outputs = ", ".join(o["name"] for o in signature["outputs"])
    print(f"exported {args.model} as {args.fmt} to {args.output} (outputs: {outputs})")
    print(f"preprocessing state and signature.json in {args.output}.preprocess")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    import signal

    from mtrec.inference.score import score_parquet

    keep = [c.strip() for c in args.keep.split(",") if c.strip()]

    def _terminated(signum: int, frame: Any) -> None:
        # SIGTERM as KeyboardInterrupt, so that the temporary output is removed on the way out.
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        result = score_parquet(
            args.model,
            args.input,
            args.output,
            keep=keep,
            batch_size=args.batch_size,
            rank=args.rank,
            overwrite=args.overwrite,
            progress=not args.quiet,
            calibrated=not args.uncalibrated,
            precision=args.precision,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    if "precision_note" in result:
        print(f"mtrec: {result['precision_note']}", file=sys.stderr)
    print(
        f"scored {result['rows']:,} rows from {result['files']} file(s) in {result['seconds']:.1f}s "
        f"({result['rows_per_second']:,.0f} rows/s) -> {result['output']}"
    )
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from mtrec.models import list_models

    for name, desc in list_models().items():
        print(f"{name:15s} {desc}")
    return 0


# Commands that run a loop of same-sized batches: they keep freed memory for the next batch
# (mtrec.allocator; the library itself leaves the process's allocator alone).
_BATCH_LOOPS = frozenset({"quickstart", "train", "tune", "evaluate", "score"})


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    handlers = {
        "quickstart": _cmd_quickstart,
        "datasets": _cmd_datasets,
        "train": _cmd_train,
        "tune": _cmd_tune,
        "evaluate": _cmd_evaluate,
        "models": _cmd_models,
        "compare": _cmd_compare,
        "score": _cmd_score,
        "export": _cmd_export,
    }
    if args.command in _BATCH_LOOPS:
        from mtrec.allocator import retain_freed_memory

        retain_freed_memory()
    try:
        return handlers[args.command](args)
    except MtrecError as exc:
        if args.debug:
            raise
        print(f"mtrec: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `mtrec evaluate ... | head`: the reader left; stop quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # A full disk, a read-only folder, a vanished file: one line, like any bad input.
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mtrec: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtrec: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``mtrec`` process: :func:`main`, then an exit that skips tearing the interpreter down.

    Freeing every module and object of torch and its compiler stack at exit took 0.7-1.1 s
    after ``mtrec train`` (measured at 500k rows), time in which nothing is left to do: the
    command's files are written and closed. So the exit handlers run (logging's flush,
    anything registered with :mod:`atexit`), threads still running are waited for, the
    standard streams are flushed and the process ends with ``os._exit``. Under
    ``torchrun`` (``WORLD_SIZE`` > 1) the ordinary exit is kept.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit(code)
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader of a pipe left: as main() answers it
        code = 141
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
