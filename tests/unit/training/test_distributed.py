"""mtrec.training.distributed in real process groups: 2 CPU processes on gloo (and torchrun for failures)."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtrec.batch import Batch
from mtrec.errors import ConfigError, DataError, MtrecError
from mtrec.models import create_model
from mtrec.schema import InputLayout, Task
from mtrec.training.distributed import (
    SINGLE_PROCESS,
    DistContext,
    all_reduce_array,
    all_reduce_grads,
    all_reduce_scalar,
    check_loss_weighting,
    check_same,
    fail_fast,
    gather_rows,
    global_mean_scale,
    init_distributed,
    shard_bounds,
    shutdown,
    sync_sparse_grads,
    unwrap_model,
    wrap_model,
)
from mtrec.training.losses import multitask_loss, task_losses
from mtrec.training.optim import LazyAdam

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2
LAYOUT = InputLayout(
    table_sizes=(50, 30, 7, 20),
    sparse_tables=(0, 1, 2),
    sequence_tables=(1, 3),
    sequence_max_len=(5, 3),
    sequence_pooling=("mean", "sum"),
    num_dense=4,
)
TASK_NAMES = ("ctr", "cvr", "sat")
TASKS = (Task("ctr", label="ctr"), Task("cvr", label="cvr", where="ctr == 1"), Task("sat", label="sat"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, fn, args: tuple, timeout_s: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)  # the CI machine may have 2 cores for both ranks
    ctx, device = init_distributed("cpu", timeout_s=timeout_s)
    try:
        fn(ctx, *args)
    finally:
        shutdown(ctx)


def _spawn(fn, *args, timeout_s: float = 30.0, deadline_s: float = 90.0) -> None:
    """Runs ``fn(ctx, *args)`` in 2 fresh processes of one gloo group; re-raises their failure."""
    procs = mp.start_processes(
        _entry, args=(_free_port(), fn, args, timeout_s), nprocs=WORLD, join=False, start_method="spawn"
    )
    end = time.monotonic() + deadline_s
    while not procs.join(timeout=1.0):
        if time.monotonic() > end:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {deadline_s}s (a collective hangs)")


# --------------------------------------------------------------------------- collectives


def _rows(rank: int, n: int, dtype: str, trailing: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(rank * 100 + n)
    if dtype == "bool":
        return rng.random((n, *trailing)) < 0.5
    if dtype == "int64":
        # Above 2**53: any detour through float64 would change them.
        return rng.integers(2**60, 2**62, (n, *trailing), dtype=np.int64)
    return rng.standard_normal((n, *trailing)).astype(dtype)


GATHER_CASES = [("float32", (3,)), ("int64", ()), ("bool", ()), ("float64", (2, 2)), ("int8", (4,))]
COUNTS = (5, 0)  # rank 1 holds no row at all


def _collectives(ctx: DistContext) -> None:
    for dtype, trailing in GATHER_CASES:
        got = gather_rows(_rows(ctx.rank, COUNTS[ctx.rank], dtype, trailing), ctx)
        expected = np.concatenate([_rows(r, COUNTS[r], dtype, trailing) for r in range(WORLD)])
        assert got.dtype == expected.dtype and got.shape == expected.shape, (dtype, got.shape)
        assert np.array_equal(got, expected), dtype
        # Both ranks non-empty, the other rank first in size.
        got = gather_rows(_rows(ctx.rank, 2 + 3 * ctx.rank, dtype, trailing), ctx)
        assert np.array_equal(got, np.concatenate([_rows(r, 2 + 3 * r, dtype, trailing) for r in range(WORLD)]))

    # shard_bounds + gather_rows rebuild the rows in their original order.
    values = np.arange(11, dtype=np.float32) * 1.5
    start, stop = shard_bounds(len(values), ctx)
    assert np.array_equal(gather_rows(values[start:stop], ctx), values)

    # Different dtypes on different ranks: the same clear error on both ranks, no hang.
    with pytest.raises(MtrecError, match=r"rank 0: float32 .*rank 1: float64"):
        gather_rows(np.zeros(3, dtype=np.float32 if ctx.rank == 0 else np.float64), ctx)

    assert all_reduce_scalar(ctx.rank + 1.0, ctx) == 3.0
    assert all_reduce_scalar(ctx.rank + 1.0, ctx, op="max") == 2.0
    assert all_reduce_scalar(ctx.rank + 1.0, ctx, op="min") == 1.0
    assert np.array_equal(all_reduce_array([ctx.rank, 10.0], ctx, op="mean"), [0.5, 10.0])

    # Rows of each task's sample space: 4+4, none anywhere, 2+6.
    scale = global_mean_scale(torch.tensor([4, 0, 2 + 4 * ctx.rank]), ctx)
    assert scale.tolist() == ([1.0, 0.0, 0.5] if ctx.rank == 0 else [1.0, 0.0, 1.5])

    check_same({"steps": 10, "model": "mmoe"}, ctx, "steps per epoch")
    with pytest.raises(MtrecError, match=r"ranks disagree on steps per epoch: rank 0: 10; rank 1: 11"):
        check_same(10 + ctx.rank, ctx, "steps per epoch")

    # Dense gradients outside DDP (the uncertainty weighting's log-variances) are averaged;
    # a parameter without a gradient anywhere keeps None.
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), ctx.rank + 1.0)
    c.grad = torch.ones(3) if ctx.rank == 0 else None  # missing on rank 1: counts as 0
    all_reduce_grads([a, b, c], ctx)
    assert torch.equal(a.grad, torch.full((3,), 1.5))
    assert b.grad is None
    assert torch.equal(c.grad, torch.full((3,), 0.5))


@pytest.mark.slow  # 2 fresh processes importing torch: 4-11 s
def test_collectives_gather_reduce_and_agree():
    _spawn(_collectives)


# --------------------------------------------------------------------------- training


def _batch(seed: int, rank: int, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, s, (n,), generator=g) for s in (50, 30, 7)], dim=1)
    seqs = (torch.randint(0, 30, (n, 5), generator=g), torch.randint(0, 20, (n, 3), generator=g))
    lengths = torch.stack([torch.randint(0, 6, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)], dim=1)
    labels = torch.randint(0, 2, (n, 3), generator=g).float()
    mask = torch.ones(n, 3, dtype=torch.bool)
    # CVR's sample space: 4 of rank 0's rows, 3 of rank 1's, so the mean over the global batch
    # is not the mean of the per-rank means (global_mean_scale corrects for it).
    mask[:, 1] = torch.arange(n) % (2 + rank) == 0
    return Batch(sparse, torch.randn(n, 4, generator=g), seqs, lengths, labels, mask)


def _concat(a: Batch, b: Batch) -> Batch:
    return Batch(
        torch.cat([a.sparse, b.sparse]),
        torch.cat([a.dense, b.dense]),
        tuple(torch.cat([x, y]) for x, y in zip(a.sequences, b.sequences, strict=True)),
        torch.cat([a.seq_lengths, b.seq_lengths]),
        torch.cat([a.labels, b.labels]),
        torch.cat([a.label_mask, b.label_mask]),
    )


def _optimizers(model) -> list[torch.optim.Optimizer]:
    table = model.embedding_tables()[0]
    lazy = LazyAdam([table], lr=0.01) if not model.embedding_parameters() else None
    return [torch.optim.Adam(model.dense_parameters(), lr=0.01), lazy or torch.optim.SparseAdam([table], lr=0.01)]


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _same_on_all_ranks(t: torch.Tensor, ctx: DistContext) -> bool:
    both = gather_rows(t.numpy().reshape(1, -1), ctx)
    return bool(np.array_equal(both[0], both[1]))


def _start_identical(ctx: DistContext) -> None:
    torch.manual_seed(100 + ctx.rank)  # a different initialisation on every rank
    model = create_model("mmoe", LAYOUT, TASK_NAMES, embedding_dim=4)
    emb = model.features.embedding.weight
    assert not _same_on_all_ranks(emb.detach().clone(), ctx)
    wrapped = wrap_model(model, ctx, torch.device("cpu"))
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    assert unwrap_model(wrapped) is model
    # The table DDP ignores is broadcast too, not only the dense weights DDP broadcasts.
    assert _same_on_all_ranks(emb.detach(), ctx)
    assert _same_on_all_ranks(_flat(model), ctx)
    torch.manual_seed(100)
    rank0 = create_model("mmoe", LAYOUT, TASK_NAMES, embedding_dim=4)
    assert torch.equal(_flat(model), _flat(rank0)), "rank 0's initialisation wins"


@pytest.mark.slow  # 2 fresh processes importing torch: 4-11 s
def test_ranks_start_identical_after_wrap():
    _spawn(_start_identical)


def _step_equals_single_process(ctx: DistContext, sparse_table: bool) -> None:
    torch.manual_seed(100 + ctx.rank)
    model = create_model("mmoe", LAYOUT, TASK_NAMES, embedding_dim=4)
    model.use_sparse_embedding_grads(sparse_table)  # dense: DDP owns the table and all-reduces it
    ddp = wrap_model(model, ctx, torch.device("cpu"))
    torch.manual_seed(100)  # rank 0's initialisation, which wrap_model gave every rank
    ref = create_model("mmoe", LAYOUT, TASK_NAMES, embedding_dim=4)
    ref.use_sparse_embedding_grads(sparse_table)
    opts, ref_opts = _optimizers(model), _optimizers(ref)
    for step in range(3):
        shards = [_batch(seed=10 * step + r, rank=r) for r in range(WORLD)]
        for opt in opts + ref_opts:
            opt.zero_grad(set_to_none=True)
        batch = shards[ctx.rank]
        parts = task_losses(ddp(batch), batch.labels, batch.label_mask, TASKS)
        scale = global_mean_scale(batch.label_mask.sum(dim=0), ctx)
        sum(task.weight * scale[j] * parts[task.name] for j, task in enumerate(TASKS)).backward()
        sync_sparse_grads(model.embedding_parameters(), ctx)
        whole = _concat(*shards)
        ref_loss, _ = multitask_loss(ref(whole), whole.labels, whole.label_mask, TASKS)
        ref_loss.backward()

        emb_grad = model.features.embedding.weight.grad
        ref_emb_grad = ref.features.embedding.weight.grad
        if sparse_table:
            assert emb_grad.is_sparse and emb_grad.is_coalesced()
            emb_grad, ref_emb_grad = emb_grad.to_dense(), ref_emb_grad.coalesce().to_dense()
        else:
            assert not emb_grad.is_sparse
        torch.testing.assert_close(emb_grad, ref_emb_grad, rtol=1e-5, atol=1e-7)
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            if not p.grad.is_sparse:
                torch.testing.assert_close(
                    p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name, s=step: f"step {s}: {n}: {m}"
                )
        for opt in opts + ref_opts:
            opt.step()

    # Identical bit for bit on both ranks (same averaged gradients, same optimiser state)...
    assert _same_on_all_ranks(_flat(model), ctx)
    # ...and what one process gets from the concatenated batches. The gradients above agree to
    # ~1e-9; Adam divides by sqrt(v), so where a gradient is itself ~1e-9 that rounding moves a
    # weight by up to ~3e-6 over these steps (lr 1e-2: a missing or wrong sync moves it ~1e-2).
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # Rows no batch touched never moved (both optimisers update only the averaged rows).
    torch.manual_seed(100)
    initial = create_model("mmoe", LAYOUT, TASK_NAMES, embedding_dim=4).features.embedding.weight.detach()
    still = (model.features.embedding.weight.detach() == initial).all(dim=1)
    assert 0 < int(still.sum()) < still.numel()


@pytest.mark.slow  # 2 fresh processes importing torch: 4-11 s
@pytest.mark.parametrize("sparse_table", [True, False], ids=["sparse-table", "dense-table"])
def test_step_on_two_ranks_equals_one_process_on_the_whole_batch(sparse_table: bool):
    _spawn(_step_equals_single_process, sparse_table)


# --------------------------------------------------------------------------- failures


def _hang_on_rank_1(ctx: DistContext) -> None:
    with fail_fast(ctx):
        all_reduce_scalar(1.0, ctx)
        if ctx.rank == 1:
            time.sleep(60)  # alive but stuck: only the process-group timeout can end rank 0's wait
        all_reduce_scalar(1.0, ctx)


@pytest.mark.slow  # 2 fresh processes importing torch: 4-11 s
def test_a_stuck_rank_ends_the_others_at_the_timeout(capfd):
    t0 = time.monotonic()
    with pytest.raises(mp.ProcessExitedException, match="process 0 terminated with exit code 1"):
        _spawn(_hang_on_rank_1, timeout_s=3.0)
    assert time.monotonic() - t0 < 45
    err = capfd.readouterr().err
    assert "mtrec: error: rank 0: lost contact with the other ranks" in err


def _disagree(ctx: DistContext) -> None:
    with fail_fast(ctx):
        check_same(ctx.rank, ctx, "the vocabulary")


@pytest.mark.slow  # 2 fresh processes importing torch: 4-11 s
def test_an_error_all_ranks_raise_is_printed_once(capfd):
    with pytest.raises(mp.ProcessExitedException, match="exit code 2"):
        _spawn(_disagree)
    err = capfd.readouterr().err
    assert err.count("ranks disagree on the vocabulary") == 1, err
    assert "mtrec: error: rank 0: ranks disagree on the vocabulary: rank 0: 0; rank 1: 1" in err


FAILING_SCRIPT = """
import torch
from mtrec.training.distributed import all_reduce_scalar, fail_fast, init_distributed
from mtrec.errors import DataError

torch.set_num_threads(1)
ctx, device = init_distributed("cpu", timeout_s=300)
with fail_fast(ctx):
    all_reduce_scalar(1.0, ctx)
    if ctx.rank == 1:
        raise DataError("part-1.parquet: column click: expected 0 or 1, got 7")
    all_reduce_scalar(1.0, ctx)  # rank 1 never joins: without fail-fast rank 0 waits 300 s
    print("rank 0 got past the collective", flush=True)
"""


@pytest.mark.slow  # 2 fresh processes importing torch: 4-11 s
def test_torchrun_ends_the_job_when_one_rank_fails(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(textwrap.dedent(FAILING_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f}s: the job waited for the timeout instead of failing fast"
    assert "rank 0 got past the collective" not in proc.stdout
    line = "mtrec: error: rank 1: part-1.parquet: column click: expected 0 or 1, got 7"
    assert line in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split(line)[0], "the rank's own error is one line, no traceback"
    # torchrun's failure summary names rank 1, not rank 0 which only lost contact with it.
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert line in root_cause, root_cause


# --------------------------------------------------------------------------- single process


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx, device = init_distributed("cpu")
    assert ctx == SINGLE_PROCESS and not ctx.enabled and ctx.is_main
    assert device == torch.device("cpu")
    model = torch.nn.Linear(2, 1)
    assert wrap_model(model, ctx, device) is model
    values = np.arange(4).reshape(2, 2)
    assert gather_rows(values, ctx) is values
    assert all_reduce_scalar(2.5, ctx) == 2.5
    check_same(1, ctx, "anything")
    with fail_fast(ctx), pytest.raises(DataError):  # no process group: errors propagate to the CLI
        raise DataError("x")


def test_incomplete_torchrun_environment_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        init_distributed("cpu")
    monkeypatch.delenv("RANK")
    with pytest.raises(ConfigError, match="RANK is not set"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="cpu or cuda"):
        init_distributed("meta")


def test_shard_bounds_cover_every_row_once():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            bounds = [shard_bounds(n, DistContext(rank=r, world_size=world, backend="gloo")) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_gradient_based_weightings_are_refused_under_ddp():
    ddp = DistContext(rank=0, world_size=2, backend="gloo")
    for name in ("gradnorm", "pcgrad", "famo", "mgda", "cagrad", "nash_mtl", "aligned_mtl", "db_mtl"):
        with pytest.raises(ConfigError, match=f"loss_weighting: {name} is not supported with 2 processes"):
            check_loss_weighting(name, ddp)
        check_loss_weighting(name, SINGLE_PROCESS)
    for name in ("fixed", "uncertainty", "dwa", "rlw"):
        check_loss_weighting(name, ddp)
