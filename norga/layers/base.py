"""What every patched attention layer shares: the prefix attributes and the attention over `[prefix; tokens]`."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_mask, refuse_torchscript
from ..functional import BACKENDS, PrefixLike, attention_bias, is_traced, prefix_attention
from ..functional.prefix import fx_call, fx_leaf
from ..gates import NoRGaGate, resolve_gate

__all__ = ["PrefixAttentionMixin", "attend", "attention_width"]


def attention_width(attn: nn.Module) -> int:
    """The attention width `num_heads * head_dim` of a timm attention module: the width of a prefix vector."""
    qkv = getattr(attn, "qkv", None)
    proj = qkv if qkv is not None else attn.q_proj
    out = int(cast(nn.Linear, proj).weight.shape[0])
    return out // 3 if qkv is not None else out


@fx_leaf
def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: PrefixLike | None,
    gate: nn.Module | None,
    scale: float,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float,
    fused: bool,
    backend: str,
) -> torch.Tensor:
    """A patched layer's attention of `q` over `[prefix; k]`, `q, k, v` `(B, H, N, D)`, once its prefix is known.

    With no prefix, timm's computation (`F.scaled_dot_product_attention` if `fused`, else its explicit softmax);
    with one, [`prefix_attention`][norga.functional.prefix_attention] with `backend` (`"math"` if not `fused`).
    `attn_mask` (a float bias or boolean mask, SDPA semantics) and `is_causal` act on the token keys only.

    One function for eager and `torch.fx`: traced, it records a graph node that calls it with the same arguments
    at run time, so that the graph computes what eager computes, bit for bit, the mask's resolution and the
    backend selection included.

    Raises:
        TypeError: a mask of a wrong type.
        ValueError: a mask of a wrong shape, or both a mask and `is_causal`.
    """
    if is_traced(q):  # torch.fx: one graph node, this call with the same arguments at run time
        args = (q, k, v, prefix, gate, scale, attn_mask, is_causal, dropout_p, fused, backend)
        return fx_call(attend, q, *args)
    check_mask("attn_mask", attn_mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    bias = attention_bias(attn_mask, q.shape[2], is_causal, q)
    if prefix is None:  # timm's computation
        if fused:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
            )
        attn = (q * scale) @ k.transpose(-2, -1)
        attn = (attn if bias is None else attn + bias).softmax(dim=-1)
        if dropout_p > 0.0:  # timm's attn_drop in training
            attn = F.dropout(attn, p=dropout_p)
        return attn @ v
    return prefix_attention(
        q,
        k,
        v,
        prefix,
        gate=gate,
        scale=scale,
        attn_bias=bias,
        dropout_p=dropout_p,
        backend=backend if fused else "math",
    )


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
        visible. The prompt is called here (under `torch.fx` its operations are traced); the attention is
        [`attend`][norga.layers.base.attend] (under `torch.fx` one graph node that calls it).
        """
        dropout_p = self.attn_drop.p if self.training else 0.0
        if prefix is None and self.prompt is not None:
            prefix = self.prompt(q)
        gate, scale, fused, backend = self.prefix_gate, self.scale, self.fused_attn, self.backend
        return attend(q, k, v, prefix, gate, scale, attn_mask, is_causal, dropout_p, fused, backend)

    def _prefix_repr(self) -> str:
        gate = "linear" if self.prefix_gate is None else type(self.prefix_gate).__name__
        return f"prefix_gate={gate}, backend={self.backend}"
