"""Unit tests for the correlated two-task generator (mtrec.data.correlation)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mtrec.data.correlation import correlated_task_world, generate_correlated_tasks, write_correlated_tasks

ROWS = 20_000


def _pearson(df: pl.DataFrame) -> float:
    return float(np.corrcoef(df["y1"].to_numpy(), df["y2"].to_numpy())[0, 1])


def test_columns_and_types() -> None:
    df = generate_correlated_tasks(50, 0.5, seed=3)
    assert df.columns == [f"x_{j:03d}" for j in range(100)] + ["y1", "y2"]
    assert set(df.dtypes) == {pl.Float32}
    assert df.height == 50
    assert generate_correlated_tasks(7, 0.5, dim=12).columns[-3:] == ["x_011", "y1", "y2"]


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    a = generate_correlated_tasks(500, 0.7, seed=5)
    b = generate_correlated_tasks(500, 0.7, seed=5)
    assert a.equals(b)
    assert not a.equals(generate_correlated_tasks(500, 0.7, seed=6))


def test_sample_seed_draws_new_rows_from_the_same_world() -> None:
    world = correlated_task_world(0.5, seed=1)
    train = generate_correlated_tasks(2_000, 0.5, seed=1, noise_std=0.0)
    test = generate_correlated_tasks(2_000, 0.5, seed=1, sample_seed=99, noise_std=0.0)
    assert not np.array_equal(train["x_000"].to_numpy(), test["x_000"].to_numpy())
    for df in (train, test):
        x = df.select(pl.selectors.starts_with("x_")).to_numpy().astype(np.float64)
        y1, y2 = world.labels(x)
        np.testing.assert_allclose(df["y1"].to_numpy(), y1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(df["y2"].to_numpy(), y2, rtol=1e-5, atol=1e-5)


def test_world_depends_on_seed_only_through_the_mix() -> None:
    low, high = correlated_task_world(0.2, seed=4), correlated_task_world(0.9, seed=4)
    # Same seed: task 1 and the sinusoids are shared, only w2 moves.
    np.testing.assert_array_equal(low.w1, high.w1)
    np.testing.assert_array_equal(low.alphas, high.alphas)
    np.testing.assert_array_equal(low.betas, high.betas)
    assert not np.allclose(low.w2, high.w2)
    assert not np.allclose(correlated_task_world(0.2, seed=5).w1, low.w1)


@pytest.mark.parametrize("p", [-1.0, -0.3, 0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_weight_cosine_equals_requested_correlation(p: float, scale: float) -> None:
    world = correlated_task_world(p, seed=2, dim=30, num_sinusoids=4, scale=scale)
    cosine = world.w1 @ world.w2 / (np.linalg.norm(world.w1) * np.linalg.norm(world.w2))
    assert cosine == pytest.approx(p, abs=1e-12)
    assert np.linalg.norm(world.w1) == pytest.approx(scale)
    assert np.linalg.norm(world.w2) == pytest.approx(scale)
    assert world.alphas.shape == world.betas.shape == (4,)


def test_harmonic_sinusoids_are_fixed_and_share_the_directions() -> None:
    normal = correlated_task_world(0.5, seed=7, num_sinusoids=4)
    harmonic = correlated_task_world(0.5, seed=7, num_sinusoids=4, sinusoids="harmonic")
    np.testing.assert_array_equal(harmonic.alphas, [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(harmonic.betas, [0.0, 1.0, 4.0, 9.0])
    # The sinusoids do not depend on the seed, the directions do not depend on the sinusoids.
    np.testing.assert_array_equal(
        correlated_task_world(0.5, seed=8, num_sinusoids=4, sinusoids="harmonic").alphas, harmonic.alphas
    )
    np.testing.assert_array_equal(normal.w1, harmonic.w1)
    np.testing.assert_array_equal(normal.w2, harmonic.w2)
    df = generate_correlated_tasks(100, 0.5, seed=7, num_sinusoids=4, sinusoids="harmonic", noise_std=0.0)
    x = df.select(pl.selectors.starts_with("x_")).to_numpy().astype(np.float64)
    np.testing.assert_allclose(df["y1"].to_numpy(), harmonic.labels(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sinusoids", ["normal", "harmonic"])
def test_label_correlation_rises_with_the_weight_correlation(sinusoids: str) -> None:
    # One seed shares x, u1, u2 and the sinusoids across correlations: only p changes.
    corr = [_pearson(generate_correlated_tasks(ROWS, p, seed=0, sinusoids=sinusoids)) for p in (0.0, 0.5, 0.9, 1.0)]
    assert corr == sorted(corr)
    assert corr[-1] - corr[0] > 0.5
    assert abs(corr[0]) < 0.05  # orthogonal weights, independent Gaussian projections


def test_perfect_correlation_with_tiny_noise_gives_the_same_label() -> None:
    df = generate_correlated_tasks(ROWS, 1.0, seed=0, noise_std=1e-4)
    y1, y2 = df["y1"].to_numpy(), df["y2"].to_numpy()
    assert np.max(np.abs(y1 - y2)) < 2e-3
    assert _pearson(df) > 0.99999
    # Not a constant: the labels carry signal.
    assert y1.std() > 0.5


def test_noise_std_sets_the_gap_between_the_labels_at_correlation_one() -> None:
    df = generate_correlated_tasks(ROWS, 1.0, seed=0, noise_std=0.3)
    gap = df["y1"].to_numpy() - df["y2"].to_numpy()
    # y1 - y2 is the difference of two independent N(0, 0.3^2) noises.
    assert gap.std() == pytest.approx(0.3 * np.sqrt(2), rel=0.03)


def test_write_round_trip(tmp_path) -> None:
    path = write_correlated_tasks(tmp_path / "tasks.parquet", 300, 0.4, seed=8, dim=10)
    assert pl.read_parquet(path).equals(generate_correlated_tasks(300, 0.4, seed=8, dim=10))
    assert [p.name for p in tmp_path.iterdir()] == ["tasks.parquet"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rows": 0}, "rows must be an integer >= 1"),
        ({"rows": 2.5}, "rows must be an integer >= 1"),
        ({"correlation": 1.01}, r"correlation must be a number in \[-1, 1\]"),
        ({"correlation": -1.5}, r"correlation must be a number in \[-1, 1\]"),
        ({"correlation": float("nan")}, r"correlation must be a number in \[-1, 1\]"),
        ({"correlation": True}, r"correlation must be a number in \[-1, 1\]"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"sample_seed": -2}, "sample_seed must be None or a non-negative integer"),
        ({"dim": 1}, "dim must be an integer >= 2"),
        ({"num_sinusoids": -1}, "num_sinusoids must be an integer >= 0"),
        ({"scale": 0.0}, "scale must be a positive finite number"),
        ({"noise_std": -0.1}, "noise_std must be a finite number >= 0"),
        ({"sinusoids": "uniform"}, "sinusoids must be 'normal' or 'harmonic'"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, message: str) -> None:
    args = {"rows": 10, "correlation": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_correlated_tasks(args.pop("rows"), args.pop("correlation"), **args)
