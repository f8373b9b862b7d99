"""Unit tests for streaming Parquet training data (mtrec.data.streaming)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtrec.batch import Batch
from mtrec.data.loading import load_training_data
from mtrec.data.parquet import resolve_paths
from mtrec.data.preprocess import Preprocessor
from mtrec.data.streaming import ParquetStream, _deal, _ShuffleBuffer, fit_preprocessor_stream, holdout_draws
from mtrec.errors import DataError
from mtrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, Task

torch.set_num_threads(1)

SCHEMA = Schema(
    sparse=(SparseFeature("u", min_freq=2), SparseFeature("s")),
    dense=(DenseFeature("rid", transform="none"), DenseFeature("x", transform="log1p_standardize")),
    sequence=(SequenceFeature("hist", max_len=3, vocab_from="u"),),
    tasks=(Task("ctr", label="click"), Task("cvr", label="conversion", where="click == 1")),
)
RID = 0  # dense column of the row id: every row is identified by it (exact in float32 here)
THREAD = "mtrec-parquet-read-ahead"


def make_rows(start: int, n: int) -> pa.Table:
    rng = np.random.default_rng(start)
    click = (rng.random(n) < 0.3).astype(np.int64)
    x = rng.lognormal(1.0, 1.0, n)
    x[rng.random(n) < 0.1] = np.nan
    return pa.table(
        {
            "u": pa.array(rng.integers(0, 60, n), pa.int64()),
            "s": pa.array([f"s{v}" for v in rng.integers(0, 9, n)]),
            "rid": pa.array(np.arange(start, start + n, dtype=np.float64)),
            "x": pa.array(x),
            "hist": pa.array([rng.integers(0, 60, k).tolist() for k in rng.integers(0, 5, n)], pa.list_(pa.int64())),
            "click": pa.array(click),
            "conversion": pa.array(click * (rng.random(n) < 0.5)),
        }
    )


def write_files(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """One file per ``(rows, row_group_size)``, with consecutive row ids across files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for k, (rows, group) in enumerate(sizes):
        path = folder / f"part-{k}.parquet"
        pq.write_table(make_rows(start, rows), path, row_group_size=group)
        paths.append(path)
        start += rows
    return paths


# three files, 700 rows, row groups of unequal sizes (the last of each file is short)
SIZES = [(230, 40), (170, 50), (300, 60)]
TOTAL = 700


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Preprocessor]:
    paths = write_files(tmp_path_factory.mktemp("stream") / "train", SIZES)
    return paths, fit_preprocessor_stream(SCHEMA, paths)


def rids(batches: list[Batch]) -> np.ndarray:
    if not batches:
        return np.zeros(0, dtype=np.int64)
    return torch.cat([b.dense[:, RID] for b in batches]).numpy().astype(np.int64)


def stream(data: tuple[list[Path], Preprocessor], **kw: object) -> ParquetStream:
    paths, pre = data
    args: dict[str, object] = {"batch_size": 32, "seed": 0, "shuffle_buffer": 100}
    args.update(kw)
    return ParquetStream(paths, pre, **args)  # type: ignore[arg-type]


def no_reader_thread() -> bool:
    return not any(t.name == THREAD and t.is_alive() for t in threading.enumerate())


# =========================================================================== hold-out


def test_holdout_draws_are_slices_of_one_big_draw() -> None:
    full = np.random.default_rng(11).random(5000)
    for offset, n in [(0, 10), (1, 1), (123, 456), (4999, 1), (2000, 3000)]:
        np.testing.assert_array_equal(holdout_draws(11, offset, n), full[offset : offset + n])
    # and drawing in chunks, in order, from one generator gives the same stream
    rng = np.random.default_rng(11)
    np.testing.assert_array_equal(np.concatenate([rng.random(k) for k in (7, 0, 993, 4000)]), full)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_holdout_selects_exactly_the_rows_load_training_data_holds_out(
    data: tuple[list[Path], Preprocessor], num_workers: int
) -> None:
    paths, _ = data
    folder = str(paths[0].parent)
    assert resolve_paths(folder) == paths
    mem = load_training_data(SCHEMA, folder, None, valid_fraction=0.2, seed=5)
    pre = mem.preprocessor
    for keep, expected in (("train", mem.train), ("holdout", mem.valid)):
        s = ParquetStream(
            paths, pre, batch_size=64, seed=1, holdout=(0.2, 5), keep=keep, num_workers=num_workers, shuffle_buffer=50
        )
        batches = list(s.iter_batches(1))
        got = rids(batches)
        assert len(got) == len(np.unique(got)) == expected.num_rows == s.num_rows(1)
        # every encoded column, row for row (sorted by row id), is what the in-memory path encodes
        order = np.argsort(got)
        ref = np.argsort(expected.dense[:, RID])
        np.testing.assert_array_equal(torch.cat([b.sparse for b in batches]).numpy()[order], expected.sparse[ref])
        np.testing.assert_array_equal(torch.cat([b.dense for b in batches]).numpy()[order], expected.dense[ref])
        np.testing.assert_array_equal(
            torch.cat([b.sequences[0] for b in batches]).numpy()[order], expected.sequences[0][ref]
        )
        np.testing.assert_array_equal(torch.cat([b.labels for b in batches]).numpy()[order], expected.labels[ref])
        np.testing.assert_array_equal(
            torch.cat([b.label_mask for b in batches]).numpy()[order], expected.label_mask[ref]
        )


def test_streamed_fit_on_training_rows_equals_the_in_memory_fit(data: tuple[list[Path], Preprocessor]) -> None:
    paths, _ = data
    mem = load_training_data(SCHEMA, str(paths[0].parent), None, valid_fraction=0.2, seed=5).preprocessor
    streamed = fit_preprocessor_stream(SCHEMA, paths, holdout=(0.2, 5))
    for name in mem.vocabs:
        assert streamed.vocabs[name].to_pylist() == mem.vocabs[name].to_pylist()
    for name, st in mem.dense_stats.items():
        for key, value in st.items():
            assert streamed.dense_stats[name][key] == pytest.approx(value, rel=1e-9)
    # and the fit without hold-out differs: the held-out rows were really skipped
    assert fit_preprocessor_stream(SCHEMA, paths).dense_stats["rid"]["fill"] != mem.dense_stats["rid"]["fill"]


def test_holdout_that_keeps_nothing_is_a_data_error(tmp_path: Path) -> None:
    paths = write_files(tmp_path, [(3, 3)])
    pre = fit_preprocessor_stream(SCHEMA, paths)
    with pytest.raises(DataError, match=r"part-0\.parquet: too few rows \(3\) to hold out a validation split"):
        ParquetStream(paths, pre, batch_size=2, seed=0, holdout=(1e-9, 0))


# =========================================================================== ranks and workers


def test_one_rank_yields_every_row_once_with_a_partial_last_batch(data: tuple[list[Path], Preprocessor]) -> None:
    s = stream(data)
    batches = list(s.iter_batches(0))
    assert len(batches) == s.num_batches(0) == -(-TOTAL // 32)
    assert [len(b) for b in batches[:-1]] == [32] * (len(batches) - 1) and len(batches[-1]) == TOTAL % 32
    assert sorted(rids(batches).tolist()) == list(range(TOTAL))
    dropped = stream(data, drop_last=True)
    assert dropped.num_batches(0) == TOTAL // 32 == len(list(dropped.iter_batches(0)))


def test_ranks_share_every_row_exactly_once_when_divisible(tmp_path: Path) -> None:
    # 8 row groups of 50 rows: 4 per rank, 200 rows = 5 batches of 40 each, nothing dropped
    paths = write_files(tmp_path, [(200, 50), (200, 50)])
    pre = fit_preprocessor_stream(SCHEMA, paths)
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            s = ParquetStream(paths, pre, batch_size=40, seed=3, shuffle_buffer=60, rank=rank, world_size=2)
            batches = list(s.iter_batches(epoch))
            assert len(batches) == s.num_batches(epoch) == 5 and all(len(b) == 40 for b in batches)
            seen.append(rids(batches))
        assert sorted(np.concatenate(seen).tolist()) == list(range(400))


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_takes_the_same_number_of_steps(data: tuple[list[Path], Preprocessor], world_size: int) -> None:
    paths, _ = data
    train_rows = set(rids(list(stream(data, holdout=(0.2, 5)).iter_batches(0))).tolist())
    for epoch in (0, 1, 2):
        ranks = [stream(data, holdout=(0.2, 5), rank=r, world_size=world_size) for r in range(world_size)]
        steps = {s.num_batches(epoch) for s in ranks}
        assert len(steps) == 1  # each rank computed it alone, from metadata
        (expected,) = steps
        assert expected == min(s.num_rows(epoch) for s in ranks) // 32  # drop_last is the default with ranks
        seen: list[int] = []
        groups: list[tuple[Path, int]] = []
        for s in ranks:
            batches = list(s.iter_batches(epoch))
            assert len(batches) == expected and all(len(b) == 32 for b in batches)
            seen += rids(batches).tolist()
            groups += s.row_groups(epoch)
        assert len(seen) == len(set(seen)) and set(seen) <= train_rows  # disjoint, never a held-out row
        # the ranks' row groups partition the file set, and are balanced by rows
        assert sorted(groups) == sorted((p, i) for p in paths for i in range(pq.ParquetFile(p).num_row_groups))
        rows = [s.num_rows(epoch) for s in ranks]
        assert sum(rows) == len(train_rows) and max(rows) - min(rows) <= 60


def test_workers_share_a_ranks_row_groups_without_duplicates(data: tuple[list[Path], Preprocessor]) -> None:
    s = stream(data, num_workers=2, rank=1, world_size=2, drop_last=False)
    one = stream(data, rank=1, world_size=2, drop_last=False)
    batches = list(s.iter_batches(4))
    assert len(batches) == s.num_batches(4)
    got = rids(batches)
    assert len(got) == len(set(got.tolist()))
    # what this rank's row groups hold, minus at most what equalising steps with rank 0 cut off
    own = set(rids(list(one.iter_batches(4))).tolist())
    assert set(got.tolist()) <= set(range(TOTAL)) and len(got) >= len(own) - 2 * 32
    # the deal: every row group of the rank to exactly one worker, worker loads within one row group
    groups = s._plan(4)[1]
    shares = s._split(groups, 2)
    assert sorted(shares[0] + shares[1]) == sorted(groups)
    loads = [sum(s._groups[i].kept for i in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= 60


def test_deal_balances_and_keeps_order() -> None:
    parts = _deal([4, 0, 3, 1, 2], [10, 10, 10, 10, 30], 2)
    # item 4 (30) to part 0; 0, 3, 1 to the lighter part 1; then a tie at 30: the lower part
    assert parts == [[4, 2], [0, 3, 1]]
    assert sorted(sum(parts, [])) == [0, 1, 2, 3, 4]


# =========================================================================== order and determinism


def test_same_seed_and_epoch_give_the_same_batches(data: tuple[list[Path], Preprocessor]) -> None:
    a = [rids([b]) for b in stream(data).iter_batches(2)]
    b = [rids([b]) for b in stream(data, read_ahead=0).iter_batches(2)]  # no thread: same sequence
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = np.concatenate([rids([b]) for b in stream(data).iter_batches(3)])
    assert not np.array_equal(np.concatenate(a), c) and sorted(c.tolist()) == sorted(np.concatenate(a).tolist())
    assert stream(data).row_groups(2) != stream(data).row_groups(3)
    d = np.concatenate([rids([b]) for b in stream(data, seed=9).iter_batches(2)])
    assert not np.array_equal(np.concatenate(a), d)


def test_rows_are_mixed_across_row_groups(data: tuple[list[Path], Preprocessor]) -> None:
    first = rids([next(iter(stream(data, shuffle_buffer=200).iter_batches(0)))])
    # a batch drawn from a buffer of >= 200 rows spans several row groups (40 to 60 rows each)
    assert np.ptp(first) > 60


def test_shuffle_buffer_stays_bounded(data: tuple[list[Path], Preprocessor]) -> None:
    s = stream(data, shuffle_buffer=100, batch_size=16)
    n = sum(len(b) for b in s.iter_batches(0))
    assert n == TOTAL
    assert 100 <= s.peak_buffered_rows <= 100 + 60  # the buffer plus one row group, never the data set


def test_shuffle_buffer_emits_full_batches_and_keeps_the_remainder() -> None:
    from mtrec.data.preprocess import EncodedColumns

    def chunk(start: int, n: int) -> EncodedColumns:
        z = np.zeros((n, 0), np.int64)
        ids = np.arange(start, start + n, dtype=np.float32)[:, None]
        return EncodedColumns(z, ids, [], z, np.zeros((n, 1), np.float32), np.ones((n, 1), bool))

    buf = _ShuffleBuffer(10, 25, np.random.default_rng(0), drop_last=False)
    out: list[Batch] = []
    for k in range(4):
        buf.add(chunk(k * 12, 12))
        if buf.ready:
            out += list(buf.drain())
    # 36 rows in: 30 out, 6 kept (in random order); then 12 more: 18 < 25, nothing out
    assert [len(b) for b in out] == [10, 10, 10] and buf.rows == 18
    assert buf.peak_rows == 36 and not buf.ready
    out += list(buf.drain(final=True))
    assert sorted(torch.cat([b.dense[:, 0] for b in out]).tolist()) == list(range(48))
    assert [len(b) for b in out] == [10, 10, 10, 10, 8]


# =========================================================================== errors and clean-up


def test_missing_column_is_a_data_error_naming_the_file(tmp_path: Path, data: tuple[list[Path], Preprocessor]) -> None:
    paths = write_files(tmp_path, [(20, 10)])
    pq.write_table(make_rows(20, 10).drop_columns(["conversion"]), tmp_path / "part-1.parquet")
    with pytest.raises(DataError, match=r"part-1\.parquet: missing column\(s\) 'conversion'$"):
        ParquetStream([paths[0], tmp_path / "part-1.parquet"], data[1], batch_size=4, seed=0)


def test_not_parquet_is_a_data_error(tmp_path: Path, data: tuple[list[Path], Preprocessor]) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        ParquetStream([bad], data[1], batch_size=4, seed=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_file_deleted_after_construction(
    tmp_path: Path, data: tuple[list[Path], Preprocessor], num_workers: int
) -> None:
    paths = write_files(tmp_path, [(60, 20), (60, 20)])
    s = ParquetStream(paths, data[1], batch_size=8, seed=0, num_workers=num_workers)
    paths[1].unlink()
    with pytest.raises(DataError) as info:
        list(s.iter_batches(0))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{paths[1]}: row group ") and "cannot be read" in msg
    assert no_reader_thread()


def test_corrupt_row_group_is_a_data_error_naming_it(tmp_path: Path, data: tuple[list[Path], Preprocessor]) -> None:
    (path,) = write_files(tmp_path, [(60, 20)])
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(raw))
    s = ParquetStream([path], data[1], batch_size=8, seed=0)
    with pytest.raises(DataError, match=rf"^{path}: row group 1 cannot be decoded \([^\n]*\)$"):
        list(s.iter_batches(0))
    assert no_reader_thread()


def test_file_rewritten_after_construction(tmp_path: Path, data: tuple[list[Path], Preprocessor]) -> None:
    (path,) = write_files(tmp_path, [(60, 20)])
    s = ParquetStream([path], data[1], batch_size=8, seed=0)
    pq.write_table(make_rows(0, 60), path, row_group_size=30)
    with pytest.raises(DataError, match=rf"^{path}: row group \d changed since the stream was opened"):
        list(s.iter_batches(0))


def test_bad_label_names_file_and_row_group(tmp_path: Path, data: tuple[list[Path], Preprocessor]) -> None:
    path = tmp_path / "labels.parquet"
    rows = make_rows(0, 40)
    click = np.zeros(40, np.int64)
    click[25] = 7  # row group 1 of 20-row groups
    pq.write_table(
        rows.set_column(rows.schema.get_field_index("click"), "click", pa.array(click)), path, row_group_size=20
    )
    s = ParquetStream([path], data[1], batch_size=8, seed=0, read_ahead=0)
    with pytest.raises(DataError, match=rf"^{path} row group 1: label column 'click' \(task ctr\)"):
        list(s.iter_batches(0))


def test_stopping_early_stops_the_read_ahead_thread(data: tuple[list[Path], Preprocessor]) -> None:
    s = stream(data, read_ahead=1, batch_size=8, shuffle_buffer=8)
    it = s.iter_batches(0)
    assert len(next(it)) == 8
    assert not no_reader_thread()  # it is reading ahead
    it.close()
    assert no_reader_thread()
    it = s.iter_batches(1)
    next(it)
    del it  # dropped without close: the generator's finaliser stops the thread too
    assert no_reader_thread()


def test_fewer_row_groups_than_ranks_is_a_data_error(tmp_path: Path, data: tuple[list[Path], Preprocessor]) -> None:
    paths = write_files(tmp_path, [(30, 30)])
    with pytest.raises(DataError, match=r"1 non-empty row group\(s\) cannot be shared by 2 ranks"):
        ParquetStream(paths, data[1], batch_size=4, seed=0, rank=0, world_size=2)
