"""Building blocks that work on any tensor: no schemas, no files.

A ranking pipeline can use these directly, for example an MMoE layer over its own
feature encoder's output.
"""

from mtrec.nn.embedding import FusedEmbedding, masked_pool
from mtrec.nn.experts import PLE, AFTBLayer, CGCLayer, ExpertGroup, MMoELayer
from mtrec.nn.gates import DSelectKGate, Gate, GateSpec
from mtrec.nn.mlp import MLP, Tower

__all__ = [
    "AFTBLayer",
    "CGCLayer",
    "DSelectKGate",
    "ExpertGroup",
    "FusedEmbedding",
    "Gate",
    "GateSpec",
    "MLP",
    "MMoELayer",
    "PLE",
    "Tower",
    "masked_pool",
]
