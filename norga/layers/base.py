"""What every patched attention layer shares: the prefix attributes and the attention over `[prefix; tokens]`."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_mask, refuse_torchscript
from ..functional import BACKENDS, Prefix, PrefixLike, attention_bias, is_traced, prefix_attention
from ..functional.math import traced_attention
from ..gates import NoRGaGate, resolve_gate

__all__ = ["PrefixAttentionMixin", "attention_width"]


def attention_width(attn: nn.Module) -> int:
    """The attention width `num_heads * head_dim` of a timm attention module: the width of a prefix vector."""
    qkv = getattr(attn, "qkv", None)
    proj = qkv if qkv is not None else attn.q_proj
    out = int(cast(nn.Linear, proj).weight.shape[0])
    return out // 3 if qkv is not None else out


class PrefixAttentionMixin:
    """Prompt experts for a timm attention class: mixed in before it by every norga layer.

    Attributes:
        prefix_gate: The gate on the prefix scores (`None`: the linear gate of plain prefix tuning). Named
            `prefix_gate` because timm's `gate` attribute is its own output gate.
        prompt: A module called as `prompt(q)` with the layer's queries `(B, H, N, D)` when `forward` gets no
            `prefix`; it returns a [`Prefix`][norga.functional.Prefix], a `(key, value)` pair or `None`.
        backend: The [`prefix_attention`][norga.functional.prefix_attention] backend when `fused_attn` is on;
            with `fused_attn` off the readable `"math"` path runs.
    """

    __prepare_scriptable__ = refuse_torchscript

    # Provided by the timm attention class the mixin is combined with.
    num_heads: int
    scale: float
    fused_attn: bool
    attn_drop: nn.Dropout
    training: bool
    prefix_gate: nn.Module | None
    prompt: nn.Module | None
    backend: str

    def _init_prefix(self, gate: NoRGaGate | nn.Module | str | None, prompt: nn.Module | None, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if prompt is not None and not isinstance(prompt, nn.Module):
            raise TypeError(f"prompt must be an nn.Module called as prompt(q), got {type(prompt).__name__}")
        self.prefix_gate = resolve_gate(gate)
        self.prompt = prompt
        self.backend = backend

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix: PrefixLike | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Attention of `q` over `[prefix; k]`, `q, k, v` `(B, H, N, D)`.

        The prefix is `prefix`, else the prompt's (if any); with none, timm's computation. `attn_mask` (a float
        bias or boolean mask, SDPA semantics) and `is_causal` act on the token keys only: prefix columns stay
        visible.
        """
        dropout_p = self.attn_drop.p if self.training else 0.0
        if prefix is None and self.prompt is not None:
            prefix = self.prompt(q)
        if is_traced(q):  # torch.fx: the mask and is_causal may be graph inputs, shapes are symbolic
            p = None if prefix is None else prefix if isinstance(prefix, Prefix) else Prefix(*prefix)
            return traced_attention(q, k, v, p, self.prefix_gate, self.scale, attn_mask, is_causal, dropout_p)
        check_mask("attn_mask", attn_mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        bias = attention_bias(attn_mask, q.shape[2], is_causal, q)
        if prefix is None:  # timm's computation
            if self.fused_attn:
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
                )
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.attn_drop((attn if bias is None else attn + bias).softmax(dim=-1))
            return attn @ v
        return prefix_attention(
            q,
            k,
            v,
            prefix,
            gate=self.prefix_gate,
            scale=self.scale,
            attn_bias=bias,
            dropout_p=dropout_p,
            backend=self.backend if self.fused_attn else "math",
        )

    def _prefix_repr(self) -> str:
        gate = "linear" if self.prefix_gate is None else type(self.prefix_gate).__name__
        return f"prefix_gate={gate}, backend={self.backend}"
