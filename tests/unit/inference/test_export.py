"""Export to TorchScript and ONNX: parity with the eager model on encoded inputs."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import mtrec
from mtrec.config import config_from_dict
from mtrec.data.synthetic import write_click_log
from mtrec.errors import MtrecError
from mtrec.inference.export import _reference_logits, export_model
from mtrec.quickstart import synthetic_features, synthetic_tasks

PEPNET = {
    "name": "pepnet",
    "embedding_dim": 4,
    "prior_features": ["item_id", "user_id"],
    "domain_features": ["device"],
    "tower_hidden": [16, 8],
    "gate_hidden": 8,
}


@pytest.fixture(scope="module", params=["shared", "stem", "gated", "pepnet"])
def model_dir(tmp_path_factory, request):
    """ESMM over PLE, with the shared embedding, with STEM's shared + per-task tables, and
    with DIN target attention, DCN-v2 cross layers, DSelect-k gates, HoME's expert
    normalisation, the balance penalty and ESCM2-DR's imputation tower; and ESMM over PEPNet
    (prior and domain features looked up by name) with the same DIN and DCN-v2 input."""
    # DIN attention of the candidate item over the history, and DCN-v2 cross layers.
    din = {"name": "hist_item_ids", "max_len": 20, "pooling": "target_attention", "target": "item_id"}
    gated_features = {"sequence": [{**din, "vocab_from": "item_id"}], "interaction": {"name": "dcn_v2", "rank": 8}}
    gated = {"gate": "dselect_k", "gate_k": 2, "expert_norm": True, "expert_balance": 0.1, "gate_entropy": 0.01}
    work = tmp_path_factory.mktemp(f"export-{request.param}")
    data = work / "clicks.parquet"
    write_click_log(data, 6000, seed=1)
    cfg = config_from_dict(
        {
            "data": {"train": str(data)},
            "features": {
                **synthetic_features(num_sparse=10, num_dense=6),
                **(gated_features if request.param in ("gated", "pepnet") else {}),
            },
            "tasks": synthetic_tasks(),
            "esmm": {"ctr": "ctr", "cvr": "cvr", **({"counterfactual": "dr"} if request.param == "gated" else {})},
            "model": PEPNET
            if request.param == "pepnet"
            else {
                "name": "ple",
                "embedding_dim": 4,
                "embedding": "shared" if request.param == "gated" else request.param,
                "expert_hidden": [16, 8],
                "tower_hidden": [8],
                **(gated if request.param == "gated" else {}),
            },
            "train": {"epochs": 1, "batch_size": 512},
        }
    )
    mtrec.train(cfg, output=work / "model", progress=False)
    return work / "model", data


def _inputs(model_dir, table):
    loaded = mtrec.load_model_dir(model_dir)
    enc = loaded.preprocessor.transform(table, with_labels=False)
    return (
        torch.from_numpy(enc.sparse),
        torch.from_numpy(enc.dense),
        torch.from_numpy(enc.seq_lengths),
        *[torch.from_numpy(s) for s in enc.sequences],
    )


def test_torchscript_matches_eager(model_dir, tmp_path):
    directory, data = model_dir
    table = pq.read_table(data).slice(0, 1000)
    sig = export_model(directory, tmp_path / "m.pt", fmt="torchscript")
    assert [o["name"] for o in sig["outputs"]] == ["ctr", "cvr", "satisfaction", "ctcvr"]
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    ref = _reference_logits(directory, table)
    with torch.no_grad():
        out = scripted(*_inputs(directory, table))
    for o, spec in zip(out, sig["outputs"], strict=True):
        np.testing.assert_allclose(o.numpy(), ref[spec["name"]], atol=1e-5)
    state = tmp_path / "m.pt.preprocess"
    assert json.loads((state / "signature.json").read_text())["format"] == "torchscript"
    assert (state / "state.json").exists() and list(state.glob("vocab_*.parquet"))


def test_onnx_matches_eager(model_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    directory, data = model_dir
    table = pq.read_table(data).slice(0, 1000)
    sig = export_model(directory, tmp_path / "m.onnx", fmt="onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    feed = {i["name"]: t.numpy() for i, t in zip(sig["inputs"], _inputs(directory, table), strict=True)}
    ref = _reference_logits(directory, table)
    for o, spec in zip(session.run(None, feed), sig["outputs"], strict=True):
        np.testing.assert_allclose(o, ref[spec["name"]], atol=1e-5)


def test_export_refuses_overwrite_and_bad_format(model_dir, tmp_path):
    directory, _ = model_dir
    (tmp_path / "m.pt").write_text("old")
    with pytest.raises(MtrecError, match="--overwrite"):
        export_model(directory, tmp_path / "m.pt", fmt="torchscript")
    assert (tmp_path / "m.pt").read_text() == "old"
    with pytest.raises(MtrecError, match="torchscript or onnx"):
        export_model(directory, tmp_path / "x.bin", fmt="tflite")
    assert not (tmp_path / "x.bin").exists()
