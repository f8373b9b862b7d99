"""Typed configuration: YAML in, frozen dataclasses out, unknown keys rejected.

A config has five sections (``data``, ``features``, ``tasks``, ``model``, ``train``)
plus ``output``. Model parameters are checked against the registered model's
constructor, so a typo such as ``num_expert`` is an error rather than silently ignored.

Example:
    >>> cfg = config_from_dict({
    ...     "data": {"train": "clicks.parquet"},
    ...     "features": {"sparse": [{"name": "user_id"}]},
    ...     "tasks": [{"name": "ctr", "label": "click"}],
    ...     "model": {"name": "mmoe", "num_experts": 2},
    ... }, overrides=["train.epochs=1"])
    >>> cfg.train.epochs, cfg.model.params["num_experts"]
    (1, 2)
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtrec.errors import ConfigError, SchemaError
from mtrec.schema import DenseFeature, Esmm, Schema, SequenceFeature, SparseFeature, Task

__all__ = [
    "StrictLoader",
    "Config",
    "DataConfig",
    "FeaturesConfig",
    "Interaction",
    "ModelConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_yaml_text",
]

MAX_CONFIG_BYTES = 1 << 20
"""Largest config text read (1 MiB): real configs are a few KiB, and the bound caps what the
parser and the validation below can be made to spend."""
MAX_NESTING = 32
"""Deepest nesting of lists and mappings in a config or ``--set`` value (real configs use 5):
the YAML composer and the copies below recurse once per level."""


class _LimitError(yaml.MarkedYAMLError):
    """A YAML text that breaks a bound of :func:`parse_yaml_text` (size, nesting, anchors).

    Not a plain parse error: ``--set`` reads a value that is not valid YAML as its raw text,
    but a value that breaks a bound must be refused, not taken as a string.
    """


class StrictLoader(yaml.SafeLoader):
    """Safe YAML that rejects duplicate keys, anchors/aliases and deep nesting, and reads
    ``1e-4`` as a float (YAML 1.1 would not).

    Anchors and aliases are refused when the composer first meets them, before any node is
    built: an alias shares one node between places, and the config copies and checks below
    would expand a document of nested aliases exponentially ("billion laughs": 1 KB, 10^7
    nodes). Nesting is bounded because the composer recurses once per level. A value whose
    construction fails in Python (an unhashable key, a day 30 of February, an integer of
    5,000 digits) becomes a YAML error with its line instead of a traceback.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise _LimitError(
                problem=f"YAML anchors and aliases are not allowed in a config (found {sign}{event.anchor})",
                problem_mark=event.start_mark,
            )
        if self._depth >= MAX_NESTING:
            raise _LimitError(
                problem=f"lists and mappings nested deeper than {MAX_NESTING} levels", problem_mark=event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:int" and len(node.value) > 100:
            # No config value needs 100 digits, and 0x<5,000 digits> would be read (only
            # decimal strings are limited) into an int that no error message can print.
            raise _LimitError(problem="integers of more than 100 digits are not allowed", problem_mark=node.start_mark)
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value ({exc})", node.start_mark
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a scalar, got {type(key).__name__}", key_node.start_mark
                ) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    """``yaml.load`` with :class:`StrictLoader`; every failure is a :class:`yaml.YAMLError`."""
    if len(text) > MAX_CONFIG_BYTES // 4 and len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise _LimitError(problem=f"text larger than {MAX_CONFIG_BYTES // 2**20} MiB")
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except (RecursionError, MemoryError):
        # Unreachable with the nesting bound; kept so that no such error escapes as a traceback.
        raise _LimitError(problem="too deeply nested or too large to read") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # Python errors outside construct_object (e.g. while merging a mapping's items).
        raise yaml.constructor.ConstructorError(None, None, f"cannot read this value ({exc})", None) from None


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, str]:
    """``(" line N", problem)`` of a YAML error, on one line (``str(exc)`` spans several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return where, problem


def parse_yaml_text(text: str, source: str) -> Any:
    """Parses config text (a config file, a model directory's ``config.yaml``) into plain
    Python values, safely against hostile input.

    The text is at most :data:`MAX_CONFIG_BYTES`, nests lists and mappings at most
    :data:`MAX_NESTING` deep and holds no anchors or aliases (refused before anything is
    expanded or copied); tags that would run code, duplicate keys and unreadable values are
    refused too. Every failure is a one-line :class:`~mtrec.errors.ConfigError` that starts
    with ``source`` (a file name) and names the line where there is one.

    Example:
        >>> parse_yaml_text("train: {epochs: 2, lr: 1e-3}", "cfg.yaml")
        {'train': {'epochs': 2, 'lr': 0.001}}
        >>> parse_yaml_text("a: [&x 1, *x]", "cfg.yaml")
        Traceback (most recent call last):
        mtrec.errors.ConfigError: cfg.yaml: line 1 YAML anchors and aliases are not allowed in a config (found &x)
    """
    try:
        return _yaml_load(text)
    except _LimitError as exc:
        where, problem = _yaml_problem(exc)
        raise ConfigError(f"{source}:{where} {problem}") from None
    except yaml.YAMLError as exc:
        where, problem = _yaml_problem(exc)
        raise ConfigError(f"{source}:{where} invalid YAML ({problem})") from None


@dataclass(frozen=True)
class DataConfig:
    """Where the data is.

    Args:
        train: Parquet file, folder or glob with the training data.
        valid: Parquet validation data; when omitted, ``valid_fraction`` of the
            training rows (seeded) is held out instead.
        valid_fraction: Share of training rows held out when ``valid`` is not given.
        mode: ``memory`` reads and encodes the training data once and keeps it in
            memory; ``stream`` reads it row group by row group every epoch (a background
            thread reads ahead, a shuffle buffer mixes rows), so data larger than memory
            trains in bounded memory; ``auto`` streams when the encoded training data
            would exceed ``memory_budget_mb`` (estimated from the Parquet metadata).
            Validation data is always held in memory. Distributed runs always stream
            (each rank reads its own row groups).
        memory_budget_mb: The ``auto`` threshold, in MiB of encoded training columns.
        shuffle_buffer: Rows mixed at a time in stream mode (per rank).
        read_ahead: Row groups read and encoded ahead of training in stream mode.
        num_workers: DataLoader worker processes reading row groups in stream mode
            (0: one background thread).
    """

    train: str | None = None
    valid: str | None = None
    valid_fraction: float = 0.1
    mode: Literal["auto", "memory", "stream"] = "auto"
    memory_budget_mb: float = 8192.0
    shuffle_buffer: int = 262_144
    read_ahead: int = 2
    num_workers: int = 0


@dataclass(frozen=True)
class Interaction:
    """``features.interaction``: explicit feature crosses on the concatenated input, before
    any backbone.

    Args:
        name: ``dcn_v2``: DCN-v2 cross layers (Wang et al., WWW 2021),
            ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``.
        layers: Cross layers.
        rank: ``null``: full ``d x d`` matrices; else the rank of the low-rank ``U V^T``.
    """

    name: Literal["dcn_v2"] = "dcn_v2"
    layers: int = 2
    rank: int | None = None


@dataclass(frozen=True)
class FeaturesConfig:
    """The ``features:`` section."""

    sparse: tuple[SparseFeature, ...] = ()
    dense: tuple[DenseFeature, ...] = ()
    sequence: tuple[SequenceFeature, ...] = ()
    interaction: Interaction | None = None

    def interaction_keys(self) -> dict[str, Any]:
        """The cross layers as :func:`mtrec.models.create_model` takes them."""
        if self.interaction is None:
            return {}
        return {"cross_layers": self.interaction.layers, "cross_rank": self.interaction.rank}


@dataclass(frozen=True)
class ModelConfig:
    """The ``model:`` section: an architecture name, the embedding keys and the
    architecture's own keyword arguments (checked against its constructor).

    The embedding keys (every architecture has them; see
    :class:`mtrec.models.base.EmbeddingSpec`): ``embedding_dim``; ``embedding``
    (``shared`` | ``per_task`` | ``stem``); ``task_embedding_dim`` (width of the per-task
    table sets, ``null``: ``embedding_dim``); ``embedding_dropout`` (per-feature).
    """

    name: str = "mmoe"
    embedding_dim: int = 16
    params: Mapping[str, Any] = field(default_factory=dict)
    embedding: str = "shared"
    task_embedding_dim: int | None = None
    embedding_dropout: float = 0.0

    def embedding_keys(self) -> dict[str, Any]:
        """The embedding keys as :func:`mtrec.models.create_model` takes them."""
        return {
            "embedding_dim": self.embedding_dim,
            "embedding": self.embedding,
            "task_embedding_dim": self.task_embedding_dim,
            "embedding_dropout": self.embedding_dropout,
        }


@dataclass(frozen=True)
class TrainConfig:
    """The ``train:`` section.

    Args:
        epochs: Maximum number of passes over the training data.
        batch_size: Rows per optimisation step (the global batch: under torchrun each of
            N ranks takes ``batch_size / N`` rows per step).
        lr: Adam learning rate of the dense (MLP) parameters.
        embedding_lr: Learning rate of the embedding rows (Adam on the rows a batch
            touches); ``null`` means ``lr``. Each row is updated only when its
            value appears in a batch, so it wants a larger rate than the dense weights:
            on the synthetic benchmark 0.01 gains ~0.02-0.03 validation AUC per task
            over 0.001 after one epoch.
        embedding_optimizer: How the embedding rows are updated; both apply the same
            update (Adam on the rows a batch touched, see :class:`mtrec.training.optim.LazyAdam`).
            ``sparse``: sparse gradients and ``torch.optim.SparseAdam``, whose cost follows
            the batch (the CPU's choice), but which reads the number of touched rows back
            to the host every step (a stall on a GPU). ``dense``: a dense gradient and
            :class:`mtrec.training.optim.LazyAdam`, no host read, a few passes over the table per
            step. ``auto``: ``dense`` for one process on CUDA with a table of at most
            2^24 values (64 MiB in fp32), else ``sparse`` (also under DDP, where a dense
            table would be all-reduced whole). A run may be resumed with the other one.
        weight_decay: L2 penalty on the dense parameters.
        grad_clip: Clip the norm of the dense parameters' gradient to this value.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``; ``bf16`` (bfloat16 autocast for the matrix products, fp32
            weights, losses and optimiser state); or ``auto``: ``bf16`` where the
            hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX),
            else ``fp32``; ``fp16``: float16 autocast with a gradient scaler (for GPUs
            without bf16; needs ``fixed`` or ``dwa`` loss weighting). Prediction and
            evaluation always run in fp32.
        seed: Seeds parameter initialisation, the validation split and shuffling.
        monitor: Validation metric that selects the best epoch: ``mean_auc``,
            ``loss``, ``<task>.auc`` or ``<task>.logloss``; ``auto`` (the default) is
            ``mean_auc`` when a task is binary, else ``loss``.
        patience: Stop after this many epochs without improvement of ``monitor``.
        threads: Torch CPU threads (default: all cores).
        eval_batch_size: Rows per batch when predicting.
        log_every: Steps between progress lines when output is not a terminal.
        gpu_data_share: On CUDA in memory mode, the encoded training data is copied to
            the GPU once and batches are gathered there (no host round trip per step)
            when it takes at most this share of the free GPU memory; 0 never does.
            Otherwise batches are copied ahead of use by a background thread.
        compile: ``torch.compile`` the backbone (experts, gates, shared layers) for
            training; the embedding lookup stays eager (inductor has no sparse gradients).
        dist_timeout_s: Under torchrun, how long a rank waits for the others in a
            collective before the job ends (a backstop: a rank that fails ends the job at
            once).
        loss_weighting: How task losses are balanced: ``{name: fixed}`` (the tasks'
            weights), ``uncertainty``, ``gradnorm`` (``alpha``, ``lr``), ``dwa``
            (``temperature``), ``rlw`` (``seed``), ``famo`` (``lr``, ``decay``), ``pcgrad``
            (``seed``), or one of the methods that combine the task gradients on the shared
            representation: ``mgda``, ``cagrad`` (``c``), ``nash_mtl``, ``aligned_mtl``,
            ``db_mtl`` (``beta``, ``beta_sigma``); see :mod:`mtrec.weighting`.
        loss_normalization: How a task's loss is normalised over its sample space (see
            :mod:`mtrec.training.losses`): ``sample_space`` (the default), the mean over the batch rows
            in the task's space, so CVR on the ~5 % clicked rows weighs as much as CTR on
            all; ``impressions``, the sum over those rows divided by the batch rows (under
            torchrun the global batch), so a task weighs by the share of impressions it
            covers. Also the form of the validation loss.
        embedding_weight_decay: Decoupled (AdamW) weight decay of the embedding rows,
            applied inside the embedding update to the rows a batch touched only (rows
            absent from the batch do not shrink): ``p -= lr * wd * p`` per touched row and
            step, the same with ``sparse`` and ``dense`` (see :class:`mtrec.training.optim.SparseAdamW`).
        warmup_steps: Steps (updates) over which the learning rates of the dense and the
            embedding optimiser ramp up linearly from ``1 / warmup_steps`` of their value
            to the full value; 0: none.
        lr_decay: After the warm-up, ``none`` keeps the learning rates; ``cosine`` or
            ``linear`` decays them to ``min_lr_ratio`` of their value by the last step of
            ``epochs`` epochs (see :func:`mtrec.training.optim.lr_factor`). Stepped per training step,
            saved with the resume state.
        min_lr_ratio: Where ``lr_decay`` ends, as a share of each learning rate (0 to 1).
        init_from: A trained model directory to start from (a warm start, see
            :mod:`mtrec.training.warm_start`): parameters are matched by name (towers by task),
            embedding rows by raw ID through both vocabularies, task-stacked parameters block by
            block by task name; new tasks start fresh, removed ones are dropped; the table of
            what was loaded, remapped, new and dropped is printed and saved as
            ``init_from.json``. ``None``: train from scratch.
        init_from_preprocessing: ``refit`` fits the vocabularies and statistics on this run's
            training data (rows are still matched by ID); ``reuse`` encodes with the saved
            preprocessing of ``init_from`` as it is (the same features; IDs it has not seen map
            to the unseen row), so every embedding row carries over.
        freeze: Parts of the model that keep their loaded values (no gradient, left out of the
            optimisers): ``embedding``, ``features``, ``backbone``, ``experts``, ``gates``,
            ``towers`` or ``towers.<task>`` (see :mod:`mtrec.models.parts`); needs ``init_from``,
            and every frozen parameter must have been loaded.
        init_lr_scale: Learning-rate factor of the parameters ``init_from`` loaded (and not
            frozen), e.g. 0.1 to move what was learned less than the new parts; 1: the same rates.
        tensorboard: A directory for TensorBoard scalars (losses, validation metrics, task
            weights, gate entropy; see :mod:`mtrec.training.tensorboard`), needs the
            ``tensorboard`` extra; ``None``: none.
        calibration: ``none``; ``platt`` or ``isotonic``: after training, a per-task
            calibration of every binary task's probability fitted on the validation split
            (:mod:`mtrec.calibration`), saved in the model directory and applied by
            prediction and scoring; evaluation shows the raw and the calibrated metrics.
        affinity_every: Steps between task-affinity measurements (``None``: off): on that
            step's batch, the cosine similarity of the tasks' gradients on the shared
            parameters and the lookahead inter-task affinity of Fifty et al. (NeurIPS 2021),
            averaged per epoch, printed at the end and saved as ``affinity.json`` (see
            :mod:`mtrec.training.affinity`). Parameters, optimisers and random generators are
            left as they were: the run trains the same weights with it on or off.
    """

    epochs: int = 3
    batch_size: int = 2048
    lr: float = 1e-3
    embedding_lr: float | None = 0.01
    embedding_optimizer: Literal["auto", "sparse", "dense"] = "auto"
    weight_decay: float = 0.0
    grad_clip: float | None = None
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    monitor: str = "auto"
    patience: int = 2
    threads: int | None = None
    eval_batch_size: int = 16384
    log_every: int = 50
    gpu_data_share: float = 0.5
    compile: bool = False
    dist_timeout_s: float = 600.0
    loss_weighting: Mapping[str, Any] = field(default_factory=lambda: {"name": "fixed"})
    loss_normalization: Literal["sample_space", "impressions"] = "sample_space"
    embedding_weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay: Literal["none", "cosine", "linear"] = "none"
    min_lr_ratio: float = 0.0
    init_from: str | None = None
    init_from_preprocessing: Literal["refit", "reuse"] = "refit"
    freeze: tuple[str, ...] = ()
    init_lr_scale: float = 1.0
    tensorboard: str | None = None
    calibration: Literal["none", "platt", "isotonic"] = "none"
    affinity_every: int | None = None


@dataclass(frozen=True)
class Config:
    """A whole training configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    tasks: tuple[Task, ...] = ()
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    esmm: Esmm | None = None
    output: str | None = None

    @property
    def schema(self) -> Schema:
        """The features and tasks as a validated :class:`~mtrec.schema.Schema`."""
        return Schema(
            sparse=self.features.sparse,
            dense=self.features.dense,
            sequence=self.features.sequence,
            tasks=self.tasks,
            esmm=self.esmm,
        )


_INT64 = (-(2**63), 2**63 - 1)
_SEED_MAX = 2**32 - 1
_WIDTH_MAX = 65536


@dataclass(frozen=True)
class _Range:
    """The allowed values of one numeric config key.

    Every float must also be finite (``nan <= 0`` is False, so a plain ``x <= 0`` test lets
    ``nan`` through) and every int fit in int64. ``cap`` is an upper limit on a size,
    reported on its own (``expected at most 4096``), so that the lower bound's message stays
    short (``expected a positive number``). For a list (hidden-layer widths) the range holds
    for every item, and ``non_empty`` asks for at least one.
    """

    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    cap: float | None = None
    why: str = ""
    non_empty: bool = False

    def describe(self, finite: bool = False) -> str:
        """The expectation as an error states it, e.g. ``a positive number``, ``>= 0``."""
        a = "a finite" if finite else "a"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{a} number in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low == 0 and self.low_open:
            return f"{a} positive number"
        if self.low is not None:
            bound = f"{'>' if self.low_open else '>='} {_num(self.low)}"
            return f"a finite number {bound}" if finite else bound
        return "a finite number"

    def check(self, key: str, value: Any, nullable: bool = False) -> None:
        """Raises ConfigError naming ``key`` unless ``value`` (already type-checked) is allowed."""
        if isinstance(value, (list, tuple)):
            if self.non_empty and not value:
                raise ConfigError(f"{key}: expected a non-empty list of widths, got []")
            for i, item in enumerate(value):
                self.check(f"{key}.{i}", item)
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        null = " or null" if nullable else ""
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: expected {self.describe(finite=True)}{null}, got {value}")
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (low_ok and high_ok):
            raise ConfigError(f"{key}: expected {self.describe()}{null}, got {_show(value)}")
        if self.cap is not None and value > self.cap:
            raise ConfigError(f"{key}: expected at most {_num(self.cap)}{self.why}, got {_show(value)}")
        if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
            raise ConfigError(f"{key}: expected an integer in [{_INT64[0]}, {_INT64[1]}], got {_show(value)}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_ANY = _Range()
_POSITIVE = _Range(low=0, low_open=True)
_NON_NEGATIVE = _Range(low=0)
_AT_LEAST_1 = _Range(low=1)
_ROWS = _Range(low=0, low_open=True, cap=2**31 - 1)
_SEED = _Range(low=0, cap=_SEED_MAX, why=" (numpy's seed limit)")
_UNIT = _Range(low=0, high=1)
_WIDTHS = _Range(low=1, cap=_WIDTH_MAX)

_FIELD_RULES: dict[tuple[type, str], _Range] = {
    (DataConfig, "valid_fraction"): _Range(low=0, low_open=True, high=1, high_open=True),
    (DataConfig, "memory_budget_mb"): _POSITIVE,
    (DataConfig, "shuffle_buffer"): _Range(low=0, cap=2**31 - 1),
    (DataConfig, "read_ahead"): _Range(low=0, cap=1024),
    (DataConfig, "num_workers"): _Range(low=0, cap=1024),
    (TrainConfig, "epochs"): _Range(low=0, low_open=True, cap=1_000_000),
    (TrainConfig, "batch_size"): _ROWS,
    (TrainConfig, "eval_batch_size"): _ROWS,
    (TrainConfig, "lr"): _POSITIVE,
    (TrainConfig, "embedding_lr"): _POSITIVE,
    (TrainConfig, "weight_decay"): _NON_NEGATIVE,
    (TrainConfig, "grad_clip"): _POSITIVE,
    (TrainConfig, "seed"): _SEED,
    (TrainConfig, "patience"): _Range(low=0, cap=1_000_000),
    (TrainConfig, "threads"): _Range(low=1, cap=4096),
    (TrainConfig, "init_lr_scale"): _Range(low=0, low_open=True, cap=1000),
    (TrainConfig, "log_every"): _Range(low=1, cap=2**31 - 1),
    (TrainConfig, "gpu_data_share"): _UNIT,
    # timedelta(seconds=...) overflows past ~3e13 s; a year is already far past any use.
    (TrainConfig, "dist_timeout_s"): _Range(low=0, low_open=True, cap=365 * 86400, why=" (a year)"),
    (TrainConfig, "embedding_weight_decay"): _NON_NEGATIVE,
    (TrainConfig, "warmup_steps"): _Range(low=0, cap=2**31 - 1),
    (TrainConfig, "min_lr_ratio"): _UNIT,
    (TrainConfig, "affinity_every"): _Range(low=1, cap=2**31 - 1),
    (SparseFeature, "min_freq"): _AT_LEAST_1,
    (SparseFeature, "hash_buckets"): _Range(low=1, cap=2**31 - 1),
    (SparseFeature, "max_vocab"): _AT_LEAST_1,
    (SequenceFeature, "max_len"): _Range(low=1, cap=_WIDTH_MAX),
    (SequenceFeature, "min_freq"): _AT_LEAST_1,
    (Task, "weight"): _NON_NEGATIVE,
    (Task, "huber_delta"): _POSITIVE,
    (Task, "num_classes"): _Range(cap=1_000_000),  # the lower bound (>= 2) is the schema's
    (Interaction, "layers"): _Range(low=1, cap=16),
    (Interaction, "rank"): _Range(low=1, cap=_WIDTH_MAX),
    (Esmm, "weight"): _NON_NEGATIVE,
    (Esmm, "cvr_loss_weight"): _NON_NEGATIVE,
    (Esmm, "counterfactual_weight"): _NON_NEGATIVE,
    (Esmm, "propensity_clip"): _Range(low=0, low_open=True, high=1),
}
"""Ranges of the typed sections' numeric keys, by (section class, field); a float key not
listed must still be finite."""

_PARAM_RULES: dict[str, _Range] = {
    # model parameters (the keyword parameters of the builders in mtrec/models)
    "embedding_dim": _Range(low=1, cap=4096),
    "dropout": _Range(low=0, high=1, high_open=True),
    "num_experts": _Range(low=1, cap=64),
    "num_shared_experts": _Range(low=0, cap=64),
    "num_task_experts": _Range(low=0, cap=64),
    "num_levels": _Range(low=1, cap=64),
    "calibration_weight": _NON_NEGATIVE,
    "stitch_self_weight": _UNIT,
    "gate_k": _Range(low=1, cap=64),
    "gate_gamma": _POSITIVE,
    "gate_entropy": _NON_NEGATIVE,
    "expert_balance": _NON_NEGATIVE,
    "gate_scale": _POSITIVE,
    # loss weighting parameters (mtrec.weighting)
    "alpha": _NON_NEGATIVE,
    "lr": _POSITIVE,
    "temperature": _POSITIVE,
    "decay": _NON_NEGATIVE,
    "seed": _SEED,
    "c": _NON_NEGATIVE,
    "beta": _UNIT,
    "beta_sigma": _NON_NEGATIVE,
}
"""Ranges of model and loss-weighting parameters, by parameter name: one owner for every
architecture (``hidden`` and ``*_hidden``, layer widths as a list or one int, are handled by
:func:`_param_rule`). A parameter not listed is only checked for finiteness and int64."""

_NEEDS_LAYERS = {"expert_hidden", "hidden", "aitm.tower_hidden", "relation_hidden"}
"""Width lists the network needs at least one layer of (an expert, a cross-stitch column, an
AITM tower); other towers and the shared bottom may be empty (a linear layer)."""


def _param_rule(owner: str, name: str) -> _Range:
    """The range of parameter ``name`` of model or weighting ``owner``."""
    if name == "hidden" or name.endswith("_hidden"):
        needs = name in _NEEDS_LAYERS or f"{owner}.{name}" in _NEEDS_LAYERS
        return dataclasses.replace(_WIDTHS, non_empty=needs)
    return _PARAM_RULES.get(name, _ANY)


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (types.UnionType, typing.Union) and type(None) in typing.get_args(tp)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config file, applies ``a.b=value`` overrides and validates it."""
    path = Path(path)
    try:
        # At most one byte past the bound is read: a huge file (or /dev/zero) is refused
        # without being read into memory.
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file larger than {MAX_CONFIG_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    raw = parse_yaml_text(text, str(path))
    if raw is None:
        raw = {}
    try:
        return config_from_dict(raw, overrides=overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_from_dict(raw: Any, overrides: Sequence[str] = (), *, training: bool = True) -> Config:
    """Validates a plain dict (as parsed from YAML) into a :class:`Config`.

    ``training=False`` (a saved model's config read for inference) skips the one check that
    builds a training object: constructing the loss weighting to range-check its values
    (they were checked when the model was trained; the names and types still are).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(raw).__name__}")
    raw = _deepcopy(raw)
    for item in overrides:
        _apply_override(raw, item)
    model_raw = raw.pop("model", {}) or {}
    cfg = _coerce(raw, Config, "")
    model = _model_config(model_raw)
    weighting = _weighting_config(cfg.train.loss_weighting)
    cfg = dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, loss_weighting=weighting))
    try:
        schema = cfg.schema
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.train.monitor == "auto":
        monitor = "mean_auc" if any(t.kind.ranks for t in schema.output_tasks) else "loss"
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, monitor=monitor))
    if training:
        _check_weighting_values(weighting, schema)
    _check_model_tasks(model, schema)
    _check_model_features(model, schema)
    _check_train(cfg)
    return cfg


def _check_model_tasks(model: ModelConfig, schema: Schema) -> None:
    """What an architecture asks of the tasks."""
    if model.name == "independent" and schema.esmm is not None:
        raise ConfigError(
            "esmm: the independent baseline shares nothing, so ESMM's product of CTR and CVR towers has no "
            "common input to learn from; compare ESMM with an independent model trained without esmm:"
        )
    if model.name == "aitm" and any(t.where is not None for t in schema.tasks):
        raise ConfigError(
            "tasks: AITM chains tasks over the same impressions (e.g. click, then purchase); "
            "remove the where: sample spaces or choose another model"
        )
    if model.name == "dbmtl":
        from mtrec.models.dbmtl import task_positions

        try:
            task_positions(tuple(model.params["task_order"]), schema.task_names)
        except ValueError as exc:
            raise ConfigError(f"model.task_order: {exc}") from None


def _check_model_features(model: ModelConfig, schema: Schema) -> None:
    """The input features an architecture's keys name (PEPNet's prior and domain features)."""
    if model.name != "pepnet":
        return
    from mtrec.models.pepnet import feature_columns

    sparse = tuple(f.name for f in schema.sparse)
    if not sparse:
        raise ConfigError(
            "model.prior_features: pepnet's gates read sparse (ID) features, and features.sparse is empty"
        )
    for key in ("prior_features", "domain_features"):
        try:
            feature_columns(tuple(model.params[key]), sparse)
        except ValueError as exc:
            raise ConfigError(f"model.{key}: {exc}") from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain dict (lists, no tuples) of a config, as written to ``config.yaml``."""

    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, Mapping):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    out = plain(cfg)
    model = out.pop("model")
    keys = {"name": model["name"], "embedding_dim": model["embedding_dim"]}
    defaults = ModelConfig()
    for key in ("embedding", "task_embedding_dim", "embedding_dropout"):  # written when set
        if model[key] != getattr(defaults, key):
            keys[key] = model[key]
    out["model"] = {**keys, **model["params"]}
    return out


def _needs_representation(name: str) -> bool:
    from mtrec.weighting import WEIGHTINGS

    return name in WEIGHTINGS and WEIGHTINGS[name].needs_representation


def _check_train(cfg: Config) -> None:
    """Checks that span keys; each key's own range was checked as it was read (``_FIELD_RULES``)."""
    t = cfg.train
    if t.precision == "fp16" and t.loss_weighting.get("name") not in ("fixed", "dwa"):
        raise ConfigError(
            f"train.precision: fp16 scales the losses, which needs loss_weighting fixed or dwa, "
            f"not {t.loss_weighting.get('name')}"
        )
    if t.compile and _needs_representation(str(t.loss_weighting.get("name"))):
        raise ConfigError(
            f"train.compile: loss_weighting {t.loss_weighting.get('name')} records the shared representation "
            f"with a forward hook, which a compiled backbone does not run; set train.compile: false"
        )
    if t.init_from is None:
        unused = [
            key
            for key, value in (
                ("freeze", t.freeze),
                ("init_lr_scale", t.init_lr_scale != 1.0),
                ("init_from_preprocessing", t.init_from_preprocessing != "refit"),
            )
            if value
        ]
        if unused:
            raise ConfigError(
                f"train.{unused[0]}: applies to a warm start; set train.init_from: DIR (a model directory)"
            )
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {t.device!r}")
    tasks = cfg.schema.output_tasks
    choices = ["mean_auc", "loss"] + [f"{task.name}.{m}" for task in tasks for m in task.kind.monitorable]
    if t.monitor not in choices:
        raise ConfigError(f"train.monitor: expected one of {', '.join(choices)}, got {t.monitor!r}")
    if t.monitor == "mean_auc" and not any(task.kind.ranks for task in tasks):
        raise ConfigError("train.monitor: mean_auc needs a binary task; use loss or <task>.rmse")


def _model_config(raw: Any) -> ModelConfig:
    from mtrec.models.base import EMBEDDING_MODES
    from mtrec.models.registry import check_embedding_mode, model_parameters

    if not isinstance(raw, dict):
        raise ConfigError(f"model: expected a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    name = raw.pop("name", "mmoe")
    if not isinstance(name, str):
        raise ConfigError(f"model.name: expected a string, got {_show(name)}")
    dim = _coerce(raw.pop("embedding_dim", 16), int, "model.embedding_dim")
    _PARAM_RULES["embedding_dim"].check("model.embedding_dim", dim)
    mode = raw.pop("embedding", "shared")
    if mode not in EMBEDDING_MODES:
        raise ConfigError(f"model.embedding: expected one of {', '.join(EMBEDDING_MODES)}, got {_show(mode)}")
    task_dim = raw.pop("task_embedding_dim", None)
    if task_dim is not None:
        task_dim = _coerce(task_dim, int, "model.task_embedding_dim")
        _PARAM_RULES["embedding_dim"].check("model.task_embedding_dim", task_dim)
        if mode == "shared":
            raise ConfigError("model.task_embedding_dim: needs embedding per_task or stem (shared has no task tables)")
    dropout = _coerce(raw.pop("embedding_dropout", 0.0), float, "model.embedding_dropout")
    _PARAM_RULES["dropout"].check("model.embedding_dropout", dropout)
    try:
        spec = model_parameters(name)
        check_embedding_mode(name, mode)
    except KeyError as exc:
        raise ConfigError(f"model.name: {exc.args[0]}") from None
    except ValueError as exc:
        raise ConfigError(f"model.embedding: {exc}") from None
    params = _checked_params(
        raw, spec, prefix="model", owner=f"model {name!r}", fixed=("name", "embedding_dim"), rules=name
    )
    if params.get("num_shared_experts") == 0 and params.get("num_task_experts") == 0:
        raise ConfigError("model.num_task_experts: expected >= 1 when num_shared_experts is 0 (no expert at all)")
    _check_gate_params(params)
    return ModelConfig(
        name=name,
        embedding_dim=dim,
        params=params,
        embedding=mode,
        task_embedding_dim=task_dim,
        embedding_dropout=dropout,
    )


def _check_gate_params(params: Mapping[str, Any]) -> None:
    """The gate keys of mmoe / cgc / ple that depend on each other (see :mod:`mtrec.nn.gates`)."""
    if "gate" not in params:
        return
    if params["gate"] == "softmax" and params.get("gate_entropy", 0.0) > 0:
        raise ConfigError("model.gate_entropy: DSelect-k's selector penalty needs gate: dselect_k")
    if params["gate"] != "dselect_k":
        return
    if "num_experts" in params:
        experts, which = params["num_experts"], "num_experts"
    else:
        experts = params["num_shared_experts"] + params["num_task_experts"]
        which = "num_shared_experts + num_task_experts, the experts a task gate mixes"
    if params["gate_k"] > experts:
        raise ConfigError(f"model.gate_k: expected at most {experts} ({which}), got {params['gate_k']}")


def _checked_params(
    raw: Mapping[str, Any],
    spec: Mapping[str, tuple[Any, Any]],
    *,
    prefix: str,
    owner: str,
    fixed: Sequence[str],
    rules: str,
) -> dict[str, Any]:
    """Keyword parameters checked against ``spec`` (from :func:`parameter_spec`) and against
    the ranges of :func:`_param_rule` for ``rules`` (the model or weighting name), defaults
    filled in: a value that would fail (or allocate without bound) when the model or the
    weighting is built is a config error now, also when it comes from a saved model."""
    params: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in spec:
            raise ConfigError(
                f"{prefix}.{key}: unknown parameter for {owner} (expected one of {', '.join([*fixed, *spec])})"
            )
        params[key] = _coerce(value, spec[key][0], f"{prefix}.{key}")
        _param_rule(rules, key).check(f"{prefix}.{key}", params[key], nullable=_allows_none(spec[key][0]))
    for key, (_, default) in spec.items():
        params.setdefault(key, default)
    return params


def _weighting_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    from mtrec.weighting import WEIGHTINGS, weighting_parameters

    raw = dict(raw)
    name = raw.pop("name", "fixed")
    if not isinstance(name, str) or name not in WEIGHTINGS:
        raise ConfigError(f"train.loss_weighting.name: expected one of {', '.join(WEIGHTINGS)}, got {_show(name)}")
    spec = weighting_parameters(name)
    params = _checked_params(raw, spec, prefix="train.loss_weighting", owner=repr(name), fixed=("name",), rules=name)
    return {"name": name, **params}


def _check_weighting_values(params: Mapping[str, Any], schema: Schema) -> None:
    """Builds the strategy once so that out-of-range values fail now, as config errors."""
    from mtrec.weighting import create_weighting

    tasks = schema.output_tasks
    kwargs = {k: v for k, v in params.items() if k != "name"}
    try:
        create_weighting(params["name"], tuple(t.name for t in tasks), tuple(t.weight for t in tasks), **kwargs)
    except ValueError as exc:
        raise ConfigError(f"train.loss_weighting: {exc}") from None


_MAX_VALUES = MAX_CONFIG_BYTES
"""Most lists, mappings and values a raw config may hold: more than a text of
:data:`MAX_CONFIG_BYTES` can (each takes 2 bytes or more), so only shared lists expand past it."""


def _deepcopy(x: Any, depth: int = 0, count: list[int] | None = None) -> Any:
    """Copies the lists and dicts of a raw config, within the bounds of :func:`parse_yaml_text`.

    A raw dict may come from another loader (``yaml.safe_load``) or from Python, where one
    list can sit at many places (what a YAML alias makes): copying nested shared lists would
    expand them exponentially ("billion laughs"), so the copy stops at :data:`_MAX_VALUES`.
    Nesting is bounded so that no RecursionError can escape from this copy or the checks
    after it. (A list shared a few times, e.g. one width list for two keys, is fine.)
    """
    count = [0] if count is None else count
    count[0] += 1
    if count[0] > _MAX_VALUES:
        raise ConfigError(
            f"config: more than {_MAX_VALUES} values (shared lists expanding? YAML aliases are not allowed)"
        )
    if not isinstance(x, (dict, list)):
        return x
    if depth >= MAX_NESTING:
        raise ConfigError(f"config: lists and mappings nested deeper than {MAX_NESTING} levels")
    if isinstance(x, dict):
        return {k: _deepcopy(v, depth + 1, count) for k, v in x.items()}
    return [_deepcopy(v, depth + 1, count) for v in x]


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {_show(item)}: expected KEY=VALUE, for example train.epochs=3")
    try:
        value = _yaml_load(text) if text else None
    except _LimitError as exc:
        raise ConfigError(f"--set {_show_key(key)}: {_yaml_problem(exc)[1]}") from None
    except yaml.YAMLError:
        value = text  # not YAML (e.g. "a: b: c"): the text itself, as a string
    parts = key.split(".")
    if len(parts) > MAX_NESTING:
        raise ConfigError(f"--set {_show_key(key)}: a key of at most {MAX_NESTING} parts expected")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                node = child
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")


def _list_index(node: list[Any], part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if -len(node) <= index < len(node):
            return index
        raise ConfigError(f"--set {where}: index out of range (list has {len(node)} items)")
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    raise ConfigError(f"--set {where}: no item named {part!r}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against annotation ``tp``; returns it converted (lists to tuples)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append((arg, exc))
        if len(errors) == 1 and dataclasses.is_dataclass(errors[0][0]) and isinstance(value, dict):
            # A mapping for a section that may be null (esmm): the section's own error
            # names the key inside it (``esmm.weight: ...``), not just the section.
            raise errors[0][1]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
        (item_tp, *_) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}.{_item_label(v, i)}") for i, v in enumerate(value))
    if origin is not None and issubclass(origin, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _coerce_dataclass(value, tp, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int of 400 digits
                raise ConfigError(f"{key}: expected a finite number, got {_show(value)}") from None
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")


def _show(value: Any, limit: int = 80) -> str:
    """``repr`` of a value for an error message, cut short: the message must stay one
    readable line even when the value is a list of a million items."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (from Python; YAML ints are bounded)
        return "a value too large to print"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _show_key(key: str, limit: int = 80) -> str:
    return key if len(key) <= limit else f"{key[: limit - 3]}..."


def _item_label(value: Any, index: int) -> str:
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"]
    return str(index)


def _coerce_dataclass(value: Any, cls: Any, key: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {_show(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{key}." if key else ""
    for k in value:
        if k not in fields:
            raise ConfigError(f"{prefix}{k}: unknown key (expected one of {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _coerce(value[name], hints[name], f"{prefix}{name}")
            rule = _FIELD_RULES.get((cls, name), _ANY)
            rule.check(f"{prefix}{name}", kwargs[name], nullable=_allows_none(hints[name]))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
