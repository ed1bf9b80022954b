"""`PrefixMoEAttention`: timm's `Attention` with prompt experts."""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import Attention
from torch import nn

from .._checks import check_int, check_mask
from ..functional import PrefixLike, is_traced, merge_heads, split_qkv
from ..gates import NoRGaGate
from .base import PrefixAttentionMixin

__all__ = ["PrefixMoEAttention"]


class PrefixMoEAttention(PrefixAttentionMixin, Attention):  # type: ignore[misc]  # timm: Final fused_attn
    """timm's multi-head self-attention with prompt experts (prefix tuning, NoRGa, SMoPE).

    The same constructor arguments, submodules (`qkv`, `q_norm`, `k_norm`, `norm`, `attn_drop`, `proj`,
    `proj_drop`, `gate`) and so the same `state_dict` keys as `timm.layers.Attention`; with no prefix and no
    prompt it runs timm's own forward. With a prefix `(key, value)` of length `L` each head attends over `L`
    prompt experts and `N` token experts; the prompt experts' scores `scale * q . key` go through the gate first.

    Args:
        dim: Input (token embedding) dimension.
        num_heads: Number of attention heads.
        qkv_bias: Bias in the fused qkv projection.
        qk_norm: Normalise queries and keys per head with `norm_layer` (prefix keys are *not* normalised: they
            are free parameters in head space).
        attn_drop: Dropout on the attention weights (over prefix and token columns).
        proj_drop: Dropout after the output projection.
        norm_layer: Norm constructor for `qk_norm` / `scale_norm`.
        gate: Gate on the prefix scores: `None` (linear, plain prefix tuning), a module such as
            [`NoRGaGate`][norga.gates.NoRGaGate], or an activation name (`"tanh"`, `"sigmoid"`, `"gelu"`) for a
            default `NoRGaGate`. Stored as `prefix_gate`.
        prompt: A module called as `prompt(q)` for the prefix when `forward` is given none.
        backend: [`prefix_attention`][norga.functional.prefix_attention] backend when `fused_attn` is on.
        **timm_kwargs: Further arguments of `timm.layers.Attention` (`attn_head_dim`, `dim_out`, `scale_norm`,
            `proj_bias`, `gated`, `device`, `dtype`).

    Shape:
        `x`: `(B, N, dim)`; prefix key and value: `(L, H * D)`, `(B, L, H * D)` or `(B, H, L, D)`; output
        `(B, N, dim_out)`.

    Examples:
        >>> attn = PrefixMoEAttention(64, num_heads=4, gate=NoRGaGate("tanh"))
        >>> x = torch.randn(2, 10, 64)
        >>> attn(x, prefix=(torch.randn(5, 64), torch.randn(5, 64))).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        gate: NoRGaGate | nn.Module | str | None = None,
        prompt: nn.Module | None = None,
        backend: str = "auto",
        **timm_kwargs: Any,
    ) -> None:
        check_int("dim", dim, 1)
        check_int("num_heads", num_heads, 1)
        if timm_kwargs.get("attn_head_dim") is None and dim % num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim} and num_heads={num_heads}")
        if (qk_norm or timm_kwargs.get("scale_norm")) and norm_layer is None:
            norm_layer = nn.LayerNorm
        super().__init__(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            **timm_kwargs,
        )
        self._init_prefix(gate, prompt, backend)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        prefix: PrefixLike | None = None,
    ) -> torch.Tensor:
        """Attend over `[prefix; x]`.

        Args:
            x: Tokens `(B, N, dim)`.
            attn_mask: Optional SDPA-style mask over the token keys.
            is_causal: Causal attention among the tokens.
            prefix: `(key, value)` or a [`Prefix`][norga.functional.Prefix]; if `None` the attached `prompt` (if
                any) supplies it, else this is timm's attention.

        Raises:
            TypeError: `x` is not a floating tensor of the layer's dtype (outside autocast).
            ValueError: `x` or the mask has the wrong shape, or both a mask and `is_causal`.
        """
        if not is_traced(x):
            self._check_input(x, attn_mask, is_causal)
        if prefix is None and self.prompt is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        gate = getattr(self, "gate", None)  # timm's output gate (gated=True), an attribute from timm 1.0.28
        out_gate = gate(x).sigmoid() if gate is not None else None
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        o = self.norm(merge_heads(self._attend(q, k, v, prefix, attn_mask, is_causal)))
        if out_gate is not None:
            o = o * out_gate
        return self.proj_drop(self.proj(o))

    def _check_input(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor (B, N, dim), got {type(x).__name__}")
        width = self.qkv.in_features
        if x.dim() != 3 or x.shape[-1] != width:
            raise ValueError(f"x must be (B, N, dim), got shape {tuple(x.shape)} (dim={width})")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dtype != self.qkv.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the layer's weights are {self.qkv.weight.dtype}; cast one of them "
                "or run under torch.autocast"
            )
        check_mask("attn_mask", attn_mask, (x.shape[0], self.num_heads, x.shape[1], x.shape[1]))
        if is_causal and attn_mask is not None:
            raise ValueError("attn_mask and is_causal=True are mutually exclusive")

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, fused_attn={self.fused_attn}, {self._prefix_repr()}"
