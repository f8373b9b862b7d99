"""Inference from a model directory: :class:`Ranker` for pipelines, rank formulas, Parquet
scoring and export. Loading builds the network and the preprocessing only (no training objects)."""

from mtrec.inference.rank import check_rank, parse_rank, rank_score
from mtrec.inference.ranker import Ranker, load_model
from mtrec.inference.score import score_parquet

__all__ = ["Ranker", "check_rank", "load_model", "parse_rank", "rank_score", "score_parquet"]
