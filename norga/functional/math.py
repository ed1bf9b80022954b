"""The `math` backend: the readable reference.

Concatenate the gated prefix scores and the token scores, softmax, multiply by `[pv; v]`. Materialises
`N x (N + L)` scores. Float32 throughout, returns the dtype of `v`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .prefix import float32

__all__ = ["math_attention"]


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
