"""Unit tests for Parquet reading, data loading and batching (mtrec.data)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtrec.batch import Batch
from mtrec.data import (
    EncodedColumns,
    Preprocessor,
    TensorColumns,
    encode_files,
    iter_row_groups,
    load_training_data,
    read_table,
    resolve_paths,
)
from mtrec.errors import ConfigError, DataError
from mtrec.schema import DenseFeature, Schema, SparseFeature, Task


def write(path: Path, table: pa.Table, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kwargs)
    return path


def small_table(n: int = 4, offset: int = 0) -> pa.Table:
    return pa.table({"u": list(range(offset, offset + n)), "click": [i % 2 for i in range(n)]})


# =========================================================================== resolve_paths


def test_resolve_single_file(tmp_path: Path) -> None:
    f = write(tmp_path / "a.parquet", small_table())
    assert resolve_paths(f) == [f]
    assert resolve_paths(str(f)) == [f]


def test_resolve_folder_is_recursive_and_sorted(tmp_path: Path) -> None:
    files = [
        write(tmp_path / "d" / "b.parquet", small_table()),
        write(tmp_path / "d" / "a.parquet", small_table()),
        write(tmp_path / "d" / "sub" / "deep" / "c.parquet", small_table()),
        write(tmp_path / "d" / "sub" / "0.parquet", small_table()),
    ]
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    (tmp_path / "d" / "sub" / "_SUCCESS").write_text("")
    got = resolve_paths(tmp_path / "d")
    assert got == sorted(files)
    assert got[0].name == "a.parquet"


def test_resolve_glob_is_sorted(tmp_path: Path) -> None:
    write(tmp_path / "part-2.parquet", small_table())
    write(tmp_path / "part-10.parquet", small_table())
    write(tmp_path / "part-1.parquet", small_table())
    write(tmp_path / "other.parquet", small_table())
    got = resolve_paths(str(tmp_path / "part-*.parquet"))
    assert [p.name for p in got] == ["part-1.parquet", "part-10.parquet", "part-2.parquet"]
    deep = write(tmp_path / "x" / "y" / "part-3.parquet", small_table())
    assert deep in resolve_paths(str(tmp_path / "**" / "part-*.parquet"))


def test_resolve_list_of_specs(tmp_path: Path) -> None:
    a = write(tmp_path / "a.parquet", small_table())
    b = write(tmp_path / "dir" / "b.parquet", small_table())
    assert resolve_paths([str(a), tmp_path / "dir"]) == [a, b]


def test_resolve_nothing_matches(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pattern matches no files"):
        resolve_paths(str(tmp_path / "*.parquet"))
    missing = tmp_path / "missing.parquet"
    with pytest.raises(DataError, match=rf"^{re.escape(str(missing))}: no such file or folder"):
        resolve_paths(missing)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.csv").write_text("a\n")
    with pytest.raises(DataError, match="folder contains no"):
        resolve_paths(tmp_path / "empty")


# =========================================================================== reading


def test_non_parquet_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "x.parquet"
    bad.write_text("user_id,click\n1,0\n")
    with pytest.raises(DataError) as info:
        read_table([bad], ["u"])
    msg = str(info.value)
    assert msg.startswith(f"{bad}: not a readable Parquet file")
    assert "\n" not in msg


def test_non_parquet_file_in_a_folder_is_named(tmp_path: Path) -> None:
    write(tmp_path / "a.parquet", small_table())
    bad = tmp_path / "b.parquet"
    bad.write_bytes(b"PAR1" + b"\x00" * 10)
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}: not a readable Parquet file"):
        read_table(resolve_paths(tmp_path), ["u", "click"])


def test_missing_columns_are_all_listed(tmp_path: Path) -> None:
    f = write(tmp_path / "a.parquet", small_table())
    with pytest.raises(DataError) as info:
        read_table([f], ["u", "price", "click", "city"])
    assert str(info.value) == f"{f}: missing column(s) 'price', 'city'"


def test_read_table_reads_only_requested_columns_of_all_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a.parquet", small_table(3).append_column("extra", pa.array([1.0, 2.0, 3.0])))
    b = write(tmp_path / "b.parquet", small_table(2, offset=10).append_column("extra", pa.array([4.0, 5.0])))
    t = read_table([a, b], ["click", "u"])
    assert t.column_names == ["click", "u"]
    assert t.column("u").to_pylist() == [0, 1, 2, 10, 11]


def test_iter_row_groups_yields_every_row_group(tmp_path: Path) -> None:
    f = write(tmp_path / "a.parquet", small_table(10), row_group_size=3)
    parts = list(iter_row_groups([f], ["u"]))
    assert [p for p, _ in parts] == [f] * 4
    assert [t.num_rows for _, t in parts] == [3, 3, 3, 1]
    assert sum((t.column("u").to_pylist() for _, t in parts), []) == list(range(10))


def test_empty_file_has_no_rows(tmp_path: Path) -> None:
    f = write(tmp_path / "a.parquet", small_table(0))
    with pytest.raises(DataError, match="no rows"):
        read_table([f], ["u"])


def test_files_with_conflicting_types_are_a_data_error(tmp_path: Path) -> None:
    a = write(tmp_path / "a.parquet", pa.table({"u": [1, 2]}))
    b = write(tmp_path / "b.parquet", pa.table({"u": [[1], [2]]}))
    with pytest.raises(DataError, match="files disagree on column types"):
        read_table([a, b], ["u"])


# =========================================================================== load_training_data


SCHEMA = Schema(
    sparse=(SparseFeature("u"),),
    dense=(DenseFeature("row", transform="none"),),
    tasks=(Task("ctr", label="click"),),
)


def unique_id_table(n: int, offset: int = 0) -> pa.Table:
    """Each row has its own user id; ``row`` (a dense feature passed through) identifies it."""
    rows = np.arange(offset, offset + n)
    return pa.table(
        {
            "u": pa.array(rows + 2**40, pa.int64()),
            "row": pa.array(rows.astype(np.float64)),
            "click": pa.array(rows % 2),
        }
    )


def rows_of(enc: EncodedColumns) -> list[int]:
    return enc.dense[:, 0].astype(np.int64).tolist()


def test_holdout_split_size_and_disjointness(tmp_path: Path) -> None:
    n = 2000
    f = write(tmp_path / "train.parquet", unique_id_table(n), row_group_size=300)
    data = load_training_data(SCHEMA, str(f), None, valid_fraction=0.2, seed=0)
    train, valid = rows_of(data.train), rows_of(data.valid)
    assert data.train.num_rows + data.valid.num_rows == n
    assert sorted(train + valid) == list(range(n))
    assert 300 < len(valid) < 500  # 400 expected, sd ~18
    assert data.train_files == [f]
    assert data.valid_files == [f]


def test_holdout_split_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    f = write(tmp_path / "train.parquet", unique_id_table(500))
    a = load_training_data(SCHEMA, str(f), None, valid_fraction=0.3, seed=7)
    b = load_training_data(SCHEMA, str(f), None, valid_fraction=0.3, seed=7)
    c = load_training_data(SCHEMA, str(f), None, valid_fraction=0.3, seed=8)
    assert rows_of(a.valid) == rows_of(b.valid)
    assert rows_of(a.train) == rows_of(b.train)
    assert rows_of(c.valid) != rows_of(a.valid)


def test_vocabulary_is_fitted_on_training_rows_only(tmp_path: Path) -> None:
    f = write(tmp_path / "train.parquet", unique_id_table(400))
    data = load_training_data(SCHEMA, str(f), None, valid_fraction=0.25, seed=1)
    # every user id is unique, so ids of held-out rows were never seen in training
    assert (data.valid.sparse[:, 0] == 0).all()
    assert (data.train.sparse[:, 0] > 0).all()
    assert len(set(data.train.sparse[:, 0].tolist())) == data.train.num_rows
    assert len(data.preprocessor.vocabs["u"]) == data.train.num_rows


def test_dense_statistics_are_fitted_on_training_rows_only(tmp_path: Path) -> None:
    schema = Schema(sparse=(SparseFeature("u"),), dense=(DenseFeature("row"),), tasks=(Task("ctr", label="click"),))
    f = write(tmp_path / "train.parquet", unique_id_table(300))
    data = load_training_data(schema, str(f), None, valid_fraction=0.3, seed=2)
    train_rows = np.array(rows_of(load_training_data(SCHEMA, str(f), None, valid_fraction=0.3, seed=2).train))
    assert data.preprocessor.dense_stats["row"]["mean"] == pytest.approx(train_rows.mean())
    assert data.preprocessor.dense_stats["row"]["std"] == pytest.approx(train_rows.std())


def test_separate_valid_file(tmp_path: Path) -> None:
    train = write(tmp_path / "train.parquet", unique_id_table(100))
    shared = unique_id_table(5)  # ids seen in training
    fresh = unique_id_table(3, offset=1000)  # ids never seen
    valid = write(tmp_path / "valid" / "v.parquet", pa.concat_tables([shared, fresh]))
    data = load_training_data(SCHEMA, str(train), str(tmp_path / "valid"), valid_fraction=0.5, seed=0)
    assert data.train.num_rows == 100  # nothing held out
    assert rows_of(data.train) == list(range(100))
    assert rows_of(data.valid) == [0, 1, 2, 3, 4, 1000, 1001, 1002]
    np.testing.assert_array_equal(data.valid.sparse[:5, 0], data.train.sparse[:5, 0])
    assert data.valid.sparse[5:, 0].tolist() == [0, 0, 0]
    assert data.valid_files == [valid]
    assert data.train_files == [train]


def test_valid_file_is_checked_like_train(tmp_path: Path) -> None:
    train = write(tmp_path / "train.parquet", unique_id_table(10))
    valid = write(tmp_path / "valid.parquet", unique_id_table(10).drop_columns(["row", "click"]))
    with pytest.raises(DataError, match=rf"^{re.escape(str(valid))}: missing column\(s\) 'row', 'click'"):
        load_training_data(SCHEMA, str(train), str(valid), valid_fraction=0.1, seed=0)


def test_training_from_a_folder_of_files(tmp_path: Path) -> None:
    write(tmp_path / "d" / "p0.parquet", unique_id_table(50))
    write(tmp_path / "d" / "p1.parquet", unique_id_table(50, offset=50))
    data = load_training_data(SCHEMA, str(tmp_path / "d"), None, valid_fraction=0.2, seed=0)
    assert sorted(rows_of(data.train) + rows_of(data.valid)) == list(range(100))
    assert len(data.train_files) == 2


def test_missing_train_and_too_few_rows(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.train"):
        load_training_data(SCHEMA, None, None, valid_fraction=0.1, seed=0)
    f = write(tmp_path / "one.parquet", unique_id_table(1))
    with pytest.raises(DataError, match="too few rows"):
        load_training_data(SCHEMA, str(f), None, valid_fraction=0.1, seed=0)


def test_encode_files_matches_transform_of_whole_table(tmp_path: Path) -> None:
    write(tmp_path / "d" / "a.parquet", unique_id_table(40), row_group_size=7)
    write(tmp_path / "d" / "b.parquet", unique_id_table(25, offset=40), row_group_size=10)
    whole = pa.concat_tables([unique_id_table(40), unique_id_table(25, offset=40)])
    pre = Preprocessor.fit(SCHEMA, whole.slice(0, 50))
    enc = encode_files(pre, str(tmp_path / "d"))
    ref = pre.transform(whole)
    np.testing.assert_array_equal(enc.sparse, ref.sparse)
    np.testing.assert_array_equal(enc.dense, ref.dense)
    np.testing.assert_array_equal(enc.labels, ref.labels)
    np.testing.assert_array_equal(enc.label_mask, ref.label_mask)
    unlabeled = encode_files(pre, str(tmp_path / "d" / "a.parquet"), with_labels=False)
    assert unlabeled.num_rows == 40 and not unlabeled.label_mask.any()


# =========================================================================== TensorColumns


def columns(n: int) -> TensorColumns:
    """Rows whose every column encodes the row number, to check gathers stay aligned."""
    r = np.arange(n, dtype=np.int64)
    enc = EncodedColumns(
        sparse=np.stack([r, r * 2], axis=1),
        dense=r[:, None].astype(np.float32),
        sequences=[np.stack([r, r + 1, r + 2], axis=1)],
        seq_lengths=(r % 4)[:, None],
        labels=(r % 2)[:, None].astype(np.float32),
        label_mask=(r % 3 == 0)[:, None],
    )
    return TensorColumns.from_encoded(enc)


def check_aligned(batch: Batch) -> list[int]:
    rows = batch.sparse[:, 0]
    assert torch.equal(batch.sparse[:, 1], rows * 2)
    assert torch.equal(batch.dense[:, 0], rows.float())
    assert torch.equal(batch.sequences[0][:, 2], rows + 2)
    assert torch.equal(batch.seq_lengths[:, 0], rows % 4)
    assert torch.equal(batch.labels[:, 0], (rows % 2).float())
    assert torch.equal(batch.label_mask[:, 0], rows % 3 == 0)
    return rows.tolist()


def test_from_encoded_shares_memory_and_counts_rows() -> None:
    r = np.arange(5, dtype=np.int64)
    enc = EncodedColumns(
        r[:, None].copy(), np.zeros((5, 1), np.float32), [], np.zeros((5, 0), np.int64),
        np.zeros((5, 1), np.float32), np.ones((5, 1), bool),
    )  # fmt: skip
    cols = TensorColumns.from_encoded(enc)
    assert cols.num_rows == 5
    enc.sparse[0, 0] = 42
    assert cols.all.sparse[0, 0].item() == 42


@pytest.mark.parametrize(("n", "bs", "drop_last", "sizes"), [
    (10, 4, False, [4, 4, 2]),
    (10, 4, True, [4, 4]),
    (8, 4, True, [4, 4]),
    (8, 4, False, [4, 4]),
    (3, 5, False, [3]),
    (3, 5, True, []),
])  # fmt: skip
@pytest.mark.parametrize("shuffle", [False, True])
def test_batch_sizes_and_drop_last(n: int, bs: int, drop_last: bool, sizes: list[int], shuffle: bool) -> None:
    cols = columns(n)
    g = torch.Generator().manual_seed(0)
    batches = list(cols.iter_batches(bs, shuffle=shuffle, generator=g, drop_last=drop_last))
    assert [len(b) for b in batches] == sizes
    assert cols.num_batches(bs, drop_last=drop_last) == len(sizes)


def test_unshuffled_batches_are_in_order() -> None:
    cols = columns(10)
    rows = [check_aligned(b) for b in cols.iter_batches(3)]
    assert rows == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_shuffled_epoch_covers_every_row_once() -> None:
    n = 1000
    cols = columns(n)
    g = torch.Generator().manual_seed(123)
    seen = [r for b in cols.iter_batches(64, shuffle=True, generator=g) for r in check_aligned(b)]
    assert sorted(seen) == list(range(n))
    assert seen != list(range(n))


def test_shuffled_drop_last_drops_fewer_than_a_batch_and_never_repeats() -> None:
    n = 103
    cols = columns(n)
    g = torch.Generator().manual_seed(5)
    seen = [r for b in cols.iter_batches(10, shuffle=True, generator=g, drop_last=True) for r in check_aligned(b)]
    assert len(seen) == 100
    assert len(set(seen)) == 100


def test_epochs_differ_with_one_generator_and_repeat_with_the_same_seed() -> None:
    cols = columns(200)

    def epoch(g: torch.Generator) -> list[int]:
        return [r for b in cols.iter_batches(32, shuffle=True, generator=g) for r in check_aligned(b)]

    g = torch.Generator().manual_seed(9)
    first, second = epoch(g), epoch(g)
    assert sorted(first) == sorted(second) == list(range(200))
    assert first != second
    g2 = torch.Generator().manual_seed(9)
    assert epoch(g2) == first
    assert epoch(g2) == second


def test_gather_and_slice() -> None:
    cols = columns(20)
    assert check_aligned(cols.gather(torch.tensor([19, 0, 7]))) == [19, 0, 7]
    assert check_aligned(cols.slice(5, 9)) == [5, 6, 7, 8]
    view = cols.slice(0, 2)
    assert view.sparse.data_ptr() == cols.all.sparse.data_ptr()  # a view, not a copy
