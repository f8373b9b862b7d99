"""Unit tests for the real log formats (mtrec.data.logs) on the shared real samples."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from mtrec.data.logs import (
    ALI_CCP,
    ALI_CCP_DENSE,
    ALI_CCP_SPARSE,
    ALIEXPRESS,
    BYTEREC,
    prepare_ali_ccp,
    prepare_aliexpress,
    prepare_byterec,
)
from mtrec.errors import DataError, MtrecError

SAMPLES = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "samples"
pytestmark = pytest.mark.skipif(
    not SAMPLES.is_dir(), reason=f"the real sample logs are not at {SAMPLES} (../shared/data/samples)"
)

BYTEREC_NAMES = list(BYTEREC.names())
ALI_CCP_FILES = {
    "train": "ali_ccp_train_sample.csv",
    "valid": "ali_ccp_val_sample.csv",
    "test": "ali_ccp_test_sample.csv",
}


def copy_sample(folder: str, tmp_path: Path) -> Path:
    """A writable copy of one sample folder (the shared files are read-only)."""
    target = tmp_path / f"src-{folder}"
    target.mkdir()
    for f in (SAMPLES / folder).iterdir():
        shutil.copyfile(f, target / f.name)
    return target


def edit_line(path: Path, number: int, change: Callable[[str], str]) -> None:
    """Replaces line ``number`` (1-based) of a text file by ``change(line)``."""
    lines = path.read_text().split("\n")
    lines[number - 1] = change(lines[number - 1])
    path.write_text("\n".join(lines))


def source_rows(path: Path, header: bool = True) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) - int(header)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def read_splits(out: Path) -> dict[str, pl.DataFrame]:
    return {s: pl.read_parquet(out / f"{s}.parquet") for s in ("train", "valid", "test")}


def assert_typed(frame: pl.DataFrame, fmt) -> None:
    assert frame.columns == list(fmt.names())
    for name, kind in fmt.columns:
        dtype = frame.schema[name]
        if kind == "label":
            assert dtype == pl.Int8, name
            assert set(frame.get_column(name).unique().to_list()) <= {0, 1}, name
        elif kind == "dense":
            assert dtype == pl.Float32, name
        else:
            assert dtype == pl.Int64, name
    assert frame.null_count().sum_horizontal().item() == 0


# --------------------------------------------------------------------------- Ali-CCP


def test_ali_ccp_keeps_the_publishers_splits_with_real_column_names(tmp_path: Path):
    out = tmp_path / "ali-ccp"
    manifest = prepare_ali_ccp(SAMPLES / "ali-ccp", out, seed=5)
    splits = read_splits(out)
    for split, name in ALI_CCP_FILES.items():
        src = SAMPLES / "ali-ccp" / name
        assert splits[split].height == source_rows(src)
        assert_typed(splits[split], ALI_CCP)
        # The same values, in file order, as a plain read of the source.
        plain = pl.read_csv(src)
        for column in ("click", "purchase", "101", "205", "109_14"):
            assert splits[split].get_column(column).to_list() == plain.get_column(column).to_list(), column
        assert splits[split].get_column("D508").to_list() == pytest.approx(plain.get_column("D508").to_list())
    assert splits["train"].columns[:3] == ["click", "purchase", "101"]
    assert len(ALI_CCP_SPARSE) == 23 and len(ALI_CCP_DENSE) == 8

    written = json.loads((out / "dataset.json").read_text())
    assert written == manifest
    assert manifest["dataset"] == "ali-ccp"
    assert manifest["seed"] == 5
    assert manifest["tasks"] == ["click", "purchase"]
    assert [s["file"] for s in manifest["source"]] == list(ALI_CCP_FILES.values())
    assert [s["md5"] for s in manifest["source"]] == [md5(SAMPLES / "ali-ccp" / n) for n in ALI_CCP_FILES.values()]
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == {"train": 100, "valid": 50, "test": 50}
    everything = pl.concat(list(splits.values()))
    for label in ("click", "purchase"):
        assert manifest["positive_rate"][label] == pytest.approx(everything.get_column(label).mean())
    assert "train/val/test" in manifest["protocol"]


def test_a_64_bit_id_survives_unchanged(tmp_path: Path):
    src = copy_sample("ali-ccp", tmp_path)
    big = 2**63 - 25  # far above 2**53, where a float64 would round it
    edit_line(
        src / "ali_ccp_train_sample.csv",
        3,
        lambda line: ",".join([*line.split(",")[:2], str(big), *line.split(",")[3:]]),
    )
    prepare_ali_ccp(src, tmp_path / "out")
    ids = pl.read_parquet(tmp_path / "out" / "train.parquet").get_column("101")
    assert ids.dtype == pl.Int64
    assert ids[1] == big


# --------------------------------------------------------------------------- AliExpress and tiny-mtl


@pytest.mark.parametrize(
    ("folder", "train_name", "test_name"),
    [
        ("aliexpress", "aliexpress_train_sample.csv", "aliexpress_test_sample.csv"),
        ("tiny-mtl", "train.csv", "test.csv"),
    ],
)
def test_aliexpress_holds_out_whole_searches_seeded(tmp_path: Path, folder: str, train_name: str, test_name: str):
    out = tmp_path / "a"
    manifest = prepare_aliexpress(SAMPLES / folder, out, seed=3)
    splits = read_splits(out)
    train_src, test_src = SAMPLES / folder / train_name, SAMPLES / folder / test_name
    assert splits["train"].height + splits["valid"].height == source_rows(train_src) == 100
    assert splits["test"].height == source_rows(test_src)
    assert splits["valid"].height > 0 and splits["train"].height > splits["valid"].height
    for frame in splits.values():
        assert_typed(frame, ALIEXPRESS)
    # numerical_58 holds only integers in the file but is a dense feature: Float32.
    assert splits["train"].schema["numerical_58"] == pl.Float32
    # No search page on both sides of the validation split.
    train_ids = set(splits["train"].get_column("search_id").to_list())
    assert train_ids.isdisjoint(splits["valid"].get_column("search_id").to_list())
    # Rows keep their file order: train is the source minus the held-out searches.
    plain = pl.read_csv(train_src)
    kept = plain.filter(pl.col("search_id").is_in(list(train_ids)))
    assert splits["train"].get_column("categorical_7").to_list() == kept.get_column("categorical_7").to_list()
    assert splits["test"].get_column("search_id").to_list() == pl.read_csv(test_src).get_column("search_id").to_list()

    assert manifest["dataset"] == "aliexpress" and manifest["seed"] == 3
    assert manifest["tasks"] == ["click", "conversion"]
    assert [(s["file"], s["md5"]) for s in manifest["source"]] == [
        (train_name, md5(train_src)),
        (test_name, md5(test_src)),
    ]
    assert "search_id" in manifest["protocol"] and "search_id" in manifest["not_features"]
    everything = pl.concat(list(splits.values()))
    assert manifest["positive_rate"]["conversion"] == pytest.approx(everything.get_column("conversion").mean())

    # Same seed, same split; another seed, another split.
    prepare_aliexpress(SAMPLES / folder, tmp_path / "again", seed=3)
    assert read_splits(tmp_path / "again")["valid"].equals(splits["valid"])
    prepare_aliexpress(SAMPLES / folder, tmp_path / "other", seed=4)
    assert not read_splits(tmp_path / "other")["valid"].equals(splits["valid"])


def test_trailing_separators_and_blank_lines_are_tolerated(tmp_path: Path):
    src = copy_sample("tiny-mtl", tmp_path)
    for name in ("train.csv", "test.csv"):
        path = src / name
        lines = path.read_text().splitlines()
        # A trailing comma on every line (header included) and blank lines at the end.
        path.write_text("\n".join(line + "," for line in lines) + "\n\n\n")
    prepare_aliexpress(src, tmp_path / "edited")
    prepare_aliexpress(SAMPLES / "tiny-mtl", tmp_path / "plain")
    for split in ("train", "valid", "test"):
        assert read_splits(tmp_path / "edited")[split].equals(read_splits(tmp_path / "plain")[split])


def test_a_trailing_comma_on_data_lines_only_is_tolerated(tmp_path: Path):
    src = copy_sample("aliexpress", tmp_path)
    path = src / "aliexpress_test_sample.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], *(line + "," for line in lines[1:])]) + "\n")
    prepare_aliexpress(src, tmp_path / "out")
    assert pl.read_parquet(tmp_path / "out" / "test.parquet").columns == list(ALIEXPRESS.names())


# --------------------------------------------------------------------------- ByteRec


def test_byterec_is_split_by_time_and_keeps_minus_one(tmp_path: Path):
    out = tmp_path / "b"
    manifest = prepare_byterec(SAMPLES / "byterec", out, seed=9)
    splits = read_splits(out)
    assert {k: v.height for k, v in splits.items()} == {"train": 140, "valid": 30, "test": 30}
    assert sum(f.height for f in splits.values()) == source_rows(SAMPLES / "byterec" / "byterec_sample.txt", False)
    for frame in splits.values():
        assert_typed(frame, BYTEREC)
    times = {k: v.get_column("time") for k, v in splits.items()}
    assert times["train"].max() <= times["valid"].min()
    assert times["valid"].max() <= times["test"].min()
    assert all(t.is_sorted() for t in times.values())
    plain = pl.read_csv(SAMPLES / "byterec" / "byterec_sample.txt", separator="\t", has_header=False)
    plain.columns = BYTEREC_NAMES
    everything = pl.concat(list(splits.values()))
    # -1 (unknown) is kept as a value of its own, not turned into null.
    assert (everything.get_column("music_id") == -1).sum() == (plain.get_column("music_id") == -1).sum() > 0
    assert sorted(everything.get_column("item_id").to_list()) == sorted(plain.get_column("item_id").to_list())

    assert manifest["dataset"] == "byterec" and manifest["seed"] == 9
    assert manifest["tasks"] == ["finish", "like"]
    assert manifest["source"] == [
        {"file": "byterec_sample.txt", "md5": md5(SAMPLES / "byterec" / "byterec_sample.txt"), "rows": 200}
    ]
    assert manifest["split_column"] == "time" and "time" in manifest["protocol"]
    assert manifest["missing_marker"] == -1
    assert manifest["positive_rate"]["finish"] == pytest.approx(plain.get_column("finish").mean())
    assert manifest["positive_rate"]["like"] == pytest.approx(plain.get_column("like").mean())

    # The split does not depend on the seed; a source file works as well as its folder.
    prepare_byterec(SAMPLES / "byterec" / "byterec_sample.txt", tmp_path / "file", seed=1)
    for split in ("train", "valid", "test"):
        assert read_splits(tmp_path / "file")[split].equals(splits[split])


def test_byterec_64_bit_ids_survive(tmp_path: Path):
    src = copy_sample("byterec", tmp_path)
    big = 2**53 + 1  # the first integer a float64 cannot hold
    edit_line(src / "byterec_sample.txt", 1, lambda line: "\t".join([str(big), *line.split("\t")[1:]]))
    prepare_byterec(src, tmp_path / "out")
    uids = pl.concat(list(read_splits(tmp_path / "out").values())).get_column("uid")
    assert uids.dtype == pl.Int64 and big in uids.to_list()


# --------------------------------------------------------------------------- bad input


def _replace_field(sep: str, index: int, value: str) -> Callable[[str], str]:
    def change(line: str) -> str:
        fields = line.split(sep)
        fields[index] = value
        return sep.join(fields)

    return change


AE_TRAIN = "aliexpress_train_sample.csv"
BAD_INPUTS = {
    "ali-ccp truncated header": (
        prepare_ali_ccp, "ali-ccp", "ali_ccp_val_sample.csv", 1, lambda line: line.rsplit(",", 1)[0],
        ["'D853'", "header"],
    ),
    "ali-ccp renamed label": (
        prepare_ali_ccp, "ali-ccp", "ali_ccp_test_sample.csv", 1, lambda line: line.replace("purchase", "buy"),
        ["'purchase'", "'buy'"],
    ),
    "ali-ccp label 2": (
        prepare_ali_ccp, "ali-ccp", "ali_ccp_train_sample.csv", 5, _replace_field(",", 1, "2"),
        ["line 5", "'purchase'", "0 or 1"],
    ),
    "ali-ccp letter in an ID": (
        prepare_ali_ccp, "ali-ccp", "ali_ccp_train_sample.csv", 4, _replace_field(",", 11, "20x"),
        ["line 4", "'205'", "'20x'", "integer ID"],
    ),
    "aliexpress letter in an ID": (
        prepare_aliexpress, "aliexpress", AE_TRAIN, 6, _replace_field(",", 3, "a"),
        ["line 6", "'categorical_3'", "integer ID"],
    ),
    "aliexpress text in a dense field": (
        prepare_aliexpress, "aliexpress", AE_TRAIN, 7, _replace_field(",", 26, "n/a"),
        ["line 7", "'numerical_10'", "a number"],
    ),
    "aliexpress label 2": (
        prepare_aliexpress, "aliexpress", "aliexpress_test_sample.csv", 3, _replace_field(",", 80, "2"),
        ["line 3", "'click'", "0 or 1"],
    ),
    "aliexpress extra field": (
        prepare_aliexpress, "tiny-mtl", "test.csv", 9, lambda line: line + ",7",
        ["line 9", "83 comma-separated fields", "expected 82"],
    ),
    "aliexpress short row": (
        prepare_aliexpress, "tiny-mtl", "train.csv", 12, lambda line: line.rsplit(",", 1)[0],
        ["line 12", "'conversion'", "empty"],
    ),
    "byterec letter in an ID": (
        prepare_byterec, "byterec", "byterec_sample.txt", 8, _replace_field("\t", 2, "12b4"),
        ["line 8", "'item_id'", "integer ID"],
    ),
    "byterec label 2": (
        prepare_byterec, "byterec", "byterec_sample.txt", 20, _replace_field("\t", 7, "2"),
        ["line 20", "'like'", "0 or 1"],
    ),
    "byterec commas instead of tabs": (
        prepare_byterec, "byterec", "byterec_sample.txt", 1, lambda line: line.replace("\t", ","),
        ["line 1", "1 tab-separated fields", "expected 12"],
    ),
    "byterec missing field": (
        prepare_byterec, "byterec", "byterec_sample.txt", 30, lambda line: line.rsplit("\t", 1)[0],
        ["line 30", "'duration_time'", "empty"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_file_and_column_and_writes_nothing(tmp_path: Path, case: str):
    prepare, folder, name, line, change, needles = BAD_INPUTS[case]
    src = copy_sample(folder, tmp_path)
    edit_line(src / name, line, change)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare(src, out)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(src / name) + ":"), message
    for needle in needles:
        assert needle in message, message
    assert not out.exists()
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    ("prepare", "folder", "missing"),
    [
        (prepare_ali_ccp, "ali-ccp", "ali_ccp_val_sample.csv"),
        (prepare_aliexpress, "tiny-mtl", "test.csv"),
        (prepare_byterec, "byterec", "byterec_sample.txt"),
    ],
)
def test_missing_source_file_is_named(tmp_path: Path, prepare, folder: str, missing: str):
    src = copy_sample(folder, tmp_path)
    (src / missing).unlink()
    with pytest.raises(DataError) as info:
        prepare(src, tmp_path / "out")
    assert str(src) in str(info.value) and missing in str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="no such file or folder"):
        prepare(tmp_path / "nowhere", tmp_path / "out")


def test_a_file_where_a_folder_of_splits_is_expected(tmp_path: Path):
    with pytest.raises(DataError, match="is a file, expected the Ali-CCP folder"):
        prepare_ali_ccp(SAMPLES / "ali-ccp" / "ali_ccp_train_sample.csv", tmp_path / "out")


def test_a_value_after_the_last_column_is_an_error(tmp_path: Path):
    src = copy_sample("ali-ccp", tmp_path)
    path = src / "ali_ccp_test_sample.csv"
    lines = path.read_text().splitlines()
    lines = [line + "," for line in lines]
    lines[3] += "9"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"line 4: value '9' after the last column 'D853'"):
        prepare_ali_ccp(src, tmp_path / "out")


# --------------------------------------------------------------------------- overwrite


def test_overwrite_replaces_only_a_prepared_folder(tmp_path: Path):
    out = tmp_path / "out"
    prepare_byterec(SAMPLES / "byterec", out)
    with pytest.raises(MtrecError, match="already exists"):
        prepare_byterec(SAMPLES / "byterec", out)
    prepare_byterec(SAMPLES / "byterec", out, overwrite=True)
    assert json.loads((out / "dataset.json").read_text())["dataset"] == "byterec"

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(MtrecError, match="refusing"):
        prepare_aliexpress(SAMPLES / "aliexpress", foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
