"""The `math` backend: the readable reference, and what `torch.fx` traces.

Concatenate the gated prefix scores and the token scores, softmax, multiply by `[pv; v]`. Materialises
`N x (N + L)` scores. Float32 throughout, returns the dtype of `v`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .prefix import Gate, Prefix, PrefixLike, attention_bias, float32, prefix_scores

__all__ = ["math_attention", "traced_attention"]


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    pv: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """`softmax([g, scale * q . k + bias]) @ [pv; v]` for gated prefix scores `g` `(B, H, N, L)`."""
    with float32(q):
        tok = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
        if bias is not None:
            tok = tok + bias.float()
        attn = torch.cat([g, tok], dim=-1).softmax(dim=-1)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        values = torch.cat([pv.float().expand(v.shape[0], -1, -1, -1), v.float()], dim=-2)
        return torch.matmul(attn, values).to(v.dtype)


def traced_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: PrefixLike | None,
    gate: Gate,
    scale: float | None,
    attn_mask: torch.Tensor | None,
    is_causal: Any,
    dropout_p: float,
) -> torch.Tensor:
    """Prefix attention under `torch.fx` symbolic tracing: the `math` equations as device-agnostic graph ops.

    Shapes are symbolic, so nothing is validated or dispatched on them, and the prefix must already be in head
    space `(1 or B, H, L, D)` (norga's prompt modules hand it out so). The gate's ops are traced; the mask
    resolution and the softmax over `[prefix; tokens]` are one graph node (`_fx_math`), run with the real mask
    and `is_causal` (timm passes both as graph inputs).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if prefix is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    p = prefix if isinstance(prefix, Prefix) else Prefix(*prefix)
    g = prefix_scores(q, p.key, scale, gate, p.logits)
    return _fx_math(q, k, v, g, p.value, attn_mask, is_causal, scale, dropout_p)


@torch.fx.wrap
def _fx_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    pv: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """`math_attention` with the mask resolved at run time: a leaf of `torch.fx` graphs."""
    bias = attention_bias(attn_mask, q.shape[2], bool(is_causal), q)
    return math_attention(q, k, v, g, pv, bias, scale, dropout_p)
