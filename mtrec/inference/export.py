"""Export a trained network for serving: TorchScript or ONNX, on encoded inputs.

The exported graph takes the encoded columns as plain tensors, in this order:
``sparse (B, F) int64``, ``dense (B, Dn) float32``, ``seq_lengths (B, S) int64`` and one
``(B, L_i) int64`` tensor per list feature, and returns one logit tensor per task in
``Schema.output_tasks`` order. The preprocessing state (vocabularies as Parquet, dense
statistics as JSON) is copied beside the file, with a ``signature.json`` describing
inputs and outputs, so a serving system can reproduce the encoding without Python
objects.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtrec.batch import Batch
from mtrec.data.batches import TensorColumns
from mtrec.errors import ModelError, MtrecError
from mtrec.files import (
    atomic_write_text,
    claim_output,
    fault_point,
    output_path,
    staged_dir,
    write_file,
)
from mtrec.model_dir import CALIBRATION, load_model_dir, save_calibration

__all__ = ["EncodedInputModel", "export_model", "load_exported"]


class EncodedInputModel(nn.Module):
    """Wraps a model so that it takes tensors instead of a :class:`~mtrec.batch.Batch`."""

    def __init__(self, model: nn.Module, task_names: tuple[str, ...], num_tasks_labels: int) -> None:
        super().__init__()
        self.model = model
        self.task_names = task_names
        self.num_tasks_labels = num_tasks_labels

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor, seq_lengths: torch.Tensor, *sequences: torch.Tensor):  # noqa: ANN201
        n = sparse.shape[0]
        labels = torch.zeros(n, self.num_tasks_labels, dtype=torch.float32)
        mask = torch.zeros(n, self.num_tasks_labels, dtype=torch.bool)
        logits = self.model(Batch(sparse, dense, tuple(sequences), seq_lengths, labels, mask))
        return tuple(logits[name] for name in self.task_names)


def _example_inputs(loaded: Any, rows: int = 8) -> tuple[torch.Tensor, ...]:
    layout = loaded.preprocessor.layout()
    sparse = torch.zeros(rows, len(layout.sparse_tables), dtype=torch.int64)
    for j, table in enumerate(layout.sparse_tables):
        sparse[:, j] = torch.arange(rows) % layout.table_sizes[table]
    dense = torch.randn(rows, layout.num_dense, generator=torch.Generator().manual_seed(0))
    lengths = torch.ones(rows, len(layout.sequence_tables), dtype=torch.int64)
    seqs = tuple(torch.zeros(rows, length, dtype=torch.int64) for length in layout.sequence_max_len)
    return (sparse, dense, lengths, *seqs)


EXPORT_KIND = "export"


def export_model(model_dir: str | Path, output: str | Path, *, fmt: str, overwrite: bool = False) -> dict[str, Any]:
    """Exports ``model_dir`` to ``output`` (``torchscript`` or ``onnx``).

    Writes ``output`` and the folder ``output.preprocess/`` (preprocessing state and
    ``signature.json``); each only appears once complete. Two paths cannot be replaced
    in one step, so the pair is tied by content instead: ``signature.json`` records the
    SHA-256 of the graph file, and :func:`load_exported` refuses a graph and a state
    from different exports (a crash between the two renames; ``export`` again repairs it).

    Returns:
        The signature (input and output names, shapes and dtypes).
    """
    if fmt not in ("torchscript", "onnx"):
        raise MtrecError(f"--format: expected torchscript or onnx, got {fmt!r}")
    output = output_path(output)
    state_dir = output.with_name(output.name + ".preprocess")
    inputs = [model_dir]
    with claim_output(output, kind=None, overwrite=overwrite, inputs=inputs):
        with claim_output(
            state_dir, kind=EXPORT_KIND, overwrite=overwrite, inputs=inputs, what="an exported preprocessing state"
        ):
            loaded = load_model_dir(model_dir)
            graph = _export_bytes(loaded, fmt)
            signature = _signature(loaded, model_dir, fmt, hashlib.sha256(graph).hexdigest())

            def write(tmp: Path) -> None:
                # The graph is on disk (under its temporary name) before the state is swapped
                # in, so a full disk fails before anything is replaced.
                tmp.write_bytes(graph)
                with staged_dir(state_dir, EXPORT_KIND) as staging:
                    loaded.preprocessor.save(staging)
                    if loaded.calibration:
                        save_calibration(staging / CALIBRATION, loaded.config.train.calibration, loaded.calibration)
                    atomic_write_text(staging / "signature.json", json.dumps(signature, indent=2))
                fault_point("export:between-renames")

            write_file(output, write)
    return signature


def _input_names(loaded: Any) -> list[str]:
    return ["sparse", "dense", "seq_lengths"] + [f"seq_{s.name}" for s in loaded.config.schema.sequence]


def _export_bytes(loaded: Any, fmt: str) -> bytes:
    """The serialised graph, built in memory: a full disk can then only fail in Python, never inside torch."""
    tasks = loaded.config.schema.output_tasks
    names = tuple(t.name for t in tasks)
    wrapper = EncodedInputModel(loaded.model, names, len(tasks)).eval()
    example = _example_inputs(loaded)
    input_names = _input_names(loaded)
    buffer = io.BytesIO()
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(wrapper, example, check_trace=False)
            torch.jit.save(traced, buffer)
        else:
            try:
                import onnx  # noqa: F401
            except ImportError:
                raise MtrecError('--format onnx needs the onnx package: pip install -e ".[export]"') from None
            dynamic = {name: {0: "batch"} for name in [*input_names, *names]}
            torch.onnx.export(
                wrapper,
                example,
                buffer,  # type: ignore[arg-type]  # torch stub: the dynamo=False exporter also takes a file-like f
                input_names=input_names,
                output_names=list(names),
                dynamic_axes=dynamic,
                dynamo=False,
            )
    return buffer.getvalue()


def _signature(loaded: Any, model_dir: str | Path, fmt: str, graph_sha256: str) -> dict[str, Any]:
    schema = loaded.config.schema
    return {
        "format": fmt,
        "model_dir": str(model_dir),
        "graph_sha256": graph_sha256,
        "inputs": [{"name": n, "dtype": "float32" if n == "dense" else "int64"} for n in _input_names(loaded)],
        "outputs": [
            {
                "name": t.name,
                "type": t.type,
                "shape": ["batch", t.output_dim] if t.output_dim > 1 else ["batch"],
            }
            for t in schema.output_tasks
        ],
        "sparse_features": [f.name for f in schema.sparse],
        "dense_features": [f.name for f in schema.dense],
        "sequence_features": [{"name": s.name, "max_len": s.max_len} for s in schema.sequence],
        "note": "logits; apply sigmoid (binary), softmax (multiclass) or expm1 (log1p regression)",
        # The graph's outputs are uncalibrated; the calibration is data beside it (mtrec.calibration).
        "calibration": (
            {"file": CALIBRATION, "method": loaded.config.train.calibration, "tasks": sorted(loaded.calibration)}
            if loaded.calibration
            else None
        ),
    }


def load_exported(path: str | Path) -> tuple[bytes, dict[str, Any]]:
    """The graph file of an export and its ``signature.json``, checked to belong together.

    Returns:
        The graph's bytes (for ``torch.jit.load(io.BytesIO(...))`` or an ONNX runtime)
        and the signature.

    Raises:
        ModelError: A missing file, or a graph and a state from different exports.
    """
    path = Path(path)
    sig_path = path.with_name(path.name + ".preprocess") / "signature.json"
    try:
        graph = path.read_bytes()
        signature = json.loads(sig_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a complete export ({exc})") from None
    if not isinstance(signature, dict) or signature.get("graph_sha256") != hashlib.sha256(graph).hexdigest():
        raise ModelError(
            f"{path}: the graph and {sig_path} come from different exports; run `mtrec export --overwrite` again"
        )
    return graph, signature


def _reference_logits(model_dir: str | Path, table: Any) -> dict[str, Any]:
    """Eager logits of a model directory on a pyarrow table (for parity checks)."""
    from mtrec.predict import predict_logits

    loaded = load_model_dir(model_dir)
    enc = loaded.preprocessor.transform(table, with_labels=False)
    names = tuple(t.name for t in loaded.config.schema.output_tasks)
    return predict_logits(loaded.model, TensorColumns.from_encoded(enc), names)
