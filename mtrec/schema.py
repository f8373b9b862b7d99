"""Feature and task specifications: what the model reads and what it predicts.

These are frozen dataclasses that double as the ``features:`` and ``tasks:`` sections
of a config (see :mod:`mtrec.config`). They describe columns by name; the fitted
vocabularies and statistics live in :mod:`mtrec.data.preprocess`.

Example:
    >>> spec = Schema(
    ...     sparse=(SparseFeature("user_id", min_freq=2), SparseFeature("item_id")),
    ...     dense=(DenseFeature("price", transform="log1p"),),
    ...     sequence=(SequenceFeature("hist_items", max_len=20, vocab_from="item_id"),),
    ...     tasks=(Task("ctr", label="click"), Task("cvr", label="conversion", where="click == 1")),
    ... )
    >>> spec.task_names
    ('ctr', 'cvr')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from mtrec.errors import SchemaError
from mtrec.expr import parse_where
from mtrec.tasks import BINARY, KINDS, TaskKind

_NAME = re.compile(r"[A-Za-z0-9_-]+")

__all__ = ["DenseFeature", "Esmm", "InputLayout", "Schema", "SequenceFeature", "SparseFeature", "Task"]


@dataclass(frozen=True)
class SparseFeature:
    """A categorical column (int or string values) looked up in an embedding table.

    Args:
        name: Column name.
        min_freq: Values seen fewer times in the training data map to the reserved
            index 0 (shared with nulls and values unseen at training time).
        hash_buckets: When set, no vocabulary is fitted; values are hashed into this
            many buckets (for ID spaces too large to enumerate).
        max_vocab: Keep at most this many of the most frequent values.
    """

    name: str
    min_freq: int = 1
    hash_buckets: int | None = None
    max_vocab: int | None = None


@dataclass(frozen=True)
class DenseFeature:
    """A numeric column.

    Args:
        name: Column name.
        transform: ``none``, ``standardize`` (z-score with training mean/std),
            ``log1p`` (negative values clipped to 0 first) or ``log1p_standardize``.
        fill: Value for nulls/NaN/inf; ``None`` means the training mean.
        clean: Declares the column free of nulls/NaN/inf; if any appear the data is
            rejected instead of filled.
    """

    name: str
    transform: Literal["none", "standardize", "log1p", "log1p_standardize"] = "standardize"
    fill: float | None = None
    clean: bool = False


@dataclass(frozen=True)
class SequenceFeature:
    """A variable-length list column pooled into one embedding.

    Args:
        name: Column name (a Parquet list column of ints or strings).
        max_len: Items kept per row (the last ``max_len``, i.e. the most recent when
            the list is in chronological order).
        pooling: ``mean`` or ``sum`` over the non-padding items, or ``target_attention``:
            DIN's attention of the candidate ``target`` over the items (Zhou et al., KDD 2018).
        vocab_from: Name of a sparse feature whose vocabulary and embedding table this
            list shares (for example ``item_id`` for a list of recent items).
        min_freq: Only used when the list has its own vocabulary.
        target: The sparse feature (the candidate) that ``target_attention`` attends with;
            the list must share its table (``vocab_from`` the same feature).
    """

    name: str
    max_len: int = 50
    pooling: Literal["mean", "sum", "target_attention"] = "mean"
    vocab_from: str | None = None
    min_freq: int = 1
    target: str | None = None


@dataclass(frozen=True)
class Task:
    """One prediction target.

    Args:
        name: Task name; logits and metrics are keyed by it.
        label: Label column.
        type: ``binary`` (labels in {0, 1}), ``regression`` (real labels) or
            ``multiclass`` (integer labels in ``[0, num_classes)``).
        weight: Loss weight.
        where: Sample space, a boolean expression over columns such as
            ``"click == 1"``: the task is trained and evaluated only on those rows.
        loss: ``auto`` (BCE with logits for binary, MSE for regression, cross-entropy for
            multiclass), or ``huber`` for a regression task.
        huber_delta: Where the Huber loss turns from quadratic to linear.
        num_classes: Number of classes of a multiclass task.
        label_transform: ``log1p`` trains a regression task on ``log1p(label)`` (labels
            must be >= 0); predictions are mapped back with ``expm1``.
        sample_weight: Column of non-negative per-row weights for loss and metrics.
    """

    name: str
    label: str
    type: Literal["binary", "regression", "multiclass"] = "binary"
    weight: float = 1.0
    where: str | None = None
    loss: Literal["auto", "huber"] = "auto"
    huber_delta: float = 1.0
    num_classes: int | None = None
    label_transform: Literal["none", "log1p"] = "none"
    sample_weight: str | None = None

    @property
    def kind(self) -> TaskKind:
        """What the task's ``type`` means: loss, inverse link, labels, metrics (see :mod:`mtrec.tasks`)."""
        return KINDS[self.type]

    @property
    def output_dim(self) -> int:
        """Logits the task's tower produces."""
        return self.kind.output_dim(self)


@dataclass(frozen=True)
class Esmm:
    """Entire Space Multi-task Model (Ma et al., SIGIR 2018) over any backbone.

    ``pCTCVR = pCTR * pCVR``: the model is trained with the CTR loss and a CTCVR loss on
    every impression (label ``ctr label * cvr label``); by default the CVR tower gets no
    loss of its own and learns through the product, so it is defined on the entire space.

    Args:
        ctr: Name of the binary click task (no ``where``: it covers every impression).
        cvr: Name of the binary conversion task, with ``where`` exactly the click condition
            (``"click == 1"`` for a click label ``click``, or an equivalent such as
            ``"click > 0"``) or no ``where``. A narrower space (e.g. ``"click == 1 and pos < 2"``)
            is refused: the CTCVR label is built from the CVR label, which is 0 outside its
            space, so it would drop the conversions outside it instead of being click AND
            conversion on every impression.
        name: Name of the derived CTCVR task in predictions and metrics.
        weight: Loss weight of the CTCVR task.
        cvr_loss_weight: Weight of an extra direct CVR loss (the CVR task's BCE on its own
            sample space, the clicked rows) beside the CTCVR loss; 0 (the default) is the
            paper's ESMM. It needs the CVR task's ``where`` (the click condition): on every
            impression the CVR label is click AND conversion, which is the CTCVR target.
            Scaling: the loss is a task loss like the others, normalised as
            ``train.loss_normalization`` says. With ``sample_space`` it is the mean over the
            ~clicked rows of the batch, so a weight ``w`` gives it ``w`` times a full task's
            weight however few the clicks (0.1-0.3 is a light auxiliary loss); with
            ``impressions`` it is the sum over the clicked rows divided by the batch rows, so
            its weight is effectively ``w * click rate`` of the CTR task's (a few x 1.0 to
            matter).
        counterfactual: ESCM2 (Wang et al., "ESCM2: Entire Space Counterfactual Multi-Task
            Model for Post-Click Conversion Rate Estimation", SIGIR 2022): add the
            counterfactual CVR risk on the entire space, ``ips`` (the clicked rows' CVR loss
            weighted by ``1 / pCTR``) or ``dr`` (doubly robust: plus an imputation tower that
            predicts the CVR loss on every row); ``none``: ESMM alone. It needs the CVR task's
            ``where`` (the click condition).
        counterfactual_weight: Weight of that risk (and of DR's imputation loss).
        propensity_clip: Smallest ``pCTR`` divided by (``1 / pCTR`` at most ``1 / clip``).
    """

    ctr: str
    cvr: str
    name: str = "ctcvr"
    weight: float = 1.0
    cvr_loss_weight: float = 0.0
    counterfactual: Literal["none", "ips", "dr"] = "none"
    counterfactual_weight: float = 1.0
    propensity_clip: float = 0.05


@dataclass(frozen=True)
class Schema:
    """All features and tasks of one model; validates names and references."""

    sparse: tuple[SparseFeature, ...] = ()
    dense: tuple[DenseFeature, ...] = ()
    sequence: tuple[SequenceFeature, ...] = ()
    tasks: tuple[Task, ...] = field(default=())
    esmm: Esmm | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise SchemaError("tasks: at least one task is required")
        if not (self.sparse or self.dense or self.sequence):
            raise SchemaError("features: at least one sparse, dense or sequence feature is required")
        seen: set[str] = set()
        for kind, items in (("sparse", self.sparse), ("dense", self.dense), ("sequence", self.sequence)):
            for f in items:
                if f.name in seen:
                    raise SchemaError(f"features.{kind}: column {f.name!r} is listed twice")
                seen.add(f.name)
        sparse_names = {f.name for f in self.sparse}
        for f in self.sparse:
            if f.min_freq < 1:
                raise SchemaError(f"features.sparse.{f.name}.min_freq: expected >= 1, got {f.min_freq}")
            if f.max_vocab is not None and f.max_vocab < 1:
                raise SchemaError(f"features.sparse.{f.name}.max_vocab: expected >= 1, got {f.max_vocab}")
            if f.hash_buckets is not None and f.hash_buckets < 1:
                raise SchemaError(f"features.sparse.{f.name}.hash_buckets: expected >= 1, got {f.hash_buckets}")
        for s in self.sequence:
            if s.max_len < 1:
                raise SchemaError(f"features.sequence.{s.name}.max_len: expected >= 1, got {s.max_len}")
            if s.vocab_from is not None and s.vocab_from not in sparse_names:
                raise SchemaError(
                    f"features.sequence.{s.name}.vocab_from: {s.vocab_from!r} is not a sparse feature "
                    f"(expected one of {sorted(sparse_names)})"
                )
            _check_target(s, sparse_names)
        task_names: set[str] = set()
        for t in self.tasks:
            if not _NAME.fullmatch(t.name):
                raise SchemaError(f"tasks.{t.name}: a task name may hold letters, digits, '_' and '-' only")
            if t.weight < 0:
                raise SchemaError(f"tasks.{t.name}.weight: expected >= 0, got {t.weight}")
            if t.name in task_names:
                raise SchemaError(f"tasks: task name {t.name!r} is used twice")
            task_names.add(t.name)
            if t.label in seen:
                raise SchemaError(f"tasks.{t.name}.label: column {t.label!r} is also an input feature")
            if t.where is not None:
                try:
                    parse_where(t.where)
                except ValueError as exc:
                    raise SchemaError(f"tasks.{t.name}.where: {exc}") from None
            _check_task(t)
        if self.esmm is not None:
            self._check_esmm(self.esmm)

    def _check_esmm(self, e: Esmm) -> None:
        by_name = {t.name: t for t in self.tasks}
        for key in ("ctr", "cvr"):
            name = getattr(e, key)
            task = by_name.get(name)
            if task is None:
                raise SchemaError(
                    f"esmm.{key}: ESMM needs a {'click' if key == 'ctr' else 'conversion'} task; "
                    f"{name!r} is not a task (tasks: {', '.join(by_name)})"
                )
            if task.kind is not BINARY:
                raise SchemaError(f"esmm.{key}: task {name!r} must be binary, it is {task.type}")
        if by_name[e.ctr].where is not None:
            raise SchemaError(f"esmm.ctr: the click task {e.ctr!r} must cover every impression (no where:)")
        if e.ctr == e.cvr:
            raise SchemaError("esmm: ctr and cvr must be different tasks")
        ctr, cvr = by_name[e.ctr], by_name[e.cvr]
        if cvr.where is not None and not _is_click_condition(cvr.where, ctr.label):
            raise SchemaError(
                f"esmm.cvr: task {cvr.name!r} has where: {cvr.where!r}; ESMM needs the conversion task's sample "
                f"space to be exactly the click condition ({ctr.label} == 1) or absent (the CTCVR label, click AND "
                f"conversion on every impression, is built from the CVR label, which is 0 outside that space)"
            )
        if e.name in by_name or not _NAME.fullmatch(e.name):
            raise SchemaError(f"esmm.name: {e.name!r} must be a new task name (letters, digits, '_', '-')")
        if e.cvr_loss_weight < 0:
            raise SchemaError(f"esmm.cvr_loss_weight: expected >= 0, got {e.cvr_loss_weight}")
        if e.counterfactual != "none" and cvr.where is None:
            raise SchemaError(
                f"esmm.counterfactual: ESCM2's counterfactual risk weighs the clicked rows' CVR loss by 1 / pCTR, "
                f"but task {cvr.name!r} has no where: (no clicked rows to tell apart); set where: {ctr.label} == 1"
            )
        if e.cvr_loss_weight > 0 and cvr.where is None:
            raise SchemaError(
                f"esmm.cvr_loss_weight: the direct CVR loss is on the clicked rows, but task {cvr.name!r} has no "
                f"where: (on every impression its label is click AND conversion, the CTCVR target); "
                f"set where: {ctr.label} == 1 on it or cvr_loss_weight: 0"
            )

    @property
    def task_names(self) -> tuple[str, ...]:
        """Names of the tasks with a tower, in config order."""
        return tuple(t.name for t in self.tasks)

    @property
    def output_tasks(self) -> tuple[Task, ...]:
        """Every task the model predicts and that is trained and evaluated: the configured
        tasks, plus the derived CTCVR task under ESMM (where the CVR task's loss weight is
        ``esmm.cvr_loss_weight``, by default 0: it learns only through the product)."""
        e = self.esmm
        if e is None:
            return self.tasks
        ctr = next(t for t in self.tasks if t.name == e.ctr)
        cvr = next(t for t in self.tasks if t.name == e.cvr)
        tasks = tuple(replace(t, weight=e.cvr_loss_weight) if t.name == e.cvr else t for t in self.tasks)
        ctcvr = Task(e.name, label=f"{ctr.label}*{cvr.label}", type="binary", weight=e.weight)
        return (*tasks, ctcvr)

    def input_columns(self) -> list[str]:
        """Feature columns read from the data."""
        features: tuple[SparseFeature | DenseFeature | SequenceFeature, ...] = (
            *self.sparse,
            *self.dense,
            *self.sequence,
        )
        return [f.name for f in features]

    def read_columns(self, with_labels: bool = True) -> list[str]:
        """Every column read from the data, each once: the features, and with ``with_labels``
        the label, weight and ``where`` columns."""
        cols = self.input_columns()
        if with_labels:
            cols += self.label_columns()
        return list(dict.fromkeys(cols))

    def label_columns(self) -> list[str]:
        """Label and sample-weight columns plus every column a ``where`` expression uses."""
        cols: list[str] = []
        for t in self.tasks:
            cols.append(t.label)
            if t.sample_weight is not None:
                cols.append(t.sample_weight)
            if t.where is not None:
                cols.extend(parse_where(t.where).columns)
        return list(dict.fromkeys(cols))


def _is_click_condition(where: str, click: str) -> bool:
    """Whether ``where`` reads the binary column ``click`` only and selects exactly its 1s."""
    expr = parse_where(where)
    if expr.columns != (click,):
        return False
    for values in (np.array([0, 1], dtype=np.int64), np.array([0.0, 1.0])):
        try:
            if expr.evaluate({click: values}).tolist() != [False, True]:
                return False
        except (TypeError, ValueError):
            return False
    return True


def _check_task(t: Task) -> None:
    where = f"tasks.{t.name}"
    if t.type not in KINDS:
        raise SchemaError(f"{where}.type: expected one of {', '.join(KINDS)}, got {t.type!r}")
    if t.kind.has_classes:
        if t.num_classes is None or t.num_classes < 2:
            raise SchemaError(f"{where}.num_classes: a multiclass task needs num_classes >= 2")
    elif t.num_classes is not None:
        raise SchemaError(f"{where}.num_classes: only for multiclass tasks")
    if t.loss == "huber" and not t.kind.real_valued:
        raise SchemaError(f"{where}.loss: huber is for regression tasks")
    if t.huber_delta <= 0:
        raise SchemaError(f"{where}.huber_delta: expected a positive number, got {t.huber_delta}")
    if t.label_transform != "none" and not t.kind.real_valued:
        raise SchemaError(f"{where}.label_transform: only for regression tasks")


def _check_target(s: SequenceFeature, sparse_names: set[str]) -> None:
    """A ``target_attention`` list names a sparse candidate whose table it shares."""
    where = f"features.sequence.{s.name}"
    if s.pooling != "target_attention":
        if s.target is not None:
            raise SchemaError(f"{where}.target: only for pooling: target_attention (got pooling: {s.pooling})")
        return
    if s.target is None:
        raise SchemaError(f"{where}.target: pooling target_attention needs the candidate's sparse feature")
    if s.target not in sparse_names:
        raise SchemaError(
            f"{where}.target: {s.target!r} is not a sparse feature (expected one of {sorted(sparse_names)})"
        )
    if s.vocab_from != s.target:
        raise SchemaError(
            f"{where}.target: the list must share {s.target!r}'s embedding table to attend with it "
            f"(set vocab_from: {s.target}; it is {s.vocab_from!r})"
        )


@dataclass(frozen=True)
class InputLayout:
    """The shape of the encoded inputs, fitted by preprocessing and read by models.

    Attributes:
        table_sizes: Rows of each embedding table (index 0 of each is the reserved
            unseen/null row).
        sparse_tables: Table index of each sparse column, in ``Batch.sparse`` order.
        sequence_tables: Table index of each list column.
        sequence_max_len: Padded length of each list column.
        sequence_pooling: ``mean``, ``sum`` or ``target_attention`` for each list column.
        num_dense: Width of ``Batch.dense``.
        sequence_targets: For each list column, the sparse column (``Batch.sparse`` index)
            its ``target_attention`` attends with, -1 for the other poolings; empty when no
            list pools by attention (as in every layout saved before the option existed).
        sparse_names: The feature name of each sparse column, in ``Batch.sparse`` order (what
            a model that names input features, e.g. PEPNet's prior features, resolves them
            with); empty in a hand-built layout, and missing from the ``meta.json`` of model
            directories saved before the field existed (their layout is rebuilt from the saved
            preprocessing, which names them).
    """

    table_sizes: tuple[int, ...]
    sparse_tables: tuple[int, ...]
    sequence_tables: tuple[int, ...]
    sequence_max_len: tuple[int, ...]
    sequence_pooling: tuple[str, ...]
    num_dense: int
    sequence_targets: tuple[int, ...] = ()
    sparse_names: tuple[str, ...] = ()
