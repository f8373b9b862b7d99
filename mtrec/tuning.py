"""``mtrec tune``: a hyper-parameter search over any dotted config key, on Optuna (the optional
``tune`` extra).

The search space is a YAML file of dotted keys and their ranges, plus an optional objective::

    space:
      train.lr: {type: log, low: 1.0e-4, high: 1.0e-2}
      model.num_experts: {type: int, low: 2, high: 8}
      model.expert_hidden: {type: categorical, choices: [[128, 64], [256, 128]]}
      train.loss_weighting: {type: categorical, choices: [{name: fixed}, {name: famo}]}
      model.dropout: {type: uniform, low: 0.0, high: 0.3}
    objective:                  # optional; default: the config's train.monitor
      weights: {ctr.auc: 1.0, cvr.auc: 0.5}   # a weighted sum of validation metrics, maximised
                                              # (a log loss term takes a negative weight)
    sampler: tpe                # tpe (default) or random
    pruning: true               # stop a trial whose epoch is worse than the median (default)

Each trial trains an ordinary model directory (``OUTPUT/trial-0007``) with the sampled keys
laid over the config as ``--set`` overrides; its value is the objective of the epoch the model
directory keeps (the best by ``train.monitor``), reported after every epoch so that Optuna's
median pruner can stop a hopeless trial (its half-trained directory is removed). A combination
the config refuses fails its trial and the study goes on. The study is stored in
``OUTPUT/study.db`` (SQLite), so a second ``mtrec tune`` with the same output continues it. At the end ``OUTPUT`` holds
``best.yaml`` (the best trial's whole config, which ``mtrec train --config`` accepts),
``trials.csv`` and ``summary.json`` (every trial's parameters, value and state) and
``importance.png`` (Optuna's parameter importances, once two trials are complete).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from mtrec.errors import ConfigError, MtrecError

__all__ = ["SearchSpace", "load_space", "tune"]

TYPES = ("log", "uniform", "int", "categorical")


class SearchSpace:
    """A parsed search-space file: ``params`` (dotted key -> range), the objective and the sampler."""

    def __init__(
        self, params: dict[str, dict[str, Any]], weights: dict[str, float] | None, sampler: str, pruning: bool
    ) -> None:
        self.params, self.weights, self.sampler, self.pruning = params, weights, sampler, pruning


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_space(path: str | Path) -> SearchSpace:
    """Reads and checks a search-space file; :class:`ConfigError` naming the file and the key."""
    from mtrec.config import parse_yaml_text

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    raw = parse_yaml_text(text, str(path))
    if not isinstance(raw, dict) or not isinstance(raw.get("space"), dict) or not raw["space"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'space' of dotted config keys")
    unknown = sorted(set(raw) - {"space", "objective", "sampler", "pruning"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} (expected space, objective, sampler, pruning)")
    params: dict[str, dict[str, Any]] = {}
    for key, spec in raw["space"].items():
        where = f"{path}: space.{key}"
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise ConfigError(f"{where}: expected {{type: {' | '.join(TYPES)}, ...}}, got {spec!r}")
        kind = spec["type"]
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices or set(spec) != {"type", "choices"}:
                raise ConfigError(f"{where}: categorical needs a non-empty list 'choices' (and nothing else)")
        else:
            low, high = spec.get("low"), spec.get("high")
            if set(spec) - {"type", "low", "high", "step"} or not (_number(low) and _number(high)):
                raise ConfigError(f"{where}: {kind} needs numbers low and high, got {low!r} and {high!r}")
            if not low < high:  # type: ignore[operator]
                raise ConfigError(f"{where}: low must be below high, got {low} and {high}")
            if kind == "log" and low <= 0:  # type: ignore[operator]
                raise ConfigError(f"{where}: log needs low > 0, got {low}")
            if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
                raise ConfigError(f"{where}: int needs integer low and high, got {low!r} and {high!r}")
            step = spec.get("step", 1)
            if "step" in spec and (kind != "int" or not isinstance(step, int) or isinstance(step, bool) or step < 1):
                raise ConfigError(f"{where}: step is for int ranges only, a positive integer; got {step!r}")
        params[str(key)] = dict(spec)
    weights = None
    objective = raw.get("objective")
    if objective is not None:
        w = objective.get("weights") if isinstance(objective, dict) else None
        if not isinstance(w, dict) or not w or not all(_number(v) for v in w.values()) or set(objective) != {"weights"}:
            raise ConfigError(f"{path}: objective: expected {{weights: {{TASK.METRIC: number, ...}}}}")
        weights = {str(k): float(v) for k, v in w.items()}
    sampler = raw.get("sampler", "tpe")
    if sampler not in ("tpe", "random"):
        raise ConfigError(f"{path}: sampler: expected tpe or random, got {sampler!r}")
    pruning = raw.get("pruning", True)
    if not isinstance(pruning, bool):
        raise ConfigError(f"{path}: pruning: expected true or false, got {pruning!r}")
    return SearchSpace(params, weights, sampler, pruning)


def _override(key: str, value: Any) -> str:
    """``key=value`` in the YAML flow form ``--set`` reads."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"


def _objective_value(record: Mapping[str, Any], weights: dict[str, float] | None) -> tuple[float, bool]:
    """An epoch's objective and whether higher is better (the monitor, or the weighted sum)."""
    if weights is None:
        from mtrec.tasks import higher_is_better

        value = record["monitor_value"]
        return (math.nan if value is None else float(value)), higher_is_better(record["monitor"])
    total = 0.0
    for key, w in weights.items():
        task, _, metric = key.partition(".")
        value = record["valid"].get(task, {}).get(metric)
        if value is None:
            return math.nan, True
        total += w * float(value)
    return total, True


def _check_objective(weights: dict[str, float] | None, config: Any, path: Path) -> None:
    if weights is None:
        return
    tasks = {t.name: t for t in config.schema.output_tasks}
    for key in weights:
        task, _, metric = key.partition(".")
        if task not in tasks or metric not in tasks[task].kind.monitorable:
            choices = [f"{t.name}.{m}" for t in tasks.values() for m in t.kind.monitorable]
            raise ConfigError(f"{path}: objective.weights.{key}: expected one of {', '.join(choices)}")


def tune(
    config_path: str | Path,
    space_path: str | Path,
    *,
    trials: int,
    output: str | Path,
    timeout: float | None = None,
    overrides: tuple[str, ...] = (),
    seed: int = 0,
    progress: bool = True,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Runs (or continues) the study; returns the summary written to ``OUTPUT/summary.json``.

    Raises:
        ConfigError: A bad space file, a key the config does not have or a value it refuses
            (checked on a first sample before any trial trains), or Optuna is not installed.
    """
    try:
        import optuna
    except ImportError:
        raise ConfigError("tune: needs Optuna (pip install 'mtrec-rank[tune]')") from None
    from mtrec.config import load_config
    from mtrec.files import output_path

    if trials < 1:
        raise MtrecError(f"--trials: expected a positive number, got {trials}")
    if not 0 <= seed < 2**31:
        raise MtrecError(f"--seed: expected 0 <= seed < 2**31, got {seed}")
    space = load_space(space_path)
    out = output_path(output)
    base = load_config(config_path, overrides)
    _check_objective(space.weights, base, Path(space_path))
    # Every key and every range end must give a valid config before the first trial trains.
    for key, spec in space.params.items():
        probes = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for value in probes:
            try:
                load_config(config_path, [*overrides, _override(key, value)])
            except ConfigError as exc:
                raise ConfigError(f"{space_path}: space.{key}: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    study, higher = _open_study(optuna, out, space, base.train.monitor, str(config_path), seed)
    done_before = len(study.trials)
    run = _TrialRunner(optuna, config_path, overrides, space, out, higher, stream or sys.stderr, progress)
    study.optimize(run, n_trials=trials, timeout=timeout, catch=())
    summary = _write_results(optuna, study, out, space, config_path, overrides, higher)
    summary.update(config=str(config_path), space=str(space_path), new_trials=len(study.trials) - done_before)
    summary["objective"] = space.weights or base.train.monitor
    from mtrec.files import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _open_study(optuna: Any, out: Path, space: SearchSpace, monitor: str, config: str, seed: int) -> tuple[Any, bool]:
    """The study in ``OUTPUT/study.db`` (new, or the one to continue) and whether it maximises."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A continued study seeds its sampler past the trials it has, so it does not draw them again.
    storage = f"sqlite:///{out / 'study.db'}"
    known = {s.study_name: s.n_trials for s in optuna.study.get_all_study_summaries(storage)}
    seed = seed + known.get("mtrec", 0)
    sampler = (
        optuna.samplers.TPESampler(seed=seed) if space.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed)
    )
    pruner = optuna.pruners.MedianPruner(n_warmup_steps=1) if space.pruning else optuna.pruners.NopPruner()
    probe_record = {"monitor": monitor, "monitor_value": 0.0, "valid": {}}
    higher = True if space.weights is not None else _objective_value(probe_record, None)[1]
    study = optuna.create_study(
        study_name="mtrec",
        storage=storage,
        load_if_exists=True,
        direction="maximize" if higher else "minimize",
        sampler=sampler,
        pruner=pruner,
    )
    # A continued study must search the same space for the same objective: Optuna keeps the
    # stored direction and its categorical indices, so anything else would be silently wrong.
    fingerprint = json.dumps(
        {"space": space.params, "objective": space.weights or monitor, "config": config}, sort_keys=True
    )
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif stored != fingerprint:
        raise ConfigError(
            f"{out / 'study.db'}: holds a study of another config, space or objective; "
            "continue it with the same files, or choose another --output"
        )
    return study, higher


def _suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """One value per key of the space, drawn by the trial."""
    chosen = {}
    for key, spec in space.params.items():
        kind = spec["type"]
        if kind == "categorical":
            chosen[key] = spec["choices"][trial.suggest_categorical(key, list(range(len(spec["choices"]))))]
        elif kind == "int":
            chosen[key] = trial.suggest_int(key, spec["low"], spec["high"], step=int(spec.get("step", 1)))
        else:
            chosen[key] = trial.suggest_float(key, spec["low"], spec["high"], log=kind == "log")
    return chosen


class _TrialRunner:
    """Optuna's objective: trains one trial's model directory and returns its value."""

    def __init__(
        self,
        optuna: Any,
        config_path: str | Path,
        overrides: tuple[str, ...],
        space: SearchSpace,
        out: Path,
        higher: bool,
        stream: TextIO,
        progress: bool,
    ) -> None:
        self.optuna, self.config_path, self.overrides, self.space = optuna, config_path, overrides, space
        self.out, self.higher, self.stream, self.progress = out, higher, stream, progress

    def say(self, text: str) -> None:
        if self.progress:
            self.stream.write(text + "\n")

    def __call__(self, trial: Any) -> float:
        from mtrec.config import load_config
        from mtrec.files import remove_owned, staging_dir
        from mtrec.training import train

        chosen = _suggest(trial, self.space)
        trial.set_user_attr("params", chosen)
        try:
            config = load_config(self.config_path, [*self.overrides, *(_override(k, v) for k, v in chosen.items())])
        except ConfigError as exc:  # a combination the config refuses: this trial fails, the study goes on
            self.say(f"trial {trial.number}: refused by the config ({exc})")
            return math.nan
        trial_dir = self.out / f"trial-{trial.number:04d}"
        best = {"value": math.nan}

        def on_epoch(record: dict[str, Any]) -> None:
            # The trial's value is the objective of the epoch the model directory keeps (the
            # best by train.monitor), so best.yaml reproduces what the value says.
            value, _ = _objective_value(record, self.space.weights)
            if record.get("improved"):
                best["value"] = value
            trial.report(value if math.isfinite(value) else (-math.inf if self.higher else math.inf), record["epoch"])
            if trial.should_prune():
                raise self.optuna.TrialPruned(f"epoch {record['epoch']}: {value:.4f}")

        self.say(f"trial {trial.number}: {', '.join(f'{k}={v}' for k, v in chosen.items())}")
        try:
            train(config, output=trial_dir, progress=False, stream=self.stream, on_epoch=on_epoch, overwrite=True)
        except self.optuna.TrialPruned:
            remove_owned(staging_dir(trial_dir))  # a pruned trial leaves no half-trained model
            self.say(f"trial {trial.number}: pruned")
            raise
        trial.set_user_attr("model_dir", str(trial_dir))
        if not math.isfinite(best["value"]):
            # Optuna records a NaN objective as a failed trial and goes on with the next.
            self.say(f"trial {trial.number}: the objective was never defined (a metric was n/a)")
            return math.nan
        self.say(f"trial {trial.number}: {best['value']:.4f}")
        return float(best["value"])


def _write_results(
    optuna: Any,
    study: Any,
    out: Path,
    space: SearchSpace,
    config_path: str | Path,
    overrides: tuple[str, ...],
    higher: bool,
) -> dict[str, Any]:
    """``best.yaml``, ``trials.csv`` and ``importance.png``; returns the summary's trial parts."""
    from mtrec.config import config_to_dict, load_config
    from mtrec.files import atomic_write_text

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise MtrecError(f"tune: no trial completed ({len(study.trials)} pruned or failed); see {out}")
    best_trial = study.best_trial
    params = best_trial.user_attrs["params"]
    best_config = load_config(config_path, [*overrides, *(_override(k, v) for k, v in params.items())])
    atomic_write_text(out / "best.yaml", yaml.safe_dump(config_to_dict(best_config), sort_keys=False))
    rows = [
        {
            "trial": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            **{k: json.dumps(v) for k, v in t.user_attrs.get("params", {}).items()},
        }
        for t in study.trials
    ]
    with open(out / "trials.csv.tmp", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["trial", "state", "value", *space.params], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    Path(out / "trials.csv.tmp").replace(out / "trials.csv")
    importance = None
    if len(complete) >= 2:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's note that few trials give rough importances
                importance = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError):  # e.g. every completed trial drew the same values
            importance = None
        if importance:
            _plot_importance(importance, out / "importance.png")
    return {
        "direction": "maximize" if higher else "minimize",
        "trials": rows,
        "best": {"trial": best_trial.number, "value": best_trial.value, "params": params},
        "best_config": str(out / "best.yaml"),
        "importance": importance,
    }


def _plot_importance(importance: dict[str, float], path: Path) -> None:
    """A horizontal bar chart of the parameter importances (matplotlib, when installed)."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importance)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.2))
    ax.barh(names, [importance[n] for n in names], color="#4c72b0")
    ax.set_xlabel("importance (fANOVA share of the objective's variance)")
    ax.set_title("mtrec tune: parameter importance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
