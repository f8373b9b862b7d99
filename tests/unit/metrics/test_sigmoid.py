"""The one NumPy sigmoid: exact where it matters, no overflow warning at extreme logits."""

from __future__ import annotations

import warnings

import numpy as np

from mtrec.metrics import sigmoid


def test_sigmoid_is_the_logistic_function_and_keeps_the_dtype():
    z = np.array([-3.0, 0.0, 2.5], dtype=np.float64)
    np.testing.assert_allclose(sigmoid(z), [0.0474258731775668, 0.5, 0.9241418199787566], rtol=1e-15)
    assert sigmoid(z.astype(np.float32)).dtype == np.float32


def test_extreme_logits_saturate_without_a_warning():
    z = np.array([-1000.0, -745.0, 40.0, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = sigmoid(z)
    assert p[0] == 0.0 and 0.0 <= p[1] < 1e-300 and p[2] == 1.0 and p[3] == 1.0
