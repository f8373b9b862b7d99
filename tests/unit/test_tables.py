"""The metric tables: layout, missing vs undefined cells, GAUC column and notes."""

from mtrec.tables import cell, format_metrics, text_table


def test_cell_formats_integers_floats_and_missing_values():
    assert cell(1234567) == "1,234,567"
    assert cell(0.123456) == "0.1235"
    assert cell(0.5, digits=2) == "0.50"
    assert cell(None) == "n/a"
    assert cell(None, missing="-") == "-"


def test_text_table_aligns_numbers_right_or_everything_left():
    rows = [["name", "value"], ["a", "1.5"], ["longer", "10.25"]]
    assert text_table(rows) == "name    value\n------  -----\na         1.5\nlonger  10.25"
    assert text_table(rows, align="left") == "name    value\n------  -----\na       1.5\nlonger  10.25"
    assert text_table([["x", ""], ["y", ""]], align="left") == "x\n-  \ny"


def test_metrics_table_separates_metrics_a_kind_lacks_from_undefined_ones():
    tasks = {
        "click": {"count": 10, "positives": 0, "auc": None, "logloss": 0.1, "normalized_entropy": None,
                  "pr_auc": None, "calibration": None, "mean_pred": 0.1, "mean_label": 0.0, "note": "one class"},
        "watch": {"count": 12345, "rmse": 1.5, "mean_pred": 2.0, "mean_label": 2.1},
    }  # fmt: skip
    lines = format_metrics(tasks).split("\n")
    assert lines[0].split() == ["task", "rows", "positives", "auc", "logloss", "ne", "pr_auc", "calib", "rmse",
                                "accuracy", "mean_pred", "mean_label"]  # fmt: skip
    assert lines[2].split() == ["click", "10", "0", "n/a", "0.1000", "n/a", "n/a", "n/a", "-", "-", "0.1000", "0.0000"]
    assert lines[3].split() == ["watch", "12,345", "-", "-", "-", "-", "-", "-", "1.5000", "-", "2.0000", "2.1000"]
    assert lines[4:] == ["click: one class"]
    assert len({len(line) for line in lines[:4]}) == 1  # every row padded to the same width


def test_metrics_table_adds_gauc_after_auc_with_group_counts():
    tasks = {
        "click": {"count": 3, "positives": 1, "auc": 0.5, "gauc": {"gauc": float("nan"), "groups_used": 0,
                  "groups_skipped_one_class": 3}},
        "buy": {"count": 2_000_000, "positives": 9, "auc": 0.75, "gauc": {"gauc": 0.61, "groups_used": 1200,
                "groups_skipped_one_class": 30}},
    }  # fmt: skip
    lines = format_metrics(tasks).split("\n")
    assert lines[0].split()[3:5] == ["auc", "gauc"]
    assert lines[2].split()[3:5] == ["0.5000", "-"]  # NaN GAUC: no group had both classes
    assert lines[3].split()[:5] == ["buy", "2,000,000", "9", "0.7500", "0.6100"]
    assert lines[4:] == [
        "click: gauc over 0 groups (3 with one class skipped)",
        "buy: gauc over 1,200 groups (30 with one class skipped)",
    ]
