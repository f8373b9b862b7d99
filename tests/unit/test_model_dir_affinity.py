"""``affinity.json`` is read back checked: a tampered file is one ModelError naming it."""

from __future__ import annotations

import json

import pytest

from mtrec.errors import ModelError
from mtrec.model_dir import AFFINITY, load_affinity
from mtrec.tables import format_affinity

GOOD = {
    "every": 5,
    "measurements": 4,
    "shared": "dense",
    "tasks": ["ctr", "cvr"],
    "gradient_cosine": [[1.0, -0.2], [-0.2, 1.0]],
    "lookahead_affinity": [[1e-5, None], [2e-6, 3e-6]],
}


def test_a_missing_file_is_none_and_a_good_one_reads_back(tmp_path):
    assert load_affinity(tmp_path) is None
    (tmp_path / AFFINITY).write_text(json.dumps(GOOD))
    assert load_affinity(tmp_path) == GOOD


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"tasks": "ctr"}, "'tasks'"),
        ({"gradient_cosine": [[1.0, 0.0]]}, "gradient_cosine: expected a 2 x 2 matrix"),
        ({"lookahead_affinity": [[1.0, "x"], [0.0, 1.0]]}, "lookahead_affinity"),
        ({"gradient_cosine": [[1.0, True], [0.0, 1.0]]}, "gradient_cosine"),
        ({"shared": "all"}, "shared: expected dense, input or none"),
        ({"every": 0}, "every: expected an integer >= 1"),
        ({"every": "5"}, "every: expected an integer"),
        ({"measurements": -1}, "measurements: expected an integer >= 0"),
        ({"measurements": None}, "measurements"),
    ],
)
def test_a_tampered_file_is_one_model_error_naming_it(tmp_path, change, needle):
    (tmp_path / AFFINITY).write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(ModelError, match="affinity.json") as err:
        load_affinity(tmp_path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_text_form_of_a_checked_file_names_its_settings(tmp_path):
    (tmp_path / AFFINITY).write_text(json.dumps(GOOD))
    text = format_affinity(load_affinity(tmp_path))
    assert text.startswith("task affinity over 4 measurement(s), every 5 steps, on the shared dense parameters")
    assert "n/a" in text  # the null lookahead entry


def test_invalid_json_is_one_model_error(tmp_path):
    (tmp_path / AFFINITY).write_text("{not json")
    with pytest.raises(ModelError, match="invalid JSON"):
        load_affinity(tmp_path)
