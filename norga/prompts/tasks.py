"""Model-level helpers across a patched model's prompts: tasks, SMoPE's losses and counts, the end of a task."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from .._checks import check_bool, check_int, check_model
from .pool import POOL_NAME, PrefixPool, TaskSpec
from .smope import SMoPE

__all__ = [
    "Phase",
    "count_usage",
    "end_task",
    "model_prompt",
    "prefix_pools",
    "set_dense",
    "set_task",
    "smope_layers",
    "smope_losses",
    "training_phases",
    "use_task",
]


def prefix_pools(model: nn.Module) -> list[PrefixPool]:
    """Every [`PrefixPool`][norga.prompts.PrefixPool] in `model` (through DDP / `torch.compile` wrappers too)."""
    check_model("prefix_pools", model)
    return [m for m in model.modules() if isinstance(m, PrefixPool)]


def model_prompt(model: nn.Module) -> nn.Module | None:
    """The model-level prompt module `patch_vit` registered on `model` (`model.prompt_pool`), or `None`."""
    found = getattr(model, POOL_NAME, None)
    return found if isinstance(found, PrefixPool) else None


def set_task(model: nn.Module, task: TaskSpec) -> None:
    """Set the active task of every [`PrefixPool`][norga.prompts.PrefixPool] in `model`.

    Args:
        model: A patched model, or a DDP / `torch.compile` wrapper of one.
        task: An `int` (the whole batch uses that task, e.g. while training task `t`) or a
            `LongTensor` of shape `(B,)` giving each sample its own task (inference after task-id
            prediction).

    Every pool checks the ids before any pool changes, so a call that raises changes nothing.

    Raises:
        TypeError: `model` is not an `nn.Module`, or `task` is neither an int nor an integer tensor.
        ValueError: the model has no prefix pool, or a task id is out of range for one of its pools.
    """
    pools = prefix_pools(check_model("set_task", model))
    if not pools:
        raise ValueError(
            "set_task: the model has no norga.PrefixPool; patch it with patch_vit(..., prompt=PrefixPool(...))"
        )
    checked = [pool._checked_task(task) for pool in pools]
    for pool, t in zip(pools, checked):
        pool.task = t


@contextmanager
def use_task(model: nn.Module, task: TaskSpec) -> Iterator[None]:
    """Context manager form of [`set_task`][norga.prompts.set_task] that restores the previous tasks on exit."""
    pools = prefix_pools(check_model("use_task", model))
    previous = [p.task for p in pools]
    set_task(model, task)
    try:
        yield
    finally:
        for p, t in zip(pools, previous):
            p.task = t


def smope_layers(model: nn.Module) -> list[SMoPE]:
    """Every [`SMoPE`][norga.prompts.SMoPE] in `model` (through DDP / `torch.compile` wrappers too), in module order.

    Raises:
        TypeError: `model` is not an `nn.Module`.
    """
    check_model("smope_layers", model)
    return [m for m in model.modules() if isinstance(m, SMoPE)]


def _require(model: nn.Module, what: str) -> list[SMoPE]:
    check_model(what, model)
    layers = smope_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no norga.SMoPE; patch it with patch_vit(..., prompt=smope_factory())")
    return layers


def smope_losses(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """`(router_loss, prototype_loss)` summed over every SMoPE layer of `model`.

    Layers whose last forward was not a sparse training forward (dense warm-up, evaluation) add no router
    loss; if no layer has one it is 0. Weight them as the authors do: router and prototype `mu` 1e-5 and
    1e-5 in their CIFAR-100 script, 1e-5 and 5e-5 for CUB-200, 5e-5 to 1e-4 for ImageNet-R.
    """
    layers = _require(model, "smope_losses")
    router = [m.router_loss() for m in layers if m._last_scores is not None]
    proto = [m.prototype_loss() for m in layers]
    zero = torch.zeros((), device=layers[0].key_snapshot.device)
    return (torch.stack(router).sum() if router else zero), torch.stack(proto).sum()


@contextmanager
def count_usage(model: nn.Module) -> Iterator[None]:
    """Count expert usage as the authors do: an evaluation pass over the task's training data.

    Inside the block the model is in evaluation mode and gradients are off, and every forward adds, per
    SMoPE layer, head and expert, how often the expert is among the top `K` of the raw (noise-free)
    routing scores to `usage`. On exit the modules' training modes are restored. Call
    [`end_task`][norga.prompts.end_task] after it:

    ```python
    with norga.count_usage(model):
        for x, _ in train_loader:      # the task's training data
            model(x)
    norga.end_task(model)              # frequent experts, key snapshot
    ```

    Under DDP pass the unwrapped model (`ddp.module`) and call it: a forward through the wrapper would
    first overwrite every rank's counts with rank 0's (DDP's buffer synchronisation); then
    [`sync_smope_usage`][norga.distributed.sync_smope_usage] sums the ranks' counts.

    Raises:
        ValueError: the model has no SMoPE layer, or it is a `DistributedDataParallel` wrapper.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "count_usage: pass the model inside DistributedDataParallel (ddp.module) and call it in the block; "
            "a forward through the wrapper overwrites every rank's usage counts with rank 0's"
        )
    layers = _require(model, "count_usage")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for m in layers:
        m.counting = True
    try:
        with torch.no_grad():
            yield
    finally:
        for layer in layers:
            layer.counting = False
        for module, training in modes:
            module.training = training


class Phase(NamedTuple):
    """One phase of a task's training: `dense` routing or not, for `epochs` epochs."""

    dense: bool
    epochs: int


def training_phases(task: int, epochs: int) -> list[Phase]:
    """The authors' SMoPE schedule for one task: build a fresh optimizer and schedule for each phase.

    On the first task (`task == 0`) a dense warm-up of `int(epochs / 2)` epochs, then `epochs` sparse
    epochs; on later tasks `epochs` sparse epochs. A phase of 0 epochs is left out:

    ```python
    for phase in norga.prompts.training_phases(task, epochs):
        norga.set_dense(model, phase.dense)
        optimizer = torch.optim.Adam(params, lr=lr)  # fresh for each phase, as the authors reset it
        for epoch in range(phase.epochs):
            ...
    ```

    Raises:
        TypeError: `task` or `epochs` is not an int.
        ValueError: `task < 0` or `epochs < 1`.
    """
    check_int("task", task, 0)
    check_int("epochs", epochs, 1)
    phases = [Phase(True, epochs // 2)] if task == 0 else []
    return [p for p in [*phases, Phase(False, epochs)] if p.epochs > 0]


def end_task(model: nn.Module) -> None:
    """Close the current task for every norga prompt module of `model`.

    - every [`SMoPE`][norga.prompts.SMoPE]: [`SMoPE.end_task`][norga.prompts.SMoPE.end_task] (frequent experts,
      key snapshot; run [`count_usage`][norga.prompts.count_usage] over the task's data first);
    - every [`PrefixPool`][norga.prompts.PrefixPool]: [`PrefixPool.end_task`][norga.prompts.PrefixPool.end_task]
      (the prompt momentum's write-back for the active task; nothing without momentum).

    Everything is checked before anything changes.

    Raises:
        TypeError: `model` is not an `nn.Module`.
        ValueError: the model has neither an SMoPE layer nor a prefix pool, or a pool with momentum has
            per-sample task ids set.
    """
    check_model("end_task", model)
    layers = smope_layers(model)
    pools = prefix_pools(model)
    if not layers and not pools:
        raise ValueError(
            "end_task: the model has no norga.SMoPE layer and no norga.PrefixPool; patch it with "
            "patch_vit(..., prompt=smope_factory()) or patch_vit(..., prompt=PrefixPool(...))"
        )
    for pool in pools:
        pool._end_task_index(None)
    for m in layers:
        m.end_task()
    for pool in pools:
        pool.end_task()


def set_dense(model: nn.Module, dense: bool = True) -> None:
    """Switch every SMoPE layer of `model` to dense routing (all experts; warm-up) or back to top-K.

    Raises:
        TypeError: `dense` is not a bool.
        ValueError: the model has no SMoPE layer.
    """
    check_bool("set_dense: dense", dense)
    for m in _require(model, "set_dense"):
        m.dense = dense
