"""Ranker (in-memory prediction), rank formulas and score_parquet on a tiny trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mtrec
from mtrec.config import config_from_dict
from mtrec.errors import DataError, MtrecError
from mtrec.files import MARKER
from mtrec.inference import Ranker, parse_rank, rank_score, score_parquet
from mtrec.nn import experts

N = 3000


def _table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 200, n) + 2**40  # above 2^31 and 2^24: IDs must stay int64
    click = (rng.random(n) < 0.3).astype(np.int64)
    return pa.table(
        {
            "u": u,
            "cat": rng.choice(["a", "b", "c", "d"], n),
            "x": rng.normal(size=n),
            "hist": pa.array(
                [list(rng.integers(0, 200, k) + 2**40) for k in rng.integers(0, 5, n)], pa.list_(pa.int64())
            ),
            "click": click,
            "conversion": np.where(click == 1, (rng.random(n) < 0.4).astype(np.int64), 0),
            "dwell": np.where(click == 1, rng.exponential(30.0, n), 0.0),
            "genre": rng.integers(0, 3, n),
        }
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Binary, regression (log1p), multiclass and ESMM tasks in one small model."""
    work = tmp_path_factory.mktemp("score")
    pq.write_table(_table(N, 0), work / "train.parquet", row_group_size=1000)
    config = config_from_dict(
        {
            "data": {"train": str(work / "train.parquet"), "valid_fraction": 0.2},
            "features": {
                "sparse": [{"name": "u"}, {"name": "cat"}],
                "dense": [{"name": "x"}],
                "sequence": [{"name": "hist", "max_len": 4, "vocab_from": "u"}],
            },
            "tasks": [
                {"name": "ctr", "label": "click"},
                {"name": "cvr", "label": "conversion", "where": "click == 1"},
                {
                    "name": "dwell",
                    "label": "dwell",
                    "type": "regression",
                    "label_transform": "log1p",
                    "where": "click == 1",
                },
                {"name": "genre", "label": "genre", "type": "multiclass", "num_classes": 3},
            ],
            "esmm": {"ctr": "ctr", "cvr": "cvr"},
            "model": {"name": "shared_bottom", "embedding_dim": 4, "bottom_hidden": [16], "tower_hidden": [8]},
            "train": {"epochs": 1, "batch_size": 512, "device": "cpu", "seed": 0},
        }
    )
    return mtrec.train(config, output=work / "model", progress=False).output


@pytest.fixture(scope="module")
def ranker(model_dir: Path) -> Ranker:
    return mtrec.load_model(model_dir)


@pytest.fixture(scope="module")
def data() -> pa.Table:
    return _table(500, 1)


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: float = 1e-6) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=tol * max(1.0, float(np.abs(b[k]).max())), err_msg=k)


def test_ranker_exposes_module_tasks_and_config(ranker: Ranker):
    assert ranker.task_names == ("ctr", "cvr", "dwell", "genre", "ctcvr")
    assert isinstance(ranker.module, torch.nn.Module) and not ranker.module.training
    assert ranker.config.model.name == "shared_bottom"


def test_predict_is_the_same_from_every_input_type(ranker: Ranker, data: pa.Table):
    expected = ranker.predict(data)
    frame = data.to_pandas()
    inputs = {
        "pandas": frame,
        "polars": pl.from_arrow(data),
        "record_batch": data.combine_chunks().to_batches()[0],
        "dict_of_arrays": {c: frame[c].to_numpy() for c in ("u", "cat", "x")} | {"hist": data["hist"].to_pylist()},
        "dict_of_lists": data.to_pydict(),
        "extra_columns": data.append_column("junk", pa.array([{"a": 1}] * data.num_rows)),
    }
    for name, value in inputs.items():
        got = ranker.predict(value)
        assert list(got) == list(ranker.task_names), name
        assert_same(got, expected)


def test_predictions_are_the_transformed_logits_of_the_module(ranker: Ranker, data: pa.Table):
    preds = ranker.predict(data, batch_size=128)
    with torch.no_grad():
        logits = ranker.module(ranker.encode(data))
    assert preds["ctr"].shape == (500,) and preds["ctr"].dtype == np.float32
    np.testing.assert_allclose(preds["ctr"], torch.sigmoid(logits["ctr"]).numpy(), atol=1e-6)
    np.testing.assert_allclose(preds["dwell"], np.expm1(logits["dwell"].numpy()), rtol=1e-5)
    assert preds["genre"].shape == (500, 3)
    np.testing.assert_allclose(preds["genre"].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(preds["genre"], torch.softmax(logits["genre"], -1).numpy(), atol=1e-6)
    np.testing.assert_allclose(preds["ctcvr"], preds["ctr"] * preds["cvr"], atol=1e-6)
    assert (preds["dwell"] > -1).all()


def test_row_order_is_preserved(ranker: Ranker, data: pa.Table):
    expected = ranker.predict(data)
    perm = np.random.default_rng(5).permutation(data.num_rows)
    shuffled = ranker.predict(data.take(perm), batch_size=64)
    assert_same(shuffled, {k: v[perm] for k, v in expected.items()})


def test_unseen_and_null_categories_share_index_zero(ranker: Ranker, data: pa.Table):
    base = data.slice(0, 4)
    a = base.set_column(0, "u", pa.array([2**62, 2**62 + 1, 7, 8])).set_column(
        1, "cat", pa.array(["zzz", "yyy", "xxx", "www"])
    )
    b = base.set_column(0, "u", pa.array([None, 9, 2**50, 10], pa.int64())).set_column(
        1, "cat", pa.array([None, "new", "other", "q"])
    )
    pa_, pb = ranker.predict(a), ranker.predict(b)
    for k in pa_:
        assert np.isfinite(pa_[k]).all()
    assert_same(pa_, pb)  # every unseen value (and null) is index 0: identical rows


def test_missing_columns_are_all_listed(ranker: Ranker, data: pa.Table):
    with pytest.raises(DataError, match=r"'u', 'x', 'hist'"):
        ranker.predict(data.select(["cat"]))
    with pytest.raises(DataError, match="'cat'"):
        ranker.predict({"u": [1], "x": [0.0], "hist": [[1]]})


def test_wrong_type_is_a_data_error(ranker: Ranker, data: pa.Table):
    bad = data.set_column(data.schema.get_field_index("x"), "x", pa.array(["1.0"] * data.num_rows))
    with pytest.raises(DataError, match="'x'.*expected a number"):
        ranker.predict(bad)


def test_unsupported_input_type(ranker: Ranker):
    with pytest.raises(TypeError, match="DataFrame"):
        ranker.predict([1, 2])


def test_parse_rank_product_and_sum():
    assert parse_rank("ctr^1*cvr^0.5*satisfaction^2") == {
        "type": "product",
        "exponents": {"ctr": 1.0, "cvr": 0.5, "satisfaction": 2.0},
    }
    assert parse_rank(" ctr * cvr ^ 1e-1 * ctr ") == {"type": "product", "exponents": {"ctr": 2.0, "cvr": 0.1}}
    assert parse_rank("0.7*ctr+0.3*cvr") == {"type": "sum", "weights": {"ctr": 0.7, "cvr": 0.3}}
    assert parse_rank("ctr + -0.5*dwell + cvr*2") == {"type": "sum", "weights": {"ctr": 1.0, "dwell": -0.5, "cvr": 2.0}}
    assert parse_rank("my-task^2") == {"type": "product", "exponents": {"my-task": 2.0}}


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "   ",
        "ctr^",
        "ctr**2",
        "ctr^cvr",
        "0.5*ctr^2",
        "ctr*cvr+cvr",
        "ctr+",
        "2*3",
        "__import__('os')",
        "ctr;cvr",
        "ctr/cvr",
    ],
)
def test_parse_rank_rejects_bad_syntax(expr: str):
    with pytest.raises(MtrecError, match="--rank"):
        parse_rank(expr)


def test_rank_score_product_and_sum():
    preds = {"ctr": np.array([0.1, 0.4]), "cvr": np.array([0.25, 0.04]), "genre": np.ones((2, 3)) / 3}
    np.testing.assert_allclose(rank_score(preds, "ctr^1*cvr^0.5"), [0.1 * 0.5, 0.4 * 0.2])
    formula = {"type": "sum", "weights": {"ctr": 0.7, "cvr": 0.3}}
    np.testing.assert_allclose(rank_score(preds, formula), [0.7 * 0.1 + 0.3 * 0.25, 0.7 * 0.4 + 0.3 * 0.04])
    with pytest.raises(MtrecError, match="unknown task 'like'"):
        rank_score(preds, "ctr*like")
    with pytest.raises(MtrecError, match="'genre' is multiclass"):
        rank_score(preds, "genre")
    with pytest.raises(MtrecError, match="type must be"):
        rank_score(preds, {"type": "max", "weights": {"ctr": 1}})
    with pytest.raises(MtrecError, match="must be finite"):
        rank_score(preds, {"type": "sum", "weights": {"ctr": float("nan")}})


def test_score_parquet_writes_one_column_per_class_and_matches_predict(model_dir: Path, ranker: Ranker, tmp_path):
    data = _table(2500, 2).append_column("cat_copy", pa.array(["s"] * 2500).dictionary_encode())
    src = tmp_path / "in.parquet"
    pq.write_table(data, src, row_group_size=700)
    out = tmp_path / "out" / "scores.parquet"
    result = score_parquet(model_dir, src, out, keep=("cat_copy", "u"), rank="0.5*ctr+dwell", progress=False)
    assert result["rows"] == 2500 and result["files"] == 1
    got = pq.read_table(out)
    assert got.column_names == ["cat_copy", "u", "ctr", "cvr", "dwell", "genre_c0", "genre_c1", "genre_c2", "ctcvr"] + [
        "rank_score"
    ]
    assert got.schema.field("cat_copy").type == pq.read_schema(src).field("cat_copy").type
    assert got.column("u").equals(pq.read_table(src).column("u"))
    expected = ranker.predict(pq.read_table(src))
    for name in ("ctr", "cvr", "dwell", "ctcvr"):
        np.testing.assert_allclose(got.column(name).to_numpy(), expected[name], rtol=1e-6, atol=1e-6)
    genre = np.stack([got.column(f"genre_c{k}").to_numpy() for k in range(3)], axis=1)
    np.testing.assert_allclose(genre, expected["genre"], atol=1e-6)
    np.testing.assert_allclose(
        got.column("rank_score").to_numpy(), 0.5 * expected["ctr"] + expected["dwell"], rtol=1e-5
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["scores.parquet"]  # no temp file left


def test_a_failure_midway_leaves_no_output_and_no_temp_files(model_dir: Path, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        pq.write_table(_table(300, 10 + i), folder / f"part-{i}.parquet")
    calls = []

    def failing(preds, formula):
        calls.append(1)
        if len(calls) > 1:  # the second file
            raise KeyboardInterrupt
        return np.zeros(len(preds["ctr"]))

    monkeypatch.setattr(mtrec.inference.score, "rank_score", failing)
    with pytest.raises(KeyboardInterrupt):
        score_parquet(model_dir, folder, tmp_path / "out", rank="ctr", progress=False)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]

    single = tmp_path / "one.parquet"
    pq.write_table(_table(300, 12), single)
    calls.clear()
    calls.append(1)
    with pytest.raises(KeyboardInterrupt):
        score_parquet(model_dir, single, tmp_path / "one_scores.parquet", rank="ctr", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "one.parquet"]


def test_progress_lines_are_plain_off_a_terminal(model_dir: Path, tmp_path):
    import io

    src = tmp_path / "in.parquet"
    pq.write_table(_table(200, 3), src)
    stream = io.StringIO()
    mtrec.inference.score._Progress(10, stream, True, every=0.0).update(5)
    assert "scored 5/10 rows (50.0 %)" in stream.getvalue() and "eta" in stream.getvalue()
    quiet = io.StringIO()
    score_parquet(model_dir, src, tmp_path / "o.parquet", progress=False, stream=quiet)
    assert quiet.getvalue() == ""


def test_pandas_categorical_and_polars_categorical_columns(ranker: Ranker, data: pa.Table):
    frame = data.to_pandas()
    expected = ranker.predict(frame)
    frame["cat"] = frame["cat"].astype("category")
    assert_same(ranker.predict(frame), expected)
    assert_same(ranker.predict(pl.from_arrow(data).with_columns(pl.col("cat").cast(pl.Categorical))), expected)


def test_globs_output_files_or_folders_and_overwrite_safety(model_dir: Path, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        pq.write_table(_table(100, 20 + i), data / f"p{i}.parquet")
    one = score_parquet(model_dir, str(data / "p0*.parquet"), tmp_path / "one.parquet", progress=False)
    assert one["files"] == 1 and (tmp_path / "one.parquet").is_file()
    score_parquet(model_dir, str(data / "p*.parquet"), tmp_path / "many", progress=False)
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == [MARKER, "p0.parquet", "p1.parquet"]
    with pytest.raises(MtrecError, match="--overwrite"):
        score_parquet(model_dir, data, tmp_path / "many", progress=False)
    score_parquet(model_dir, data, tmp_path / "many", overwrite=True, progress=False)
    with pytest.raises(MtrecError, match="lies inside\\) the input"):
        score_parquet(model_dir, data, data / "scores", progress=False)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    with pytest.raises(MtrecError, match="refusing to replace it"):
        score_parquet(model_dir, data, precious, overwrite=True, progress=False)
    assert (precious / "thesis.txt").read_text() == "keep me"
    with pytest.raises(MtrecError, match="clash"):
        score_parquet(model_dir, data / "p0.parquet", tmp_path / "x.parquet", keep=("ctr",), progress=False)
    assert not (tmp_path / "x.parquet").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bf16_on_a_model_without_experts_stays_fp32_and_says_so(model_dir: Path, tmp_path, monkeypatch):
    monkeypatch.setattr(experts, "bf16_gemms_supported", lambda device: True)
    src = tmp_path / "in.parquet"
    pq.write_table(_table(500, 3), src)
    fp32 = score_parquet(model_dir, src, tmp_path / "a.parquet", progress=False)
    got = score_parquet(model_dir, src, tmp_path / "b.parquet", progress=False, precision="bf16")
    assert got["precision"] == "fp32" and "bf16_check" not in got
    assert got["precision_note"] == "the model has no expert layers to run in bf16: fp32"
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    assert set(fp32["timings"]) == {"load_s", "read_s", "encode_s", "forward_s", "write_s"}
    assert all(v >= 0 for v in fp32["timings"].values()) and fp32["timings"]["forward_s"] > 0
