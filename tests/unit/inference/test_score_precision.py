"""``score --precision bf16``: the experts' matrix products in bfloat16, used only where the first
rows agree with fp32, and never in training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mtrec
from mtrec.config import config_from_dict
from mtrec.errors import MtrecError
from mtrec.inference import score, score_parquet
from mtrec.nn import experts
from mtrec.nn.experts import MMoELayer, use_bf16_gemms

N = 6000


def _table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 300, n)
    x = rng.normal(size=n)
    click = (rng.random(n) < 1 / (1 + np.exp(-(x + (u % 7 - 3) / 3)))).astype(np.int64)
    return pa.table(
        {"u": u, "item": rng.integers(0, 50, n), "x": x, "click": click, "like": (x > 0.5).astype(np.int64)}
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("bf16")
    pq.write_table(_table(N, 0), work / "train.parquet")
    config = config_from_dict(
        {
            "data": {"train": str(work / "train.parquet"), "valid_fraction": 0.2},
            "features": {"sparse": [{"name": "u"}, {"name": "item"}], "dense": [{"name": "x"}]},
            "tasks": [{"name": "ctr", "label": "click"}, {"name": "like", "label": "like"}],
            "model": {"name": "mmoe", "embedding_dim": 8, "num_experts": 3, "expert_hidden": [64, 32]},
            "train": {"epochs": 1, "batch_size": 512, "device": "cpu", "seed": 0},
        }
    )
    return mtrec.train(config, output=work / "model", progress=False).output


@pytest.fixture
def bf16_here(monkeypatch):
    """The bf16 path runs on any CPU (emulated where the CPU has no bf16 instructions)."""
    monkeypatch.setattr(experts, "bf16_gemms_supported", lambda device: True)


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bf16_in") / "candidates.parquet"
    pq.write_table(_table(5000, 1), path)
    return path


def _scores(path: Path) -> dict[str, np.ndarray]:
    t = pq.read_table(path)
    return {c: t.column(c).to_numpy() for c in ("ctr", "like")}


def test_bf16_gemms_change_evaluation_only_and_switch_back_exactly():
    torch.manual_seed(0)
    layer = MMoELayer(20, num_tasks=2, num_experts=3, expert_hidden=(32, 16))
    x = torch.randn(64, 20)
    with torch.no_grad():
        ref_train = layer.train()(x)
        ref_eval = layer.eval()(x)
        assert use_bf16_gemms(layer) == 1
        assert torch.equal(layer.train()(x), ref_train)  # training never runs in bf16
        low = layer.eval()(x)
        assert not torch.equal(low, ref_eval) and low.dtype == torch.float32
        torch.testing.assert_close(low, ref_eval, atol=0.05, rtol=0.02)
        assert use_bf16_gemms(layer, False) == 1
        assert torch.equal(layer(x), ref_eval)
    assert "bf16_gemms" not in layer.state_dict()  # never saved


def test_bf16_scoring_agrees_with_fp32_within_1e3_and_reports_its_check(model_dir, candidates, tmp_path, bf16_here):
    fp32 = score_parquet(model_dir, candidates, tmp_path / "fp32.parquet", progress=False)
    bf16 = score_parquet(model_dir, candidates, tmp_path / "bf16.parquet", progress=False, precision="bf16")
    assert fp32["precision"] == "fp32" and "bf16_check" not in fp32
    check = bf16["bf16_check"]
    assert check["rows"] == 5000 and check["max_diff"] > 0 and check["task"] in ("ctr", "like")
    a, b = _scores(tmp_path / "fp32.parquet"), _scores(tmp_path / "bf16.parquet")
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert diff == pytest.approx(check["max_diff"])  # the check saw every row here
    assert 0 < diff <= 1e-3
    assert bf16["precision"] == ("bf16" if diff <= score.BF16_TOLERANCE else "fp32")


def test_the_check_reads_the_first_file_that_has_rows(model_dir, candidates, tmp_path, bf16_here):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pq.read_table(candidates).slice(0, 0), folder / "a_empty.parquet")
    pq.write_table(pq.read_table(candidates), folder / "b.parquet")
    got = score_parquet(model_dir, folder, tmp_path / "out", progress=False, precision="bf16")
    assert got["rows"] == 5000 and got["bf16_check"]["rows"] == 5000


def test_bf16_that_disagrees_on_the_first_rows_stays_fp32_and_says_why(
    model_dir, candidates, tmp_path, monkeypatch, bf16_here
):
    monkeypatch.setattr(score, "BF16_TOLERANCE", 0.0)
    fp32 = score_parquet(model_dir, candidates, tmp_path / "fp32.parquet", progress=False)
    got = score_parquet(model_dir, candidates, tmp_path / "fell_back.parquet", progress=False, precision="bf16")
    assert got["precision"] == "fp32" and got["bf16_check"]["max_diff"] > 0
    assert got["precision_note"].startswith("bf16 differs from fp32 by up to ")
    assert "on the first 5,000 rows: fp32" in got["precision_note"]
    a, b = _scores(tmp_path / "fp32.parquet"), _scores(tmp_path / "fell_back.parquet")
    assert all(np.array_equal(a[k], b[k]) for k in a) and fp32["rows"] == got["rows"]


def test_without_native_bf16_the_run_stays_fp32_and_says_so(model_dir, candidates, tmp_path, monkeypatch):
    monkeypatch.setattr(experts, "bf16_gemms_supported", lambda device: False)
    got = score_parquet(model_dir, candidates, tmp_path / "s.parquet", progress=False, precision="bf16")
    assert got["precision"] == "fp32" and got["precision_note"] == "cpu has no native bf16 matrix products: fp32"


def test_the_difference_is_absolute_for_probabilities_relative_for_large_values_and_nan_safe():
    ref = {"p": np.array([0.2, 0.5], np.float32), "dwell": np.array([100.0, np.nan], np.float32)}
    diff, task = score._bf16_difference(ref, {"p": ref["p"] + 1e-4, "dwell": ref["dwell"] * 1.0005})
    assert task == "dwell" and diff == pytest.approx(5e-4, rel=1e-3)  # 0.05 absolute on 100: relative
    same_nan = score._bf16_difference(ref, {"p": ref["p"], "dwell": ref["dwell"].copy()})
    assert same_nan == (0.0, "p")
    one_nan = {"p": np.array([np.nan, 0.5], np.float32), "dwell": ref["dwell"]}
    assert score._bf16_difference(ref, one_nan) == (float("inf"), "p")


def test_an_unknown_precision_is_refused_before_anything_is_written(model_dir, candidates, tmp_path):
    with pytest.raises(MtrecError, match="--precision: expected fp32 or bf16, got 'fp16'"):
        score_parquet(model_dir, candidates, tmp_path / "out.parquet", progress=False, precision="fp16")
    assert not any(tmp_path.iterdir())


def test_the_cli_prints_why_bf16_was_not_used(model_dir, candidates, tmp_path, capsys, monkeypatch, bf16_here):
    from mtrec.cli import main

    monkeypatch.setattr(score, "BF16_TOLERANCE", 0.0)
    out = tmp_path / "s.parquet"
    args = ["score", "--model", str(model_dir), "--input", str(candidates), "--output", str(out), "--quiet"]
    assert main([*args, "--precision", "bf16"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("mtrec: bf16 differs from fp32") and err.count("\n") == 1 and out.is_file()
