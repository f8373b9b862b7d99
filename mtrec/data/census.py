"""UCI Census-Income (KDD): the benchmark of the MMoE and PLE papers, as Parquet.

The papers train on the official train file (199,523 rows) and test on the official
test file (99,762 rows). Only the test file is available here, so :func:`prepare_census_income`
splits it 60/20/20 into train/valid/test, stratified on income and seeded. Results on
that split are close to, but not the same protocol as, the published ones.

Labels (written as 0/1 ``Int8`` columns, the source columns they come from removed):

* ``income``: ``income_50k == "50000+."`` (6.2 % positive).
* ``never_married``: ``marital_stat == "Never married"`` (43.2 %).
* ``college``: education of at least some college (the "education" task of the
  papers' group 2). The ``education`` column stays in the data, because it is a
  legitimate input for group 1; group-2 configs must not use it.

``instance_weight`` (a survey sampling weight) is kept as a column but is not a feature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl

from mtrec.data.prepared import file_md5, read_source, write_prepared
from mtrec.errors import DataError

__all__ = ["CATEGORICAL", "FIELDS", "NUMERIC", "prepare_census_income", "read_census_file"]

FIELDS = (
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour", "hs_college",
    "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses", "stock_dividends",
    "tax_filer_stat", "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ",
    "instance_weight", "mig_chg_msa", "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt",
    "num_emp", "fam_under_18", "country_father", "country_mother", "country_self", "citizenship",
    "own_or_self", "vet_question", "vet_benefits", "weeks_worked", "year", "income_50k",
)  # fmt: skip

NUMERIC = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp", "weeks_worked",
)  # fmt: skip
CODED = ("det_ind_code", "det_occ_code", "own_or_self", "vet_benefits", "year")
LABEL_SOURCES = ("income_50k", "marital_stat")
CATEGORICAL = tuple(f for f in FIELDS if f not in NUMERIC and f not in LABEL_SOURCES and f != "instance_weight")

COLLEGE = (
    "Some college but no degree",
    "Associates degree-occup /vocational",
    "Associates degree-academic program",
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
)
FILES = ("census-income.test.gz", "census-income.test", "census-income.data.gz", "census-income.data")
SPLITS = (("train", 0.6), ("valid", 0.2), ("test", 0.2))


def read_census_file(path: Path) -> pl.DataFrame:
    """Reads one raw census-income file (42 fields, ``", "``-separated, ``?`` = missing).

    Returns the typed frame: numeric fields as Float32, coded categories as Int64,
    the rest as trimmed strings with ``?`` turned into null, and the three labels.
    """
    try:
        raw = pl.read_csv(path, has_header=False, infer_schema=False, quote_char=None, new_columns=list(FIELDS))
    except (pl.exceptions.ShapeError, pl.exceptions.SchemaError):
        raise DataError(f"{path}: expected {len(FIELDS)} comma-separated fields per row") from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"{path}: cannot be read as census-income CSV ({str(exc).splitlines()[0]})") from None
    if raw.width != len(FIELDS):
        raise DataError(f"{path}: expected {len(FIELDS)} comma-separated fields per row, found {raw.width}")
    if raw.height == 0:
        raise DataError(f"{path}: no rows")
    text = raw.select(pl.all().str.strip_chars())
    income = text["income_50k"]
    bad = ~income.is_in(["50000+.", "- 50000."])
    if bad.any():
        value = income.filter(bad)[0]
        raise DataError(f"{path}: column 'income_50k' holds {value!r}, expected '50000+.' or '- 50000.'")
    columns: list[pl.Expr] = []
    for name in FIELDS:
        col = pl.col(name).replace("?", None)
        if name in NUMERIC or name == "instance_weight":
            columns.append(col.cast(pl.Float32, strict=False).alias(name))
        elif name in CODED:
            columns.append(col.cast(pl.Int64, strict=False).alias(name))
        elif name not in LABEL_SOURCES:
            columns.append(col.alias(name))
    typed = text.select(columns)
    for name in (*NUMERIC, *CODED, "instance_weight"):
        lost = typed[name].is_null() & text[name].ne("?")
        if lost.any():
            value = text[name].filter(lost)[0]
            raise DataError(f"{path}: column {name!r} holds {value!r}, expected a number")
    labels = text.select(
        pl.col("income_50k").eq("50000+.").cast(pl.Int8).alias("income"),
        pl.col("marital_stat").eq("Never married").cast(pl.Int8).alias("never_married"),
        pl.col("education").is_in(COLLEGE).cast(pl.Int8).alias("college"),
    )
    return pl.concat([typed, labels], how="horizontal")


def _stratified_split(income: np.ndarray, seed: int) -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) per row, 60/20/20 within each income class."""
    rng = np.random.default_rng(seed)
    split = np.empty(income.shape[0], dtype=np.int8)
    bounds = np.cumsum([f for _, f in SPLITS])
    for cls in (0, 1):
        rows = np.flatnonzero(income == cls)
        rows = rows[rng.permutation(rows.shape[0])]
        cuts = np.round(bounds * rows.shape[0]).astype(np.int64)
        start = 0
        for i, stop in enumerate(cuts):
            split[rows[start:stop]] = i
            start = stop
    return split


def prepare_census_income(source: Path, output: Path, *, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Writes ``output/{train,valid,test}.parquet`` from the census-income test file.

    Args:
        source: The ``census-income-kdd`` folder (or the ``census-income.test.gz`` file).
        output: Folder to create.
        seed: Seed of the stratified 60/20/20 split.
        overwrite: Replace a folder written earlier by ``mtrec datasets``.

    Returns:
        The manifest written to ``output/dataset.json``.
    """
    path = read_source(Path(source), FILES)
    frame = read_census_file(path)
    split = _stratified_split(frame["income"].to_numpy(), seed)
    # Rows keep their file order within a split, so a split is reproducible from the seed alone.
    splits = {name: frame.filter(pl.Series(split == i)) for i, (name, _) in enumerate(SPLITS)}
    manifest = {
        "dataset": "census-income",
        "source": [{"file": path.name, "md5": file_md5(path), "rows": frame.height}],
        "seed": seed,
        "protocol": (
            "the official test file split 60/20/20 (train/valid/test), stratified on income, seeded; "
            "the papers train on the official train file and test on the whole test file"
        ),
        "tasks": ["income", "never_married", "college"],
        "features": {"categorical": list(CATEGORICAL), "numeric": list(NUMERIC)},
        "not_features": ["instance_weight"],
        "positive_rate": {t: float(cast(float, frame[t].mean())) for t in ("income", "never_married", "college")},
    }
    return write_prepared(Path(output), splits, manifest, overwrite=overwrite)
