"""The embedded default: the features and tasks of the synthetic click log.

``configs/synthetic/*.yaml`` spell the same features out for users to edit; a test
keeps the two in agreement.
"""

from __future__ import annotations

from typing import Any

from mtrec.config import Config, config_from_dict

__all__ = ["quickstart_config", "synthetic_features", "synthetic_tasks"]


def synthetic_features(*, num_sparse: int = 20, num_dense: int = 10, history: bool = True) -> dict[str, Any]:
    """The ``features:`` section for a log from :func:`mtrec.data.synthetic.generate_click_log`."""
    sparse: list[dict[str, Any]] = [
        {"name": "user_id", "min_freq": 2},
        {"name": "item_id", "min_freq": 2},
        {"name": "author_id"},
        {"name": "category"},
        {"name": "city"},
        {"name": "device"},
        {"name": "hour"},
        {"name": "position"},
    ]
    sparse += [{"name": f"cat_{i:02d}"} for i in range(8, num_sparse)]
    dense: list[dict[str, Any]] = [
        {"name": "item_price", "transform": "log1p_standardize"},
        {"name": "user_age"},
        {"name": "item_ctr_7d"},
        {"name": "video_duration", "transform": "log1p_standardize"},
    ]
    dense += [{"name": f"num_{i:02d}"} for i in range(4, num_dense)]
    out: dict[str, Any] = {"sparse": sparse, "dense": dense}
    if history:
        out["sequence"] = [{"name": "hist_item_ids", "max_len": 20, "pooling": "mean", "vocab_from": "item_id"}]
    return out


def synthetic_tasks() -> list[dict[str, Any]]:
    """CTR on every impression; CVR and satisfaction on clicked impressions only."""
    return [
        {"name": "ctr", "label": "click", "type": "binary"},
        {"name": "cvr", "label": "conversion", "type": "binary", "where": "click == 1"},
        {"name": "satisfaction", "label": "satisfied", "type": "binary", "where": "click == 1"},
    ]


def benchmark_model() -> dict[str, Any]:
    """The ``model:`` section of the benchmark configuration (README, benchmarks/): MMoE,
    embedding dim 16, 4 experts [256, 128], towers [64]."""
    return {"name": "mmoe", "embedding_dim": 16, "num_experts": 4, "expert_hidden": [256, 128], "tower_hidden": [64]}


def quickstart_config(train_path: str, *, model: str = "mmoe", epochs: int = 2, seed: int = 0) -> Config:
    """A ready-to-train config for a synthetic log at ``train_path``."""
    return config_from_dict(
        {
            "data": {"train": train_path, "valid_fraction": 0.1},
            "features": synthetic_features(),
            "tasks": synthetic_tasks(),
            "model": {"name": model, "embedding_dim": 16},
            "train": {"epochs": epochs, "batch_size": 2048, "lr": 0.001, "seed": seed, "patience": 1},
        }
    )
