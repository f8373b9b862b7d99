"""Census-income preparation: labels, inputs, the stratified split, bad files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from mtrec.data.census import CATEGORICAL, FIELDS, NUMERIC, prepare_census_income, read_census_file
from mtrec.errors import DataError, MtrecError

SOURCE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "census-income-kdd"
pytestmark = pytest.mark.skipif(not (SOURCE / "census-income.test.gz").is_file(), reason=f"{SOURCE} not present")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("census") / "census"
    prepare_census_income(SOURCE, out, seed=0)
    return out


@pytest.fixture(scope="module")
def splits(prepared: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(prepared / f"{name}.parquet") for name in ("train", "valid", "test")}


def test_every_source_row_lands_in_exactly_one_split(splits):
    sizes = {k: v.height for k, v in splits.items()}
    assert sum(sizes.values()) == 99_762
    assert sizes["train"] == pytest.approx(0.6 * 99_762, abs=2)
    assert sizes["valid"] == pytest.approx(0.2 * 99_762, abs=2)
    # The rows are the source rows: same multiset of (age, weeks_worked, instance_weight).
    key = ["age", "weeks_worked", "instance_weight", "income", "never_married"]
    joined = pl.concat([v.select(key) for v in splits.values()]).sort(key)
    source = read_census_file(SOURCE / "census-income.test.gz").select(key).sort(key)
    assert joined.equals(source)


def test_split_is_stratified_on_income(splits):
    rates = {k: v["income"].mean() for k, v in splits.items()}
    overall = 6186 / 99_762
    for rate in rates.values():
        assert rate == pytest.approx(overall, abs=2e-4)


def test_labels_match_the_published_rates_and_sources_are_removed(splits):
    frame = pl.concat(list(splits.values()))
    assert frame["income"].sum() == 6186
    assert frame["never_married"].sum() == 43_143  # " Never married" in the raw file
    for label in ("income", "never_married", "college"):
        assert frame[label].dtype == pl.Int8
        assert set(frame[label].unique().to_list()) == {0, 1}
    assert "income_50k" not in frame.columns and "marital_stat" not in frame.columns
    # college is derived from education: every college row has a college-level education
    college = frame.filter(pl.col("college") == 1)["education"].unique().to_list()
    assert "High school graduate" not in college and "Bachelors degree(BA AB BS)" in college
    assert "Children" not in college


def test_types_nulls_and_trimmed_strings(splits):
    frame = splits["train"]
    for name in NUMERIC:
        assert frame[name].dtype == pl.Float32
    for name in ("det_ind_code", "det_occ_code", "year"):
        assert frame[name].dtype == pl.Int64
    assert set(frame["year"].unique().to_list()) == {94, 95}
    # "?" is a missing value, never a category; values carry no leading space
    assert frame["mig_chg_msa"].null_count() > 0
    assert "?" not in frame["country_self"].drop_nulls().to_list()
    assert all(not s.startswith(" ") for s in frame["education"].unique().to_list())
    assert "instance_weight" in frame.columns and "instance_weight" not in CATEGORICAL + NUMERIC


def test_same_seed_same_split_other_seed_other_split(tmp_path, splits):
    again = prepare_census_income(SOURCE, tmp_path / "again", seed=0)
    assert pl.read_parquet(tmp_path / "again" / "test.parquet").equals(splits["test"])
    assert again["seed"] == 0 and again["positive_rate"]["income"] == pytest.approx(0.0620, abs=1e-4)
    prepare_census_income(SOURCE, tmp_path / "other", seed=1)
    assert not pl.read_parquet(tmp_path / "other" / "test.parquet").equals(splits["test"])


def test_manifest_names_the_source_and_protocol(prepared):
    manifest = json.loads((prepared / "dataset.json").read_text())
    assert manifest["source"][0]["md5"] == "a8c39dce642efb4d17f28ebe74a3c271"
    assert manifest["splits"]["test"]["rows"] == pl.read_parquet(prepared / "test.parquet").height
    assert "official test file" in manifest["protocol"]
    assert manifest["not_features"] == ["instance_weight"]


def _write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def _raw_lines(n: int) -> list[str]:
    with gzip.open(SOURCE / "census-income.test.gz", "rt") as fh:
        return [next(fh).rstrip("\n") for _ in range(n)]


def test_bad_income_value_names_file_and_column(tmp_path):
    lines = _raw_lines(50)
    lines[3] = lines[3].rsplit(", ", 1)[0] + ", maybe."
    src = _write_gz(tmp_path / "census-income.test.gz", lines)
    with pytest.raises(DataError, match=r"census-income.test.gz: column 'income_50k' holds 'maybe.'"):
        prepare_census_income(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()


def test_text_in_a_numeric_column_names_file_and_column(tmp_path):
    lines = _raw_lines(50)
    fields = lines[5].split(", ")
    fields[FIELDS.index("weeks_worked")] = "fifty"
    lines[5] = ", ".join(fields)
    src = _write_gz(tmp_path / "census-income.test.gz", lines)
    with pytest.raises(DataError, match=r"column 'weeks_worked' holds 'fifty', expected a number"):
        prepare_census_income(src, tmp_path / "out")


def test_wrong_field_count_and_missing_file(tmp_path):
    src = _write_gz(tmp_path / "census-income.test.gz", [", ".join(["1"] * 10)] * 5)
    with pytest.raises(DataError, match="expected 42 comma-separated fields"):
        prepare_census_income(src, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: expected one of census-income.test.gz"):
        prepare_census_income(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite_and_only_replaces_prepared_folders(tmp_path, prepared):
    with pytest.raises(MtrecError, match="already exists"):
        prepare_census_income(SOURCE, prepared)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(MtrecError, match="refusing to replace it"):
        prepare_census_income(SOURCE, foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    prepare_census_income(SOURCE, prepared, seed=0, overwrite=True)
    assert json.loads((prepared / "dataset.json").read_text())["seed"] == 0
