"""Prefix mixture-of-experts attention layers.

:class:`PrefixMoEAttention` is timm's ``Attention`` with prompt experts: it has the same constructor
arguments, the same submodules (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``attn_drop``, ``proj``,
``proj_drop``, ``gate``) and so the same ``state_dict`` keys, and with no prefix it computes exactly what
timm's ``Attention`` computes. With a prefix it attends over ``[prefix; tokens]`` through
:func:`norga.functional.prefix_attention`, with the prefix scores passed through ``prefix_gate``.

:class:`PrefixAttentionMixin` holds the prefix machinery shared by every patched timm family
(:mod:`norga.patch`).
"""

from __future__ import annotations

from typing import Any, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_mask, refuse_torchscript
from .functional import (
    BACKENDS,
    Prefix,
    PrefixLike,
    attention_bias,
    is_traced,
    merge_heads,
    normalize_prefix,
    prefix_attention,
    split_qkv,
)
from .functional import _traced as traced_prefix_attention
from .gates import NoRGaGate, resolve_gate

try:  # timm >= 1.0
    from timm.layers import Attention as _TimmAttention
except ImportError as e:  # pragma: no cover - timm is a hard dependency
    raise ImportError("norga requires timm>=1.0 (pip install 'timm>=1.0')") from e

__all__ = ["PrefixAttentionMixin", "PrefixMoEAttention"]


class PrefixAttentionMixin:
    """Prefix (prompt-expert) attention shared by norga's attention layers.

    Attributes set by :meth:`_init_prefix`:
        prefix_gate: The gate on prefix scores (``None``: linear gate, plain prefix tuning). It is
            named ``prefix_gate`` because timm's ``gate`` attribute is its own output gate.
        prompt: A module called as ``prompt(q)`` with the layer's queries ``(B, H, N, D)`` when
            ``forward`` gets no ``prefix``; it returns a :class:`norga.Prefix`, a ``(key, value)`` pair
            or ``None``.
        backend: Backend of :func:`norga.functional.prefix_attention` used when ``fused_attn`` is
            True; with ``fused_attn`` False the readable ``"math"`` path runs.
    """

    __prepare_scriptable__ = refuse_torchscript

    # Provided by the timm attention class the mixin is combined with.
    num_heads: int
    scale: float
    fused_attn: bool
    attn_drop: nn.Dropout
    training: bool
    prefix_gate: Optional[nn.Module]
    prompt: Optional[nn.Module]
    backend: str

    def _init_prefix(self, gate: NoRGaGate | nn.Module | str | None, prompt: nn.Module | None, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if prompt is not None and not isinstance(prompt, nn.Module):
            raise TypeError(f"prompt must be an nn.Module called as prompt(q), got {type(prompt).__name__}")
        self.prefix_gate = resolve_gate(gate)
        self.prompt = prompt
        self.backend = backend

    def _resolve_prefix(self, q: torch.Tensor, prefix: PrefixLike | None) -> Prefix | None:
        if prefix is None and self.prompt is not None:
            prefix = self.prompt(q)
        if prefix is None:
            return None
        if is_traced(q):  # torch.fx: shapes are symbolic, prompts hand out (B or 1, H, L, D) already
            return prefix if isinstance(prefix, Prefix) else Prefix(*prefix)
        return normalize_prefix(prefix, q.shape[0], q.shape[1], q.shape[3], num_queries=q.shape[2])

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix: PrefixLike | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Attention of ``q`` over ``[prefix; k]``; with no prefix, exactly timm's computation.

        Args:
            q, k, v: ``(B, H, N, D)``.
            prefix: An explicit prefix, else the one from ``self.prompt`` (if any).
            attn_mask: Float bias or boolean mask over the token keys (SDPA semantics).
            is_causal: Causal masking over the tokens (prefix columns stay visible).
        """
        dropout_p = self.attn_drop.p if self.training else 0.0
        if is_traced(q):  # torch.fx: mask and is_causal may be graph inputs, shapes are symbolic
            p = self._resolve_prefix(q, prefix)
            gate = self.prefix_gate
            return traced_prefix_attention(q, k, v, p, gate, self.scale, attn_mask, is_causal, dropout_p)
        check_mask("attn_mask", attn_mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        if is_causal and attn_mask is not None:
            raise ValueError("attn_mask and is_causal=True are mutually exclusive")
        p = self._resolve_prefix(q, prefix)
        if p is None:
            if self.fused_attn:
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
                )
            attn = (q * self.scale) @ k.transpose(-2, -1)
            bias = attention_bias(attn_mask, q.shape[2], is_causal, attn)
            if bias is not None:
                attn = attn + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            return attn @ v
        bias = attention_bias(attn_mask, q.shape[2], is_causal, q)
        return prefix_attention(
            q,
            k,
            v,
            p,
            gate=self.prefix_gate,
            scale=self.scale,
            attn_bias=bias,
            dropout_p=dropout_p,
            backend=self.backend if self.fused_attn else "math",
        )

    def _prefix_repr(self) -> str:
        gate = "linear" if self.prefix_gate is None else type(self.prefix_gate).__name__
        return f"prefix_gate={gate}, backend={self.backend}"


class PrefixMoEAttention(PrefixAttentionMixin, _TimmAttention):  # type: ignore[misc]  # timm: Final fused_attn
    """timm's multi-head self-attention with prompt experts (prefix tuning, NoRGa, SMoPE).

    With no prefix the output is exactly that of ``timm.layers.Attention`` with the same weights. With a
    prefix ``(key, value)`` of length ``L`` each head attends over ``L`` prompt experts and ``N`` token
    experts; the prompt experts' scores ``scale * q . key`` go through ``gate`` first.

    Args:
        dim: Input (token embedding) dimension.
        num_heads: Number of attention heads.
        qkv_bias: Bias in the fused qkv projection.
        qk_norm: Normalise queries and keys per head with ``norm_layer`` (prefix keys are *not*
            normalised: they are free parameters in head space).
        attn_drop: Dropout on the attention weights (over prefix and token columns).
        proj_drop: Dropout after the output projection.
        norm_layer: Norm constructor for ``qk_norm``/``scale_norm``.
        gate: Gate on the prefix scores: ``None`` (linear, plain prefix tuning), a module such as
            :class:`norga.NoRGaGate`, or an activation name (``"tanh"``, ``"sigmoid"``, ``"gelu"``) for a
            default ``NoRGaGate``. Stored as ``prefix_gate``.
        prompt: Module called as ``prompt(q)`` to obtain the prefix when ``forward`` is given none.
        backend: Prefix-attention backend when ``fused_attn`` is on: ``"auto"``, ``"merge"``,
            ``"sdpa"``, ``"flex"`` or ``"math"`` (see :mod:`norga.functional`).
        **timm_kwargs: Further arguments of ``timm.layers.Attention`` (``attn_head_dim``, ``dim_out``,
            ``scale_norm``, ``proj_bias``, ``gated``, ``device``, ``dtype``).

    Shape:
        ``x``: ``(B, N, dim)``; prefix key/value: ``(L, H*D)``, ``(B, L, H*D)`` or ``(B, H, L, D)``;
        output ``(B, N, dim_out)``.

    Example:
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
        norm_layer: Optional[Type[nn.Module]] = None,
        gate: NoRGaGate | nn.Module | str | None = None,
        prompt: nn.Module | None = None,
        backend: str = "auto",
        **timm_kwargs: Any,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
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
        """Attend over ``[prefix; x]``; with no prefix and no prompt, timm's own forward.

        Args:
            x: Tokens ``(B, N, dim)``.
            attn_mask: Optional SDPA-style mask over the token keys.
            is_causal: Causal attention among tokens.
            prefix: ``(key, value)`` or :class:`norga.Prefix`; if ``None`` the attached ``prompt`` (if any)
                supplies it, else this is plain attention.
        """
        if not is_traced(x):
            self._check_input(x, attn_mask, is_causal)
        if prefix is None and self.prompt is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        timm_gate = getattr(self, "gate", None)  # timm's output gate (gated=True), not the prefix gate
        out_gate = timm_gate(x).sigmoid() if timm_gate is not None else None
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        o = merge_heads(self._attend(q, k, v, prefix, attn_mask, is_causal))
        o = self.norm(o)
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
