"""The `flex` backend: FlexAttention over `[prefix; tokens]` with the gate as a `score_mod`.

One fused kernel compiled by inductor (Triton on CUDA, C++ on CPU): the scores are never materialised, and
`logits` and the token bias are read inside the kernel by index. The gate is called inside the `score_mod` on
scalar scores, so it must be traceable by `torch.compile` (a `NoRGaGate` is). Opt-in. On CUDA it trains: the
gradients of the gate's parameters, the logits and the token bias (captured tensors of the `score_mod`) come from
FlexAttention's backward. PyTorch has no compiled FlexAttention backward on CPU, so there it runs without autograd
only. The first call per shape and gate compiles (seconds). No dropout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._compat import has, require
from .prefix import Gate

__all__ = ["flex_attention", "flex_available", "require_flex", "score_mod"]


def flex_available(device: torch.device) -> bool:
    """Whether FlexAttention can run on `device`: CPU or CUDA, with a torch whose FlexAttention runs norga's
    `score_mod` (2.11 or newer, docs/compat.md)."""
    return device.type in ("cpu", "cuda") and has("flex")


def require_flex() -> None:
    """Raise the `ValueError` naming the torch release `flex` needs (2.11), unless the installed torch has it."""
    require("flex", "backend 'flex'", "use 'merge', 'sdpa' or 'math'")


_COMPILED: list[Callable[..., torch.Tensor]] = []  # the compiled flex_attention, built on first use


def _compiled() -> Callable[..., torch.Tensor]:
    if not _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention as flex

        _COMPILED.append(torch.compile(flex))  # fused only when compiled; inlined inside an outer torch.compile
    return _COMPILED[0]


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    gate: Gate,
    logits: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    *,
    attend: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """FlexAttention over `[pk; k]`, `[pv; v]`; `gate(prefix score)` on the first `L` columns.

    Args:
        q: Queries `(B, H, N, D)`.
        k: Token keys `(B, H, M, D)`.
        v: Token values `(B, H, M, D)`.
        pk: Prefix keys `(B|1, H, L, D)`.
        pv: Prefix values `(B|1, H, L, D)`.
        gate: The gate, called on scalar prefix scores inside the kernel, or `None`.
        logits: Prefix scores `(B|1, H, N|1, L)` replacing `scale * q . pk`, or `None`.
        bias: Token bias broadcastable to `(B, H, N, M)` with 4 dimensions, or `None`.
        scale: Score scale.
        attend: The FlexAttention callable: by default the compiled one. Given the uncompiled
            `torch.nn.attention.flex_attention.flex_attention`, its reference implementation runs (it materialises
            the scores; the tests check the `score_mod`'s gradients with it on CPU).

    Returns:
        `(B, H, N, D)` in the dtype of `v`.

    Raises:
        ValueError: a gradient is needed on CPU, where PyTorch has no compiled FlexAttention backward, or this torch
            is older than 2.11 (its FlexAttention cannot compile the `score_mod`).
    """
    require_flex()
    if attend is None and q.device.type == "cpu" and torch.is_grad_enabled():
        needs = [t for t in (q, k, v, pk, pv, logits, bias) if t is not None and t.requires_grad]
        if needs or (isinstance(gate, torch.nn.Module) and any(p.requires_grad for p in gate.parameters())):
            raise ValueError(
                "backend 'flex' has no backward on CPU (a PyTorch limitation); use 'merge' or 'auto' when "
                "training on CPU, or run under torch.no_grad()"
            )
    if q.device.type == "cpu" and not torch.is_grad_enabled():  # PyTorch refuses leaves that require grad on CPU
        q, k, v = q.detach(), k.detach(), v.detach()
    b, h, _, _ = q.shape
    keys = torch.cat([pk.to(k.dtype).expand(b, h, -1, -1), k], dim=-2)
    values = torch.cat([pv.to(v.dtype).expand(b, h, -1, -1), v], dim=-2)
    attend = _compiled() if attend is None else attend
    out = attend(q, keys, values, score_mod=score_mod(gate, logits, bias, pk.shape[-2]), scale=scale)
    return out.to(v.dtype)


def score_mod(
    gate: Gate, logits: torch.Tensor | None, bias: torch.Tensor | None, length: int
) -> Callable[[torch.Tensor, Any, Any, Any, Any], torch.Tensor]:
    """The `score_mod` of `flex` over `[prefix; tokens]` columns: on the first `length` columns the gate of the score
    (or of `logits` `(B|1, H|1, N|1, L)` read by index), on the others the score plus the token bias
    `(B|1, H|1, N, M)` read by index. Its captured tensors (`logits`, `bias`, the gate's parameters) get gradients
    through FlexAttention's backward."""

    def at(t: torch.Tensor, bi: Any, hi: Any, qi: Any, ki: Any) -> torch.Tensor:  # index a (B|1, H|1, N|1, X)
        return t[bi if t.shape[0] > 1 else 0, hi if t.shape[1] > 1 else 0, qi if t.shape[2] > 1 else 0, ki]

    def mod(score: torch.Tensor, bi: Any, hi: Any, qi: Any, ki: Any) -> torch.Tensor:
        pre = score if logits is None else at(logits, bi, hi, qi, ki.clamp(max=length - 1)).to(score.dtype)
        tok = score if bias is None else score + at(bias, bi, hi, qi, (ki - length).clamp(min=0)).to(score.dtype)
        return torch.where(ki < length, pre if gate is None else gate(pre), tok)

    return mod
