"""SMoPE: one shared prefix prompt split into sparse prompt experts ("One-Prompt Strikes Back").

Per layer and head there are `E` prompt experts, each a key vector and a value vector of size `D`. For every
sample and head the experts are scored with the *mean* query of that sample, `s_j = mean_n(q_n) . key_j`, the top
`K` are selected, and only they enter the attention softmax, each with the logit `scale * s_j` shared by every
query row. [`SMoPE`][norga.prompts.SMoPE] is a prompt module: attach it to a layer (`prompt=`) or put one on every
patched layer with `patch_vit(model, prompt=smope_factory())`.

What the authors' code keeps as Python attributes is state here, in buffers that travel with the `state_dict`:

- `usage` `(H, E)`: how often each expert was among the noise-free top `K` in the counting passes
  ([`count_usage`][norga.prompts.count_usage]) after each task, cumulative over tasks, as the authors count;
- `frequent` `(H, E)`: experts whose usage was at least the mean of the non-zero usages of their head at some
  `end_task` (once flagged, always flagged); they receive the adaptive routing noise in later training;
- `key_snapshot` `(H, E, D)` and `has_snapshot`: the keys at the last `end_task`, the prototype loss's memory.

Model-level helpers (counting, losses, dense warm-up, the task end) are in `norga.prompts.tasks`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_real, refuse_torchscript
from ..functional import Prefix
from ..gates import NoRGaGate, resolve_gate
from ..layers import attention_width

__all__ = ["SMOPE_DEFAULT_LAYERS", "SMoPE", "SMoPEFactory", "smope_factory"]

#: The largest expert tensor (`H * E * D` elements) SMoPE builds: 2**31 - 1, 8 GiB of float32.
_MAX_EXPERT_ELEMENTS = 2**31 - 1

SMOPE_DEFAULT_LAYERS: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
"""SMoPE prompts blocks 0-5."""


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter as a plain full tensor: FSDP2 keeps it sharded (a DTensor) outside the forward.

    `full_tensor()` is a differentiable all-gather, so every rank must call the method that uses it.
    """
    full = getattr(p, "full_tensor", None)
    return full() if callable(full) else p


def _check_routing(
    num_experts: int, top_k: int, noise_eps: float, router_weight: float, prototype_weight: float
) -> tuple[float, float]:
    """The routing options checked; returns the loss weights as floats."""
    check_int("num_experts", num_experts, 1)
    check_int("top_k", top_k, 1)
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts, got top_k={top_k} and num_experts={num_experts}")
    check_real("noise_eps", noise_eps, minimum=0.0)
    return (
        check_real("router_weight", router_weight, minimum=0.0),
        check_real("prototype_weight", prototype_weight, minimum=0.0),
    )


class SMoPE(nn.Module):
    """Sparse mixture of prompt experts for one attention layer.

    Args:
        dim: Attention width `num_heads * head_dim` of the layer.
        num_heads: Number of heads `H` of the layer.
        num_experts: Experts per head `E` (the paper's `N_p`, default 25).
        top_k: Experts selected per sample and head `K` (default 5); `top_k <= num_experts`.
        noise_eps: `eps` of the adaptive noise: in training, frequent experts are routed with
            `s - eps * (max s - min s)` (0.4 for CIFAR/CUB, 0.3-0.7 for ImageNet-R in the paper).
        scale: Attention scale of the layer (default `head_dim ** -0.5`); the expert logit is
            `scale * s`.
        gate: Optional gate on the selected experts' logits (an activation name or a module such as
            `NoRGaGate("tanh")`). This is norga's extension: the authors' SMoPE has none. Do not also
            give the attention layer a `gate`, or the logits are gated twice.
        router_weight: The router loss's weight in [`prompt_losses`][norga.prompts.prompt_losses] (the authors'
            `prompt_param[2]`, `mu_router`: 1e-5 for CIFAR-100 and CUB-200, 5e-5 to 1e-4 for ImageNet-R).
        prototype_weight: The prototype loss's weight there (`prompt_param[3]`, `mu_router_old`: 1e-5 for
            CIFAR-100, 5e-5 for CUB-200, 5e-5 to 1e-4 for ImageNet-R).

    Attributes:
        keys, values: `nn.Parameter` `(H, E, D)`, initialised `U[0, 1)` as the authors do.
        dense: When `True` every expert is used (the first task's dense warm-up).
        counting: When `True` (set by [`count_usage`][norga.prompts.count_usage]) each forward adds its
            noise-free top `K` selections to `usage`.
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
        scale: float | None = None,
        gate: NoRGaGate | nn.Module | str | None = None,
        router_weight: float = 1e-5,
        prototype_weight: float = 1e-5,
    ) -> None:
        super().__init__()
        check_int("dim", dim, 1)
        check_int("num_heads", num_heads, 1)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim} and num_heads={num_heads}")
        weights = _check_routing(num_experts, top_k, noise_eps, router_weight, prototype_weight)
        head_dim = dim // num_heads
        if num_heads * num_experts * head_dim > _MAX_EXPERT_ELEMENTS:
            gib = num_heads * num_experts * head_dim * 4 / 2**30
            raise ValueError(
                f"num_experts={num_experts} is too large: the keys would be a ({num_heads}, {num_experts}, "
                f"{head_dim}) tensor of {gib:.1f} GiB (float32), and as much again for values, key snapshot "
                f"and gradients; at most {_MAX_EXPERT_ELEMENTS} elements per tensor are supported"
            )
        if scale is not None:
            check_real("scale", scale, positive=True)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_eps = float(noise_eps)
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.gate = resolve_gate(gate)
        self.router_weight, self.prototype_weight = weights
        self.dense = False
        self.counting = False
        self.keys = nn.Parameter(torch.rand(num_heads, num_experts, head_dim))
        self.values = nn.Parameter(torch.rand(num_heads, num_experts, head_dim))
        self.register_buffer("usage", torch.zeros(num_heads, num_experts))
        self.register_buffer("frequent", torch.zeros(num_heads, num_experts, dtype=torch.bool))
        self.register_buffer("key_snapshot", torch.zeros(num_heads, num_experts, head_dim))
        self.register_buffer("has_snapshot", torch.zeros((), dtype=torch.bool))
        self._last_scores: torch.Tensor | None = None
        self._last_indices: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The last forward's scores belong to that forward's autograd graph (for router_loss): a copy or a pickle
        # starts without them, as after an evaluation forward (deepcopy refuses tensors inside a graph).
        return {**super().__getstate__(), "_last_scores": None, "_last_indices": None}

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
        """Routing scores `s = mean_n(q) . key` in float32, shape `(B, H, E)`."""
        if not isinstance(q, torch.fx.Proxy):
            self._check_q(q)
        q_mean = q.float().mean(dim=2).transpose(0, 1)  # (H, B, D)
        # one (H, B, D) @ (H, D, E) bmm: no broadcast copy of the keys over the batch
        return (q_mean @ self.keys.float().transpose(-1, -2)).transpose(0, 1)  # (B, H, E)

    def routing_scores(self, s: torch.Tensor) -> torch.Tensor:
        """The scores that *select* experts; the attention logit always uses the raw `s`.

        As the authors route, with `range = max s - min s` per sample and head, not differentiated:

        * training: frequent experts get `s - noise_eps * range` (the adaptive noise);
        * evaluation: experts whose `usage` count is 0 get `s - 2 * range`, so they are chosen only
          when fewer than `K` used experts are left. A head whose counts are all 0 is returned unchanged
          (the authors shift all its scores alike, which selects the same experts).

        Args:
            s: Raw routing scores `(B, H, E)`.
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
        """Select experts: `(indices (B, H, K), scores (B, H, K))`, the scores raw (noise-free).

        Selection uses `routing_scores`. In dense mode every expert is selected (`K = E`), in expert
        order. While [`count_usage`][norga.prompts.count_usage] is active, the top `K` of the *raw* scores are added to
        `usage` after the selection, as the authors count.
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
        """The selected experts for queries `q` `(B, H, N, D)` as a [`Prefix`][norga.functional.Prefix].

        Returns:
            `Prefix(key, value, logits, indices)` with key/value `(B, H, K, D)`, logits
            `(B, H, 1, K)` (`scale * s`, gated if a gate is set; one value for every query row) and
            indices `(B, H, K)`.
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

        Call it after the task's counting pass ([`count_usage`][norga.prompts.count_usage]). An expert is flagged
        frequent if its usage is at least the mean of the non-zero usages of its head; flags are sticky (an expert
        flagged at an earlier task stays flagged), as in the authors' code. A head with no counts at all flags nothing
        (the authors' code flags every expert there; see `docs/fidelity.md`).
        """
        used = self.usage > 0
        n_used = used.sum(dim=-1, keepdim=True)
        mean_nonzero = (self.usage * used).sum(dim=-1, keepdim=True) / n_used.clamp_min(1)
        self.frequent.logical_or_(used & (self.usage >= mean_nonzero))
        self.key_snapshot.copy_(_full(self.keys.detach()))
        self.has_snapshot.fill_(True)

    def router_loss(self) -> torch.Tensor:
        """Router loss of the last sparse training forward, as the authors compute it.

        With the raw routing scores `s` `(B, H, E)`, the `K` experts selected with the noisy scores
        `idx` and their mask `m`, and `range = max s - min s` (not differentiated):

        ```python
        loss = mean_b sum_h sum_{i in idx[b, h]} CE(s[b, h] + noise_eps * (1 - m[b, h]) * range[b, h], i)
        ```

        The margin `noise_eps * range` on the unselected experts asks the selected ones to win by it. An
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

        The snapshot keys of a head's frequent experts are its prototypes `P` `(F, D)`. With the keys
        now `K_now` and at the snapshot `K_old` (both `(E, D)`) and `t_1..t_K` the top `K` of
        `P . K_old^T` per prototype:

        ```python
        loss = sum_heads sum_{i < K} mean_prototypes CE(P . K_now^T, t_i)
        ```

        Zero before any `end_task`; a head without frequent experts adds 0.
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

    def checkpoint_config(self) -> dict[str, Any]:
        """What [`save_prompts`][norga.checkpoint.save_prompts] records and `load_prompts` compares."""
        config = getattr(self.gate, "checkpoint_config", None)
        gate = None if self.gate is None else config() if callable(config) else {"kind": type(self.gate).__qualname__}
        return {
            "kind": "SMoPE",
            "dim": int(self.dim),
            "num_heads": int(self.num_heads),
            "num_experts": int(self.num_experts),
            "top_k": int(self.top_k),
            "noise_eps": float(self.noise_eps),
            "scale": float(self.scale),
            "dense": bool(self.dense),
            "gate": gate,
            "router_weight": self.router_weight,
            "prototype_weight": self.prototype_weight,
        }

    def training_state(self) -> dict[str, Any]:
        """The training-state protocol ([`training_state`][norga.checkpoint.training_state]): the phase (`dense`);
        usage counts, flags and the key snapshot are buffers, in the tensors."""
        return {"dense": bool(self.dense)}

    def check_training_state(self, state: Any) -> None:
        """Raise `TypeError` if `state` is not `{"dense": bool}`; nothing changes."""
        if not isinstance(state, dict) or set(state) != {"dense"} or not isinstance(state["dense"], bool):
            raise TypeError(f"expected {{'dense': bool}}, got {state!r:.200}")

    def load_training_state(self, state: Any) -> None:
        """Restore what `training_state` returned (checked first)."""
        self.check_training_state(state)
        self.dense = state["dense"]

    def extra_repr(self) -> str:
        gate = "" if self.gate is None else f", gate={type(self.gate).__name__}"
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"noise_eps={self.noise_eps}{gate}"
        )


class SMoPEFactory:
    """A `patch_vit` prompt factory that puts an [`SMoPE`][norga.prompts.SMoPE] on each patched layer.

    Width, heads and scale come from the layer. With `layers=None`, `patch_vit` prompts
    [`SMOPE_DEFAULT_LAYERS`][norga.prompts.SMOPE_DEFAULT_LAYERS] (blocks 0-5).
    """

    default_layers: tuple[int, ...] = SMOPE_DEFAULT_LAYERS

    def __init__(
        self,
        num_experts: int = 25,
        top_k: int = 5,
        noise_eps: float = 0.4,
        gate: NoRGaGate | nn.Module | str | None = None,
        router_weight: float = 1e-5,
        prototype_weight: float = 1e-5,
    ) -> None:
        weights = _check_routing(num_experts, top_k, noise_eps, router_weight, prototype_weight)
        if gate is not None and not isinstance(gate, (str, nn.Module)):
            raise TypeError(f"gate must be None, an activation name or an nn.Module, got {type(gate).__name__}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_eps = noise_eps
        self.gate = gate
        self.router_weight, self.prototype_weight = weights

    def __call__(self, layer_index: int, attn: nn.Module) -> SMoPE:
        gate = copy.deepcopy(self.gate) if isinstance(self.gate, nn.Module) else self.gate  # own alpha, tau per layer
        layer: Any = attn  # any timm attention: num_heads and scale are plain attributes
        return SMoPE(
            attention_width(attn),
            int(layer.num_heads),
            num_experts=self.num_experts,
            top_k=self.top_k,
            noise_eps=self.noise_eps,
            scale=float(layer.scale),
            gate=gate,
            router_weight=self.router_weight,
            prototype_weight=self.prototype_weight,
        )

    def __repr__(self) -> str:
        return f"SMoPEFactory(num_experts={self.num_experts}, top_k={self.top_k}, noise_eps={self.noise_eps})"


def smope_factory(
    num_experts: int = 25,
    top_k: int = 5,
    noise_eps: float = 0.4,
    gate: NoRGaGate | nn.Module | str | None = None,
    router_weight: float = 1e-5,
    prototype_weight: float = 1e-5,
) -> SMoPEFactory:
    """A factory for `patch_vit(model, prompt=smope_factory(...))`: an [`SMoPE`][norga.prompts.SMoPE] per layer."""
    return SMoPEFactory(
        num_experts=num_experts,
        top_k=top_k,
        noise_eps=noise_eps,
        gate=gate,
        router_weight=router_weight,
        prototype_weight=prototype_weight,
    )
