"""Prompts: modules that deliver a prefix to a patched attention layer.

A patched layer calls ``layer.prompt(q)`` (``q``: its queries ``(B, H, N, D)``) and attends over the
prefix it returns. Two prompts ship here:

* :class:`PrefixPrompt`: one learnable prefix for one layer, shared by every sample.
* :class:`PrefixPool`: per-task prefixes for several layers, one tensor of shape
  ``(tasks, layers, 2, length, dim)`` (the NoRGa / HiDe-Prompt E-prompt). Each layer reads its slice
  through a :class:`PoolPrompt`. Which task's prefix each sample gets is set with :func:`set_task`
  (one task for the whole batch, or one task id per sample) and is gathered per sample, so a sample's
  output never depends on the rest of its batch.

Task ids are model state, not forward arguments, because timm blocks call ``attn(x)`` with nothing else.
Set them before the forward (also before calling a ``torch.compile``-d or DDP-wrapped model; both find
the pool through ``.modules()``)::

    norga.set_task(model, 3)                  # training task 3: every sample uses prompt 3
    norga.set_task(model, task_ids)           # inference: LongTensor (B,), one task per sample
    with norga.use_task(model, task_ids):     # the same, restored afterwards
        logits = model(x)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Union

import torch
from torch import nn

from ._validation import fail, refuse_torchscript
from .functional import Prefix, prefix_heads

__all__ = ["PrefixPrompt", "PrefixPool", "PoolPrompt", "set_task", "use_task", "prefix_pools", "TaskSpec"]

TaskSpec = Union[int, torch.Tensor]


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class PrefixPrompt(nn.Module):
    """One learnable prefix ``(key, value)`` of shape ``(length, dim)``, shared by the batch.

    Args:
        length: Number of prompt experts ``L``.
        dim: Width ``num_heads * head_dim`` of the layer.
        init: ``"uniform"`` draws U(-1, 1) as the NoRGa authors do; ``"zeros"`` starts at zero.
    """

    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, length: int, dim: int, init: str = "uniform") -> None:
        super().__init__()
        _positive("length", length)
        _positive("dim", dim)
        self.prompt = nn.Parameter(torch.empty(2, length, dim))
        _init_(self.prompt, init)

    def forward(self, q: torch.Tensor) -> Prefix:
        """The prefix in head space ``(1, H, L, D)``, heads taken from the queries ``q`` ``(B, H, N, D)``."""
        return Prefix(prefix_heads(self.prompt[0].unsqueeze(0), q), prefix_heads(self.prompt[1].unsqueeze(0), q))

    def extra_repr(self) -> str:
        _, length, dim = self.prompt.shape
        return f"length={length}, dim={dim}"


def _init_(t: torch.Tensor, init: str) -> None:
    with torch.no_grad():
        if init == "uniform":
            t.uniform_(-1.0, 1.0)
        elif init == "zeros":
            t.zero_()
        else:
            raise ValueError(f"init must be 'uniform' or 'zeros', got {init!r}")


class PrefixPool(nn.Module):
    """Per-task prefix prompts for several layers: ``prompts`` of shape ``(T, layers, 2, L, dim)``.

    ``prompts[t, i, 0]`` is the key and ``prompts[t, i, 1]`` the value of task ``t``'s prefix in the
    ``i``-th prompted layer. Initialised U(-1, 1), as the authors do.

    Args:
        num_tasks: ``T``.
        num_layers: Number of prompted layers.
        length: Prefix length ``L`` (5 for CIFAR-100, 20 for ImageNet-R and CUB in NoRGa).
        dim: Layer width ``num_heads * head_dim``.
        init: ``"uniform"`` (U(-1, 1)) or ``"zeros"``.
        momentum: The NoRGa / HiDe-Prompt authors' prompt momentum ``m`` (their default 0.01; 0 turns it
            off). While the pool is in training mode with one task ``t > 0`` active, the prompt used is
            ``(1 - m) * P_t + m * mean(P_0, ..., P_{t-1})``, the mean detached; :meth:`end_task` then
            writes that blend into ``P_t``.

    The active task is ``self.task``: an ``int`` (every sample uses that task) or a ``LongTensor`` of
    shape ``(B,)`` (one task per sample). Set it with :func:`set_task`.
    """

    __prepare_scriptable__ = refuse_torchscript

    task: TaskSpec

    def __init__(
        self, num_tasks: int, num_layers: int, length: int, dim: int, init: str = "uniform", momentum: float = 0.0
    ) -> None:
        super().__init__()
        for name, value in (("num_tasks", num_tasks), ("num_layers", num_layers), ("length", length), ("dim", dim)):
            _positive(name, value)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise TypeError(f"momentum must be a float in [0, 1], got {type(momentum).__name__} ({momentum!r})")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self._shape = (num_tasks, num_layers, 2, length, dim)  # plain ints: also known while torch.fx traces
        self.prompts = nn.Parameter(torch.empty(num_tasks, num_layers, 2, length, dim))
        _init_(self.prompts, init)
        self.task = 0
        #: Tasks ``< frozen_before`` are frozen (see :meth:`freeze_tasks_before`); 0: none.
        self.frozen_before = 0
        # values of the frozen tasks when they were frozen; restored by restore_frozen_()
        self.register_buffer("frozen_values", torch.empty(0, *self.prompts.shape[1:]), persistent=False)

    @property
    def num_tasks(self) -> int:
        return self._shape[0]

    @property
    def num_layers(self) -> int:
        return self._shape[1]

    @property
    def length(self) -> int:
        return self._shape[3]

    @property
    def dim(self) -> int:
        return self._shape[4]

    def set_task(self, task: TaskSpec) -> None:
        """Select one task for the batch (``int``) or one per sample (``LongTensor`` ``(B,)``).

        Raises:
            TypeError: ``task`` is neither an int nor an integer tensor.
            ValueError: a task id is out of range, the tensor is not 1-D, or it holds no values (meta device).
        """
        self.task = self._checked_task(task)

    def _checked_task(self, task: TaskSpec) -> TaskSpec:
        """``task`` validated and, for a tensor, as ``int64`` on the pool's device; nothing is changed."""
        if isinstance(task, bool):
            raise TypeError("task must be an int or an integer tensor, got bool")
        if isinstance(task, int):
            if not 0 <= task < self.num_tasks:
                raise ValueError(f"task must be in [0, {self.num_tasks}), got {task}")
            return task
        if not isinstance(task, torch.Tensor):
            raise TypeError(f"task must be an int or an integer tensor of shape (B,), got {type(task).__name__}")
        if task.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"task ids must be an integer tensor, got dtype {task.dtype}")
        if task.dim() != 1:
            raise ValueError(f"task ids must have shape (B,), got {tuple(task.shape)}")
        if task.device.type == "meta":
            raise ValueError("task ids must be a tensor with values, got one on the meta device")
        if task.numel() and (int(task.min()) < 0 or int(task.max()) >= self.num_tasks):
            raise ValueError(
                f"task ids must be in [0, {self.num_tasks}), got values in [{int(task.min())}, {int(task.max())}]"
            )
        return task.to(device=self.prompts.device, dtype=torch.long)

    def select(self, layer: int, batch: int) -> Prefix:
        """The prefix of the ``layer``-th prompted layer for the active task(s).

        Returns ``(L, dim)`` key/value for a single task, ``(B, L, dim)`` for per-sample task ids.
        Per-sample selection gathers along the task axis: sample ``b`` gets exactly
        ``prompts[task[b], layer]`` (no reshape across the batch).

        Raises:
            ValueError: ``layer`` is not in ``[0, num_layers)``, or the per-sample task ids do not match
                ``batch``.
        """
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        task = self.task
        if isinstance(task, int):
            kv = self.prompts[task, layer]
            if task < self.frozen_before:
                kv = kv.detach()
            elif self.momentum > 0.0 and self.training and task > 0:
                kv = (1.0 - self.momentum) * kv + self.momentum * self.prompts[:task, layer].detach().mean(dim=0)
            return Prefix(kv[0], kv[1])
        if not isinstance(batch, torch.fx.Proxy) and task.shape[0] != batch:
            fail(ValueError(f"{task.shape[0]} task ids were set but the batch has {batch} samples"))
        kv = self.prompts[:, layer].index_select(0, task)  # (B, 2, L, dim)
        if self.frozen_before:
            frozen = (task < self.frozen_before).view(-1, 1, 1, 1)
            kv = torch.where(frozen, kv.detach(), kv)
        return Prefix(kv[:, 0], kv[:, 1])

    def _check_task_index(self, name: str, task: int) -> int:
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"{name} must be an int, got {type(task).__name__} ({task!r})")
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"{name} must be in [0, {self.num_tasks}), got {task}")
        return task

    def copy_task_(self, src: int, dst: int) -> None:
        """Copy task ``src``'s prompts (every layer, key and value) into task ``dst``, in place.

        The NoRGa / HiDe-Prompt authors start task ``t`` from the prompt of task ``t - 1``:
        ``pool.copy_task_(t - 1, t)`` before training task ``t``. Gradients and optimizer state are
        not touched.

        Raises:
            TypeError: ``src`` or ``dst`` is not an int.
            ValueError: ``src`` or ``dst`` is out of range, or ``dst`` is a frozen task.
        """
        self._check_task_index("src", src)
        self._check_task_index("dst", dst)
        if dst < self.frozen_before:
            raise ValueError(f"dst={dst} is frozen (tasks < {self.frozen_before} are); unfreeze it first")
        with torch.no_grad():
            self.prompts[dst].copy_(self.prompts[src])

    def _check_end_task(self, task: int | None) -> int:
        if task is None:
            if not isinstance(self.task, int):
                if self.momentum == 0.0:
                    return -1
                raise ValueError(
                    "PrefixPool.end_task: per-sample task ids are set; set_task(model, t) to the task that was "
                    "trained, or pass the task"
                )
            task = self.task
        self._check_task_index("task", task)
        if self.momentum > 0.0 and 0 < task < self.frozen_before:
            raise ValueError(f"PrefixPool.end_task: task {task} is frozen (tasks < {self.frozen_before} are)")
        return task

    def end_task(self, task: int | None = None) -> None:
        """Close task ``task`` (default: the active task): write the prompt-momentum blend into its prompts.

        With ``momentum = m > 0`` and ``task = t > 0``, in place and without autograd::

            P_t <- (1 - m) * P_t + m * mean(P_0, ..., P_{t-1})

        as the authors do after training task ``t``. Nothing happens for ``t = 0`` or ``m = 0``.
        :func:`norga.end_task` calls it for every pool of a model.

        Raises:
            TypeError: ``task`` is not an int.
            ValueError: ``task`` is out of range or frozen, or ``task`` is None while per-sample task ids
                are set (with momentum).
        """
        t = self._check_end_task(task)
        if self.momentum == 0.0 or t <= 0:
            return
        with torch.no_grad():
            blend = (1.0 - self.momentum) * self.prompts[t] + self.momentum * self.prompts[:t].mean(dim=0)
            self.prompts[t].copy_(blend)

    def freeze_tasks_before(self, task: int) -> None:
        """Freeze the prompts of tasks ``< task`` (``0`` unfreezes every task).

        Two things happen:

        * **Gradient mask.** The forward hands frozen tasks' prefixes out detached, so
          ``prompts.grad`` is exactly zero on their rows. The pool stays one Parameter that every
          forward uses, so DDP needs no ``find_unused_parameters`` and ``torch.compile`` and
          ``copy.deepcopy`` keep the freeze (it is module state, not a tensor hook).
        * **Snapshot.** Their current values are kept (``frozen_values``, not in the
          ``state_dict``) so :meth:`restore_frozen_` can put them back.

        A zero gradient is not enough with every optimizer: Adam/AdamW with weight decay, or any
        optimizer with momentum or Adam moments left over from earlier tasks, still moves rows
        whose gradient is zero. Call :meth:`restore_frozen_` after each ``optimizer.step()``, or
        once with :meth:`protect` ``(optimizer)``, which does it in a step hook.

        Raises:
            TypeError: ``task`` is not an int.
            ValueError: ``task`` is not in ``[0, num_tasks]``.
        """
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"task must be an int, got {type(task).__name__} ({task!r})")
        if not 0 <= task <= self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}], got {task}")
        self.frozen_before = task
        self.frozen_values = self.prompts.detach()[:task].clone()

    def train_only(self, task: int) -> None:
        """Train task ``task``'s prompts with the earlier ones frozen: ``freeze_tasks_before(task)``.

        Later tasks need no freezing while task ``task`` trains: no sample uses them, so their
        gradient is zero (and they are overwritten by :meth:`copy_task_` before their turn).
        """
        self._check_task_index("task", task)
        self.freeze_tasks_before(task)

    def restore_frozen_(self) -> None:
        """Write the snapshot taken by :meth:`freeze_tasks_before` back into the frozen tasks' rows."""
        if self.frozen_before:
            with torch.no_grad():
                self.prompts[: self.frozen_before].copy_(self.frozen_values)

    def protect(self, optimizer: torch.optim.Optimizer) -> Any:
        """Restore the frozen tasks after every ``optimizer.step()`` (weight decay, stale moments).

        Returns:
            The hook handle; ``handle.remove()`` stops it.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.restore_frozen_())

    def layer(self, index: int) -> "PoolPrompt":
        """A prompt module that delivers this pool's prefix for the ``index``-th prompted layer."""
        if not 0 <= index < self.num_layers:
            raise ValueError(f"layer index must be in [0, {self.num_layers}), got {index}")
        return PoolPrompt(self, index)

    def extra_repr(self) -> str:
        frozen = f", frozen_before={self.frozen_before}" if self.frozen_before else ""
        momentum = f", momentum={self.momentum:g}" if self.momentum else ""
        return (
            f"num_tasks={self.num_tasks}, num_layers={self.num_layers}, length={self.length}, dim={self.dim}"
            f"{momentum}{frozen}"
        )


class PoolPrompt(nn.Module):
    """The view of one layer onto a :class:`PrefixPool`.

    It holds the pool without registering it as a submodule (the pool is registered once, on the
    model, by :func:`norga.patch_vit`), so its parameters appear once in ``parameters()`` and
    ``state_dict()``.
    """

    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, pool: PrefixPool, index: int) -> None:
        super().__init__()
        self._pool = (pool,)  # a tuple is not registered by nn.Module
        self.index = index

    @property
    def pool(self) -> PrefixPool:
        return self._pool[0]

    def forward(self, q: torch.Tensor) -> Prefix:
        """The active task's prefix in head space ``(1 or B, H, L, D)`` for queries ``q`` ``(B, H, N, D)``."""
        pool = self._pool[0]
        key, value = pool.select(self.index, q.shape[0])[:2]
        if isinstance(pool.task, int):  # one task: (L, dim), shared by the batch
            key, value = key.unsqueeze(0), value.unsqueeze(0)
        return Prefix(prefix_heads(key, q), prefix_heads(value, q))

    def extra_repr(self) -> str:
        return f"layer={self.index}"


def prefix_pools(model: nn.Module) -> list[PrefixPool]:
    """Every :class:`PrefixPool` in ``model`` (through DDP / ``torch.compile`` wrappers too)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a patched model), got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, PrefixPool)]


def set_task(model: nn.Module, task: TaskSpec) -> None:
    """Set the active task of every :class:`PrefixPool` in ``model``.

    Args:
        model: A patched model, or a DDP / ``torch.compile`` wrapper of one.
        task: An ``int`` (the whole batch uses that task, e.g. while training task ``t``) or a
            ``LongTensor`` of shape ``(B,)`` giving each sample its own task (inference after task-id
            prediction).

    Every pool checks the ids before any pool changes, so a call that raises changes nothing.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``task`` is neither an int nor an integer tensor.
        ValueError: the model has no prefix pool, or a task id is out of range for one of its pools.
    """
    pools = prefix_pools(model)
    if not pools:
        raise ValueError(
            "set_task: the model has no norga.PrefixPool; patch it with patch_vit(..., prompt=PrefixPool(...))"
        )
    checked = [pool._checked_task(task) for pool in pools]
    for pool, t in zip(pools, checked):
        pool.task = t


@contextmanager
def use_task(model: nn.Module, task: TaskSpec) -> Iterator[None]:
    """Context manager form of :func:`set_task` that restores the previous tasks on exit."""
    pools = prefix_pools(model)
    previous = [p.task for p in pools]
    set_task(model, task)
    try:
        yield
    finally:
        for p, t in zip(pools, previous):
            p.task = t
