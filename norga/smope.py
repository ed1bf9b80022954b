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

* ``usage`` ``(H, E)``: how often each expert was selected in training mode (cumulative over tasks);
* ``frequent`` ``(H, E)``: experts whose usage was at least the mean of the non-zero usages of their head
  at the last :meth:`SMoPE.end_task`; they receive the adaptive routing noise in later training;
* ``key_snapshot`` ``(H, E, D)`` and ``has_snapshot``: the keys at the last ``end_task``, the memory of
  the prototype loss.

Model-level helpers: :func:`smope_layers`, :func:`smope_losses`, :func:`end_task`, :func:`set_dense`.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .functional import Prefix
from .gates import NoRGaGate, resolve_gate
from .patch import _width

__all__ = [
    "SMoPE",
    "SMoPEFactory",
    "smope_factory",
    "smope_layers",
    "smope_losses",
    "end_task",
    "set_dense",
    "SMOPE_DEFAULT_LAYERS",
]

#: SMoPE prompts blocks 0-5.
SMOPE_DEFAULT_LAYERS: tuple[int, ...] = (0, 1, 2, 3, 4, 5)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
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
        dense: When ``True`` every expert is used (the first task's dense warm-up); usage is not counted.
    """

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
        if scale is not None and (not math.isfinite(scale) or scale <= 0):
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
        self._check_q(q)
        q_mean = q.float().mean(dim=2).transpose(0, 1)  # (H, B, D)
        # one (H, B, D) @ (H, D, E) bmm: no broadcast copy of the keys over the batch
        return (q_mean @ self.keys.float().transpose(-1, -2)).transpose(0, 1)  # (B, H, E)

    def noisy_scores(self, s: torch.Tensor) -> torch.Tensor:
        """Scores used for *selection* in training: frequent experts get ``- eps * (max s - min s)``.

        The range is per sample and head and is not differentiated. Outside training, or before any
        :meth:`end_task`, the scores are returned unchanged.
        """
        if not self.training or self.noise_eps == 0.0:
            return s
        spread = (s.amax(dim=-1, keepdim=True) - s.amin(dim=-1, keepdim=True)).detach()
        return s - self.noise_eps * spread * self.frequent.to(s.dtype)

    def route(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Select experts: ``(indices (B, H, K), scores (B, H, K))`` with the *noise-free* scores.

        In dense mode every expert is selected (``K = E``), in expert order.
        """
        s = self.scores(q)
        if self.dense:
            idx = torch.arange(self.num_experts, device=s.device).expand(s.shape[0], self.num_heads, -1)
            self._last_scores, self._last_indices = None, None
            return idx, s
        routed = self.noisy_scores(s)
        idx = routed.topk(self.top_k, dim=-1, sorted=True).indices  # (B, H, K)
        if self.training:
            with torch.no_grad():
                counts = F.one_hot(idx, self.num_experts).sum(dim=(0, 2)).to(self.usage.dtype)  # (H, E)
                self.usage.add_(counts)
        self._last_scores, self._last_indices = routed, idx
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
        shape = (*idx.shape, self.head_dim)
        key = self.keys.reshape(-1, self.head_dim).index_select(0, flat).view(shape)  # (B, H, K, D)
        value = self.values.reshape(-1, self.head_dim).index_select(0, flat).view(shape)
        logits = (self.scale * s).unsqueeze(2)  # (B, H, 1, K)
        if self.gate is not None:
            logits = self.gate(logits)
        dtype = q.dtype
        return Prefix(key.to(dtype), value.to(dtype), logits, idx)

    # ------------------------------------------------------------------ tasks and losses
    @torch.no_grad()
    def end_task(self) -> None:
        """Close a task: mark frequent experts and snapshot the keys (both buffers).

        An expert is frequent if its usage is at least the mean of the non-zero usages of its head.
        A head that has never routed marks nothing.
        """
        used = self.usage > 0
        n_used = used.sum(dim=-1, keepdim=True)
        mean_nonzero = (self.usage * used).sum(dim=-1, keepdim=True) / n_used.clamp_min(1)
        self.frequent.copy_(used & (self.usage >= mean_nonzero))
        self.key_snapshot.copy_(_full(self.keys.detach()))
        self.has_snapshot.fill_(True)

    def router_loss(self) -> torch.Tensor:
        """Router loss of the last sparse routing (NOTES):
        ``sum_heads sum_{i in top-K} CE(routing scores, i)``, averaged over the batch.

        The routing scores include the adaptive noise when it applied, so the loss pushes the router
        towards the experts it actually selected.

        Raises:
            RuntimeError: no sparse routing happened yet (or the last one was dense).
        """
        if self._last_scores is None or self._last_indices is None:
            raise RuntimeError("router_loss() needs a sparse forward first (none yet, or the last one was dense)")
        s, idx = self._last_scores, self._last_indices  # (B, H, E), (B, H, K)
        log_p = s.log_softmax(dim=-1)
        return -log_p.gather(-1, idx).sum(dim=(1, 2)).mean()

    def prototype_loss(self) -> torch.Tensor:
        """Prototype loss: the snapshot keys of frequent experts ``P`` are prototypes, and
        ``CE(P . K_now^T, argmax(P . K_old^T))`` keeps each prototype closest to the expert it matched
        (summed over heads, averaged over the prototypes of a head). Zero before any :meth:`end_task`
        or when no expert is frequent."""
        if not bool(self.has_snapshot) or not bool(self.frequent.any()):
            return torch.zeros((), device=self.key_snapshot.device)
        keys = _full(self.keys)
        old = self.key_snapshot
        logits_now = old @ keys.transpose(-1, -2)  # (H, E, E): every old key against the keys now
        with torch.no_grad():
            target = (old @ old.transpose(-1, -2)).argmax(dim=-1)  # (H, E): the expert each prototype matched
        ce = F.cross_entropy(logits_now.flatten(0, 1), target.flatten(), reduction="none").view(self.num_heads, -1)
        mask = self.frequent.to(ce.dtype)
        per_head = (ce * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1)
        return per_head.sum()

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
    """Every :class:`SMoPE` in ``model`` (through DDP / ``torch.compile`` wrappers too), in module order."""
    return [m for m in model.modules() if isinstance(m, SMoPE)]


def _require(model: nn.Module, what: str) -> list[SMoPE]:
    layers = smope_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no norga.SMoPE; patch it with patch_vit(..., prompt=smope_factory())")
    return layers


def smope_losses(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(router_loss, prototype_loss)`` summed over every SMoPE layer of ``model``.

    The router loss of layers whose last forward was dense (warm-up) is skipped; if every layer was
    dense it is 0. Weight them as the authors do (``mu`` about 1e-5 and 1e-5 to 1e-4).
    """
    layers = _require(model, "smope_losses")
    router = [m.router_loss() for m in layers if m._last_scores is not None]
    proto = [m.prototype_loss() for m in layers]
    zero = torch.zeros((), device=layers[0].key_snapshot.device)
    return (torch.stack(router).sum() if router else zero), torch.stack(proto).sum()


def end_task(model: nn.Module) -> None:
    """Call :meth:`SMoPE.end_task` on every SMoPE layer of ``model``."""
    for m in _require(model, "end_task"):
        m.end_task()


def set_dense(model: nn.Module, dense: bool = True) -> None:
    """Switch every SMoPE layer of ``model`` to dense routing (all experts; warm-up) or back to top-K."""
    for m in _require(model, "set_dense"):
        m.dense = bool(dense)
