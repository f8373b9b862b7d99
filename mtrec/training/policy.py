"""Where and how a run computes: the device, the autocast precision, the embedding update."""

from __future__ import annotations

import torch

from mtrec.errors import ConfigError

__all__ = [
    "DENSE_EMBEDDING_MAX_VALUES",
    "native_bf16",
    "resolve_device",
    "resolve_embedding_optimizer",
    "resolve_precision",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but no CUDA device is available")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (fast)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Without AVX512-BF16 or AMX, bf16 matmuls are emulated and slower than fp32.
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training, or ``None`` for plain fp32."""
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


# Largest table (values) that ``embedding_optimizer: auto`` updates densely on a GPU. An
# estimate, not yet measured on a GPU: the dense gradient (a zero fill and the lookup's
# backward) and LazyAdam make ~25 table-sized reads and writes per step; at 2^24 fp32 values
# (64 MiB) that is ~1.7 GB, ~0.5 ms at H100/H200 memory bandwidth, against a sync per step
# (the GPU idles while the host launches the next step's ~350 kernels) for sparse Adam.
DENSE_EMBEDDING_MAX_VALUES = 2**24


def resolve_embedding_optimizer(name: str, device: torch.device, table_values: int, world_size: int = 1) -> str:
    """``sparse`` or ``dense`` for ``train.embedding_optimizer`` (see :class:`mtrec.config.TrainConfig`).

    ``auto`` is ``dense`` for one process on CUDA with a table of at most
    :data:`DENSE_EMBEDDING_MAX_VALUES` values. Under DDP it stays ``sparse``: a dense table
    would be all-reduced whole every step, where ``sync_sparse_grads`` moves only the rows
    the ranks touched.
    """
    if name != "auto":
        return name
    dense = device.type == "cuda" and world_size == 1 and table_values <= DENSE_EMBEDDING_MAX_VALUES
    return "dense" if dense else "sparse"
