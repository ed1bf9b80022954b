"""Distributed training helpers: SMoPE usage counts across ranks.

Parameters need nothing special: a patched model trains under
`torch.nn.parallel.DistributedDataParallel` without `find_unused_parameters` (the prompt pool is one
parameter, so inactive tasks' prompts get zero gradients rather than none; every patched layer's gate is
used in every forward; SMoPE's unselected experts get zero gradients from the gather). DDP averages the
gradients and every rank ends with the same parameters.

SMoPE's *buffers* are another matter. `usage` counts, per head and expert, how often the expert was among
the noise-free top `K` in the counting passes ([`count_usage`][norga.prompts.count_usage]), and it decides the
"frequent" experts at [`end_task`][norga.prompts.end_task]. Each rank counts only its own shard of the task's data, so
the exact global counts need a reduction: [`sync_smope_usage`][norga.distributed.sync_smope_usage] all-reduces (sums)
the increments since its previous call, so that afterwards every rank holds `usage = previous common counts + sum over
ranks of their own new counts`. Call it once before training (it records the common starting counts and checks that all
ranks agree), and again after every counting pass, before [`end_task`][norga.prompts.end_task] (and before saving):

```python
ddp = DistributedDataParallel(model)
norga.sync_smope_usage(model)          # start: records the counts every rank shares
for x, y in loader:                    # train a task (training steps do not count)
    ...
with norga.count_usage(model):         # the unwrapped model: each rank counts its own shard
    for x, _ in loader:
        model(x)
norga.sync_smope_usage(model)          # every rank now has the global counts
norga.end_task(model)                  # identical "frequent" experts and key snapshots on every rank
```

Run the counting pass on the unwrapped model, as above: a forward through the DDP wrapper would first
overwrite every rank's buffers with rank 0's (DDP's buffer synchronisation), losing the other ranks'
counts. Training forwards through the wrapper are fine: they do not change `usage`. Counts are float32
and exact up to 2**24 per head and expert.

FSDP2 (`torch.distributed.fsdp.fully_shard`) runs on CPU with gloo (tested from torch 2.9) and shards the prompt pool
and SMoPE experts like any parameter, with one exception: it refuses 0-dimensional parameters
(`ValueError: fully_shard doesn't support scalar parameters`), and a learnable
[`NoRGaGate`][norga.gates.NoRGaGate] holds `alpha` and `tau` as scalars. Keep them out of sharding with
`ignored_params=scalar_parameters(model)` and average their gradients yourself after `backward()`
with [`all_reduce_grads`][norga.distributed.all_reduce_grads] (FSDP does not reduce ignored parameters):

```python
gates = norga.distributed.scalar_parameters(model)
for block in model.blocks:
    fully_shard(block, mesh=mesh, ignored_params=set(gates))
fully_shard(model, mesh=mesh, ignored_params=set(gates))
...
loss.backward()
norga.distributed.all_reduce_grads(gates)      # mean over ranks, as DDP would
optimizer.step()
```
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import unwrap_model
from .prompts import smope_layers

__all__ = ["all_reduce_grads", "scalar_parameters", "sync_smope_usage"]

# usage counts every rank agreed on at the previous sync, per SMoPE module (not stored on the module).
_BASELINES: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def sync_smope_usage(model: nn.Module, *, group: dist.ProcessGroup | None = None) -> None:
    """Make every rank's SMoPE `usage` buffers the global counts (sum over ranks).

    The first call for a model records the counts as the common baseline and checks that every rank
    holds the same values; later calls all-reduce `usage - baseline` (SUM), add the result to the
    baseline, write it into every rank's `usage` and make it the new baseline. Collective: every rank
    of `group` must call it.

    Args:
        model: A model with [`SMoPE`][norga.prompts.SMoPE] layers, or a DDP / `torch.compile` wrapper of one.
        group: Process group (default: the world).

    Raises:
        RuntimeError: `torch.distributed` is not initialised.
        ValueError: the model has no SMoPE layer, or at the first call the ranks' counts differ (call it
            once *before* training, when all ranks share the same counts).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sync_smope_usage needs an initialised torch.distributed process group")
    layers = smope_layers(unwrap_model(model))
    if not layers:
        raise ValueError("sync_smope_usage: the model has no norga.SMoPE layer")
    flat = torch.cat([m.usage.detach().reshape(-1) for m in layers]).to(torch.float32)
    bases = [_BASELINES.get(m) for m in layers]
    if any(b is None or b.shape != m.usage.shape for b, m in zip(bases, layers)):
        lo, hi = flat.clone(), flat.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(lo, hi):
            raise ValueError(
                "sync_smope_usage: no baseline recorded for this model and the ranks' usage counts differ "
                f"(largest difference {float((hi - lo).abs().max()):g}). Call sync_smope_usage(model) once before "
                "training, while every rank holds the same counts (e.g. right after building or loading the model)"
            )
        for m in layers:
            _BASELINES[m] = m.usage.detach().clone()
        return
    base = torch.cat([b.reshape(-1) for b in bases if b is not None]).to(device=flat.device, dtype=torch.float32)
    delta = flat - base
    dist.all_reduce(delta, op=dist.ReduceOp.SUM, group=group)
    total = base + delta
    offset = 0
    with torch.no_grad():
        for m in layers:
            n = m.usage.numel()
            m.usage.copy_(total[offset : offset + n].view_as(m.usage))
            _BASELINES[m] = m.usage.detach().clone()
            offset += n


def scalar_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The 0-dimensional parameters of `model` (a learnable NoRGaGate's `alpha` and `tau`), in
    `model.parameters()` order (the same on every rank).

    FSDP2's `fully_shard` refuses scalar parameters; pass `set(...)` of this list as its
    `ignored_params` and reduce their gradients with [`all_reduce_grads`][norga.distributed.all_reduce_grads].
    """
    return [p for p in unwrap_model(model).parameters() if p.dim() == 0]


def all_reduce_grads(params: Sequence[nn.Parameter], *, group: dist.ProcessGroup | None = None) -> None:
    """Average the gradients of `params` over the ranks of `group` (in place), as DDP does.

    Args:
        params: A list or tuple in the same order on every rank (e.g.
            [`scalar_parameters`][norga.distributed.scalar_parameters]); a `set` is refused because its order
            differs between processes.
        group: Process group (default: the world).

    Parameters without a gradient on every rank are skipped.

    Raises:
        RuntimeError: `torch.distributed` is not initialised.
        TypeError: `params` is not a list or tuple.
        ValueError: some ranks have a gradient for a parameter and others do not.
    """
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list or tuple (the same order on every rank), got {type(params).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce_grads needs an initialised torch.distributed process group")
    ordered = list(params)
    has = torch.tensor([p.grad is not None for p in ordered], dtype=torch.int32)
    lo, hi = has.clone(), has.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        raise ValueError("all_reduce_grads: some ranks have gradients for parameters that others do not")
    grads = [p.grad for p in ordered if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
