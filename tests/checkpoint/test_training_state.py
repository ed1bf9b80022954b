"""Resuming training exactly: norga.training_state / load_training_state beside the optimizer's state.

Each test trains a tiny model as docs/howto/training.md does, interrupts it at one kind of point (mid-task, at a
task end, in SMoPE's dense warm-up and sparse phase, with prompt momentum, with gates frozen after the first
task), saves with torch.save, restores into a *fresh* model (other random prompts) with torch.load(weights_only=
True), finishes the run, and checks that every tensor norga trains equals the uninterrupted run's bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F

import norga
from norga.checkpoint import load_training_state, prompt_state_dict, training_state

TASKS, STEPS, CLASSES = 3, 3, 6


def _backbone() -> torch.nn.Module:
    torch.manual_seed(0)  # the same backbone for every run
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=3,
        embed_dim=64,
        num_heads=4,
        num_classes=CLASSES,
    )


def _batch(task: int, step: int, phase: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * task + 100 * phase + step)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(2 * task, 2 * task + 2, (4,), generator=g)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _save(tmp_path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, where: Any) -> Path:
    path = tmp_path / "resume.pt"
    ckpt = {"norga": training_state(model), "where": list(where)}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    torch.save(ckpt, path)
    return path


# ------------------------------------------------------------------------------------ prefix pool, NoRGa gates
def _pool_model(seed: int) -> torch.nn.Module:
    model = _backbone()
    torch.manual_seed(seed)  # prompts, gates and head differ between seeds
    pool = norga.PrefixPool(TASKS, 2, 4, 64, momentum=0.1)
    norga.patch_vit(model, gate=norga.NoRGaGate("sigmoid"), prompt=pool, layers=[0, 1])
    torch.nn.init.normal_(model.head.weight)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("prompt_pool.", "head.")) or ".prefix_gate." in name
    return model


def _train_pool(
    model: torch.nn.Module, tmp_path: Path, start=(0, 0), stop=None, resume: Path | None = None, recipe: str = "new"
):
    """The recipe of docs/howto/training.md from `(task, step)` `start`; returns the checkpoint path at `stop`.

    `recipe="old"`: the recipe before it cleared the gradients at a task start and clipped only the optimised
    parameters.
    """
    pool = model.prompt_pool
    ckpt = torch.load(resume, weights_only=True) if resume is not None else None
    if ckpt is not None:
        load_training_state(model, ckpt["norga"])
    model.train()
    for task in range(start[0], TASKS):
        first = start[1] if task == start[0] else 0
        if first == 0:  # the task starts here
            if task > 0:
                pool.copy_task_(task - 1, task)
                norga.gates.freeze_gates(model)
            pool.train_only(task)
            norga.set_task(model, task)
            if recipe == "new":
                model.zero_grad(set_to_none=True)  # no gradient left from the last task
        params = _trainable(model)
        optimizer = torch.optim.Adam(params, lr=0.05, weight_decay=0.01)
        if first > 0 and ckpt is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        pool.protect(optimizer)
        for step in range(first, STEPS):
            if stop == (task, step):
                return _save(tmp_path, model, optimizer, stop)
            x, y = _batch(task, step)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params if recipe == "new" else model.parameters(), 1.0)
            optimizer.step()
        norga.end_task(model)
        if stop == (task, STEPS):  # at the task end
            return _save(tmp_path, model, None, stop)
    return None


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in prompt_state_dict(model, include_head=True).items()}


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def pool_reference() -> dict[str, torch.Tensor]:
    model = _pool_model(1)
    _train_pool(model, Path("."))
    return _state(model)


@pytest.mark.parametrize(
    "stop",
    [(0, 1), (0, STEPS), (1, 0), (1, 2), (2, 1)],
    ids=["mid-first-task", "first-task-end", "second-task-start", "mid-second-task-gates-frozen", "mid-last-task"],
)
def test_pool_resumes_bitwise(tmp_path: Path, pool_reference: dict[str, torch.Tensor], stop) -> None:
    first = _pool_model(1)
    path = _train_pool(first, tmp_path, stop=stop)
    resumed = _pool_model(2)  # other random prompts, gates and head: everything must come from the checkpoint
    start = (stop[0] + 1, 0) if stop[1] == STEPS else stop
    _train_pool(resumed, tmp_path, start=start, resume=path)
    _assert_bitwise(_state(resumed), pool_reference)
    assert resumed.prompt_pool.frozen_before == TASKS - 1
    assert not resumed.blocks[0].attn.prefix_gate.alpha.requires_grad  # frozen after the first task


def test_the_old_recipe_leaves_stale_gradients(tmp_path: Path) -> None:
    """The old recipe keeps the frozen gates' .grad of task 0 into task 1, where clipping model.parameters()
    counts it in the uninterrupted run and not in a resumed one (a fresh model has no .grad): the two runs clip by
    different norms (here by a rounding error, which some torch releases round away; in general by any amount).
    The reason the recipe clears the gradients at a task start (and what makes the tests above meaningful)."""

    def gates(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for name, p in model.named_parameters() if ".prefix_gate." in name]

    old, new = _pool_model(1), _pool_model(1)
    _train_pool(old, tmp_path, stop=(1, 2), recipe="old")
    _train_pool(new, tmp_path, stop=(1, 2))
    assert gates(old) and not any(p.requires_grad for p in gates(old) + gates(new))  # frozen after task 0
    assert all(p.grad is not None and bool(p.grad.any()) for p in gates(old))  # task 0's, counted by the clip
    assert all(p.grad is None for p in gates(new))  # cleared at the task start: nothing a resumed run lacks


# ------------------------------------------------------------------------------------------------------ SMoPE
def _smope_model(seed: int) -> torch.nn.Module:
    model = _backbone()
    torch.manual_seed(seed)
    norga.patch_vit(model, prompt=norga.smope_factory(num_experts=6, top_k=2, noise_eps=0.4), layers=[0, 1])
    for name, p in model.named_parameters():
        p.requires_grad = ".prompt." in name or name.startswith("head.")
    return model


EPOCHS = 2  # the first task: one dense warm-up epoch, then two sparse epochs (one step each here)


def _train_smope(model: torch.nn.Module, tmp_path: Path, start=(0, 0, 0), stop=None, resume: Path | None = None):
    """The SMoPE recipe of docs/howto/training.md from `(task, phase, step)` `start`."""
    ckpt = torch.load(resume, weights_only=True) if resume is not None else None
    if ckpt is not None:
        load_training_state(model, ckpt["norga"])
    params = _trainable(model)
    model.train()
    for task in range(start[0], TASKS):
        phases = norga.prompts.training_phases(task, EPOCHS)
        for i, phase in enumerate(phases):
            if (task, i) < tuple(start[:2]):
                continue
            first = start[2] if (task, i) == tuple(start[:2]) else 0
            if first == 0:
                norga.set_dense(model, phase.dense)
            optimizer = torch.optim.Adam(params, lr=0.05)
            if first > 0 and ckpt is not None:
                optimizer.load_state_dict(ckpt["optimizer"])
            for step in range(first, phase.epochs * 2):
                if stop == (task, i, step):
                    return _save(tmp_path, model, optimizer, stop)
                x, y = _batch(task, step, i)
                logits = model(x)
                router, proto = norga.smope_losses(model)
                loss = F.cross_entropy(logits, y) + 1e-2 * router + 1e-2 * proto
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        norga.set_dense(model, False)
        with norga.count_usage(model):
            for step in range(2):
                model(_batch(task, step)[0])
        norga.end_task(model)
        model.train()
    return None


@pytest.fixture(scope="module")
def smope_reference() -> dict[str, torch.Tensor]:
    model = _smope_model(1)
    _train_smope(model, Path("."))
    return _state(model)


@pytest.mark.parametrize(
    "stop",
    [(0, 0, 1), (0, 1, 1), (1, 0, 2), (2, 0, 1)],
    ids=["dense-warm-up", "first-task-sparse", "second-task-prototype-loss", "last-task"],
)
def test_smope_resumes_bitwise(tmp_path: Path, smope_reference: dict[str, torch.Tensor], stop) -> None:
    first = _smope_model(1)
    path = _train_smope(first, tmp_path, stop=stop)
    resumed = _smope_model(2)
    _train_smope(resumed, tmp_path, start=stop, resume=path)
    _assert_bitwise(_state(resumed), smope_reference)


# ------------------------------------------------------------------------------------------- what is restored
def test_per_sample_tasks_phase_and_flags_are_restored() -> None:
    model = _pool_model(1)
    pool = model.prompt_pool
    pool.train_only(2)
    norga.set_task(model, torch.tensor([2, 0, 1]))
    norga.gates.freeze_gates(model)
    state = training_state(model)
    fresh = _pool_model(3)
    load_training_state(fresh, state)
    assert torch.equal(fresh.prompt_pool.task, torch.tensor([2, 0, 1]))
    assert fresh.prompt_pool.frozen_before == 2
    assert torch.equal(fresh.prompt_pool.frozen_values, pool.frozen_values)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".prefix_gate." in n)
    smope = _smope_model(1)
    norga.set_dense(smope, True)
    other = _smope_model(2)
    load_training_state(other, training_state(smope))  # the phase differs from the fresh model's: restored
    assert all(m.dense for m in norga.prompts.smope_layers(other))


def _snapshot(model: torch.nn.Module) -> tuple[Any, ...]:
    pool = model.prompt_pool
    return (
        _state(model),
        pool.task if isinstance(pool.task, int) else pool.task.clone(),
        pool.frozen_before,
        pool.frozen_values.clone(),
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_same(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    _assert_bitwise(a[0], b[0])
    assert a[1] == b[1] and a[2] == b[2] and torch.equal(a[3], b[3]) and a[4] == b[4]


@pytest.mark.parametrize(
    "case, edit, exc, fragment",
    [
        ("not a dict", lambda s: [1], TypeError, "state must be the dict norga.training_state returned"),
        ("another format", lambda s: {**s, "format": "x"}, ValueError, "not a norga training state"),
        (
            "a damaged pool state",
            lambda s: {**s, "modules": {"prompt_pool": {**s["modules"]["prompt_pool"], "frozen_before": 9}}},
            ValueError,
            r"the training state of prompt_pool \(PrefixPool\): frozen_before must be in \[0, 4\)",
        ),
        (
            "a snapshot of another shape",
            lambda s: {
                **s,
                "modules": {
                    "prompt_pool": {**s["modules"]["prompt_pool"], "frozen_values": torch.zeros(2, 2, 2, 4, 64)}
                },
            },
            ValueError,
            r"frozen_values must be a floating-point tensor of shape \(1, 2, 2, 4, 64\)",
        ),
        (
            "a tensor of another shape",
            lambda s: {**s, "tensors": {**s["tensors"], "head.bias": torch.zeros(1)}},
            ValueError,
            r"head.bias: stored as float32 \(1,\), but the metadata gives float32 \(6,\)",
        ),
        (
            "a missing tensor",
            lambda s: {**s, "tensors": {k: v for k, v in s["tensors"].items() if k != "head.weight"}},
            ValueError,
            "head.weight: listed in the metadata but the file holds no such tensor",
        ),
        (
            "another momentum",
            lambda s: {**s, "metadata": {**s["metadata"], "pool": {**s["metadata"]["pool"], "momentum": 0.0}}},
            ValueError,
            "prompt pool: momentum 0.0 in the file, 0.1 in this model",
        ),
    ],
    ids=lambda c: c if isinstance(c, str) and " " in c else "",
)
def test_a_state_that_does_not_fit_changes_nothing(case, edit, exc, fragment) -> None:
    source = _pool_model(1)
    source.prompt_pool.train_only(1)
    state = edit(training_state(source))
    model = _pool_model(2)
    norga.set_task(model, 2)
    before = _snapshot(model)
    with pytest.raises(exc, match=fragment):
        load_training_state(model, state)
    _assert_same(_snapshot(model), before)


def test_training_state_loads_with_weights_only(tmp_path: Path) -> None:
    model = _pool_model(1)
    norga.set_task(model, torch.tensor([1, 0]))
    torch.save(training_state(model), tmp_path / "s.pt")
    load_training_state(_pool_model(2), torch.load(tmp_path / "s.pt", weights_only=True))


# ------------------------------------------------------------------------- CODA-Prompt across a task start
def _coda_model(seed: int) -> torch.nn.Module:
    model = _backbone()
    torch.manual_seed(seed)
    norga.patch_vit(
        model, prompt=norga.prompts.CODAPrompt(TASKS, 64, pool_size=6, length=4, ortho_mu=0.1, layers=(0, 1))
    )
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("prompt_pool.", "head."))
    return model


def _train_coda(model, tmp_path: Path, start=(0, 0), stop=None, resume: Path | None = None):
    """The authors' loop: a task start draws the task's components (set_task), a fresh optimizer per task; the
    checkpoint also keeps the random generator (the next task's components are drawn from it)."""
    ckpt = torch.load(resume, weights_only=True) if resume is not None else None
    if ckpt is not None:
        load_training_state(model, ckpt["norga"])
        torch.random.set_rng_state(ckpt["rng"])
    model.train()
    for task in range(start[0], TASKS):
        first = start[1] if task == start[0] else 0
        if first == 0:
            norga.set_task(model, task)
        optimizer = torch.optim.Adam(_trainable(model), lr=0.05)
        if first > 0 and ckpt is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        for step in range(first, STEPS):
            if stop == (task, step):
                path = tmp_path / "resume.pt"
                torch.save(
                    {
                        "norga": training_state(model),
                        "optimizer": optimizer.state_dict(),
                        "rng": torch.random.get_rng_state(),
                    },
                    path,
                )
                return path
            x, y = _batch(task, step)
            loss = F.cross_entropy(model(x), y) + norga.prompt_losses(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return None


@pytest.mark.parametrize("stop", [(1, 0), (1, 2)], ids=["second-task-start", "mid-second-task"])
def test_coda_resumes_bitwise(tmp_path: Path, stop) -> None:
    straight = _coda_model(1)
    _train_coda(straight, tmp_path)
    first = _coda_model(1)
    path = _train_coda(first, tmp_path, stop=stop)
    resumed = _coda_model(2)
    _train_coda(resumed, tmp_path, start=stop, resume=path)
    _assert_bitwise(_state(resumed), _state(straight))
    assert resumed.prompt_pool.started == TASKS
