"""Unit tests for fitted preprocessing (mtrec.data.preprocess)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtrec.data.preprocess import EncodedColumns, Preprocessor
from mtrec.errors import DataError, ModelError
from mtrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, Task

CTR = (Task("ctr", label="click"),)


def make_schema(
    *,
    sparse: tuple[SparseFeature, ...] = (),
    dense: tuple[DenseFeature, ...] = (),
    sequence: tuple[SequenceFeature, ...] = (),
    tasks: tuple[Task, ...] = CTR,
) -> Schema:
    return Schema(sparse=sparse, dense=dense, sequence=sequence, tasks=tasks)


def make_table(**cols: Any) -> pa.Table:
    """A table of ``cols`` plus an all-zero ``click`` label unless one is given."""
    arrays = {k: v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v) for k, v in cols.items()}
    n = len(next(iter(arrays.values())))
    arrays.setdefault("click", pa.array([0] * n))
    return pa.table(arrays)


def sparse_codes(schema: Schema, fit_table: pa.Table, table: pa.Table | None = None, col: int = 0) -> list[int]:
    pre = Preprocessor.fit(schema, fit_table)
    return pre.transform(fit_table if table is None else table).sparse[:, col].tolist()


def assert_encoded_equal(a: EncodedColumns, b: EncodedColumns) -> None:
    np.testing.assert_array_equal(a.sparse, b.sparse)
    np.testing.assert_array_equal(a.dense, b.dense)
    assert len(a.sequences) == len(b.sequences)
    for x, y in zip(a.sequences, b.sequences, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.seq_lengths, b.seq_lengths)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.label_mask, b.label_mask)


# =========================================================================== sparse vocabularies


def test_vocabulary_is_ordered_by_frequency_then_value() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),))
    t = make_table(u=[5, 3, 3, 9, 9, 1, 7, 7, 7])
    pre = Preprocessor.fit(schema, t)
    # 7 x3; 3 and 9 x2 (3 < 9); 1 and 5 x1 (1 < 5)
    assert pre.vocabs["u"].to_pylist() == [7, 3, 9, 1, 5]
    assert pre.transform(t).sparse[:, 0].tolist() == [5, 2, 2, 3, 3, 4, 1, 1, 1]
    assert pre.cardinality(schema.sparse[0]) == 6


def test_vocabulary_does_not_depend_on_row_order() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),))
    values = [4, 8, 8, 2, 2, 6, 6, 6, 1, 9]
    a = Preprocessor.fit(schema, make_table(u=values)).vocabs["u"].to_pylist()
    b = Preprocessor.fit(schema, make_table(u=values[::-1])).vocabs["u"].to_pylist()
    assert a == b == [6, 2, 8, 1, 4, 9]


def test_string_vocabulary_ties_broken_by_value() -> None:
    schema = make_schema(sparse=(SparseFeature("s"),))
    t = make_table(s=["z", "b", "a", "b", "a", "c"])
    pre = Preprocessor.fit(schema, t)
    assert pre.vocabs["s"].to_pylist() == ["a", "b", "c", "z"]
    assert pre.transform(t).sparse[:, 0].tolist() == [4, 2, 1, 2, 1, 3]


def test_min_freq_maps_rare_values_to_zero() -> None:
    schema = make_schema(sparse=(SparseFeature("u", min_freq=2),))
    t = make_table(u=[1, 1, 2, 3, 3, 3, 4])
    pre = Preprocessor.fit(schema, t)
    assert pre.vocabs["u"].to_pylist() == [3, 1]
    assert pre.transform(t).sparse[:, 0].tolist() == [2, 2, 0, 1, 1, 1, 0]
    assert pre.cardinality(schema.sparse[0]) == 3


def test_max_vocab_keeps_most_frequent() -> None:
    schema = make_schema(sparse=(SparseFeature("u", max_vocab=2),))
    t = make_table(u=[1, 2, 2, 3, 3, 3])
    pre = Preprocessor.fit(schema, t)
    assert pre.vocabs["u"].to_pylist() == [3, 2]
    assert pre.transform(t).sparse[:, 0].tolist() == [0, 2, 2, 1, 1, 1]


def test_nulls_map_to_zero_and_are_not_in_the_vocabulary() -> None:
    schema = make_schema(sparse=(SparseFeature("u"), SparseFeature("s")))
    t = make_table(u=[None, None, None, 7], s=[None, "x", None, None])
    pre = Preprocessor.fit(schema, t)
    assert pre.vocabs["u"].to_pylist() == [7]
    assert pre.vocabs["s"].to_pylist() == ["x"]
    enc = pre.transform(t)
    assert enc.sparse.tolist() == [[0, 0], [0, 1], [0, 0], [1, 0]]


def test_unseen_values_at_transform_map_to_zero() -> None:
    schema = make_schema(sparse=(SparseFeature("u"), SparseFeature("s")))
    pre = Preprocessor.fit(schema, make_table(u=[10, 20, 20], s=["a", "b", "b"]))
    enc = pre.transform(make_table(u=[20, 30, 10, None], s=["c", "b", None, "a"]))
    assert enc.sparse.tolist() == [[1, 0], [0, 1], [2, 0], [0, 2]]
    assert enc.sparse.dtype == np.int64


def test_large_int64_ids_stay_distinct() -> None:
    ids = [2**53 + 1, 2**53 + 2, 2**53 + 3, 2**31 + 1, 2**31 + 2, 2**63 - 1, 2**63 - 2, -(2**63), 0]
    schema = make_schema(sparse=(SparseFeature("u"),))
    t = make_table(u=pa.array(ids, pa.int64()))
    pre = Preprocessor.fit(schema, t)
    vocab = pre.vocabs["u"]
    assert vocab.type == pa.int64()
    assert sorted(vocab.to_pylist()) == sorted(ids)  # exact values, nothing rounded
    codes = pre.transform(t).sparse[:, 0]
    assert len(set(codes.tolist())) == len(ids)
    assert 0 not in codes
    # 2**53+1 and 2**53+2 collapse to the same float64, 2**31+1 and +2 to the same float32
    single = pre.transform(make_table(u=pa.array([2**53 + 2, 2**53 + 1, 2**31 + 2, 2**31 + 1], pa.int64())))
    expected = [codes[ids.index(v)] for v in (2**53 + 2, 2**53 + 1, 2**31 + 2, 2**31 + 1)]
    assert single.sparse[:, 0].tolist() == expected
    # an id never seen that would collide under a float cast
    assert pre.transform(make_table(u=pa.array([2**53 + 4], pa.int64()))).sparse[0, 0] == 0


def test_narrow_int_types_encode_like_int64() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),))
    pre = Preprocessor.fit(schema, make_table(u=pa.array([3, 1, 1, 2], pa.int64())))
    for tp in (pa.int8(), pa.int16(), pa.int32(), pa.uint32()):
        enc = pre.transform(make_table(u=pa.array([1, 2, 3, 4], tp)))
        assert enc.sparse[:, 0].tolist() == [1, 2, 3, 0], tp


def test_uint64_ids_above_int64_range() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),))
    t = make_table(u=pa.array([2**63 + 5, 2**63 + 6, 1], pa.uint64()))
    codes = Preprocessor.fit(schema, t).transform(t).sparse[:, 0].tolist()
    assert len(set(codes)) == 3 and 0 not in codes


def test_dictionary_and_large_string_columns_encode_like_plain_strings() -> None:
    values = ["b", "a", None, "b", "c", "a", "b"]
    schema = make_schema(sparse=(SparseFeature("s"),))
    plain = make_table(s=pa.array(values, pa.string()))
    pre = Preprocessor.fit(schema, plain)
    expected = pre.transform(plain).sparse[:, 0].tolist()
    assert expected == [1, 2, 0, 1, 3, 2, 1]
    for arr in (pa.array(values).dictionary_encode(), pa.array(values, pa.large_string())):
        t = make_table(s=arr)
        assert pre.transform(t).sparse[:, 0].tolist() == expected
        assert Preprocessor.fit(schema, t).vocabs["s"].to_pylist() == ["b", "a", "c"]


def test_chunked_column_encodes_like_contiguous() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),))
    chunked = pa.chunked_array([[5, 6], [6, None, 7]])
    t = make_table(u=chunked)
    pre = Preprocessor.fit(schema, t)
    assert pre.transform(t).sparse[:, 0].tolist() == [2, 1, 1, 0, 3]


def test_float_column_as_sparse_is_a_data_error() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),))
    with pytest.raises(DataError, match=r"^train\.parquet: column 'u' has type double"):
        Preprocessor.fit(schema, make_table(u=[1.5, 2.5]), source="train.parquet")


def test_missing_columns_at_transform_are_listed() -> None:
    schema = make_schema(sparse=(SparseFeature("u"), SparseFeature("v")), dense=(DenseFeature("d"),))
    pre = Preprocessor.fit(schema, make_table(u=[1], v=[2], d=[1.0]))
    with pytest.raises(DataError) as info:
        pre.transform(pa.table({"u": [1]}), source="x.parquet")
    msg = str(info.value)
    assert msg.startswith("x.parquet: missing column(s)")
    for col in ("'v'", "'d'", "'click'"):
        assert col in msg


# =========================================================================== hashing

MASK64 = (1 << 64) - 1


def ref_splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def ref_int_bucket(value: int, buckets: int) -> int:
    return ref_splitmix64(value & MASK64) % buckets + 1


def ref_str_bucket(value: str, buckets: int) -> int:
    digest = hashlib.blake2b(value.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets + 1


def test_hashed_int_ids_match_a_reference_and_are_in_range() -> None:
    buckets = 97
    ids = [0, 1, 12345, 2**53 + 1, 2**53 + 2, -7, 2**63 - 1]
    schema = make_schema(sparse=(SparseFeature("u", hash_buckets=buckets),))
    t = make_table(u=pa.array([*ids, None], pa.int64()))
    pre = Preprocessor.fit(schema, t)
    assert "u" not in pre.vocabs
    assert pre.cardinality(schema.sparse[0]) == buckets + 1
    codes = pre.transform(t).sparse[:, 0].tolist()
    assert codes == [ref_int_bucket(v, buckets) for v in ids] + [0]
    assert all(1 <= c <= buckets for c in codes[:-1])


def test_hashed_string_ids_match_a_reference() -> None:
    buckets = 50
    values = ["alice", "bob", "", "ünïcode", "bob"]
    schema = make_schema(sparse=(SparseFeature("s", hash_buckets=buckets),))
    t = make_table(s=[*values, None])
    codes = Preprocessor.fit(schema, t).transform(t).sparse[:, 0].tolist()
    assert codes == [ref_str_bucket(v, buckets) for v in values] + [0]


def test_hashing_is_deterministic_across_instances_and_batches() -> None:
    buckets = 16
    schema = make_schema(sparse=(SparseFeature("u", hash_buckets=buckets), SparseFeature("s", hash_buckets=buckets)))
    ints = list(range(1000, 1200))
    strs = [f"id{i}" for i in ints]
    a = Preprocessor.fit(schema, make_table(u=ints, s=strs))
    b = Preprocessor.fit(schema, make_table(u=[1], s=["other"]))  # fitted on different data
    t = make_table(u=ints, s=strs)
    full_a, full_b = a.transform(t).sparse, b.transform(t).sparse
    np.testing.assert_array_equal(full_a, full_b)
    # a value's bucket does not depend on the other rows of the batch
    part = b.transform(make_table(u=ints[::-7], s=strs[::-7])).sparse
    np.testing.assert_array_equal(part, full_a[::-7])
    # all buckets in use, none outside 1..buckets
    for j in range(2):
        assert set(full_a[:, j].tolist()) == set(range(1, buckets + 1))


def test_hashing_ignores_int_width_and_dictionary_encoding() -> None:
    schema = make_schema(sparse=(SparseFeature("u", hash_buckets=1000), SparseFeature("s", hash_buckets=1000)))
    pre = Preprocessor.fit(schema, make_table(u=[1], s=["a"]))
    wide = pre.transform(make_table(u=pa.array([5, 6, None], pa.int64()), s=pa.array(["x", None, "y"])))
    narrow = pre.transform(
        make_table(u=pa.array([5, 6, None], pa.int32()), s=pa.array(["x", None, "y"]).dictionary_encode())
    )
    np.testing.assert_array_equal(wide.sparse, narrow.sparse)
    assert wide.sparse[2, 0] == 0 and wide.sparse[1, 1] == 0


# =========================================================================== dense


def test_dense_nulls_nan_inf_filled_with_training_mean() -> None:
    schema = make_schema(dense=(DenseFeature("x", transform="none"),))
    t = make_table(x=[1.0, 3.0, None, math.nan, math.inf, -math.inf])
    pre = Preprocessor.fit(schema, t)
    assert pre.dense_stats["x"]["fill"] == pytest.approx(2.0)
    enc = pre.transform(t)
    assert enc.dense.dtype == np.float32
    assert enc.dense[:, 0].tolist() == [1.0, 3.0, 2.0, 2.0, 2.0, 2.0]


def test_dense_explicit_fill() -> None:
    schema = make_schema(dense=(DenseFeature("x", transform="none", fill=-1.0),))
    t = make_table(x=[5.0, None, math.nan])
    assert Preprocessor.fit(schema, t).transform(t).dense[:, 0].tolist() == [5.0, -1.0, -1.0]


def test_dense_log1p_clips_negatives() -> None:
    schema = make_schema(dense=(DenseFeature("x", transform="log1p"),))
    t = make_table(x=[0.0, math.e - 1, -5.0, 99.0, None])
    pre = Preprocessor.fit(schema, t)
    fill = (0.0 + (math.e - 1) - 5.0 + 99.0) / 4  # mean of the raw finite training values
    expected = [0.0, 1.0, 0.0, math.log(100.0), math.log1p(fill)]
    np.testing.assert_allclose(pre.transform(t).dense[:, 0], expected, rtol=1e-6)


def test_standardize_uses_training_statistics() -> None:
    schema = make_schema(dense=(DenseFeature("x"),))
    train = make_table(x=[1.0, 2.0, 3.0, 4.0])
    pre = Preprocessor.fit(schema, train)
    mean, std = 2.5, math.sqrt(1.25)
    assert pre.dense_stats["x"]["mean"] == pytest.approx(mean)
    assert pre.dense_stats["x"]["std"] == pytest.approx(std)
    np.testing.assert_allclose(pre.transform(train).dense[:, 0], [(v - mean) / std for v in (1, 2, 3, 4)], rtol=1e-6)
    # other data is scaled with the training statistics, not its own
    other = pre.transform(make_table(x=[2.5, 100.0, None])).dense[:, 0]
    np.testing.assert_allclose(other, [0.0, (100.0 - mean) / std, 0.0], atol=1e-6)


def test_log1p_standardize_stats_after_log_and_fill() -> None:
    schema = make_schema(dense=(DenseFeature("x", transform="log1p_standardize"),))
    raw = [0.0, 9.0, 99.0, None]
    pre = Preprocessor.fit(schema, make_table(x=raw))
    fill = 36.0
    logged = np.log1p([0.0, 9.0, 99.0, fill])
    st = pre.dense_stats["x"]
    assert st["fill"] == pytest.approx(fill)
    assert st["mean"] == pytest.approx(logged.mean())
    assert st["std"] == pytest.approx(logged.std())
    out = pre.transform(make_table(x=raw)).dense[:, 0]
    np.testing.assert_allclose(out, (logged - logged.mean()) / logged.std(), rtol=1e-5)


def test_constant_column_does_not_divide_by_zero() -> None:
    schema = make_schema(dense=(DenseFeature("x"),))
    pre = Preprocessor.fit(schema, make_table(x=[3.0, 3.0, 3.0]))
    assert pre.dense_stats["x"]["std"] == 1.0
    out = pre.transform(make_table(x=[3.0, 4.0])).dense[:, 0]
    assert out.tolist() == [0.0, 1.0]


def test_int_and_bool_columns_are_dense_numbers() -> None:
    schema = make_schema(dense=(DenseFeature("i", transform="none"), DenseFeature("b", transform="none")))
    t = make_table(i=pa.array([1, None, 5], pa.int32()), b=[True, False, None])
    enc = Preprocessor.fit(schema, t).transform(t)
    assert enc.dense.tolist() == [[1.0, 1.0], [3.0, 0.0], [5.0, 0.5]]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
def test_clean_column_with_bad_values_fails_at_fit(bad: float | None) -> None:
    schema = make_schema(dense=(DenseFeature("price", clean=True),))
    with pytest.raises(DataError) as info:
        Preprocessor.fit(schema, make_table(price=[1.0, bad, 2.0]), source="data/train.parquet")
    msg = str(info.value)
    assert msg.startswith("data/train.parquet: column 'price' has 1 null/NaN/inf")
    assert "declared clean" in msg


def test_clean_column_with_bad_values_fails_at_transform() -> None:
    schema = make_schema(dense=(DenseFeature("price", clean=True),))
    pre = Preprocessor.fit(schema, make_table(price=[1.0, 2.0]))
    assert pre.transform(make_table(price=[3.0])).dense.shape == (1, 1)
    with pytest.raises(DataError, match=r"^valid\.parquet: column 'price' has 2 null/NaN/inf"):
        pre.transform(make_table(price=[math.inf, 1.0, math.nan]), source="valid.parquet")


def test_string_column_as_dense_is_a_data_error() -> None:
    schema = make_schema(dense=(DenseFeature("age"),))
    with pytest.raises(DataError, match=r"^t\.parquet: column 'age' has type string, expected a number"):
        Preprocessor.fit(schema, make_table(age=["12", "13"]), source="t.parquet")
    pre = Preprocessor.fit(schema, make_table(age=[12.0, 13.0]))
    with pytest.raises(DataError, match=r"^v\.parquet: column 'age' has type string"):
        pre.transform(make_table(age=["12"]), source="v.parquet")


# =========================================================================== list features


def test_list_feature_keeps_last_items_with_lengths_and_padding() -> None:
    schema = make_schema(sequence=(SequenceFeature("h", max_len=3),))
    t = make_table(h=[[1, 2, 3, 4, 5], [6], None, [], [2, 3]])
    pre = Preprocessor.fit(schema, t)
    vocab = pre.vocabs["h"].to_pylist()
    assert vocab == [2, 3, 1, 4, 5, 6]
    code = {v: i + 1 for i, v in enumerate(vocab)}
    enc = pre.transform(t)
    assert len(enc.sequences) == 1
    seq = enc.sequences[0]
    assert seq.dtype == np.int64 and seq.shape == (5, 3)
    assert seq.tolist() == [
        [code[3], code[4], code[5]],
        [code[6], 0, 0],
        [0, 0, 0],
        [0, 0, 0],
        [code[2], code[3], 0],
    ]
    assert enc.seq_lengths[:, 0].tolist() == [3, 1, 0, 0, 2]


def test_list_feature_unseen_and_null_items() -> None:
    schema = make_schema(sequence=(SequenceFeature("h", max_len=4, min_freq=2),))
    pre = Preprocessor.fit(schema, make_table(h=[[1, 1, 2], [3, 3, 3]]))
    assert pre.vocabs["h"].to_pylist() == [3, 1]
    enc = pre.transform(make_table(h=[[1, 99, 3], [2, None]]))
    assert enc.sequences[0].tolist() == [[2, 0, 1, 0], [0, 0, 0, 0]]
    assert enc.seq_lengths[:, 0].tolist() == [3, 2]


def test_list_feature_of_a_sliced_table_matches_full_transform() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),), sequence=(SequenceFeature("h", max_len=2),))
    t = make_table(u=[1, 2, 3, 4, 5, 6], h=[[1, 2, 3], [4], None, [5, 6, 7], [], [8, 9]])
    pre = Preprocessor.fit(schema, t)
    full = pre.transform(t)
    for start, length in [(1, 3), (2, 4), (5, 1), (3, 3)]:
        part = pre.transform(t.slice(start, length))
        assert_encoded_equal(part, full.take(np.arange(start, start + length)))


def test_list_of_strings_and_large_list() -> None:
    schema = make_schema(sequence=(SequenceFeature("h", max_len=2),))
    data = [["a", "b", "c"], ["b"], None]
    pre = Preprocessor.fit(schema, make_table(h=data))
    expected = pre.transform(make_table(h=data))
    assert pre.vocabs["h"].to_pylist() == ["b", "a", "c"]
    assert expected.sequences[0].tolist() == [[1, 3], [1, 0], [0, 0]]
    large = pa.array(data, pa.large_list(pa.large_string()))
    assert_encoded_equal(pre.transform(make_table(h=large)), expected)


def test_non_list_column_as_sequence_is_a_data_error() -> None:
    schema = make_schema(sequence=(SequenceFeature("h"),))
    with pytest.raises(DataError, match=r"^f\.parquet: column 'h' has type int64, expected a list"):
        Preprocessor.fit(schema, make_table(h=[1, 2]), source="f.parquet")


def test_vocab_from_shares_the_sparse_vocabulary() -> None:
    schema = make_schema(
        sparse=(SparseFeature("user"), SparseFeature("item")),
        sequence=(SequenceFeature("hist", max_len=3, vocab_from="item"),),
    )
    t = make_table(user=[1, 2, 3], item=[10, 20, 10], hist=[[30, 30, 20], [40], None])
    pre = Preprocessor.fit(schema, t)
    # fitted on the union of item and hist: 10 x2, 20 x2, 30 x2, 40 x1
    assert pre.vocabs["item"].to_pylist() == [10, 20, 30, 40]
    assert "hist" not in pre.vocabs
    enc = pre.transform(t)
    assert enc.sparse[:, 1].tolist() == [1, 2, 1]
    assert enc.sequences[0].tolist() == [[3, 3, 2], [4, 0, 0], [0, 0, 0]]
    # same id -> same index in the sparse column and in the list
    probe = pre.transform(make_table(user=[1], item=[30], hist=[[30]]))
    assert probe.sparse[0, 1] == probe.sequences[0][0, 0] == 3
    layout = pre.layout()
    assert layout.table_sizes == (4, 5)
    assert layout.sparse_tables == (0, 1)
    assert layout.sequence_tables == (1,)
    assert layout.sequence_max_len == (3,)
    assert layout.num_dense == 0


def test_vocab_from_min_freq_counts_the_union() -> None:
    schema = make_schema(
        sparse=(SparseFeature("item", min_freq=2),), sequence=(SequenceFeature("hist", vocab_from="item"),)
    )
    # 5 appears once in item and once in hist -> kept; 6 only once in total -> dropped
    t = make_table(item=[5, 6], hist=[[5], []])
    pre = Preprocessor.fit(schema, t)
    assert pre.vocabs["item"].to_pylist() == [5]
    assert pre.transform(t).sparse[:, 0].tolist() == [1, 0]


def test_vocab_from_a_hashed_feature_hashes_the_list() -> None:
    schema = make_schema(
        sparse=(SparseFeature("item", hash_buckets=64),), sequence=(SequenceFeature("hist", vocab_from="item"),)
    )
    t = make_table(item=[7, 8], hist=[[8, 7], None])
    pre = Preprocessor.fit(schema, t)
    enc = pre.transform(t)
    assert enc.sequences[0][0, :2].tolist() == [enc.sparse[1, 0], enc.sparse[0, 0]]
    assert pre.layout().table_sizes == (65,)


def test_vocab_from_type_mismatch_is_a_data_error() -> None:
    schema = make_schema(sparse=(SparseFeature("item"),), sequence=(SequenceFeature("hist", vocab_from="item"),))
    with pytest.raises(DataError, match=r"list column 'hist' holds string but 'item'"):
        Preprocessor.fit(schema, make_table(item=[1, 2], hist=[["1"], ["2"]]))


def test_list_feature_with_its_own_vocabulary_gets_its_own_table() -> None:
    schema = make_schema(sparse=(SparseFeature("item"),), sequence=(SequenceFeature("tags", pooling="sum"),))
    pre = Preprocessor.fit(schema, make_table(item=[1, 2], tags=[["a"], ["b", "c"]]))
    layout = pre.layout()
    assert layout.table_sizes == (3, 4)
    assert layout.sequence_tables == (1,)
    assert layout.sequence_pooling == ("sum",)


def test_two_lists_sharing_a_vocabulary_are_both_fitted() -> None:
    schema = make_schema(
        sparse=(SparseFeature("item"),),
        sequence=(SequenceFeature("clicked", vocab_from="item"), SequenceFeature("bought", vocab_from="item")),
    )
    t = make_table(item=[1, 2], clicked=[[10, 11], [10]], bought=[[20], [21]])
    pre = Preprocessor.fit(schema, t)
    assert set(pre.vocabs["item"].to_pylist()) == {1, 2, 10, 11, 20, 21}
    assert (pre.transform(t).sequences[0][:, 0] != 0).all()


def test_null_list_slot_backed_by_values() -> None:
    arr = pa.ListArray.from_arrays(
        pa.array([0, 1, 3, 4, 6], pa.int32()),
        pa.array([1, 2, 3, 4, 5, 6]),
        mask=pa.array([False, True, False, False]),
    )
    assert arr.to_pylist() == [[1], None, [4], [5, 6]]
    schema = make_schema(sequence=(SequenceFeature("h", max_len=2),))
    pre = Preprocessor.fit(schema, make_table(h=[[1], [4], [5], [6]]))
    enc = pre.transform(make_table(h=arr))
    assert enc.seq_lengths[:, 0].tolist() == [1, 0, 1, 2]
    assert enc.sequences[0].tolist() == [[1, 0], [0, 0], [2, 0], [3, 4]]


# =========================================================================== labels


def cvr_schema(where: str = "click == 1", type_: str = "binary") -> Schema:
    return make_schema(
        sparse=(SparseFeature("u"),),
        tasks=(Task("ctr", label="click"), Task("cvr", label="conversion", type=type_, where=where)),  # type: ignore[arg-type]
    )


def test_labels_and_mask_follow_the_sample_space() -> None:
    schema = cvr_schema()
    t = make_table(u=[1, 2, 3, 4], click=[1, 0, 1, 0], conversion=pa.array([1, None, 0, 5], pa.int64()))
    enc = Preprocessor.fit(schema, t).transform(t)
    assert enc.labels.dtype == np.float32 and enc.label_mask.dtype == bool
    assert enc.label_mask.tolist() == [[True, True], [True, False], [True, True], [True, False]]
    # outside the sample space: null and 5 are allowed, masked out and zeroed
    assert enc.labels.tolist() == [[1, 1], [0, 0], [1, 0], [0, 0]]


@pytest.mark.parametrize(("bad", "what"), [(2, "2.0"), (None, "null/NaN"), (-1, "-1.0")])
def test_binary_label_outside_0_1_in_sample_space(bad: int | None, what: str) -> None:
    schema = cvr_schema()
    t = make_table(u=[1, 2, 3], click=[1, 1, 0], conversion=pa.array([0, bad, 1], pa.int64()))
    pre = Preprocessor.fit(schema, t)
    with pytest.raises(DataError) as info:
        pre.transform(t, source="clicks.parquet")
    msg = str(info.value)
    assert msg.startswith("clicks.parquet: label column 'conversion' (task cvr) has 1 value(s) outside {0, 1}")
    assert f"e.g. {what}" in msg


def test_binary_label_without_where_checks_every_row() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),))
    pre = Preprocessor.fit(schema, make_table(u=[1]))
    with pytest.raises(DataError, match=r"label column 'click' \(task ctr\) has 2 value"):
        pre.transform(make_table(u=[1, 2, 3], click=[0.0, 0.5, math.nan]))


def test_bool_and_float_binary_labels() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),))
    pre = Preprocessor.fit(schema, make_table(u=[1]))
    assert pre.transform(make_table(u=[1, 2], click=[True, False])).labels[:, 0].tolist() == [1.0, 0.0]
    assert pre.transform(make_table(u=[1, 2], click=[1.0, 0.0])).labels[:, 0].tolist() == [1.0, 0.0]


def test_regression_label() -> None:
    schema = cvr_schema(type_="regression")
    t = make_table(u=[1, 2, 3], click=[1, 1, 0], conversion=[2.5, -3.0, math.nan])
    enc = Preprocessor.fit(schema, t).transform(t)
    assert enc.labels[:, 1].tolist() == [2.5, -3.0, 0.0]
    assert enc.label_mask[:, 1].tolist() == [True, True, False]
    with pytest.raises(DataError, match=r"label column 'conversion' \(task cvr\) has 1 null/NaN/inf"):
        Preprocessor.fit(schema, t).transform(make_table(u=[1], click=[1], conversion=[math.inf]))


def test_string_label_is_a_data_error() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),))
    pre = Preprocessor.fit(schema, make_table(u=[1]))
    with pytest.raises(DataError, match=r"^d\.parquet: label column 'click' \(task ctr\) has type string"):
        pre.transform(make_table(u=[1], click=["1"]), source="d.parquet")


def test_where_mask_with_and_or_not_and_nulls() -> None:
    schema = make_schema(
        sparse=(SparseFeature("u"),),
        tasks=(
            Task("a", label="y", where="click == 1 and dwell >= 30"),
            Task("b", label="y", where="not (city == 'x') or dwell < 5"),
        ),
    )
    t = make_table(
        u=[1, 2, 3, 4, 5],
        click=pa.array([1, 1, 0, None, 1], pa.int64()),
        dwell=pa.array([40.0, 10.0, 50.0, 60.0, None]),
        city=pa.array(["x", "y", "x", None, "x"]),
        y=[0, 1, 0, 1, 1],
    )
    enc = Preprocessor.fit(schema, t).transform(t)
    assert enc.label_mask[:, 0].tolist() == [True, False, False, False, False]
    # a null in any column the expression uses puts the row outside (row 3: city is null)
    assert enc.label_mask[:, 1].tolist() == [False, True, False, False, False]
    assert enc.labels[:, 0].tolist() == [0, 0, 0, 0, 0]
    assert enc.labels[:, 1].tolist() == [0, 1, 0, 0, 0]


def test_where_bare_column_is_truthiness() -> None:
    schema = cvr_schema(where="flag")
    t = make_table(u=[1, 2, 3], click=[0, 0, 0], flag=[True, False, True], conversion=[1, 7, 0])
    enc = Preprocessor.fit(schema, t).transform(t)
    assert enc.label_mask[:, 1].tolist() == [True, False, True]
    assert enc.labels[:, 1].tolist() == [1, 0, 0]


def test_where_bare_column_null_is_false() -> None:
    schema = cvr_schema(where="flag")
    t = make_table(u=[1, 2, 3], click=[0, 0, 0], flag=pa.array([1, None, 0], pa.int64()), conversion=[1, 1, 1])
    enc = Preprocessor.fit(schema, t).transform(t)
    assert enc.label_mask[:, 1].tolist() == [True, False, False]


def test_where_column_missing_is_a_data_error() -> None:
    schema = cvr_schema(where="dwell > 3")
    pre = Preprocessor.fit(schema, make_table(u=[1]))
    with pytest.raises(DataError, match=r"missing column\(s\) 'conversion', 'dwell'"):
        pre.transform(make_table(u=[1], click=[1]))


def test_where_ordering_against_wrong_type_is_a_data_error() -> None:
    schema = cvr_schema(where="click < 'a'")
    t = make_table(u=[1], click=[1], conversion=[1])
    with pytest.raises(DataError, match=r"tasks\.cvr\.where .* compares column .click. \(int64\) with a string"):
        Preprocessor.fit(schema, t).transform(t)


def test_where_equality_against_wrong_type_is_a_data_error() -> None:
    schema = cvr_schema(where="click == 'yes'")
    t = make_table(u=[1, 2], click=[1, 0], conversion=[1, 0])
    with pytest.raises(DataError, match=r"compares column .click. \(int64\) with a string"):
        Preprocessor.fit(schema, t).transform(t)


def test_without_labels_needs_no_label_columns() -> None:
    schema = cvr_schema()
    pre = Preprocessor.fit(schema, make_table(u=[1, 2], click=[1, 0], conversion=[1, 0]))
    enc = pre.transform(pa.table({"u": [2, 1, 7]}), with_labels=False)
    assert enc.sparse[:, 0].tolist() == [2, 1, 0]
    assert enc.labels.shape == (3, 2) and not enc.labels.any()
    assert enc.label_mask.shape == (3, 2) and not enc.label_mask.any()


def test_fit_on_empty_table_is_a_data_error() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),))
    with pytest.raises(DataError, match=r"^t: no training rows"):
        Preprocessor.fit(schema, make_table(u=pa.array([], pa.int64())), source="t")


# =========================================================================== persistence


def rich_schema() -> Schema:
    return make_schema(
        sparse=(SparseFeature("u", min_freq=2), SparseFeature("s"), SparseFeature("h", hash_buckets=13)),
        dense=(DenseFeature("x"), DenseFeature("p", transform="log1p_standardize", fill=1.0)),
        sequence=(SequenceFeature("hist", max_len=3, vocab_from="s"), SequenceFeature("tags", max_len=2)),
        tasks=(Task("ctr", label="click"), Task("cvr", label="conv", where="click == 1")),
    )


def rich_table(seed: int, n: int = 200) -> pa.Table:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(30)]
    click = rng.integers(0, 2, n)
    return pa.table(
        {
            "u": pa.array(rng.integers(0, 50, n) + 2**60, pa.int64()),
            "s": pa.array([words[i] for i in rng.integers(0, 30, n)]),
            "h": pa.array(rng.integers(0, 10**6, n), pa.int64()),
            "x": pa.array([None if i % 7 == 0 else float(v) for i, v in enumerate(rng.normal(size=n))]),
            "p": pa.array(rng.exponential(10.0, n)),
            "hist": pa.array([[words[j] for j in rng.integers(0, 30, i % 5)] for i in range(n)]),
            "tags": pa.array([None if i % 9 == 0 else [int(v) for v in rng.integers(0, 8, 3)] for i in range(n)]),
            "click": pa.array(click),
            "conv": pa.array(np.where(click == 1, rng.integers(0, 2, n), -1)),
        }
    )


def test_save_load_round_trip_gives_identical_encoding(tmp_path: Path) -> None:
    schema = rich_schema()
    pre = Preprocessor.fit(schema, rich_table(0))
    pre.save(tmp_path / "pp")
    assert sorted(p.name for p in (tmp_path / "pp").iterdir()) == [
        "state.json",
        "vocab_0.parquet",
        "vocab_1.parquet",
        "vocab_2.parquet",
    ]
    loaded = Preprocessor.load(schema, tmp_path / "pp")
    assert loaded.layout() == pre.layout()
    assert loaded.dense_stats == pre.dense_stats
    for name, vocab in pre.vocabs.items():
        assert loaded.vocabs[name].to_pylist() == vocab.to_pylist()
    other = rich_table(1)
    assert_encoded_equal(loaded.transform(other), pre.transform(other))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Schema, Path, dict[str, Any]]:
    schema = rich_schema()
    directory = tmp_path / "pp"
    Preprocessor.fit(schema, rich_table(0)).save(directory)
    state = json.loads((directory / "state.json").read_text())
    return schema, directory, state


def test_load_with_missing_vocab_file(saved: tuple[Schema, Path, dict[str, Any]]) -> None:
    schema, directory, state = saved
    fname = state["vocabularies"]["s"]["file"]
    (directory / fname).unlink()
    with pytest.raises(ModelError, match=rf"{fname}: cannot read vocabulary of 's'"):
        Preprocessor.load(schema, directory)


def test_load_with_wrong_vocab_size(saved: tuple[Schema, Path, dict[str, Any]]) -> None:
    schema, directory, state = saved
    info = state["vocabularies"]["u"]
    path = directory / info["file"]
    vocab = pq.read_table(path)
    pq.write_table(vocab.slice(0, vocab.num_rows - 1), path)
    with pytest.raises(ModelError, match=rf"vocabulary of 'u' has {info['size'] - 1} values, expected {info['size']}"):
        Preprocessor.load(schema, directory)


def test_load_with_corrupt_vocab_file(saved: tuple[Schema, Path, dict[str, Any]]) -> None:
    schema, directory, state = saved
    (directory / state["vocabularies"]["u"]["file"]).write_text("not parquet")
    with pytest.raises(ModelError, match="cannot read vocabulary of 'u'"):
        Preprocessor.load(schema, directory)


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"version": 99, "vocabularies": {}, "dense": {}})])
def test_load_with_missing_or_bad_state_json(saved: tuple[Schema, Path, dict[str, Any]], content: str | None) -> None:
    schema, directory, _ = saved
    if content is None:
        (directory / "state.json").unlink()
    else:
        (directory / "state.json").write_text(content)
    with pytest.raises(ModelError, match="state.json"):
        Preprocessor.load(schema, directory)


def test_load_with_a_different_schema(saved: tuple[Schema, Path, dict[str, Any]]) -> None:
    _, directory, _ = saved
    other = make_schema(sparse=(SparseFeature("u"),), tasks=CTR)
    with pytest.raises(ModelError, match="does not match the model's config"):
        Preprocessor.load(other, directory)


def test_load_with_incomplete_state_json(saved: tuple[Schema, Path, dict[str, Any]]) -> None:
    schema, directory, state = saved
    del state["dense"]
    (directory / "state.json").write_text(json.dumps(state))
    with pytest.raises(ModelError):
        Preprocessor.load(schema, directory)


# =========================================================================== EncodedColumns


def test_encoded_columns_concat_and_take() -> None:
    schema = rich_schema()
    t = rich_table(0, n=60)
    pre = Preprocessor.fit(schema, t)
    whole = pre.transform(t)
    assert whole.num_rows == 60
    parts = [pre.transform(t.slice(a, b - a)) for a, b in [(0, 17), (17, 18), (18, 60)]]
    joined = EncodedColumns.concat(parts)
    assert_encoded_equal(joined, whole)
    assert EncodedColumns.concat([whole]) is whole

    rows = np.array([59, 0, 3, 3])
    taken = whole.take(rows)
    assert taken.num_rows == 4
    np.testing.assert_array_equal(taken.sparse, whole.sparse[rows])
    np.testing.assert_array_equal(taken.dense, whole.dense[rows])
    for a, b in zip(taken.sequences, whole.sequences, strict=True):
        np.testing.assert_array_equal(a, b[rows])
    np.testing.assert_array_equal(taken.seq_lengths, whole.seq_lengths[rows])
    np.testing.assert_array_equal(taken.labels, whole.labels[rows])
    np.testing.assert_array_equal(taken.label_mask, whole.label_mask[rows])

    mask = np.zeros(60, dtype=bool)
    mask[[1, 5, 7]] = True
    assert_encoded_equal(whole.take(mask), whole.take(np.array([1, 5, 7])))


def test_encoded_shapes_and_dtypes() -> None:
    schema = rich_schema()
    t = rich_table(0, n=25)
    enc = Preprocessor.fit(schema, t).transform(t)
    assert enc.sparse.shape == (25, 3) and enc.sparse.dtype == np.int64
    assert enc.dense.shape == (25, 2) and enc.dense.dtype == np.float32
    assert [s.shape for s in enc.sequences] == [(25, 3), (25, 2)]
    assert enc.seq_lengths.shape == (25, 2) and enc.seq_lengths.dtype == np.int64
    assert enc.labels.shape == (25, 2) and enc.label_mask.shape == (25, 2)


# =========================================================================== streaming fit


def _chunks(table: pa.Table, sizes: list[int]) -> list[pa.Table]:
    """``table`` cut into consecutive slices of ``sizes`` (the rest in the last slice)."""
    out, start = [], 0
    for n in sizes:
        out.append(table.slice(start, n))
        start += n
    out.append(table.slice(start))
    return out


def _stream_table(n: int = 3000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.lognormal(2.0, 1.5, n)
    x[rng.random(n) < 0.1] = np.nan
    x[rng.random(n) < 0.02] = np.inf
    neg = rng.normal(0.0, 3.0, n)  # negatives: clipped before log1p
    hist = [rng.integers(0, 400, rng.integers(0, 6)).tolist() for _ in range(n)]
    hist[3] = None
    tags = [[f"t{v}" for v in rng.integers(0, 50, rng.integers(0, 4))] for _ in range(n)]
    return make_table(
        u=pa.array(rng.zipf(1.5, n) % 1000, pa.int64()),
        item=pa.array(rng.integers(0, 300, n), pa.int64()),
        s=pa.array([None if v == 0 else f"s{v}" for v in rng.integers(0, 40, n)]),
        h=pa.array(rng.integers(0, 10**12, n), pa.int64()),
        hist=pa.array(hist, pa.list_(pa.int64())),
        tags=pa.array(tags, pa.list_(pa.string())),
        x_none=pa.array([None if np.isnan(v) else v for v in x]),
        x_std=pa.array(x),
        x_log=pa.array(neg),
        x_logstd=pa.array(x),
        x_fill=pa.array(x),
    )


def _stream_schema() -> Schema:
    return make_schema(
        sparse=(
            SparseFeature("u", min_freq=3, max_vocab=40),
            SparseFeature("item", min_freq=2),
            SparseFeature("s"),
            SparseFeature("h", hash_buckets=97),
        ),
        dense=(
            DenseFeature("x_none", transform="none"),
            DenseFeature("x_std", transform="standardize"),
            DenseFeature("x_log", transform="log1p"),
            DenseFeature("x_logstd", transform="log1p_standardize"),
            DenseFeature("x_fill", transform="log1p_standardize", fill=-4.0),
        ),
        sequence=(
            SequenceFeature("hist", max_len=3, vocab_from="item"),
            SequenceFeature("tags", max_len=2, min_freq=2),
        ),
    )


def _reference_dense(f: DenseFeature, x: np.ndarray) -> dict[str, float]:
    """The dense statistics computed the direct way, over all rows at once."""
    finite = np.isfinite(x)
    fill = f.fill if f.fill is not None else float(x[finite].mean())
    v = np.where(finite, x, fill)
    if f.transform in ("log1p", "log1p_standardize"):
        v = np.log1p(np.clip(v, 0.0, None))
    if f.transform in ("standardize", "log1p_standardize"):
        return {"fill": fill, "mean": float(v.mean()), "std": float(v.std())}
    return {"fill": fill, "mean": 0.0, "std": 1.0}


def assert_same_fit(a: Preprocessor, b: Preprocessor) -> None:
    assert a.vocabs.keys() == b.vocabs.keys()
    for name in a.vocabs:
        assert a.vocabs[name].type == b.vocabs[name].type, name
        assert a.vocabs[name].to_pylist() == b.vocabs[name].to_pylist(), name
    assert a.dense_stats.keys() == b.dense_stats.keys()
    for name, st in a.dense_stats.items():
        for key, value in st.items():
            assert b.dense_stats[name][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)


@pytest.mark.parametrize("sizes", [[1000, 1000], [1, 0, 7, 500, 1200, 3], [250] * 11])
def test_fit_stream_equals_fit_on_the_whole_table(sizes: list[int]) -> None:
    schema, table = _stream_schema(), _stream_table()
    whole = Preprocessor.fit(schema, table)
    streamed = Preprocessor.fit_stream(schema, _chunks(table, sizes), source="chunks")
    assert_same_fit(whole, streamed)
    # the chunk order does not matter either (ties broken by value, sums commute)
    assert_same_fit(whole, Preprocessor.fit_stream(schema, _chunks(table, sizes)[::-1], source="chunks"))
    # min_freq / max_vocab / vocab_from took effect on the global counts, not per chunk
    assert len(whole.vocabs["u"]) == 40
    assert "h" not in whole.vocabs and "hist" not in whole.vocabs
    a, b = whole.transform(table), streamed.transform(table)
    np.testing.assert_allclose(a.dense, b.dense, rtol=1e-6, atol=1e-6)  # statistics agree to rounding
    a.dense = b.dense
    assert_encoded_equal(a, b)


def test_fit_stream_dense_statistics_match_a_direct_computation() -> None:
    schema, table = _stream_schema(), _stream_table(seed=1)
    pre = Preprocessor.fit_stream(schema, _chunks(table, [333] * 8), source="chunks")
    for f in schema.dense:
        x = table.column(f.name).to_numpy(zero_copy_only=False).astype(np.float64)
        ref = _reference_dense(f, x)
        for key in ("fill", "mean", "std"):
            assert pre.dense_stats[f.name][key] == pytest.approx(ref[key], rel=1e-9), (f.name, key)


def test_fit_stream_std_is_stable_for_large_offsets() -> None:
    # sum-of-squares would lose every digit here: values 1e9 + noise of std ~1e-3
    rng = np.random.default_rng(3)
    x = 1e9 + rng.normal(0.0, 1e-3, 4000)
    schema = make_schema(dense=(DenseFeature("x"),))
    pre = Preprocessor.fit_stream(schema, _chunks(make_table(x=x), [700] * 5), source="chunks")
    assert pre.dense_stats["x"]["std"] == pytest.approx(float(x.std()), rel=1e-6)


def test_fit_stream_vocab_counts_merge_across_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtrec.data import preprocess

    # Merge the running counts after every chunk, so the incremental merge is exercised.
    monkeypatch.setattr(preprocess._VocabCounts, "merge_at", 0)
    schema = make_schema(sparse=(SparseFeature("u", min_freq=2), SparseFeature("s")))
    rng = np.random.default_rng(4)
    table = make_table(u=pa.array(rng.integers(0, 200, 2000), pa.int64()), s=[f"v{i % 37}" for i in range(2000)])
    assert_same_fit(
        Preprocessor.fit(schema, table), Preprocessor.fit_stream(schema, _chunks(table, [90] * 20), source="c")
    )


def test_fit_stream_with_no_rows_is_a_data_error() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),))
    empty = make_table(u=pa.array([], pa.int64()))
    with pytest.raises(DataError, match=r"^files: no training rows"):
        Preprocessor.fit_stream(schema, [empty, empty], source="files")
    with pytest.raises(DataError, match=r"^files: no training rows"):
        Preprocessor.fit_stream(schema, iter([]), source="files")


def test_fit_stream_column_types_must_agree_across_chunks() -> None:
    schema = make_schema(sparse=(SparseFeature("u"),))
    parts = [make_table(u=[1, 2]), make_table(u=["a", "b"])]
    with pytest.raises(DataError, match=r"^f: column 'u' holds string in one part of the data and int64 in another"):
        Preprocessor.fit_stream(schema, parts, source="f")
    # int widths are not a disagreement: IDs are int64 either way
    parts = [make_table(u=pa.array([1, 2], pa.int32())), make_table(u=pa.array([2], pa.int64()))]
    assert Preprocessor.fit_stream(schema, parts, source="f").vocabs["u"].to_pylist() == [2, 1]


def test_fit_stream_clean_violation_counts_every_chunk() -> None:
    schema = make_schema(dense=(DenseFeature("price", clean=True),))
    parts = [make_table(price=[1.0, math.nan]), make_table(price=[2.0]), make_table(price=[None, math.inf])]
    with pytest.raises(DataError, match=r"^f: column 'price' has 3 null/NaN/inf values but is declared clean$"):
        Preprocessor.fit_stream(schema, parts, source="f")


def test_streamed_fit_accepts_string_and_large_string_parts_like_one_table():
    # pyarrow writes string, polars large_string: files of both kinds make one dataset.
    schema = Schema(sparse=(SparseFeature("city"),), tasks=(Task("ctr", label="click"),))
    a = pa.table({"city": pa.array(["x", "y", "x"], pa.string()), "click": [1, 0, 1]})
    b = pa.table({"city": pa.array(["y", "z", "y"], pa.large_string()), "click": [0, 0, 1]})
    streamed = Preprocessor.fit_stream(schema, [a, b], source="parts")
    assert streamed.vocabs["city"].to_pylist() == ["y", "x", "z"]  # most frequent first
    assert streamed.transform(b).sparse[:, 0].tolist() == [1, 3, 1]
    assert streamed.transform(a).sparse[:, 0].tolist() == [2, 1, 2]
