"""Contract of every registered model, and the masked multi-task loss."""

import numpy as np
import pytest
import torch

from mtrec.batch import Batch
from mtrec.models import create_model, list_models
from mtrec.schema import InputLayout, Task
from mtrec.training.losses import multitask_loss

LAYOUT = InputLayout(
    table_sizes=(50, 30, 7, 20),
    sparse_tables=(0, 1, 2),
    sequence_tables=(1, 3),
    sequence_max_len=(5, 3),
    sequence_pooling=("mean", "sum"),
    num_dense=4,
)
TASKS = ("ctr", "cvr", "sat")


def _batch(n: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, s, (n,), generator=g) for s in (50, 30, 7)], dim=1)
    seqs = (torch.randint(0, 30, (n, 5), generator=g), torch.randint(0, 20, (n, 3), generator=g))
    lengths = torch.stack([torch.randint(0, 6, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)], dim=1)
    labels = torch.randint(0, 2, (n, 3), generator=g).float()
    return Batch(sparse, torch.randn(n, 4, generator=g), seqs, lengths, labels, torch.ones(n, 3, dtype=torch.bool))


# Every model with the shared embedding, and every one that can take them with per-task and
# STEM embeddings (independent, shared_embedding, stem_net and pepnet fix their own).
CONTRACT = [(name, "shared") for name in sorted(list_models())] + [
    (name, mode)
    for name in sorted(list_models())
    if name not in ("independent", "shared_embedding", "stem_net", "pepnet")
    for mode in ("per_task", "stem")
]


@pytest.mark.parametrize(("name", "embedding"), CONTRACT)
def test_model_contract_forward_backward_save_load(name, embedding, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = create_model(name, LAYOUT, TASKS, embedding_dim=4, embedding=embedding)
    batch = _batch()
    logits = model(batch)
    assert list(logits) == list(TASKS)
    assert all(v.shape == (16,) for v in logits.values())
    loss, parts = multitask_loss(logits, batch.labels, batch.label_mask, tuple(Task(t, label=t) for t in TASKS))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
    tables = model.embedding_tables()
    assert len(tables) == (2 if embedding == "stem" or name == "stem_net" else 1)
    assert all(table.grad.is_sparse for table in tables)
    # every expert of every expert group receives gradient
    for mname, module in model.named_modules():
        if hasattr(module, "num_experts") and hasattr(module, "weights"):
            g = module.weights[0].grad.abs().sum(dim=(1, 2))
            assert (g > 0).all(), f"{name}: an expert of {mname} got no gradient"
    # save / load gives identical outputs
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.manual_seed(123)
    clone = create_model(name, LAYOUT, TASKS, embedding_dim=4, embedding=embedding)
    clone.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    model.eval()
    clone.eval()
    with torch.no_grad():
        a, b = model(batch), clone(batch)
    for t in TASKS:
        assert torch.equal(a[t], b[t])


def test_unknown_model_name():
    with pytest.raises(KeyError, match="unknown model"):
        create_model("nope", LAYOUT, TASKS)


def test_sequence_padding_does_not_change_output():
    torch.manual_seed(0)
    model = create_model("mmoe", LAYOUT, TASKS, embedding_dim=4).eval()
    batch = _batch(8)
    changed = Batch(
        batch.sparse,
        batch.dense,
        tuple(s.clone() for s in batch.sequences),
        batch.seq_lengths,
        batch.labels,
        batch.label_mask,
    )
    for s, lengths in zip(changed.sequences, batch.seq_lengths.T, strict=True):
        for row in range(s.shape[0]):
            s[row, int(lengths[row]) :] = 1  # overwrite padding with a real id
    with torch.no_grad():
        a, b = model(batch), model(changed)
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t])


def test_cvr_loss_ignores_unclicked_rows():
    tasks = (Task("ctr", label="click"), Task("cvr", label="conversion", where="click == 1"))
    rng = np.random.default_rng(0)
    n = 64
    click = torch.from_numpy(rng.integers(0, 2, n)).float()
    conv = click * torch.from_numpy(rng.integers(0, 2, n)).float()
    labels = torch.stack([click, conv], 1)
    mask = torch.stack([torch.ones(n, dtype=torch.bool), click.bool()], 1)
    z_ctr = torch.randn(n)
    z_cvr = torch.randn(n, requires_grad=True)
    total, parts = multitask_loss({"ctr": z_ctr, "cvr": z_cvr}, labels, mask, tasks)
    clicked = click.bool()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(z_cvr[clicked], conv[clicked])
    torch.testing.assert_close(parts["cvr"], expected.detach())
    total.backward()
    assert (z_cvr.grad[~clicked] == 0).all()
    assert (z_cvr.grad[clicked] != 0).any()
    # outside the sample space even a non-finite logit leaves the loss finite
    z_bad = z_cvr.detach().clone()
    z_bad[~clicked] = float("nan")
    _, parts = multitask_loss({"ctr": z_ctr, "cvr": z_bad}, labels, mask, tasks)
    assert torch.isfinite(parts["cvr"])


def test_task_weights_and_regression_loss():
    tasks = (Task("a", label="a", weight=2.0), Task("b", label="b", type="regression", weight=0.5))
    labels = torch.tensor([[1.0, 3.0], [0.0, -1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    logits = {"a": torch.zeros(2), "b": torch.tensor([1.0, 1.0])}
    total, parts = multitask_loss(logits, labels, mask, tasks)
    assert parts["b"].item() == pytest.approx((4 + 4) / 2)
    assert total.item() == pytest.approx(2.0 * np.log(2) + 0.5 * 4.0, rel=1e-6)


def test_empty_sample_space_contributes_zero():
    tasks = (Task("cvr", label="c", where="click == 1"),)
    total, parts = multitask_loss(
        {"cvr": torch.randn(4)}, torch.zeros(4, 1), torch.zeros(4, 1, dtype=torch.bool), tasks
    )
    assert total.item() == 0.0
