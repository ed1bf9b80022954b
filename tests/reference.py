"""Independent references written from the equations in NOTES.md (float64, explicit exp / sum).

Nothing here imports norga: the tests compare norga against these.
"""

from __future__ import annotations

import math

import torch

ACTS = {
    "tanh": lambda x: (torch.exp(2 * x) - 1) / (torch.exp(2 * x) + 1),
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0))),
}


def norga_gate(s: torch.Tensor, act: str, alpha: float, tau: float) -> torch.Tensor:
    """g(s) = s + alpha * act(tau * s)."""
    return s + alpha * ACTS[act](tau * s)


def heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """(..., L, h*d) -> (..., h, L, d) by explicit slicing of the last axis into h blocks."""
    d = t.shape[-1] // h
    return torch.stack([t[..., i * d : (i + 1) * d] for i in range(h)], dim=-3)


def prefix_attention(q, k, v, pk, pv, *, scale, gate=None, bias=None, logits=None):
    """o_i = softmax([g(s_i,1..L), t_i,1..N]) @ [pv; v], for q, k, v (B, H, N, D), pk, pv (B, H, L, D).

    s_il = scale * q_i . pk_l (or logits), t_ij = scale * q_i . k_j + bias_ij. Computed in float64 with an
    explicit max-shifted exp and sum, one (sample, head) at a time.
    """
    B, H, N, D = q.shape
    out = torch.empty(B, H, N, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            qb = q[b, h].double()
            s = scale * qb @ pk[b, h].double().T if logits is None else logits[b, h].double().expand(N, -1)
            g = gate(s) if gate is not None else s
            t = scale * qb @ k[b, h].double().T
            if bias is not None:
                t = t + bias[b, h].double()
            scores = torch.cat([g, t], dim=1)
            w = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            w = w / w.sum(dim=1, keepdim=True)
            out[b, h] = w @ torch.cat([pv[b, h].double(), v[b, h].double()], dim=0)
    return out
