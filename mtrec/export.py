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

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtrec.batch import Batch
from mtrec.checkpoint import load_model_dir
from mtrec.data.batches import TensorColumns
from mtrec.errors import MtrecError
from mtrec.files import atomic_write_text

__all__ = ["EncodedInputModel", "export_model"]


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


def export_model(model_dir: str | Path, output: str | Path, *, fmt: str, overwrite: bool = False) -> dict[str, Any]:
    """Exports ``model_dir`` to ``output`` (``torchscript`` or ``onnx``).

    Writes ``output`` and the folder ``output.preprocess/`` (preprocessing state and
    ``signature.json``); both only appear once complete.

    Returns:
        The signature (input and output names, shapes and dtypes).
    """
    output = Path(output)
    state_dir = output.with_name(output.name + ".preprocess")
    if fmt not in ("torchscript", "onnx"):
        raise MtrecError(f"--format: expected torchscript or onnx, got {fmt!r}")
    for path in (output, state_dir):
        if path.exists() and not overwrite:
            raise MtrecError(f"{path}: already exists (pass --overwrite to replace it)")
    if output.is_dir():
        raise MtrecError(f"{output}: is a folder, expected a file name")
    output.parent.mkdir(parents=True, exist_ok=True)
    loaded = load_model_dir(model_dir)
    tasks = loaded.config.schema.output_tasks
    names = tuple(t.name for t in tasks)
    wrapper = EncodedInputModel(loaded.model, names, len(tasks)).eval()
    example = _example_inputs(loaded)
    input_names = ["sparse", "dense", "seq_lengths"] + [f"seq_{s.name}" for s in loaded.config.schema.sequence]
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with torch.no_grad():
            if fmt == "torchscript":
                traced = torch.jit.trace(wrapper, example, check_trace=False)
                traced.save(tmp)
            else:
                try:
                    import onnx  # noqa: F401
                except ImportError:
                    raise MtrecError('--format onnx needs the onnx package: pip install -e ".[export]"') from None
                dynamic = {name: {0: "batch"} for name in [*input_names, *names]}
                torch.onnx.export(
                    wrapper,
                    example,
                    tmp,
                    input_names=input_names,
                    output_names=list(names),
                    dynamic_axes=dynamic,
                    dynamo=False,
                )
        staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.preprocess."))
        try:
            loaded.preprocessor.save(staging)
            signature = {
                "format": fmt,
                "model_dir": str(model_dir),
                "inputs": [{"name": n, "dtype": "float32" if n == "dense" else "int64"} for n in input_names],
                "outputs": [
                    {
                        "name": t.name,
                        "type": t.type,
                        "shape": ["batch", t.output_dim] if t.output_dim > 1 else ["batch"],
                    }
                    for t in tasks
                ],
                "sparse_features": [f.name for f in loaded.config.schema.sparse],
                "dense_features": [f.name for f in loaded.config.schema.dense],
                "sequence_features": [{"name": s.name, "max_len": s.max_len} for s in loaded.config.schema.sequence],
                "note": "logits; apply sigmoid (binary), softmax (multiclass) or expm1 (log1p regression)",
            }
            atomic_write_text(staging / "signature.json", json.dumps(signature, indent=2))
            if state_dir.exists():
                shutil.rmtree(state_dir)
            os.replace(staging, state_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        os.replace(tmp, output)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return signature


def _reference_logits(model_dir: str | Path, table: Any) -> dict[str, Any]:
    """Eager logits of a model directory on a pyarrow table (for parity checks)."""
    from mtrec.evaluate import predict_logits

    loaded = load_model_dir(model_dir)
    enc = loaded.preprocessor.transform(table, with_labels=False)
    names = tuple(t.name for t in loaded.config.schema.output_tasks)
    return predict_logits(loaded.model, TensorColumns.from_encoded(enc), names)
