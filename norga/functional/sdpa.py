"""The `sdpa` backend: `F.scaled_dot_product_attention` over `[prefix; tokens]` with an additive mask.

SDPA adds `scale * q . pk` itself on the prefix columns; the mask carries the rest of the gate,
`g - scale * q . pk`, and the token bias. Exact and differentiable everywhere, supports dropout, but
materialises a `B x H x N x (L + M)` mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .prefix import float32

__all__ = ["sdpa_attention"]


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """Attention over `[pk; k]`, `[pv; v]` with the gate's residual on the prefix columns as a mask."""
    b, h, n, _ = q.shape
    keys = torch.cat([pk.to(k.dtype).expand(b, -1, -1, -1), k], dim=-2)
    values = torch.cat([pv.to(v.dtype).expand(b, -1, -1, -1), v], dim=-2)
    with float32(q):
        linear = torch.matmul(q.float(), (pk.float() * scale).transpose(-2, -1))
    length = pk.shape[-2]
    mask = q.new_zeros(b, h, n, length + k.shape[-2])  # one B x H x N x (L + M) buffer, filled in place
    mask[..., :length] = g - linear
    if bias is not None:
        mask[..., length:] = bias
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p, scale=scale)
