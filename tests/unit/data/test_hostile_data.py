"""Hostile input gives one-line mtrec errors, not tracebacks or silent garbage.

Duplicate column names in Parquet files (score, evaluate, train), a rank formula whose
score overflows, data that Ranker.predict cannot convert, 0-row frames, and a list column
sharing hashed IDs (vocab_from) with a sparse feature of another ID type.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mtrec
from mtrec.data.loading import load_training_data
from mtrec.data.preprocess import Preprocessor
from mtrec.errors import DataError
from mtrec.inference import Ranker, rank_score, score_parquet
from mtrec.schema import Schema, SequenceFeature, SparseFeature, Task
from tests.integration.helpers import assert_one_line_error
from tests.integration.helpers import mtrec as cli
from tests.unit.inference.test_score import _table, model_dir  # noqa: F401  (model_dir: the tiny trained model fixture)

# The CLI subprocesses run the mtrec these tests imported, wherever it lives.
CODE_ROOT = Path(mtrec.__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path):
    return cli(*args, cwd=cwd, env={**os.environ, "PYTHONPATH": str(CODE_ROOT)})


@pytest.fixture(scope="module")
def ranker(model_dir: Path) -> Ranker:  # noqa: F811
    return mtrec.load_model(model_dir)


def with_duplicate(table: pa.Table, name: str) -> pa.Table:
    """``table`` with a second column called ``name`` (pyarrow writes such files)."""
    return pa.Table.from_arrays([*table.columns, table.column(name)], names=[*table.column_names, name])


@pytest.fixture
def duplicated(tmp_path: Path) -> Path:
    path = tmp_path / "dup.parquet"
    pq.write_table(with_duplicate(_table(200, 7), "x"), path)
    return path


# =========================================================================== duplicate column names


def test_duplicate_column_in_score_cli_is_one_line(model_dir: Path, duplicated: Path, tmp_path: Path):  # noqa: F811
    proc = run_cli(
        "score", "--model", str(model_dir), "--input", str(duplicated), "--output", "s.parquet", cwd=tmp_path
    )
    assert_one_line_error(proc, str(duplicated), "duplicate column name 'x'")
    assert not (tmp_path / "s.parquet").exists()


def test_duplicate_column_in_evaluate_cli_is_one_line(model_dir: Path, duplicated: Path, tmp_path: Path):  # noqa: F811
    proc = run_cli("evaluate", "--model", str(model_dir), "--data", str(duplicated), cwd=tmp_path)
    assert_one_line_error(proc, str(duplicated), "duplicate column name 'x'")


def test_duplicate_column_in_train_is_named(duplicated: Path):
    schema = Schema(sparse=(SparseFeature("u"),), tasks=(Task("ctr", label="click"),))
    # A repeated column is refused whichever it is: 'x' is not even a feature here.
    with pytest.raises(DataError, match=r"dup\.parquet: duplicate column name 'x'$"):
        load_training_data(schema, str(duplicated), None, valid_fraction=0.2, seed=0)


def test_duplicate_column_in_train_cli_is_one_line(model_dir: Path, duplicated: Path, tmp_path: Path):  # noqa: F811
    proc = run_cli(
        "train",
        "--config",
        str(model_dir / "config.yaml"),
        f"--set=data.train={duplicated}",
        "--output",
        str(tmp_path / "m"),
        "--quiet",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, str(duplicated), "duplicate column name 'x'")


def test_duplicate_columns_in_a_score_folder_are_caught_before_writing(model_dir: Path, tmp_path: Path):  # noqa: F811
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(_table(50, 1), folder / "a.parquet")
    pq.write_table(with_duplicate(_table(50, 2), "cat"), folder / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: duplicate column name 'cat'"):
        score_parquet(model_dir, folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# =========================================================================== rank formulas


def test_non_finite_rank_score_cli_names_the_formula(model_dir: Path, tmp_path: Path):  # noqa: F811
    data = tmp_path / "in.parquet"
    pq.write_table(_table(100, 3), data)
    proc = run_cli(
        "score",
        "--model",
        str(model_dir),
        "--input",
        str(data),
        "--output",
        "s.parquet",
        "--rank",
        "ctr^-1000",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "ctr^-1000", "non-finite", str(data))
    assert not (tmp_path / "s.parquet").exists()


def test_rank_score_refuses_non_finite_scores():
    preds = {"ctr": np.array([0.5, 0.0], np.float32), "dwell": np.array([-2.0, 3.0], np.float32)}
    with pytest.raises(DataError, match=r"'ctr\^-1'.* 1 of 2 row.*ctr=0"):
        rank_score(preds, "ctr^-1")  # 0 ** -1
    with pytest.raises(DataError, match=r"'dwell\^0\.5'"):
        rank_score(preds, {"type": "product", "exponents": {"dwell": 0.5}})  # a negative value's square root
    with pytest.raises(DataError, match=r"'1e\+308\*ctr\+1e\+308\*dwell'"):
        rank_score(preds, {"type": "sum", "weights": {"ctr": 1e308, "dwell": 1e308}})  # the sum overflows
    np.testing.assert_allclose(rank_score(preds, "ctr^2"), [0.25, 0.0])


# =========================================================================== Ranker.predict


def test_predict_mixed_type_object_column_is_a_data_error(ranker: Ranker):
    frame = _table(5, 1).to_pandas()
    frame["cat"] = pd.Series(["a", 1, "b", 2.5, None], dtype=object)
    with pytest.raises(DataError, match=r"^input: column 'cat' cannot be converted"):
        ranker.predict(frame)
    frame = _table(5, 1).to_pandas()
    frame["hist"] = pd.Series([[1], "x", [2], [3], [4]], dtype=object)
    with pytest.raises(DataError, match=r"^batch: column 'hist' cannot be converted"):
        ranker.predict(frame, source="batch")


def test_predict_duplicate_feature_columns_are_a_data_error(ranker: Ranker):
    table = _table(5, 1)
    with pytest.raises(DataError, match=r"^input: duplicate column name 'u'$"):
        ranker.predict(with_duplicate(table, "u"))
    with pytest.raises(DataError, match=r"^input: duplicate column name 'u'$"):
        ranker.predict(with_duplicate(table, "u").to_pandas())
    # A repeated column the model does not read is ignored like any extra column.
    extra = with_duplicate(table.append_column("junk", pa.array([0] * 5)), "junk")
    np.testing.assert_array_equal(ranker.predict(extra.to_pandas())["ctr"], ranker.predict(table)["ctr"])


def test_predict_python_ints_beyond_int64_are_a_data_error(ranker: Ranker):
    frame = _table(5, 1).to_pandas()
    frame["u"] = pd.Series([2**63, 1, 2, 3, 4], dtype=object)
    with pytest.raises(DataError, match=r"^input: column 'u' cannot be converted \(.*int64"):
        ranker.predict(frame)
    data = _table(5, 1).to_pydict()
    data["u"] = [2**64 + 5, 1, 2, 3, 4]
    with pytest.raises(DataError, match=r"^input: column 'u' cannot be converted \(.*int64"):
        ranker.predict(data)


def test_predict_a_zero_row_frame_gives_empty_arrays(ranker: Ranker):
    table = _table(5, 1)
    expected = {"ctr": (0,), "cvr": (0,), "dwell": (0,), "genre": (0, 3), "ctcvr": (0,)}
    inputs = {
        "pandas": table.to_pandas().iloc[:0],  # object columns of no rows have no type
        "arrow": table.slice(0, 0),
        "dict": {"u": [], "cat": [], "x": [], "hist": []},
    }
    for name, value in inputs.items():
        got = ranker.predict(value)
        assert {k: v.shape for k, v in got.items()} == expected, name
        assert all(v.dtype == np.float32 for v in got.values()), name
    # Typed columns are still checked, as in a 0-row Parquet file.
    with pytest.raises(DataError, match="'x' has type string"):
        ranker.predict(table.slice(0, 0).set_column(2, "x", pa.array([], pa.string())))


# =========================================================================== hashed vocab_from


def hashed_schema() -> Schema:
    return Schema(
        sparse=(SparseFeature("u", hash_buckets=64),),
        sequence=(SequenceFeature("hist", max_len=3, vocab_from="u"),),
        tasks=(Task("ctr", label="click"),),
    )


def test_hashed_vocab_from_with_another_id_type_is_an_error_at_fit():
    table = pa.table(
        {"u": [1, 2, 3], "hist": pa.array([["1"], ["2", "3"], []], pa.list_(pa.string())), "click": [0, 1, 0]}
    )
    with pytest.raises(DataError, match=r"^train: list column 'hist' holds string but 'u'.*hashed.* holds int64$"):
        Preprocessor.fit(hashed_schema(), table, source="train")
    # The same config without hashing was already an error; the message has the same form.
    plain = Schema(sparse=(SparseFeature("u"),), sequence=hashed_schema().sequence, tasks=hashed_schema().tasks)
    with pytest.raises(DataError, match=r"^train: list column 'hist' holds string but 'u'.* holds int64$"):
        Preprocessor.fit(plain, table, source="train")


def test_hashed_vocab_from_with_another_id_type_is_an_error_at_transform():
    good = pa.table({"u": [1, 2, 3], "hist": pa.array([[1], [2, 3], []], pa.list_(pa.int64())), "click": [0, 1, 0]})
    pre = Preprocessor.fit(hashed_schema(), good, source="train")
    bad = good.set_column(1, "hist", pa.array([["1"], ["2", "3"], []], pa.list_(pa.string())))
    with pytest.raises(DataError, match=r"^score\.parquet: list column 'hist' holds string but 'u'.* holds int64$"):
        pre.transform(bad, source="score.parquet", with_labels=False)
    assert pre.transform(good, with_labels=False).sequences[0].shape == (3, 3)
