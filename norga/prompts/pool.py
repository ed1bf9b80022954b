"""`PrefixPool`: per-task prefix prompts for several layers (the NoRGa / HiDe-Prompt E-prompt).

One tensor `prompts` of shape `(tasks, layers, 2, length, dim)`; each patched layer reads its slice through a
`PoolPrompt`. Which task's prefix each sample gets is model state set with `set_task` (one task for the
batch, or one task id per sample), gathered per sample, so a sample's output never depends on the rest of its
batch.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import nn

from .._checks import check_int, check_real, fail, refuse_torchscript
from ..functional import Prefix, prefix_heads
from .prefix import check_widths, init_prompt_

__all__ = ["POOL_NAME", "PoolPrompt", "PrefixPool", "TaskSpec"]

TaskSpec = Union[int, torch.Tensor]

#: The attribute under which `patch_vit` registers a pool on the model (its state_dict prefix).
POOL_NAME = "prompt_pool"

# the model each pool is attached to (kept out of the pool: a weakref does not pickle)
_OWNERS: weakref.WeakKeyDictionary[PrefixPool, weakref.ref[nn.Module]] = weakref.WeakKeyDictionary()


class PrefixPool(nn.Module):
    """Per-task prefix prompts for several layers: `prompts` of shape `(T, layers, 2, L, dim)`.

    `prompts[t, i, 0]` is the key and `prompts[t, i, 1]` the value of task `t`'s prefix in the `i`-th prompted
    layer, initialised U(-1, 1) as the authors do. Give the pool to [`patch_vit`][norga.patch.patch_vit] as the
    prompt: it registers the pool once on the model (`model.prompt_pool`) and each patched layer reads its slice.

    Args:
        num_tasks: `T`.
        num_layers: Number of prompted layers.
        length: Prefix length `L` (5 for CIFAR-100, 20 for ImageNet-R and CUB in NoRGa).
        dim: Layer width `num_heads * head_dim`.
        init: `"uniform"` (U(-1, 1)) or `"zeros"`.
        momentum: The NoRGa / HiDe-Prompt authors' prompt momentum `m` (their default 0.01; 0 turns it off).
            While the pool is in training mode with one task `t > 0` active, the prompt used is
            `(1 - m) * P_t + m * mean(P_0, ..., P_{t-1})`, the mean detached; `end_task` then writes that blend
            into `P_t`.

    Attributes:
        task: The active task: an `int` (every sample uses that task) or a `LongTensor` `(B,)` (one task per
            sample). Set it with [`set_task`][norga.prompts.set_task].
        frozen_before: Tasks `< frozen_before` are frozen (`freeze_tasks_before`); 0: none.
    """

    __prepare_scriptable__ = refuse_torchscript

    task: TaskSpec

    def __init__(
        self, num_tasks: int, num_layers: int, length: int, dim: int, init: str = "uniform", momentum: float = 0.0
    ) -> None:
        super().__init__()
        for name, value in (("num_tasks", num_tasks), ("num_layers", num_layers), ("length", length), ("dim", dim)):
            check_int(name, value, 1)
        self.momentum = check_real("momentum", momentum, minimum=0.0, maximum=1.0)
        self._shape = (num_tasks, num_layers, 2, length, dim)  # plain ints: also known while torch.fx traces
        self.prompts = nn.Parameter(torch.empty(self._shape))
        init_prompt_(self.prompts, init)
        self.task = 0
        self.frozen_before = 0
        self._slots: dict[int, int] = {}  # model layer index -> slice, set when patch_vit prepares the pool
        # values of the frozen tasks when they were frozen; restored by restore_frozen_()
        self.register_buffer("frozen_values", torch.empty(0, *self._shape[1:]), persistent=False)

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

    # ---------------------------------------------------------------- the prompt factory protocol (patch_vit)
    def prepare(self, model: nn.Module, layers: Sequence[Any]) -> None:
        """Check the pool fits the layers `patch_vit` is about to patch; nothing changes if it raises.

        Raises:
            ValueError: another number of layers or width, a model attribute `prompt_pool` already there, or a
                pool already attached to another model.
        """
        if self.num_layers != len(layers):
            raise ValueError(
                f"the PrefixPool has num_layers={self.num_layers} but {len(layers)} layers are patched "
                f"({[layer.index for layer in layers]})"
            )
        check_widths("PrefixPool", self.dim, layers)
        owner = _OWNERS.get(self)
        if owner is not None and getattr(owner(), POOL_NAME, None) is self:
            raise ValueError(
                "patch_vit: this PrefixPool is already attached to another model (its prompt_pool); one pool "
                "serves one model, or training one would change the other. Give each model its own pool "
                "(copy.deepcopy(pool) copies the prompts), or unpatch_vit the other model first"
            )
        if hasattr(model, POOL_NAME):
            raise ValueError(f"the model already has an attribute {POOL_NAME!r}")
        self._slots = {layer.index: j for j, layer in enumerate(layers)}

    def forward(self, layer_index: int, attn: nn.Module) -> PoolPrompt:
        """The factory call of `patch_vit`: the view of the prepared layer `layer_index` onto this pool."""
        return self.layer(self._slots[layer_index])

    def attach(self, model: nn.Module) -> None:
        """Register the pool on `model` (`model.prompt_pool`), once its layers are patched."""
        self.train(model.training)
        model.add_module(POOL_NAME, self)
        _OWNERS[self] = weakref.ref(model)

    # ---------------------------------------------------------------- tasks
    def set_task(self, task: TaskSpec) -> None:
        """Select one task for the batch (`int`) or one per sample (`LongTensor` `(B,)`).

        Raises:
            TypeError: `task` is neither an int nor an integer tensor.
            ValueError: a task id is out of range, the tensor is not 1-D, or it holds no values (meta device).
        """
        self.task = self._checked_task(task)

    def _checked_task(self, task: TaskSpec) -> TaskSpec:
        """`task` validated and, for a tensor, as `int64` on the pool's device; nothing is changed."""
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

    def _task_index(self, name: str, task: object, high: int | None = None) -> int:
        high = self.num_tasks - 1 if high is None else high
        check_int(name, task, None)
        if not 0 <= int(task) <= high:  # type: ignore[call-overload]
            raise ValueError(f"{name} must be in [0, {high + 1}), got {task}")
        return int(task)  # type: ignore[call-overload]

    def select(self, layer: int, batch: int) -> Prefix:
        """The prefix of the `layer`-th prompted layer for the active task(s).

        `(L, dim)` key and value for one task, `(B, L, dim)` for per-sample task ids: a gather along the task
        axis, so sample `b` gets exactly `prompts[task[b], layer]` (no reshape across the batch).

        Raises:
            ValueError: `layer` is not in `[0, num_layers)`, or the per-sample task ids do not match `batch`.
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
            kv = torch.where((task < self.frozen_before).view(-1, 1, 1, 1), kv.detach(), kv)
        return Prefix(kv[:, 0], kv[:, 1])

    def copy_task_(self, src: int, dst: int) -> None:
        """Copy task `src`'s prompts (every layer, key and value) into task `dst`, in place.

        The NoRGa / HiDe-Prompt authors start task `t` from the prompt of task `t - 1`:
        `pool.copy_task_(t - 1, t)` before training task `t`. Gradients and optimizer state are not touched.

        Raises:
            TypeError: `src` or `dst` is not an int.
            ValueError: `src` or `dst` is out of range, or `dst` is a frozen task.
        """
        self._task_index("src", src)
        self._task_index("dst", dst)
        if dst < self.frozen_before:
            raise ValueError(f"dst={dst} is frozen (tasks < {self.frozen_before} are); unfreeze it first")
        with torch.no_grad():
            self.prompts[dst].copy_(self.prompts[src])

    def _end_task_index(self, task: int | None) -> int:
        """The task `end_task` closes (-1: nothing to do), checked; nothing changes."""
        if task is None:
            if not isinstance(self.task, int):
                if self.momentum == 0.0:
                    return -1
                raise ValueError(
                    "PrefixPool.end_task: per-sample task ids are set; set_task(model, t) to the task that was "
                    "trained, or pass the task"
                )
            task = self.task
        t = self._task_index("task", task)
        if self.momentum > 0.0 and 0 < t < self.frozen_before:
            raise ValueError(f"PrefixPool.end_task: task {t} is frozen (tasks < {self.frozen_before} are)")
        return t

    def end_task(self, task: int | None = None) -> None:
        """Close task `task` (default: the active task): write the prompt-momentum blend into its prompts.

        With `momentum = m > 0` and `task = t > 0`, in place and without autograd,
        `P_t <- (1 - m) * P_t + m * mean(P_0, ..., P_{t-1})`, as the authors do after training task `t`.
        Nothing happens for `t = 0` or `m = 0`. [`end_task`][norga.prompts.end_task] calls it for every pool of
        a model.

        Raises:
            TypeError: `task` is not an int.
            ValueError: `task` is out of range or frozen, or `None` while per-sample task ids are set (with
                momentum).
        """
        t = self._end_task_index(task)
        if self.momentum == 0.0 or t <= 0:
            return
        with torch.no_grad():
            blend = (1.0 - self.momentum) * self.prompts[t] + self.momentum * self.prompts[:t].mean(dim=0)
            self.prompts[t].copy_(blend)

    # ---------------------------------------------------------------- freezing past tasks
    def freeze_tasks_before(self, task: int) -> None:
        """Freeze the prompts of tasks `< task` (`0` unfreezes every task).

        - **Gradient mask.** The forward hands frozen tasks' prefixes out detached, so `prompts.grad` is
          exactly zero on their rows. The pool stays one Parameter that every forward uses, so DDP needs no
          `find_unused_parameters`, and `torch.compile` and `copy.deepcopy` keep the freeze.
        - **Snapshot.** Their current values are kept (`frozen_values`, not in the `state_dict`) so
          `restore_frozen_` can put them back: with weight decay, momentum or Adam moments left from earlier
          tasks, an optimizer still moves rows whose gradient is zero. Call `restore_frozen_` after each
          `optimizer.step()`, or once `protect(optimizer)`, which does it in a step hook.

        Raises:
            TypeError: `task` is not an int.
            ValueError: `task` is not in `[0, num_tasks]`.
        """
        self._task_index("task", task, high=self.num_tasks)
        self.frozen_before = task
        self.snapshot_frozen_()

    def snapshot_frozen_(self) -> None:
        """Take the snapshot of the frozen tasks (`< frozen_before`) again from the current prompts.

        [`load_prompts`][norga.checkpoint.load_prompts] calls it after loading, so that `restore_frozen_` (and a
        `protect` hook) keeps the loaded prompts, whichever of `train_only` and the load came first.
        """
        self.frozen_values = self.prompts.detach()[: self.frozen_before].clone()

    def train_only(self, task: int) -> None:
        """Train task `task`'s prompts with the earlier ones frozen: `freeze_tasks_before(task)`.

        Later tasks need no freezing while task `task` trains: no sample uses them, so their gradient is zero
        (and `copy_task_` overwrites them before their turn).
        """
        self._task_index("task", task)
        self.freeze_tasks_before(task)

    def restore_frozen_(self) -> None:
        """Write the snapshot taken by `freeze_tasks_before` back into the frozen tasks' rows."""
        if self.frozen_before:
            with torch.no_grad():
                self.prompts[: self.frozen_before].copy_(self.frozen_values)

    def protect(self, optimizer: torch.optim.Optimizer) -> Any:
        """Restore the frozen tasks after every `optimizer.step()` (weight decay, stale moments).

        Returns:
            The hook handle; `handle.remove()` stops it.

        Raises:
            TypeError: `optimizer` is not a `torch.optim.Optimizer`.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.restore_frozen_())

    def layer(self, index: int) -> PoolPrompt:
        """A prompt module delivering this pool's prefix for the `index`-th prompted layer.

        Raises:
            ValueError: `index` is not in `[0, num_layers)`.
        """
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_layers:
            raise ValueError(f"layer index must be in [0, {self.num_layers}), got {index!r}")
        return PoolPrompt(self, index)

    # ---------------------------------------------------------------- checkpoints and resuming
    def checkpoint_config(self) -> dict[str, Any]:
        """What [`save_prompts`][norga.checkpoint.save_prompts] records and `load_prompts` compares."""
        t, n, _, length, dim = self._shape
        return {
            "kind": "PrefixPool",
            "num_tasks": t,
            "num_layers": n,
            "length": length,
            "dim": dim,
            "momentum": float(self.momentum),
        }

    def training_state(self) -> dict[str, Any]:
        """The training-state protocol ([`training_state`][norga.checkpoint.training_state]): the active task,
        `frozen_before` and the frozen tasks' snapshot."""
        task = self.task if isinstance(self.task, int) else self.task.detach().to("cpu", copy=True)
        return {
            "task": task,
            "frozen_before": int(self.frozen_before),
            "frozen_values": self.frozen_values.detach().to("cpu", copy=True),
        }

    def check_training_state(self, state: Any) -> None:
        """Raise if `state` (from `training_state`) does not fit this pool; nothing changes.

        Raises:
            TypeError: not a dict of the fields `training_state` gives, or of the wrong types.
            ValueError: a task out of range, or a snapshot of another shape.
        """
        if not isinstance(state, dict) or set(state) != {"task", "frozen_before", "frozen_values"}:
            raise TypeError(f"expected a dict with 'task', 'frozen_before' and 'frozen_values', got {state!r:.200}")
        self._checked_task(state["task"])
        frozen = self._task_index("frozen_before", state["frozen_before"], high=self.num_tasks)
        values = state["frozen_values"]
        want = (frozen, *self._shape[1:])
        if not isinstance(values, torch.Tensor) or not values.is_floating_point() or tuple(values.shape) != want:
            got = f"{values.dtype} {tuple(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"frozen_values must be a floating-point tensor of shape {want}, got {got}")

    def load_training_state(self, state: Any) -> None:
        """Restore what `training_state` returned (checked first)."""
        self.check_training_state(state)
        self.task = self._checked_task(state["task"])
        self.frozen_before = int(state["frozen_before"])
        p = self.prompts
        self.frozen_values = state["frozen_values"].to(device=p.device, dtype=p.dtype, copy=True)

    def extra_repr(self) -> str:
        frozen = f", frozen_before={self.frozen_before}" if self.frozen_before else ""
        momentum = f", momentum={self.momentum:g}" if self.momentum else ""
        return (
            f"num_tasks={self.num_tasks}, num_layers={self.num_layers}, length={self.length}, dim={self.dim}"
            f"{momentum}{frozen}"
        )


class PoolPrompt(nn.Module):
    """The view of one layer onto a [`PrefixPool`][norga.prompts.PrefixPool].

    It holds the pool without registering it as a submodule (the pool is registered once, on the model), so the
    pool's parameters appear once in `parameters()` and `state_dict()`.
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
        """The active task's prefix in head space `(1 or B, H, L, D)` for queries `q` `(B, H, N, D)`."""
        pool = self._pool[0]
        selected = pool.select(self.index, q.shape[0])
        key, value = selected.key, selected.value  # not a slice: Dynamo cannot slice a NamedTuple on torch 2.7
        if isinstance(pool.task, int):  # one task: (L, dim), shared by the batch
            key, value = key.unsqueeze(0), value.unsqueeze(0)
        return Prefix(prefix_heads(key, q), prefix_heads(value, q))

    def detach(self, model: nn.Module) -> None:
        """The prompt protocol's clean-up, called by `unpatch_vit`: drop the pool from `model`."""
        if getattr(model, POOL_NAME, None) is self.pool:
            delattr(model, POOL_NAME)
            _OWNERS.pop(self.pool, None)

    def checkpoint_config(self) -> dict[str, Any]:
        """What [`save_prompts`][norga.checkpoint.save_prompts] records and `load_prompts` compares."""
        return {"kind": "PoolPrompt", "pool_layer": int(self.index)}

    def extra_repr(self) -> str:
        return f"layer={self.index}"
