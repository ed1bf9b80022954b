"""Model-level helpers across a patched model's prompts: tasks, SMoPE's losses and counts, the end of a task."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from .._checks import check_bool, check_int, check_model
from .pool import POOL_NAME, PrefixPool, TaskSpec
from .query import QueryPrompt
from .smope import SMoPE

__all__ = [
    "Phase",
    "compute_query",
    "count_usage",
    "end_task",
    "model_prompt",
    "prefix_pools",
    "prompt_losses",
    "query_prompts",
    "set_dense",
    "set_task",
    "smope_layers",
    "smope_losses",
    "training_phases",
    "use_query",
    "use_task",
]


def prefix_pools(model: nn.Module) -> list[PrefixPool]:
    """Every [`PrefixPool`][norga.prompts.PrefixPool] in `model` (through DDP / `torch.compile` wrappers too)."""
    check_model("prefix_pools", model)
    return [m for m in model.modules() if isinstance(m, PrefixPool)]


def query_prompts(model: nn.Module) -> list[QueryPrompt]:
    """Every [`QueryPrompt`][norga.prompts.QueryPrompt] (L2P, DualPrompt, CODA-Prompt, VQ-Prompt) in `model`."""
    check_model("query_prompts", model)
    return [m for m in model.modules() if isinstance(m, QueryPrompt)]


def model_prompt(model: nn.Module) -> nn.Module | None:
    """The model-level prompt module `patch_vit` registered on `model` (`model.prompt_pool`), or `None`."""
    found = getattr(model, POOL_NAME, None)
    return found if isinstance(found, (PrefixPool, QueryPrompt)) else None


def set_task(model: nn.Module, task: TaskSpec) -> None:
    """Set the active task of every [`PrefixPool`][norga.prompts.PrefixPool] and
    [`QueryPrompt`][norga.prompts.QueryPrompt] in `model`.

    Args:
        model: A patched model, or a DDP / `torch.compile` wrapper of one.
        task: An `int` (the whole batch uses that task, e.g. while training task `t`) or, for a pool, a
            `LongTensor` of shape `(B,)` giving each sample its own task (inference after task-id
            prediction). A `QueryPrompt` takes an int: DualPrompt trains the task's E-prompt, CODA-Prompt uses the
            components up to the task's and draws a new task's components the first time it becomes active.

    Every module checks the ids before any module changes, so a call that raises changes nothing.

    Raises:
        TypeError: `model` is not an `nn.Module`, or `task` is neither an int nor an integer tensor (an int for a
            `QueryPrompt`).
        ValueError: the model has no pool or query prompt, or a task id is out of range for one of them.
    """
    pools = prefix_pools(check_model("set_task", model))
    queried = query_prompts(model)
    if not pools and not queried:
        raise ValueError(
            "set_task: the model has no norga.PrefixPool or QueryPrompt; patch it with "
            "patch_vit(..., prompt=PrefixPool(...)) or a prompt method such as norga.prompts.DualPrompt(...)"
        )
    checked = [pool._checked_task(task) for pool in pools]
    for q in queried:
        q.check_task(task)
    for pool, t in zip(pools, checked):
        pool.task = t
    for q in queried:
        q.set_task(task)  # type: ignore[arg-type]


@contextmanager
def use_task(model: nn.Module, task: TaskSpec) -> Iterator[None]:
    """Context manager form of [`set_task`][norga.prompts.set_task] that restores the previous tasks on exit."""
    modules: list[PrefixPool | QueryPrompt] = [*prefix_pools(check_model("use_task", model)), *query_prompts(model)]
    previous = [p.task for p in modules]
    set_task(model, task)
    try:
        yield
    finally:
        for p, t in zip(modules, previous):
            p.task = t


@contextmanager
def use_query(model: nn.Module, query: torch.Tensor) -> Iterator[None]:
    """Give the [`QueryPrompt`][norga.prompts.QueryPrompt] of `model` precomputed queries for the forwards inside.

    `model(x)` computes its query itself (a forward of the model without prompts). With a frozen backbone the
    queries of a dataset can be computed once instead, with [`compute_query`][norga.prompts.compute_query], and
    given here; the forward then skips its query pass:

    ```python
    queries = norga.prompts.compute_query(model, x_all)   # once: (N, key_dim)
    with norga.use_query(model, queries[idx]):             # the rows of this batch
        logits = model(x_all[idx])
    ```

    Raises:
        TypeError: `query` is not a floating-point tensor.
        ValueError: the model has no `QueryPrompt`, or `query` is not `(B, key_dim)`.
    """
    queried = query_prompts(check_model("use_query", model))
    if not queried:
        raise ValueError("use_query: the model has no norga QueryPrompt (L2P, DualPrompt, CODAPrompt, VQPrompt)")
    if not isinstance(query, torch.Tensor) or not query.is_floating_point():
        got = f"dtype {query.dtype}" if isinstance(query, torch.Tensor) else type(query).__name__
        raise TypeError(f"use_query: query must be a floating-point tensor (B, key_dim), got {got}")
    for q in queried:
        if query.dim() != 2 or query.shape[1] != q.key_dim:
            raise ValueError(f"use_query: query must have shape (B, {q.key_dim}), got {tuple(query.shape)}")
    previous = [q._given for q in queried]
    for q in queried:
        q._given = query
    try:
        yield
    finally:
        for q, given in zip(queried, previous):
            q._given = given


@torch.no_grad()
def compute_query(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The query a [`QueryPrompt`][norga.prompts.QueryPrompt] model computes for images `x`: its features without
    prompts, `forward_head(forward_features(x), pre_logits=True)` with the prompts off, `(B, key_dim)`.

    Raises:
        ValueError: the model has no `QueryPrompt`.
    """
    queried = query_prompts(check_model("compute_query", model))
    if not queried:
        raise ValueError("compute_query: the model has no norga QueryPrompt")
    owner = queried[0]
    inner: Any = owner._model[0] if owner._model else model
    for q in queried:
        q._querying = True
    try:
        return inner.forward_head(inner.forward_features(x), pre_logits=True)
    finally:
        for q in queried:
            q._querying = False


def prompt_losses(model: nn.Module) -> torch.Tensor:
    """The auxiliary loss of the last training forward of every norga prompt module, as the authors weight it.

    What the authors' `ViTZoo.forward(..., train=True)` returns as `prompt_loss`, to add to the task loss:

    - [`L2P`][norga.prompts.L2P], [`DualPrompt`][norga.prompts.DualPrompt]: the key pull losses, weight 1;
    - [`CODAPrompt`][norga.prompts.CODAPrompt]: `ortho_mu` times the orthogonality penalties;
    - [`VQPrompt`][norga.prompts.VQPrompt]: `vq_coef` and `commit_coef` times the quantisation losses;
    - [`SMoPE`][norga.prompts.SMoPE]: `router_weight * router_loss + prototype_weight * prototype_loss` of each
      layer in training mode ([`smope_losses`][norga.prompts.smope_losses] gives them unweighted).

    0 (a scalar tensor) when the last forward was not a training forward, and for a model whose prompts have no
    auxiliary loss (a `PrefixPool`).

    Raises:
        TypeError: `model` is not an `nn.Module`.
        ValueError: the model has no norga prompt module.
    """
    check_model("prompt_losses", model)
    queried, layers = query_prompts(model), smope_layers(model)
    if not queried and not layers and not prefix_pools(model):
        raise ValueError("prompt_losses: the model has no norga prompt module; patch it with norga.patch_vit")
    terms = [q.prompt_loss() for q in queried]
    for m in layers:
        if not m.training:
            continue
        if m._last_scores is not None:
            terms.append(m.router_weight * m.router_loss())
        terms.append(m.prototype_weight * m.prototype_loss())
    if terms:
        return torch.stack([t.reshape(()) for t in terms]).sum()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros((), device=device)


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
      (the prompt momentum's write-back for the active task; nothing without momentum);
    - every [`QueryPrompt`][norga.prompts.QueryPrompt]: its `end_task` (nothing for the authors' four methods,
      whose task changes happen at `set_task`).

    Everything is checked before anything changes.

    Raises:
        TypeError: `model` is not an `nn.Module`.
        ValueError: the model has no norga prompt module with tasks, or a pool with momentum has per-sample task
            ids set.
    """
    check_model("end_task", model)
    layers = smope_layers(model)
    pools = prefix_pools(model)
    queried = query_prompts(model)
    if not layers and not pools and not queried:
        raise ValueError(
            "end_task: the model has no norga.SMoPE layer, PrefixPool or QueryPrompt; patch it with "
            "patch_vit(..., prompt=smope_factory()), patch_vit(..., prompt=PrefixPool(...)) or a prompt method"
        )
    for pool in pools:
        pool._end_task_index(None)
    for m in layers:
        m.end_task()
    for pool in pools:
        pool.end_task()
    for q in queried:
        q.end_task()


def set_dense(model: nn.Module, dense: bool = True) -> None:
    """Switch every SMoPE layer of `model` to dense routing (all experts; warm-up) or back to top-K.

    Raises:
        TypeError: `dense` is not a bool.
        ValueError: the model has no SMoPE layer.
    """
    check_bool("set_dense: dense", dense)
    for m in _require(model, "set_dense"):
        m.dense = dense
