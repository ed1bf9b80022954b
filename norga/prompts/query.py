"""`QueryPrompt`: the base of the prompt methods that route on a query of the frozen pre-trained model.

L2P++, DualPrompt, CODA-Prompt and VQ-Prompt (the CODA-Prompt lineage, `models/zoo.py` of the authors) compute
each prompted layer's prefix from one per-sample **query**: the feature of the same input through the model
*without* prompts (`ViTZoo.forward`: a forward of the frozen backbone under `no_grad`, its CLS token after the
final norm). A `QueryPrompt` holds every prompted layer's parameters (registered once, as `model.prompt_pool`)
and computes that query itself:

- `patch_vit` registers a forward pre-hook on `model.patch_embed`, the first module timm's `forward_features`
  calls with the image. For each forward the hook runs `model.forward_head(model.forward_features(x),
  pre_logits=True)` with the prompts switched off, under `no_grad` (for a ViT with a CLS token: the normed CLS
  token, the authors' query), and keeps it for the prompted layers of that forward. Being inside the forward,
  the query pass is part of what `torch.compile`, `torch.fx` and `torch.export` trace, and DDP, `deepcopy` and
  pickle see nothing special; timm's forward signature is unchanged.
- [`use_query`][norga.prompts.use_query] gives a precomputed query instead (the fast path when the backbone is
  frozen: queries computed once per dataset).

Every selection is per sample: a sample's prefix depends on its own query only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, fail, refuse_torchscript
from ..functional import Prefix, is_traced, prefix_heads
from .pool import POOL_NAME
from .prefix import check_widths

__all__ = ["QueryLayerPrompt", "QueryPrompt", "check_layers", "cosine", "keyed_prompts", "split_prompt", "uniform_"]


def uniform_(*tensors: torch.Tensor) -> None:
    """Fill `tensors` in order with U[0, 1), as the authors' `tensor_prompt` initialises every prompt and key."""
    with torch.no_grad():
        for t in tensors:
            t.uniform_()


def keyed_prompts(
    layers: int, pool: int, length: int, dim: int, key_dim: int, vectors: int = 1
) -> tuple[nn.Parameter, ...]:
    """`(prompts, keys[, more key-width vectors])` for `layers` layers: prompts `(layers, pool, length, dim)` and
    `vectors` tensors `(layers, pool, key_dim)`, filled U[0, 1) in the authors' order: each layer's prompts, then
    its key-width vectors."""
    out = (torch.empty(layers, pool, length, dim), *(torch.empty(layers, pool, key_dim) for _ in range(vectors)))
    for i in range(layers):
        uniform_(*(t[i] for t in out))
    return tuple(nn.Parameter(t) for t in out)


def cosine(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`normalize(query).detach() . normalize(keys)^T`, `(B, M)`: the authors' key match (the query is constant)."""
    return F.normalize(query, dim=1).detach() @ F.normalize(keys, dim=1).t()


def split_prompt(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt `(..., length, dim)` as the prefix `(key, value)`: its first and second halves of the length."""
    half = p.shape[-2] // 2
    return p[..., :half, :], p[..., half:, :]


def check_layers(name: str, layers: Sequence[int]) -> tuple[int, ...]:
    """`layers` as a sorted tuple of distinct non-negative ints (`TypeError` / `ValueError` otherwise)."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"{name} must be a sequence of layer indices, got {type(layers).__name__}")
    out = tuple(check_int(f"{name}[{i}]", x, 0) for i, x in enumerate(layers))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicates: {list(out)}")
    return tuple(sorted(out))


def check_even(name: str, value: object) -> int:
    """A prompt length: an even int >= 2 (its halves are the prefix key and value)."""
    n = check_int(name, value, 2)
    if n % 2:
        raise ValueError(f"{name} must be even (its first half is the prefix key, its second the value), got {n}")
    return n


class QueryPrompt(nn.Module):
    """Base of the prompt modules that compute each layer's prefix from a query of the frozen model.

    A subclass sets its parameters in `__init__` and implements `layer_prefix(slot, query)`; this class does the
    rest: the factory protocol of [`patch_vit`][norga.patch.patch_vit], the query pass, the active task, the
    auxiliary loss of the last training forward, checkpoints and the training state.

    Args:
        num_tasks: Number of tasks `T` of the run (the task ids `set_task` accepts).
        layers: The prompted layers (indices into [`attention_layers`][norga.patch.attention_layers]); also
            `patch_vit`'s default.
        dim: Width of the prompted layers (`num_heads * head_dim`).
        key_dim: Width of the query: the model's `num_features` (default `dim`).

    Attributes:
        task: The active task, set by [`set_task`][norga.prompts.set_task] (an int).
    """

    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, num_tasks: int, layers: Sequence[int], dim: int, key_dim: int | None) -> None:
        super().__init__()
        check_int("num_tasks", num_tasks, 1)
        check_int("dim", dim, 1)
        self.layers = check_layers("layers", layers)
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        self.num_tasks = num_tasks
        self.dim = dim
        self.key_dim = dim if key_dim is None else check_int("key_dim", key_dim, 1)
        self.task = 0
        self._query: torch.Tensor | None = None  # the query of the forward under way
        self._given: torch.Tensor | None = None  # a query from use_query
        self._querying = False  # True during the query pass: the prompts are off
        self._losses: dict[int, torch.Tensor] = {}  # slot -> auxiliary loss of the last training forward
        self._model: tuple[Any, ...] = ()  # the model attached to (a tuple: not a submodule)

    @property
    def default_layers(self) -> tuple[int, ...]:
        """`patch_vit`'s layers when it is given `layers=None`: this module's `layers`."""
        return self.layers

    def __getstate__(self) -> dict[str, Any]:
        # the query and losses of a forward belong to its graph (or, after torch.fx tracing, are proxies)
        return {**super().__getstate__(), "_query": None, "_losses": {}}

    # ------------------------------------------------------------------ the prompt factory protocol (patch_vit)
    def prepare(self, model: nn.Module, layers: Sequence[Any]) -> None:
        """Check that this module fits the layers `patch_vit` is about to patch; nothing changes if it raises.

        Raises:
            ValueError: other layers, another width, a model without `patch_embed` / `forward_features` /
                `forward_head` (the query pass needs them) or with a query of another width, or a module already
                attached.
        """
        chosen = tuple(layer.index for layer in layers)
        name = type(self).__name__
        if chosen != self.layers:
            raise ValueError(
                f"{name} prompts layers {list(self.layers)} but patch_vit would patch {list(chosen)}; pass "
                f"layers=None (or give the {name} the layers you want)"
            )
        check_widths(name, self.dim, layers)
        for attr in ("patch_embed", "forward_features", "forward_head"):
            if getattr(model, attr, None) is None:
                raise ValueError(
                    f"{name} computes its query with the model's forward_features and forward_head, starting from "
                    f"patch_embed; {type(model).__name__} has no {attr!r}"
                )
        features = getattr(model, "num_features", self.key_dim)
        if int(features) != self.key_dim:
            raise ValueError(
                f"the {name} has key_dim={self.key_dim} but {type(model).__name__}'s features (the query) have "
                f"width {features}; pass key_dim={features}"
            )
        if self._model and getattr(self._model[0], POOL_NAME, None) is self:
            raise ValueError(f"patch_vit: this {name} is already attached to a model; give each model its own")
        if hasattr(model, POOL_NAME):
            raise ValueError(f"the model already has an attribute {POOL_NAME!r}")

    def forward(self, layer_index: int, attn: nn.Module) -> QueryLayerPrompt:
        """The factory call of `patch_vit`: the view of layer `layer_index` onto this module."""
        return QueryLayerPrompt(self, self.layers.index(layer_index))

    def attach(self, model: nn.Module) -> None:
        """Register on `model` (`model.prompt_pool`), hook the query pass onto `model.patch_embed` and its clean-up
        onto the end of `model`'s forward (the query is not kept past the forward it belongs to)."""
        self.train(model.training)
        model.add_module(POOL_NAME, self)
        self._model = (model,)
        embed: Any = model.patch_embed
        embed.register_forward_pre_hook(self._query_hook)
        model.register_forward_hook(self._forward_done)

    def detach_from(self, model: nn.Module) -> None:
        """Undo `attach` (called by `unpatch_vit` through the layers' prompts)."""
        if getattr(model, POOL_NAME, None) is not self:
            return
        embed: Any = model.patch_embed
        for hooks in (embed._forward_pre_hooks, model._forward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                del hooks[key]
        delattr(model, POOL_NAME)
        self._model = ()

    # ------------------------------------------------------------------ the query
    def _query_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._querying:  # the query pass itself
            return None
        x = args[0]
        if self._given is not None:  # use_query: the layers read it, no query pass
            if not is_traced(x) and self._given.shape[0] != x.shape[0]:
                fail(ValueError(f"use_query: {self._given.shape[0]} queries were given but the batch has {x.shape[0]}"))
            return None
        model = self._model[0]
        self._querying = True
        try:
            with torch.no_grad():
                query = model.forward_head(model.forward_features(x), pre_logits=True)
        finally:
            self._querying = False
        self._query = query.detach()
        return None

    def _forward_done(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._query is not None:  # assign only on a change: torch.export flags every assignment
            self._query = None

    def query(self, batch: int) -> torch.Tensor:
        """The query `(B, key_dim)` of the forward under way (or given by `use_query`), in the parameters' dtype."""
        query = self._given if self._given is not None else self._query
        if query is None:
            fail(
                RuntimeError(
                    f"{type(self).__name__}: no query for this forward; call the model itself (its patch_embed "
                    "computes the query) or give one with norga.use_query(model, query)"
                )
            )
        if not is_traced(query) and query.shape[0] != batch:
            fail(ValueError(f"{type(self).__name__}: the query has {query.shape[0]} rows but the batch {batch}"))
        return query.to(next(self.parameters()).dtype)

    # ------------------------------------------------------------------ what subclasses implement
    def layer_prefix(
        self, slot: int, query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # pragma: no cover - abstract
        """`(key, value, loss)` of prompted layer `slot` (an index into `layers`) for `query` `(B, key_dim)`.

        `key` and `value` are `(B, L, dim)`; `loss` is the layer's auxiliary loss in training (or `None`).
        """
        raise NotImplementedError

    def start_task(self, task: int) -> None:
        """What the module does when task `task` becomes active (checked: `0 <= task < num_tasks`)."""

    def check_task(self, task: object) -> int:
        """`task` checked to be a task id for this module; nothing changes.

        Raises:
            TypeError: not an int (per-sample task ids are not used: prompts are selected by the query).
            ValueError: out of range.
        """
        if isinstance(task, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__} takes one task id (an int): it selects each sample's prompts by its query, "
                "so per-sample task ids have no use"
            )
        check_int("task", task, 0)
        if not int(task) < self.num_tasks:  # type: ignore[call-overload]
            raise ValueError(f"task must be in [0, {self.num_tasks}), got {task}")
        return int(task)  # type: ignore[call-overload]

    def set_task(self, task: int) -> None:
        """Make `task` the active task (`start_task` first)."""
        t = self.check_task(task)
        self.start_task(t)
        self.task = t

    def end_task(self) -> None:
        """Close the active task (nothing to do for the authors' methods but CODA's; see each class)."""

    # ------------------------------------------------------------------ losses
    def prompt_loss(self) -> torch.Tensor:
        """The auxiliary loss of the last training forward, summed over the layers, as the authors weight it.

        0 when the last forward was not a training forward (or gave no loss).
        """
        losses = list(self._losses.values())
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self._device())

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ checkpoints and resuming
    def checkpoint_config(self) -> dict[str, Any]:
        """What [`save_prompts`][norga.checkpoint.save_prompts] records and `load_prompts` compares."""
        return {
            "kind": type(self).__name__,
            "num_tasks": self.num_tasks,
            "layers": list(self.layers),
            "dim": self.dim,
            "key_dim": self.key_dim,
        }

    def training_state(self) -> dict[str, Any]:
        """The training-state protocol ([`training_state`][norga.checkpoint.training_state]): the active task."""
        return {"task": int(self.task)}

    def check_training_state(self, state: Any) -> None:
        """Raise if `state` (from `training_state`) does not fit; nothing changes."""
        if not isinstance(state, dict) or set(state) != set(self.training_state()):
            raise TypeError(f"expected a dict with the fields {sorted(self.training_state())}, got {state!r:.200}")
        self.check_task(state["task"])

    def load_training_state(self, state: Any) -> None:
        """Restore what `training_state` returned (checked first)."""
        self.check_training_state(state)
        self.task = int(state["task"])

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, layers={list(self.layers)}, dim={self.dim}, key_dim={self.key_dim}"


class QueryLayerPrompt(nn.Module):
    """The view of one prompted layer onto a [`QueryPrompt`][norga.prompts.QueryPrompt].

    It holds the module without registering it (the module is registered once, on the model).
    """

    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, owner: QueryPrompt, slot: int) -> None:
        super().__init__()
        self._owner = (owner,)
        self.slot = slot

    @property
    def owner(self) -> QueryPrompt:
        return self._owner[0]

    def forward(self, q: torch.Tensor) -> Prefix | None:
        """The prefix in head space `(B, H, L, D)` for the queries `q` `(B, H, N, D)`; `None` in the query pass."""
        owner = self._owner[0]
        if owner._querying:
            return None
        key, value, loss = owner.layer_prefix(self.slot, owner.query(q.shape[0]))
        if owner.training and loss is not None and not is_traced(q):
            owner._losses[self.slot] = loss
        elif owner._losses and not owner.training:  # assign only on a change: torch.export flags assignments
            owner._losses = {}
        return Prefix(prefix_heads(key.to(q.dtype), q), prefix_heads(value.to(q.dtype), q))

    def detach(self, model: nn.Module) -> None:
        """The prompt protocol's clean-up, called by `unpatch_vit`."""
        self.owner.detach_from(model)

    def checkpoint_config(self) -> dict[str, Any]:
        """What [`save_prompts`][norga.checkpoint.save_prompts] records and `load_prompts` compares."""
        return {"kind": "QueryLayerPrompt", "slot": int(self.slot)}

    def extra_repr(self) -> str:
        return f"slot={self.slot}"
