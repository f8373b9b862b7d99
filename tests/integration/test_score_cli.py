"""The real `mtrec score` CLI in subprocesses: generate -> train -> score, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mtrec.files import MARKER
from tests.integration.helpers import assert_one_line_error
from tests.integration.helpers import mtrec as cli

SMALL_MODEL = [
    "train.epochs=1",
    "train.batch_size=1024",
    "model.expert_hidden=[64, 32]",
    "model.tower_hidden=[16]",
]
RANK = "ctr^1*cvr^0.5*satisfaction^2"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("score_cli")


@pytest.fixture(scope="module")
def clicks(work: Path) -> Path:
    path = work / "clicks.parquet"
    proc = cli("datasets", "synthetic", "--rows", "20000", "--seed", "3", "--output", str(path))
    assert proc.returncode == 0, proc.stderr
    return path


@pytest.fixture(scope="module")
def model(work: Path, clicks: Path) -> Path:
    out = work / "model"
    sets = [f"--set={s}" for s in [f"data.train={clicks}", *SMALL_MODEL]]
    proc = cli("train", "--config", "configs/synthetic/mmoe.yaml", *sets, "--output", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def folder(work: Path, clicks: Path) -> Path:
    """Two files, one in a sub-folder, with row groups smaller than the scoring slices."""
    table = pq.read_table(clicks)
    root = work / "parts"
    (root / "day=2").mkdir(parents=True)
    pq.write_table(table.slice(0, 12000), root / "part-0.parquet", row_group_size=5000)
    pq.write_table(table.slice(12000), root / "day=2" / "part-1.parquet", row_group_size=3000)
    return root


def expected_predictions(model: Path, data: Path) -> dict[str, np.ndarray]:
    import mtrec

    preds = mtrec.load_model(model).predict(pq.read_table(data))
    return preds


def test_score_a_file_keeps_columns_and_matches_predict_and_evaluate(model: Path, clicks: Path, work: Path):
    import mtrec
    from mtrec.data.batches import TensorColumns
    from mtrec.inference import rank_score
    from mtrec.predict import predict_logits

    out = work / "scores.parquet"
    proc = cli(
        "score", "--model", str(model), "--input", str(clicks), "--output", str(out), "--keep", "user_id,item_id"
    )
    assert proc.returncode == 0, proc.stderr
    assert "scored 20,000 rows" in proc.stdout
    proc = cli(
        "score", "--model", str(model), "--input", str(clicks), "--output", str(out), "--keep", "user_id,item_id",
        "--rank", RANK, "--batch-size", "3000", "--overwrite", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    got = pq.read_table(out)
    assert got.column_names == ["user_id", "item_id", "ctr", "cvr", "satisfaction", "rank_score"]
    source = pq.read_table(clicks)
    for c in ("user_id", "item_id"):
        assert got.schema.field(c).type == source.schema.field(c).type
        assert got.column(c).equals(source.column(c))  # same values, same (input) row order

    preds = expected_predictions(model, clicks)
    loaded = mtrec.load_model_dir(model)
    enc = loaded.preprocessor.transform(source, with_labels=False)
    logits = predict_logits(loaded.model, TensorColumns.from_encoded(enc), ("ctr", "cvr", "satisfaction"))
    for name in ("ctr", "cvr", "satisfaction"):
        scored = got.column(name).to_numpy()
        np.testing.assert_allclose(scored, preds[name], rtol=0, atol=1e-6)
        np.testing.assert_allclose(scored, 1.0 / (1.0 + np.exp(-logits[name].astype(np.float64))), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.column("rank_score").to_numpy(), rank_score(preds, RANK), rtol=1e-5, atol=1e-9)


def test_score_a_folder_into_a_folder_with_the_same_names(model: Path, folder: Path, work: Path):
    out = work / "folder_scores"
    proc = cli(
        "score", "--model", str(model), "--input", str(folder), "--output", str(out), "--keep", "user_id,item_id",
        "--rank", "0.7*ctr+0.3*cvr",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "from 2 file(s)" in proc.stdout
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MARKER)
    assert written == ["day=2/part-1.parquet", "part-0.parquet"]
    for rel in written:
        src, dst = pq.read_table(folder / rel), pq.read_table(out / rel)
        assert dst.num_rows == src.num_rows
        assert dst.column("user_id").equals(src.column("user_id"))
        assert dst.column("item_id").equals(src.column("item_id"))
        preds = expected_predictions(model, folder / rel)
        np.testing.assert_allclose(dst.column("ctr").to_numpy(), preds["ctr"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(
            dst.column("rank_score").to_numpy(), 0.7 * preds["ctr"] + 0.3 * preds["cvr"], rtol=1e-5
        )
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_existing_output_is_not_overwritten(model: Path, clicks: Path, work: Path):
    out = work / "existing.parquet"
    out.write_bytes(b"old")
    proc = cli("score", "--model", str(model), "--input", str(clicks), "--output", str(out))
    assert_one_line_error(proc, str(out), "--overwrite")
    assert out.read_bytes() == b"old"


def test_bad_keep_column_is_one_line_and_writes_nothing(model: Path, clicks: Path, work: Path):
    out = work / "bad_keep.parquet"
    proc = cli("score", "--model", str(model), "--input", str(clicks), "--output", str(out), "--keep", "user_id,nope")
    assert_one_line_error(proc, str(clicks), "'nope'")
    assert not out.exists()


def test_unknown_task_in_rank_is_named(model: Path, clicks: Path, work: Path):
    out = work / "bad_rank.parquet"
    proc = cli("score", "--model", str(model), "--input", str(clicks), "--output", str(out), "--rank", "ctr*likes")
    assert_one_line_error(proc, "unknown task 'likes'")
    proc = cli("score", "--model", str(model), "--input", str(clicks), "--output", str(out), "--rank", "ctr**2")
    assert_one_line_error(proc, "--rank")
    assert not out.exists()


def test_non_parquet_input_is_one_line(model: Path, work: Path):
    bad = work / "notes.parquet"
    bad.write_text("this is not parquet")
    out = work / "from_bad.parquet"
    proc = cli("score", "--model", str(model), "--input", str(bad), "--output", str(out))
    assert_one_line_error(proc, str(bad), "not a readable Parquet file")
    assert not out.exists()


def test_a_bad_second_file_is_caught_before_anything_is_written(model: Path, folder: Path, work: Path):
    mixed = work / "mixed"
    mixed.mkdir()
    (mixed / "a.parquet").write_bytes((folder / "part-0.parquet").read_bytes())
    table = pq.read_table(folder / "day=2" / "part-1.parquet")
    pq.write_table(table.drop_columns(["item_price", "cat_12"]), mixed / "b.parquet")
    out = work / "mixed_scores"
    proc = cli("score", "--model", str(model), "--input", str(mixed), "--output", str(out), "--keep", "user_id")
    assert_one_line_error(proc, str(mixed / "b.parquet"), "'cat_12', 'item_price'")
    assert not out.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".mixed_scores")]

    wrong = work / "wrong_type"
    wrong.mkdir()
    pq.write_table(
        table.set_column(table.schema.get_field_index("user_age"), "user_age", table["category"]), wrong / "c.parquet"
    )
    proc = cli("score", "--model", str(model), "--input", str(wrong), "--output", str(work / "wrong_scores"))
    assert_one_line_error(proc, "'user_age'", "expected a number")
    assert not (work / "wrong_scores").exists()
