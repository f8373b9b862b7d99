"""ESMM's CTCVR label must be click AND conversion on every impression.

The label is built as ``ctr label * cvr label`` with the CVR label already 0 outside the
CVR task's ``where``; that equals click AND conversion only when the CVR space is exactly the
click condition (or absent). Any other space is refused with one config error line.
"""

import numpy as np
import pyarrow as pa
import pytest

from mtrec.config import config_from_dict
from mtrec.data.preprocess import Preprocessor
from mtrec.errors import ConfigError, SchemaError
from mtrec.schema import Esmm, Schema, SparseFeature, Task

CLICK = [1, 1, 1, 1, 0, 0]
CONV = [1, 0, 1, 0, 0, 0]
POS = [0, 1, 3, 4, 0, 5]


def _schema(where: str | None) -> Schema:
    return Schema(
        sparse=(SparseFeature("u"),),
        tasks=(Task("ctr", label="click"), Task("cvr", label="conv", where=where)),
        esmm=Esmm(ctr="ctr", cvr="cvr"),
    )


def _raw(where: str | None) -> dict:
    cvr = {"name": "cvr", "label": "conv"} | ({"where": where} if where is not None else {})
    return {
        "data": {"train": "x"},
        "features": {"sparse": [{"name": "u"}]},
        "tasks": [{"name": "ctr", "label": "click"}, cvr],
        "esmm": {"ctr": "ctr", "cvr": "cvr"},
    }


def _ctcvr(where: str | None) -> tuple[list[float], list[bool]]:
    table = pa.table({"u": list(range(len(CLICK))), "click": CLICK, "conv": CONV, "pos": POS})
    enc = Preprocessor.fit(_schema(where), table).transform(table)
    return enc.labels[:, 2].tolist(), enc.label_mask[:, 2].tolist()


@pytest.mark.parametrize("where", ["click == 1", "click == 1.0", "click > 0", "click != 0", "1 == click", None])
def test_ctcvr_label_is_click_times_conversion_on_every_impression(where):
    labels, mask = _ctcvr(where)
    assert labels == (np.array(CLICK) * np.array(CONV)).astype(float).tolist()
    assert all(mask)


@pytest.mark.parametrize("where", ["click == 1 and pos < 2", "pos < 2", "click == 0", "click == 1 or pos < 2"])
def test_a_cvr_space_other_than_the_click_condition_is_refused_in_one_line(where):
    with pytest.raises(ConfigError) as info:
        config_from_dict(_raw(where))
    message = str(info.value)
    assert "\n" not in message
    assert "esmm.cvr" in message and "'cvr'" in message and repr(where) in message
    with pytest.raises(SchemaError, match="esmm.cvr"):
        _schema(where)


def test_the_refused_space_would_have_given_a_wrong_ctcvr_label():
    """Why it is refused: with pos < 2 the old product dropped the conversion at pos 3."""
    where = "click == 1 and pos < 2"
    truth = (np.array(CLICK) * np.array(CONV)).astype(float).tolist()
    try:
        labels, _ = _ctcvr(where)
    except SchemaError:
        return
    assert labels == truth
