"""SMoPE: one shared prefix prompt split into sparse prompt experts ("One-Prompt Strikes Back").

Per layer and head there are ``E`` prompt experts, each a key vector and a value vector of size ``D``.
For every sample and head the experts are scored with the *mean* query of that sample,
``s_j = mean_n(q_n) . key_j``, the top ``K`` experts are selected, and only they enter the attention
softmax, each with the logit ``scale * s_j`` shared by every query row. :class:`SMoPE` is a prompt
module: attach it to a :class:`norga.PrefixMoEAttention` (``prompt=``) or put it on the layers of a timm
ViT with ``patch_vit(model, prompt=smope_factory())``; the layer calls it with its queries and attends
over the :class:`norga.Prefix` it returns.

What the authors' code keeps as Python attributes is state here, in buffers that travel with
``state_dict``:

* ``usage`` ``(H, E)``: how often each expert was among the noise-free top ``K`` in the counting passes
  (:func:`count_usage`) after each task, cumulative over tasks, as the authors count;
* ``frequent`` ``(H, E)``: experts whose usage was at least the mean of the non-zero usages of their head
  at some :meth:`SMoPE.end_task` (once flagged, always flagged); they receive the adaptive routing noise
  in later training;
* ``key_snapshot`` ``(H, E, D)`` and ``has_snapshot``: the keys at the last ``end_task``, the memory of
  the prototype loss.

Model-level helpers: :func:`smope_layers`, :func:`smope_losses`, :func:`count_usage`, :func:`end_task`,
:func:`set_dense` and :func:`training_phases` (the authors' dense warm-up schedule).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import refuse_torchscript
from .functional import Prefix
from .gates import NoRGaGate, resolve_gate
from .patch import _width
from .prompts import prefix_pools

__all__ = [
    "SMoPE",
    "SMoPEFactory",
    "smope_factory",
    "smope_layers",
    "smope_losses",
    "count_usage",
    "end_task",
    "Phase",
    "training_phases",
    "set_dense",
    "SMOPE_DEFAULT_LAYERS",
]

#: The largest expert tensor (``H * E * D`` elements) SMoPE builds: 2**31 - 1, 8 GiB of float32.
_MAX_EXPERT_ELEMENTS = 2**31 - 1

#: SMoPE prompts blocks 0-5.
SMOPE_DEFAULT_LAYERS: tuple[int, ...] = (0, 1, 2, 3, 4, 5)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _non_negative_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter as a plain full tensor: FSDP2 keeps it sharded (a DTensor) outside the forward.

    ``full_tensor()`` is a differentiable all-gather, so every rank must call the method that uses it.
    """
    full = getattr(p, "full_tensor", None)
    return full() if callable(full) else p


def _check_routing(num_experts: int, top_k: int, noise_eps: float) -> None:
    _positive_int("num_experts", num_experts)
    _positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts, got top_k={top_k} and num_experts={num_experts}")
    if not isinstance(noise_eps, (int, float)) or isinstance(noise_eps, bool):
        raise TypeError(f"noise_eps must be a float, got {type(noise_eps).__name__}")
    if not math.isfinite(noise_eps) or noise_eps < 0:
        raise ValueError(f"noise_eps must be finite and >= 0, got {noise_eps}")


class SMoPE(nn.Module):
    """Sparse mixture of prompt experts for one attention layer.

    Args:
        dim: Attention width ``num_heads * head_dim`` of the layer.
        num_heads: Number of heads ``H`` of the layer.
        num_experts: Experts per head ``E`` (the paper's ``N_p``, default 25).
        top_k: Experts selected per sample and head ``K`` (default 5); ``top_k <= num_experts``.
        noise_eps: ``eps`` of the adaptive noise: in training, frequent experts are routed with
            ``s - eps * (max s - min s)`` (0.4 for CIFAR/CUB, 0.3-0.7 for ImageNet-R in the paper).
        scale: Attention scale of the layer (default ``head_dim ** -0.5``); the expert logit is
            ``scale * s``.
        gate: Optional gate on the selected experts' logits (an activation name or a module such as
            ``NoRGaGate("tanh")``). This is norga's extension: the authors' SMoPE has none. Do not also
            give the attention layer a ``gate``, or the logits are gated twice.

    Attributes:
        keys, values: ``nn.Parameter`` ``(H, E, D)``, initialised ``U[0, 1)`` as the authors do.
        dense: When ``True`` every expert is used (the first task's dense warm-up).
        counting: When ``True`` (set by :func:`count_usage`) each forward adds its noise-free top ``K``
            selections to ``usage``.
    """

    __prepare_scriptable__ = refuse_torchscript

    usage: torch.Tensor
    frequent: torch.Tensor
    key_snapshot: torch.Tensor
    has_snapshot: torch.Tensor

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_experts: int = 25,
        top_k: int = 5,
        noise_eps: float = 0.4,
        scale: Optional[float] = None,
        gate: NoRGaGate | nn.Module | str | None = None,
    ) -> None:
        super().__init__()
        _positive_int("dim", dim)
        _positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim} and num_heads={num_heads}")
        _check_routing(num_experts, top_k, noise_eps)
        head_dim = dim // num_heads
        if num_heads * num_experts * head_dim > _MAX_EXPERT_ELEMENTS:
            gib = num_heads * num_experts * head_dim * 4 / 2**30
            raise ValueError(
                f"num_experts={num_experts} is too large: the keys would be a ({num_heads}, {num_experts}, "
                f"{head_dim}) tensor of {gib:.1f} GiB (float32), and as much again for values, key snapshot "
                f"and gradients; at most {_MAX_EXPERT_ELEMENTS} elements per tensor are supported"
            )
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise TypeError(f"scale must be None or a real number, got {type(scale).__name__} ({scale!r})")
            if not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"scale must be finite and > 0, got {scale}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_eps = float(noise_eps)
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.gate = resolve_gate(gate)
        self.dense = False
        self.counting = False
        self.keys = nn.Parameter(torch.rand(num_heads, num_experts, head_dim))
        self.values = nn.Parameter(torch.rand(num_heads, num_experts, head_dim))
        self.register_buffer("usage", torch.zeros(num_heads, num_experts))
        self.register_buffer("frequent", torch.zeros(num_heads, num_experts, dtype=torch.bool))
        self.register_buffer("key_snapshot", torch.zeros(num_heads, num_experts, head_dim))
        self.register_buffer("has_snapshot", torch.zeros((), dtype=torch.bool))
        self._last_scores: Optional[torch.Tensor] = None
        self._last_indices: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ routing
    def _check_q(self, q: torch.Tensor) -> None:
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a tensor of shape (B, H, N, D), got {type(q).__name__}")
        if q.dim() != 4 or q.shape[1] != self.num_heads or q.shape[3] != self.head_dim or q.shape[2] < 1:
            raise ValueError(
                f"q must have shape (B, H={self.num_heads}, N>=1, D={self.head_dim}), got {tuple(q.shape)}"
            )
        if not q.is_floating_point():
            raise TypeError(f"q must be a floating-point tensor, got dtype {q.dtype}")

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """Routing scores ``s = mean_n(q) . key`` in float32, shape ``(B, H, E)``."""
        if not isinstance(q, torch.fx.Proxy):
            self._check_q(q)
        q_mean = q.float().mean(dim=2).transpose(0, 1)  # (H, B, D)
        # one (H, B, D) @ (H, D, E) bmm: no broadcast copy of the keys over the batch
        return (q_mean @ self.keys.float().transpose(-1, -2)).transpose(0, 1)  # (B, H, E)

    def routing_scores(self, s: torch.Tensor) -> torch.Tensor:
        """The scores that *select* experts; the attention logit always uses the raw ``s``.

        As the authors route, with ``range = max s - min s`` per sample and head, not differentiated:

        * training: frequent experts get ``s - noise_eps * range`` (the adaptive noise);
        * evaluation: experts whose :attr:`usage` count is 0 get ``s - 2 * range``, so they are chosen only
          when fewer than ``K`` used experts are left. A head whose counts are all 0 is returned unchanged
          (the authors shift all its scores alike, which selects the same experts).

        Args:
            s: Raw routing scores ``(B, H, E)``.
        """
        if self.training:
            if self.noise_eps == 0.0:
                return s
            penalty = self.noise_eps * self.frequent.to(s.dtype)
        else:
            unused = self.usage == 0
            penalty = 2.0 * (unused & ~unused.all(dim=-1, keepdim=True)).to(s.dtype)
        spread = (s.amax(dim=-1, keepdim=True) - s.amin(dim=-1, keepdim=True)).detach()
        return s - spread * penalty

    def route(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Select experts: ``(indices (B, H, K), scores (B, H, K))``, the scores raw (noise-free).

        Selection uses :meth:`routing_scores`. In dense mode every expert is selected (``K = E``), in expert
        order. While :func:`count_usage` is active, the top ``K`` of the *raw* scores are added to
        :attr:`usage` after the selection, as the authors count.
        """
        s = self.scores(q)
        if self.dense:
            idx = torch.arange(self.num_experts, device=s.device).expand(s.shape[0], self.num_heads, -1)
        else:
            idx = self.routing_scores(s).topk(self.top_k, dim=-1, sorted=True).indices  # (B, H, K)
        if self.counting:
            with torch.no_grad():
                top = s.topk(self.top_k, dim=-1).indices
                self.usage.add_(F.one_hot(top, self.num_experts).sum(dim=(0, 2)).to(self.usage.dtype))
        # router_loss needs the raw scores (differentiable) and the noisy selection of a sparse training step;
        # under torch.fx tracing there is no step to remember
        if self.training and not self.dense and not isinstance(s, torch.fx.Proxy):
            self._last_scores, self._last_indices = s, idx
        elif self._last_scores is not None:  # assign only on a change: torch.export flags every assignment
            self._last_scores = self._last_indices = None
        return idx, s.gather(-1, idx)

    def forward(self, q: torch.Tensor) -> Prefix:
        """The selected experts for queries ``q`` ``(B, H, N, D)`` as a :class:`norga.Prefix`.

        Returns:
            ``Prefix(key, value, logits, indices)`` with key/value ``(B, H, K, D)``, logits
            ``(B, H, 1, K)`` (``scale * s``, gated if a gate is set; one value for every query row) and
            indices ``(B, H, K)``.
        """
        idx, s = self.route(q)
        # gather per sample and head: row h * E + j of the flattened (H * E, D) experts
        flat = (idx + self.num_experts * torch.arange(self.num_heads, device=idx.device).view(1, -1, 1)).reshape(-1)
        key = self.keys.reshape(-1, self.head_dim).index_select(0, flat).unflatten(0, idx.shape)  # (B, H, K, D)
        value = self.values.reshape(-1, self.head_dim).index_select(0, flat).unflatten(0, idx.shape)
        logits = (self.scale * s).unsqueeze(2)  # (B, H, 1, K)
        if self.gate is not None:
            logits = self.gate(logits)
        dtype = q.dtype
        return Prefix(key.to(dtype), value.to(dtype), logits, idx)

    # ------------------------------------------------------------------ tasks and losses
    @torch.no_grad()
    def end_task(self) -> None:
        """Close a task: flag frequent experts and snapshot the keys (both buffers).

        Call it after the task's counting pass (:func:`count_usage`). An expert is flagged frequent if its
        usage is at least the mean of the non-zero usages of its head; flags are sticky (an expert flagged
        at an earlier task stays flagged), as in the authors' code. A head with no counts at all flags
        nothing (the authors' code flags every expert there; see ``docs/fidelity.md``).
        """
        used = self.usage > 0
        n_used = used.sum(dim=-1, keepdim=True)
        mean_nonzero = (self.usage * used).sum(dim=-1, keepdim=True) / n_used.clamp_min(1)
        self.frequent.logical_or_(used & (self.usage >= mean_nonzero))
        self.key_snapshot.copy_(_full(self.keys.detach()))
        self.has_snapshot.fill_(True)

    def router_loss(self) -> torch.Tensor:
        """Router loss of the last sparse training forward, as the authors compute it.

        With the raw routing scores ``s`` ``(B, H, E)``, the ``K`` experts selected with the noisy scores
        ``idx`` and their mask ``m``, and ``range = max s - min s`` (not differentiated)::

            loss = mean_b sum_h sum_{i in idx[b, h]} CE(s[b, h] + noise_eps * (1 - m[b, h]) * range[b, h], i)

        The margin ``noise_eps * range`` on the unselected experts asks the selected ones to win by it. An
        empty batch gives 0.

        Raises:
            RuntimeError: no sparse training forward happened yet (or the last forward was dense or in
                evaluation mode).
        """
        if self._last_scores is None or self._last_indices is None:
            raise RuntimeError(
                "router_loss() needs a sparse forward in training mode first (none yet, or the last one was "
                "dense or in evaluation mode)"
            )
        s, idx = self._last_scores, self._last_indices  # (B, H, E), (B, H, K)
        unselected = torch.ones_like(s).scatter_(-1, idx, 0.0)
        spread = (s.amax(dim=-1, keepdim=True) - s.amin(dim=-1, keepdim=True)).detach()
        log_p = (s + self.noise_eps * unselected * spread).log_softmax(dim=-1)
        return -log_p.gather(-1, idx).sum() / max(s.shape[0], 1)

    def prototype_loss(self) -> torch.Tensor:
        """Prototype loss, as the authors compute it.

        The snapshot keys of a head's frequent experts are its prototypes ``P`` ``(F, D)``. With the keys
        now ``K_now`` and at the snapshot ``K_old`` (both ``(E, D)``) and ``t_1..t_K`` the top ``K`` of
        ``P . K_old^T`` per prototype::

            loss = sum_heads sum_{i < K} mean_prototypes CE(P . K_now^T, t_i)

        Zero before any :meth:`end_task`; a head without frequent experts adds 0.
        """
        if not bool(self.has_snapshot) or not bool(self.frequent.any()):
            return torch.zeros((), device=self.key_snapshot.device)
        keys = _full(self.keys).float()
        old = self.key_snapshot.float()
        log_p = (old @ keys.transpose(-1, -2)).log_softmax(dim=-1)  # (H, E, E): every old key against the keys now
        with torch.no_grad():
            targets = (old @ old.transpose(-1, -2)).topk(self.top_k, dim=-1).indices  # (H, E, K)
        ce = -log_p.gather(-1, targets).sum(dim=-1)  # (H, E): summed over the K targets
        mask = self.frequent.to(ce.dtype)
        return ((ce * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1)).sum()

    def extra_repr(self) -> str:
        gate = "" if self.gate is None else f", gate={type(self.gate).__name__}"
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"noise_eps={self.noise_eps}{gate}"
        )


class SMoPEFactory:
    """A ``patch_vit`` prompt factory that puts an :class:`SMoPE` on each patched layer.

    Width, heads and scale come from the layer. With ``layers=None``, ``patch_vit`` prompts
    :data:`SMOPE_DEFAULT_LAYERS` (blocks 0-5).
    """

    default_layers: tuple[int, ...] = SMOPE_DEFAULT_LAYERS

    def __init__(
        self,
        num_experts: int = 25,
        top_k: int = 5,
        noise_eps: float = 0.4,
        gate: NoRGaGate | nn.Module | str | None = None,
    ) -> None:
        _check_routing(num_experts, top_k, noise_eps)
        if gate is not None and not isinstance(gate, (str, nn.Module)):
            raise TypeError(f"gate must be None, an activation name or an nn.Module, got {type(gate).__name__}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_eps = noise_eps
        self.gate = gate

    def __call__(self, layer_index: int, attn: nn.Module) -> SMoPE:
        gate = copy.deepcopy(self.gate) if isinstance(self.gate, nn.Module) else self.gate  # own alpha, tau per layer
        layer: Any = attn  # any timm attention: num_heads and scale are plain attributes
        return SMoPE(
            _width(attn),
            int(layer.num_heads),
            num_experts=self.num_experts,
            top_k=self.top_k,
            noise_eps=self.noise_eps,
            scale=float(layer.scale),
            gate=gate,
        )

    def __repr__(self) -> str:
        return f"SMoPEFactory(num_experts={self.num_experts}, top_k={self.top_k}, noise_eps={self.noise_eps})"


def smope_factory(
    num_experts: int = 25,
    top_k: int = 5,
    noise_eps: float = 0.4,
    gate: NoRGaGate | nn.Module | str | None = None,
) -> SMoPEFactory:
    """``patch_vit(model, prompt=smope_factory(...))`` puts an :class:`SMoPE` on blocks 0-5 (or ``layers=``)."""
    return SMoPEFactory(num_experts=num_experts, top_k=top_k, noise_eps=noise_eps, gate=gate)


def smope_layers(model: nn.Module) -> list[SMoPE]:
    """Every :class:`SMoPE` in ``model`` (through DDP / ``torch.compile`` wrappers too), in module order.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a patched model), got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, SMoPE)]


def _require(model: nn.Module, what: str) -> list[SMoPE]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be an nn.Module (a patched model), got {type(model).__name__}")
    layers = smope_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no norga.SMoPE; patch it with patch_vit(..., prompt=smope_factory())")
    return layers


def smope_losses(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(router_loss, prototype_loss)`` summed over every SMoPE layer of ``model``.

    Layers whose last forward was not a sparse training forward (dense warm-up, evaluation) add no router
    loss; if no layer has one it is 0. Weight them as the authors do: router and prototype ``mu`` 1e-5 and
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
    SMoPE layer, head and expert, how often the expert is among the top ``K`` of the raw (noise-free)
    routing scores to ``usage``. On exit the modules' training modes are restored. Call
    :func:`end_task` after it::

        with norga.count_usage(model):
            for x, _ in train_loader:      # the task's training data
                model(x)
        norga.end_task(model)              # frequent experts, key snapshot

    Under DDP pass the unwrapped model (``ddp.module``) and call it: a forward through the wrapper would
    first overwrite every rank's counts with rank 0's (DDP's buffer synchronisation); then
    :func:`norga.distributed.sync_smope_usage` sums the ranks' counts.

    Raises:
        ValueError: the model has no SMoPE layer, or it is a ``DistributedDataParallel`` wrapper.
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
    """One phase of a task's training: ``dense`` routing or not, for ``epochs`` epochs."""

    dense: bool
    epochs: int


def training_phases(task: int, epochs: int) -> list[Phase]:
    """The authors' SMoPE schedule for one task: build a fresh optimizer and schedule for each phase.

    On the first task (``task == 0``) a dense warm-up of ``int(epochs / 2)`` epochs, then ``epochs`` sparse
    epochs; on later tasks ``epochs`` sparse epochs. A phase of 0 epochs is left out::

        for phase in norga.smope.training_phases(task, epochs):
            norga.set_dense(model, phase.dense)
            optimizer = torch.optim.Adam(params, lr=lr)  # fresh for each phase, as the authors reset it
            for epoch in range(phase.epochs):
                ...

    Raises:
        TypeError: ``task`` or ``epochs`` is not an int.
        ValueError: ``task < 0`` or ``epochs < 1``.
    """
    _non_negative_int("task", task)
    _positive_int("epochs", epochs)
    phases = [Phase(True, epochs // 2)] if task == 0 else []
    return [p for p in [*phases, Phase(False, epochs)] if p.epochs > 0]


def end_task(model: nn.Module) -> None:
    """Close the current task for every norga prompt module of ``model``.

    * every :class:`SMoPE`: :meth:`SMoPE.end_task` (frequent experts, key snapshot; run
      :func:`count_usage` over the task's data first);
    * every :class:`norga.PrefixPool`: :meth:`norga.PrefixPool.end_task` (prompt momentum write-back of
      the active task; nothing without momentum).

    Everything is checked before anything changes.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the model has neither an SMoPE layer nor a prefix pool, or a pool with momentum has
            per-sample task ids set.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"end_task: model must be an nn.Module (a patched model), got {type(model).__name__}")
    layers = smope_layers(model)
    pools = prefix_pools(model)
    if not layers and not pools:
        raise ValueError(
            "end_task: the model has no norga.SMoPE layer and no norga.PrefixPool; patch it with "
            "patch_vit(..., prompt=smope_factory()) or patch_vit(..., prompt=PrefixPool(...))"
        )
    for pool in pools:
        pool._check_end_task(None)
    for m in layers:
        m.end_task()
    for pool in pools:
        pool.end_task()


def set_dense(model: nn.Module, dense: bool = True) -> None:
    """Switch every SMoPE layer of ``model`` to dense routing (all experts; warm-up) or back to top-K.

    Raises:
        TypeError: ``dense`` is not a bool.
        ValueError: the model has no SMoPE layer.
    """
    if not isinstance(dense, bool):
        raise TypeError(f"set_dense: dense must be a bool, got {type(dense).__name__} ({dense!r})")
    for m in _require(model, "set_dense"):
        m.dense = dense
