"""PrefixPool helpers: per-sample gather, batch invariance, copy, freezing of past tasks, gate freezing."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import timm
import torch
import torch.distributed as dist
from tolerance import assert_within, network_tol

import norga

T, LAYERS, L, DIM, HEADS = 4, 2, 3, 32, 2


def _model(gate: str | None = "tanh", num_tasks: int = T) -> tuple[torch.nn.Module, norga.PrefixPool]:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=DIM, depth=3, num_heads=HEADS, num_classes=5
    ).eval()
    pool = norga.PrefixPool(num_tasks=num_tasks, num_layers=LAYERS, length=L, dim=DIM)
    norga.patch_vit(model, gate=gate, prompt=pool, layers=range(LAYERS))
    for p in model.parameters():  # frozen backbone, as in the continual-learning runs
        p.requires_grad_(False)
    pool.prompts.requires_grad_(True)
    return model, pool


def test_select_gathers_each_samples_own_task() -> None:
    pool = norga.PrefixPool(num_tasks=T, num_layers=LAYERS, length=L, dim=DIM)
    tasks = torch.tensor([2, 0, 3, 2, 1])
    pool.set_task(tasks)
    for layer in range(LAYERS):
        key, value = pool.select(layer, batch=5)[:2]
        assert key.shape == value.shape == (5, L, DIM)
        for b, t in enumerate(tasks.tolist()):
            torch.testing.assert_close(key[b], pool.prompts[t, layer, 0], rtol=0, atol=0)
            torch.testing.assert_close(value[b], pool.prompts[t, layer, 1], rtol=0, atol=0)


def test_per_sample_tasks_match_single_task_runs_and_are_batch_invariant() -> None:
    model, _ = _model()
    x = torch.randn(6, 3, 32, 32)
    tasks = torch.tensor([1, 3, 0, 1, 2, 3])
    with torch.no_grad(), norga.use_task(model, tasks):
        mixed = model(x)
    with norga.use_task(model, tasks):  # two float32 evaluations, each within network_tol of the exact logits
        bound = 2 * network_tol(model, x)
    with torch.no_grad():
        for b in range(6):  # each sample alone, with its task set as an int
            norga.set_task(model, int(tasks[b]))
            assert_within(mixed[b : b + 1], model(x[b : b + 1]), bound[b : b + 1])
        perm = torch.randperm(6)
        with norga.use_task(model, tasks[perm]):
            assert_within(model(x[perm]), mixed[perm], bound[perm])
        with norga.use_task(model, tasks[:2]):  # a smaller batch: the same rows
            assert_within(model(x[:2]), mixed[:2], bound[:2])


def test_copy_task() -> None:
    pool = norga.PrefixPool(num_tasks=T, num_layers=LAYERS, length=L, dim=DIM)
    before = pool.prompts.detach().clone()
    pool.copy_task_(1, 2)
    after = pool.prompts.detach()
    torch.testing.assert_close(after[2], before[1], rtol=0, atol=0)
    for t in (0, 1, 3):
        torch.testing.assert_close(after[t], before[t], rtol=0, atol=0)
    assert not torch.equal(before[1], before[2])  # the copy did something
    with pytest.raises(ValueError, match=r"dst must be in \[0, 4\), got 4"):
        pool.copy_task_(0, 4)
    with pytest.raises(TypeError, match="src must be an int"):
        pool.copy_task_(1.0, 2)  # type: ignore[arg-type]
    pool.freeze_tasks_before(2)
    with pytest.raises(ValueError, match="dst=1 is frozen"):
        pool.copy_task_(0, 1)


@pytest.mark.parametrize("per_sample", [False, True])
def test_frozen_tasks_get_exactly_zero_gradient(per_sample: bool) -> None:
    model, pool = _model()
    pool.freeze_tasks_before(2)
    x = torch.randn(4, 3, 32, 32)
    tasks = torch.tensor([0, 2, 1, 3]) if per_sample else 2
    with norga.use_task(model, tasks):
        model(x).square().sum().backward()
    grad = pool.prompts.grad
    assert grad is not None
    assert torch.count_nonzero(grad[:2]) == 0
    assert torch.count_nonzero(grad[2]) > 0
    if per_sample:
        assert torch.count_nonzero(grad[3]) > 0  # not frozen, used by sample 3


def test_gradient_mask_does_not_change_the_forward() -> None:
    model, pool = _model()
    x = torch.randn(3, 3, 32, 32)
    tasks = torch.tensor([0, 1, 3])
    with torch.no_grad(), norga.use_task(model, tasks):
        before = model(x)
        pool.freeze_tasks_before(3)
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def _train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, task: norga.prompts.TaskSpec, steps: int) -> None:
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 5, (4,))
    for _ in range(steps):
        opt.zero_grad()
        with norga.use_task(model, task):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.5),
        lambda p: torch.optim.Adam(p, lr=0.05),
    ],
    ids=["sgd", "adam"],
)
def test_fresh_optimizer_without_decay_leaves_frozen_tasks_unchanged(make_opt) -> None:
    model, pool = _model()
    pool.train_only(2)
    before = pool.prompts.detach().clone()
    _train_steps(model, make_opt([pool.prompts]), torch.tensor([0, 1, 2, 2]), steps=3)
    after = pool.prompts.detach()
    torch.testing.assert_close(after[:2], before[:2], rtol=0, atol=0)
    assert not torch.equal(after[2], before[2])  # task 2 trained


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    ],
    ids=["adam-l2", "adamw"],
)
def test_weight_decay_moves_zero_grad_rows_unless_protected(make_opt) -> None:
    # The documented pitfall: a zero gradient does not stop weight decay.
    model, pool = _model()
    pool.train_only(1)
    before = pool.prompts.detach().clone()
    _train_steps(model, make_opt([pool.prompts]), 1, steps=2)
    assert not torch.equal(pool.prompts.detach()[0], before[0])

    model, pool = _model()
    pool.train_only(1)
    before = pool.prompts.detach().clone()
    opt = make_opt([pool.prompts])
    handle = pool.protect(opt)
    _train_steps(model, opt, 1, steps=3)
    torch.testing.assert_close(pool.prompts.detach()[0], before[0], rtol=0, atol=0)
    assert not torch.equal(pool.prompts.detach()[1], before[1])
    handle.remove()
    _train_steps(model, opt, 1, steps=1)
    assert not torch.equal(pool.prompts.detach()[0], before[0])


def test_stale_adam_moments_from_an_earlier_task_are_handled() -> None:
    # One optimizer across tasks: task 0's Adam moments keep moving task 0 after it is frozen.
    model, pool = _model()
    opt = torch.optim.Adam([pool.prompts], lr=0.05)
    pool.train_only(0)
    _train_steps(model, opt, 0, steps=2)
    pool.copy_task_(0, 1)
    pool.train_only(1)
    frozen0 = pool.prompts.detach()[0].clone()
    _train_steps(model, opt, 1, steps=1)
    assert not torch.equal(pool.prompts.detach()[0], frozen0)  # the pitfall is real
    pool.restore_frozen_()
    torch.testing.assert_close(pool.prompts.detach()[0], frozen0, rtol=0, atol=0)
    pool.protect(opt)
    _train_steps(model, opt, 1, steps=2)
    torch.testing.assert_close(pool.prompts.detach()[0], frozen0, rtol=0, atol=0)


def test_freeze_survives_deepcopy_and_state_dict_is_unchanged() -> None:
    model, pool = _model()
    keys = set(model.state_dict())
    pool.freeze_tasks_before(2)
    assert set(model.state_dict()) == keys  # the mask and snapshot are not checkpoint state
    clone = copy.deepcopy(model)
    cpool = norga.prompts.prefix_pools(clone)[0]
    assert cpool.frozen_before == 2
    with norga.use_task(clone, torch.tensor([0, 2])):
        clone(torch.randn(2, 3, 32, 32)).sum().backward()
    assert torch.count_nonzero(cpool.prompts.grad[:2]) == 0


def test_freeze_argument_checks() -> None:
    pool = norga.PrefixPool(num_tasks=T, num_layers=LAYERS, length=L, dim=DIM)
    with pytest.raises(ValueError, match=r"task must be in \[0, 5\), got 5"):
        pool.freeze_tasks_before(5)
    with pytest.raises(TypeError, match="task must be an int"):
        pool.freeze_tasks_before(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"task must be in \[0, 4\), got 4"):
        pool.train_only(4)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        pool.protect(object())  # type: ignore[arg-type]
    pool.freeze_tasks_before(4)
    pool.freeze_tasks_before(0)  # unfreeze
    assert pool.frozen_before == 0 and pool.frozen_values.shape[0] == 0


def test_freezing_works_under_ddp_without_find_unused_parameters() -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    model, pool = _model()
    pool.train_only(1)
    before = pool.prompts.detach().clone()
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'store')}", rank=0, world_size=1)
        try:
            ddp = torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
            opt = torch.optim.Adam([pool.prompts], lr=0.05, weight_decay=0.01)
            pool.protect(opt)
            norga.set_task(ddp, 1)
            for _ in range(2):  # a second iteration fails if DDP saw an unused parameter
                opt.zero_grad()
                ddp(torch.randn(2, 3, 32, 32)).square().mean().backward()
                assert torch.count_nonzero(pool.prompts.grad[0]) == 0
                opt.step()
        finally:
            dist.destroy_process_group()
    torch.testing.assert_close(pool.prompts.detach()[0], before[0], rtol=0, atol=0)
    assert not torch.equal(pool.prompts.detach()[1], before[1])


def test_freeze_gates() -> None:
    model, pool = _model(gate="sigmoid")
    gates = [m for m in model.modules() if isinstance(m, norga.NoRGaGate)]
    assert len(gates) == LAYERS
    for g in gates:
        g.alpha.requires_grad_(True)
        g.tau.requires_grad_(True)
    assert norga.gates.freeze_gates(model) == LAYERS
    assert all(not g.alpha.requires_grad and not g.tau.requires_grad for g in gates)
    before = [(g.alpha.detach().clone(), g.tau.detach().clone()) for g in gates]
    params = [p for p in model.parameters() if p.requires_grad]
    assert params == [pool.prompts]
    _train_steps(model, torch.optim.Adam(params, lr=0.1), 0, steps=2)
    for g, (a, t) in zip(gates, before):
        assert torch.equal(g.alpha.detach(), a) and torch.equal(g.tau.detach(), t)
    assert norga.gates.freeze_gates(model, frozen=False) == LAYERS
    assert all(g.alpha.requires_grad and g.tau.requires_grad for g in gates)


def test_freeze_gates_needs_a_gate() -> None:
    model, _ = _model(gate=None)
    with pytest.raises(ValueError, match="no NoRGaGate"):
        norga.gates.freeze_gates(model)


# --------------------------------------------------------------------------- prompt momentum (NoRGa / HiDe-Prompt)
def _blend_ref(prompts: torch.Tensor, t: int, layer: int, m: float) -> torch.Tensor:
    """Theirs: (1 - m) * P_t + m * mean(P_0 .. P_{t-1}), in float64 with an explicit sum."""
    p = prompts.detach().double()
    mean = sum(p[j, layer] for j in range(t)) / t
    return (1 - m) * p[t, layer] + m * mean


def test_momentum_blends_the_prompt_in_training_only() -> None:
    pool = norga.PrefixPool(num_tasks=T, num_layers=LAYERS, length=L, dim=DIM, momentum=0.25)
    pool.set_task(2)
    for layer in range(LAYERS):
        key, value = pool.select(layer, batch=3)[:2]
        expected = _blend_ref(pool.prompts, 2, layer, 0.25)
        # float32: one multiply-add and a mean of 2 values per element, |P| <= 1: a few eps
        tol = 8 * torch.finfo(torch.float32).eps
        torch.testing.assert_close(key.double(), expected[0], rtol=0, atol=tol)
        torch.testing.assert_close(value.double(), expected[1], rtol=0, atol=tol)
    # the gradient reaches P_t only, scaled by 1 - m; the mean of the earlier tasks is detached
    key, value = pool.select(0, batch=3)[:2]
    (key.sum() + 2 * value.sum()).backward()
    grad = pool.prompts.grad
    assert grad is not None
    assert torch.equal(grad[:2], torch.zeros_like(grad[:2])) and torch.equal(grad[3], torch.zeros_like(grad[3]))
    torch.testing.assert_close(grad[2, 0, 0], torch.full((L, DIM), 0.75), rtol=0, atol=0)
    torch.testing.assert_close(grad[2, 0, 1], torch.full((L, DIM), 1.5), rtol=0, atol=0)
    assert torch.equal(grad[2, 1], torch.zeros_like(grad[2, 1]))
    # no blend: evaluation mode, task 0, per-sample task ids
    pool.eval()
    assert torch.equal(pool.select(0, 3).key, pool.prompts[2, 0, 0])
    pool.train()
    pool.set_task(0)
    assert torch.equal(pool.select(0, 3).key, pool.prompts[0, 0, 0])
    pool.set_task(torch.tensor([2, 1, 3]))
    assert torch.equal(pool.select(1, 3).key[0], pool.prompts[2, 1, 0])


def test_momentum_in_a_patched_model_changes_training_outputs_only() -> None:
    model, pool = _model()
    plain = copy.deepcopy(model)
    pool.momentum = 0.5
    norga.set_task(model, 1)
    norga.set_task(plain, 1)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    plain.train()
    assert not torch.allclose(model(x), plain(x))
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_end_task_writes_the_blend_back() -> None:
    model, pool = _model()
    pool.momentum = 0.01
    before = pool.prompts.detach().clone()
    norga.set_task(model, 0)
    norga.end_task(model)  # task 0: nothing to blend with
    assert torch.equal(pool.prompts, before)
    norga.set_task(model, 3)
    norga.end_task(model)
    expected = torch.stack([_blend_ref(before, 3, layer, 0.01) for layer in range(LAYERS)])
    tol = 8 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(pool.prompts[3].double(), expected, rtol=0, atol=tol)
    assert torch.equal(pool.prompts[:3], before[:3])
    # what training used for task 3 is what evaluation now uses
    pool.prompts.data.copy_(before)
    pool.train()
    used = pool.select(1, 2).key.detach().clone()
    pool.end_task(3)
    pool.eval()
    torch.testing.assert_close(pool.select(1, 2).key, used, rtol=0, atol=0)
    off = norga.PrefixPool(num_tasks=T, num_layers=LAYERS, length=L, dim=DIM)  # momentum 0: nothing
    snapshot = off.prompts.detach().clone()
    off.set_task(2)
    off.end_task()
    assert torch.equal(off.prompts, snapshot)


def test_end_task_errors_change_nothing() -> None:
    model, pool = _model()
    pool.momentum = 0.01
    before = pool.prompts.detach().clone()
    norga.set_task(model, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="per-sample task ids are set"):
        norga.end_task(model)
    with pytest.raises(ValueError, match=r"task must be in \[0, 4\), got 7"):
        pool.end_task(7)
    with pytest.raises(TypeError, match="task must be an int"):
        pool.end_task(2.0)  # type: ignore[arg-type]
    pool.freeze_tasks_before(3)
    with pytest.raises(ValueError, match="task 2 is frozen"):
        pool.end_task(2)
    assert torch.equal(pool.prompts, before)
    with pytest.raises(ValueError, match="no norga.SMoPE layer, PrefixPool or QueryPrompt"):
        norga.end_task(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "momentum, err", [(-0.1, ValueError), (1.5, ValueError), ("0.01", TypeError), (True, TypeError)]
)
def test_momentum_argument_checks(momentum, err) -> None:
    with pytest.raises(err, match="momentum must"):
        norga.PrefixPool(num_tasks=T, num_layers=LAYERS, length=L, dim=DIM, momentum=momentum)
