"""Unit tests for the synthetic click-log generator (mtrec.data.synthetic)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtrec.data import synthetic
from mtrec.data.synthetic import _auc, _build_world, generate_click_log, write_click_log

ROWS = 50_000
SMALL = 20_000


@pytest.fixture(scope="module")
def base() -> tuple[pa.Table, dict]:
    return generate_click_log(ROWS, seed=0)


@pytest.fixture(scope="module")
def cols(base: tuple[pa.Table, dict]) -> dict[str, np.ndarray]:
    table, _ = base
    names = [f.name for f in table.schema if not pa.types.is_list(f.type)]
    out = {name: table.column(name).to_numpy(zero_copy_only=False) for name in names}
    out["user_age"] = table.column("user_age").to_numpy(zero_copy_only=False)
    return out


def test_column_names_and_types(base: tuple[pa.Table, dict]) -> None:
    table, truth = base
    schema = table.schema
    extra_sparse = [f"cat_{i:02d}" for i in range(8, 20)]
    extra_dense = [f"num_{i:02d}" for i in range(4, 10)]
    sparse = ["user_id", "item_id", "author_id", "category", "city", "device", "hour", "position", *extra_sparse]
    dense = ["item_price", "user_age", "item_ctr_7d", "video_duration", *extra_dense]
    labels = ["click", "conversion", "dwell_time", "satisfied"]
    assert table.column_names == [*sparse, *dense, "hist_item_ids", *labels, "request_ts"]
    assert table.num_rows == ROWS

    for name in sparse:
        expected = pa.string() if name in ("category", "device") else pa.int64()
        assert schema.field(name).type == expected, name
    for name in dense:
        assert pa.types.is_floating(schema.field(name).type), name
    assert schema.field("hist_item_ids").type == pa.list_(pa.int64())
    for name in ("click", "conversion", "satisfied", "request_ts"):
        assert schema.field(name).type == pa.int64()
    assert schema.field("dwell_time").type == pa.float32()

    assert truth["columns"]["sparse"] == sparse
    assert truth["columns"]["dense"] == dense
    assert truth["columns"]["list"] == ["hist_item_ids"]
    assert truth["columns"]["labels"] == labels


def test_extra_column_counts_follow_arguments() -> None:
    table, truth = generate_click_log(2_000, seed=0, num_sparse=8, num_dense=4)
    assert not any(c.startswith(("cat_", "num_")) for c in table.column_names)
    assert truth["num_sparse"] == 8 and truth["num_dense"] == 4
    assert len(truth["columns"]["sparse"]) == 8 and len(truth["columns"]["dense"]) == 4


def test_value_domains(base: tuple[pa.Table, dict], cols: dict[str, np.ndarray]) -> None:
    table, truth = base
    assert cols["hour"].min() >= 0 and cols["hour"].max() <= 23
    assert cols["position"].min() >= 1 and cols["position"].max() <= 20
    pos_counts = np.bincount(cols["position"], minlength=21)
    assert pos_counts[1] > pos_counts[5] > pos_counts[20]
    assert set(np.unique(cols["device"])) <= {
        "ios",
        "android",
        "web_desktop",
        "web_mobile",
        "ipad",
        "android_tablet",
        "smart_tv",
        "mac_app",
        "windows_app",
        "other",
    }
    categories = np.unique(cols["category"])
    assert all(c.startswith("cat_") and len(c) == 7 for c in categories)
    assert len(categories) <= 300

    assert (cols["item_price"] > 0).all()
    assert (cols["video_duration"] > 0).all()
    ctr = cols["item_ctr_7d"]
    assert ((ctr >= 0) & (ctr <= 1)).all()

    age = table.column("user_age")
    null_share = age.null_count / table.num_rows
    assert 0.01 < null_share < 0.03
    valid_age = age.drop_null().to_numpy()
    assert valid_age.min() >= 18 and valid_age.max() <= 70

    for name, card in truth["cardinalities"].items():
        if name.startswith("cat_"):
            values = cols[name]
            assert values.min() >= 0 and values.max() < card, name
    cards = [truth["cardinalities"][f"cat_{i:02d}"] for i in range(8, 20)]
    assert min(cards) >= 10 and max(cards) <= 50_000 and len(set(cards)) == len(cards)


def test_ids_are_large_int64(cols: dict[str, np.ndarray]) -> None:
    assert cols["user_id"].dtype == np.int64
    assert (cols["user_id"] > 2**31).any()
    assert cols["item_id"].min() > 2**24


def test_category_and_author_are_functions_of_item(cols: dict[str, np.ndarray]) -> None:
    for name in ("category", "author_id"):
        pairs = np.unique(np.stack([cols["item_id"].astype(str), cols[name].astype(str)]), axis=1)
        assert pairs.shape[1] == len(np.unique(cols["item_id"])), name


def test_history_lists(base: tuple[pa.Table, dict]) -> None:
    table, _ = base
    hist = table.column("hist_item_ids").combine_chunks()
    lengths = np.diff(hist.offsets.to_numpy())
    assert lengths.min() >= 0 and lengths.max() <= 50
    assert len(np.unique(lengths)) > 20
    values = hist.values.to_numpy()
    assert np.isin(values, _build_world(0, 20, 10).item_ids).all()


def test_label_consistency(cols: dict[str, np.ndarray]) -> None:
    click, conv, sat, dwell = cols["click"], cols["conversion"], cols["satisfied"], cols["dwell_time"]
    for label in (click, conv, sat):
        assert set(np.unique(label)) <= {0, 1}
    assert (click[conv == 1] == 1).all()
    assert (dwell[click == 0] == 0).all()
    assert (dwell[click == 1] > 0).all()
    np.testing.assert_array_equal(sat == 1, (click == 1) & (dwell >= 30))


def test_rates(base: tuple[pa.Table, dict], cols: dict[str, np.ndarray]) -> None:
    _, truth = base
    click = cols["click"] == 1
    assert 0.04 <= click.mean() <= 0.06
    conv_rate = cols["conversion"][click].mean()
    sat_rate = cols["satisfied"][click].mean()
    assert 0.10 <= conv_rate <= 0.20
    assert 0.30 <= sat_rate <= 0.50
    assert truth["rates"]["click"] == pytest.approx(click.mean())
    assert truth["rates"]["conversion_given_click"] == pytest.approx(conv_rate)
    assert truth["rates"]["satisfied_given_click"] == pytest.approx(sat_rate)


def test_features_carry_signal(cols: dict[str, np.ndarray]) -> None:
    click = cols["click"] == 1
    top = click[cols["position"] <= 2].mean()
    bottom = click[cols["position"] >= 10].mean()
    assert top > 1.2 * bottom
    # Conversion falls with price among clicked rows.
    price = cols["item_price"][click]
    conv = cols["conversion"][click]
    cheap, dear = np.quantile(price, [0.25, 0.75])
    assert conv[price <= cheap].mean() > 1.3 * conv[price >= dear].mean()


def test_best_auc_and_truth_dict(base: tuple[pa.Table, dict]) -> None:
    _, truth = base
    json.dumps(truth)  # must be JSON-serialisable as is
    assert truth["generator"] == "mtrec.synthetic"
    assert truth["version"] == 1
    assert truth["rows"] == ROWS and truth["seed"] == 0
    auc = truth["best_auc"]
    assert 0.75 <= auc["click"] <= 0.85
    assert 0.75 <= auc["conversion"] <= 0.90
    assert 0.75 <= auc["satisfied"] <= 0.90
    assert 0.5 < auc["ctcvr"] <= 1.0
    assert set(truth["best_auc_spaces"]) == {"click", "conversion", "satisfied", "ctcvr"}


def test_zipf_user_frequencies(cols: dict[str, np.ndarray]) -> None:
    _, counts = np.unique(cols["user_id"], return_counts=True)
    counts = np.sort(counts)[::-1]
    top = counts[: max(1, len(counts) // 100)].sum() / counts.sum()
    assert top > 0.10


def test_request_ts_increases_over_a_week(cols: dict[str, np.ndarray]) -> None:
    ts = cols["request_ts"]
    assert (np.diff(ts) >= 0).all()
    assert 6.5 * 86400 < ts[-1] - ts[0] <= 7 * 86400
    np.testing.assert_array_equal(cols["hour"], (ts // 3600) % 24)


def test_determinism(base: tuple[pa.Table, dict]) -> None:
    table, truth = base
    again, truth_again = generate_click_log(ROWS, seed=0)
    assert again.equals(table)
    assert truth_again == truth


def test_different_seed_differs(base: tuple[pa.Table, dict]) -> None:
    table, _ = base
    other, _ = generate_click_log(SMALL, seed=1)
    assert not other.equals(table.slice(0, SMALL))
    assert not np.array_equal(other.column("user_id").to_numpy(), table.column("user_id").to_numpy()[:SMALL])


def _mapping(table: pa.Table, key: str, value: str) -> dict:
    keys = table.column(key).to_numpy(zero_copy_only=False)
    values = table.column(value).to_numpy(zero_copy_only=False)
    return dict(zip(keys.tolist(), values.tolist(), strict=True))


def test_sample_seed_keeps_the_world(base: tuple[pa.Table, dict]) -> None:
    table, _ = base
    resampled, truth = generate_click_log(SMALL, seed=0, sample_seed=7)
    assert truth["seed"] == 0 and truth["sample_seed"] == 7
    assert not np.array_equal(resampled.column("item_id").to_numpy(), table.column("item_id").to_numpy()[:SMALL])
    for key, value in (("item_id", "category"), ("item_id", "author_id"), ("item_id", "video_duration")):
        a, b = _mapping(table, key, value), _mapping(resampled, key, value)
        shared = a.keys() & b.keys()
        assert len(shared) > 100
        assert all(a[k] == b[k] for k in shared), (key, value)
    # Same user id space: heavy users of one sample are heavy in the other.
    assert len(np.intersect1d(resampled.column("user_id").to_numpy(), table.column("user_id").to_numpy())) > 1_000


def test_row_count_does_not_change_the_world(base: tuple[pa.Table, dict]) -> None:
    table, _ = base
    small, _ = generate_click_log(1_000, seed=0, sample_seed=3)
    a, b = _mapping(table, "item_id", "category"), _mapping(small, "item_id", "category")
    shared = a.keys() & b.keys()
    assert shared and all(a[k] == b[k] for k in shared)


def test_write_click_log_roundtrip(tmp_path, base: tuple[pa.Table, dict]) -> None:
    table, truth = base
    path = tmp_path / "clicks.parquet"
    written_truth = write_click_log(path, ROWS, seed=0, row_group_size=10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clicks.parquet", "clicks.parquet.truth.json"]
    on_disk = pq.read_table(path)
    assert on_disk.equals(table)
    assert pq.ParquetFile(path).metadata.num_row_groups == 5
    assert written_truth == truth
    assert json.loads((tmp_path / "clicks.parquet.truth.json").read_text()) == truth


def test_write_click_log_accepts_str_path(tmp_path) -> None:
    path = str(tmp_path / "small.parquet")
    truth = write_click_log(path, 500, seed=0, num_sparse=8, num_dense=4)
    assert truth["rows"] == 500
    assert pq.read_table(path).num_rows == 500
    with pytest.raises(ValueError):
        write_click_log(tmp_path / "bad.parquet", 100, row_group_size=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.parquet", "small.parquet.truth.json"]


def test_failed_write_leaves_no_files(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(synthetic, "_generate_chunk", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_click_log(tmp_path / "clicks.parquet", 1_000, num_sparse=8, num_dense=4)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rows": 0},
        {"rows": -5},
        {"rows": 100, "num_sparse": 7},
        {"rows": 100, "num_dense": 3},
        {"rows": 100, "seed": -1},
    ],
)
def test_invalid_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_click_log(**kwargs)


def test_write_rejects_zero_rows(tmp_path) -> None:
    with pytest.raises(ValueError, match="rows"):
        write_click_log(tmp_path / "x.parquet", 0)
    assert list(tmp_path.iterdir()) == []


def test_auc_matches_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = np.round(rng.random(5_000), 2)  # many ties
    labels = rng.random(5_000) < scores
    assert _auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert _auc(np.zeros(3, dtype=bool), np.arange(3.0)) is None
