"""The self-check's float64 reference and its rounding-error bounds.

The reference computes gated prefix attention from its equations, independently of norga's backends:
`o = softmax([g(s), t]) @ [pv; v]` with `s = scale q . pk`, `g(s) = s + alpha tanh(tau s)` and
`t = scale q . k + bias`, in float64 with an explicit max-shifted exponential.

The bounds are first order in the unit roundoff, worst case over the signs of the rounding errors, elementwise on
the check's data (so they hold for any summation order, thread count or kernel), from this analysis:

- a score (`D` products summed, the scale, casts) is off by `(D + 3) u scale sum_d |q_d k_d|`, times the gate's
  slope `|g'(s)|` on prefix scores, which also get 8 roundings of `|s| + |g(s) - s|` from the gate; a bias adds
  one rounding of `|t| + |bias|`; the shift by the row's maximum and a log-sum-exp move a score by at most
  `u (|s - max| + |max| + log n + 2)` (`n = L + M` columns). Float32 inputs on CUDA may pass through TF32 in the
  matrix products: `2 u_tf32` of the same absolute sums. A lower input dtype (`u_io`) rounds the gated residual
  `g - s` (the `sdpa` mask) and the softmax weights inside the kernels.
- a softmax weight's relative error `rho` is its score's error plus the weighted mean of the row's score errors,
  plus `(2 n + 92) u + u_io` (an exponential of 20 ulp in the fused kernels, twice; the normalising sum; a dozen
  single roundings).
- an output is off by `sum_j w_j rho_j |V_j| + (n u + 4 u_io) sum_j w_j |V_j|`.
- backward, for an upstream gradient `dO`: the score gradient `dS = P (dO . V - dO . o)` has absolute terms
  `T = P (|dO| |V| + |dO| |o|)` and error `E = (rho + (D + 3) u + u_io) T + P (|dO| . e_o)`; prefix columns are
  multiplied by the gate's slope (plus 2: `sdpa` differentiates `g - s` in its mask, whose parts cancel exactly);
  each gradient is then a sum over the other side (`n`, `N` terms) of those, rounded once more to the input dtype.

`tests/tolerance.py` holds the test suite's version of this analysis, with more options; this one covers what the
self-check runs: the tanh gate, per-head prefixes `(B, H, L, D)` and a token bias `(1, H, N, M)`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["error_bounds", "reference"]


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    alpha: torch.Tensor,
    tau: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Gated prefix attention in float64 from its equations (module docstring), differentiable.

    Args:
        q: Queries `(B, H, N, D)`.
        k: Token keys `(B, H, M, D)`.
        v: Token values `(B, H, M, D)`.
        pk: Prefix keys `(B, H, L, D)`.
        pv: Prefix values `(B, H, L, D)`.
        alpha: The tanh gate's `alpha`, a scalar.
        tau: The gate's `tau`, a scalar.
        bias: Token bias `(1, H, N, M)` or `None`.
        scale: Score scale.

    Returns:
        `(B, H, N, D)` float64.
    """
    q, k, v, pk, pv, alpha, tau = (t.double() for t in (q, k, v, pk, pv, alpha, tau))
    s = scale * q @ pk.transpose(-2, -1)
    g = s + alpha * torch.tanh(tau * s)
    t = scale * q @ k.transpose(-2, -1)
    if bias is not None:
        t = t + bias.double()
    scores = torch.cat([g, t], dim=-1)
    w = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return (w / w.sum(dim=-1, keepdim=True)) @ torch.cat([pv, v], dim=-2)


def error_bounds(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    alpha: float,
    tau: float,
    bias: torch.Tensor | None,
    scale: float,
    d_out: torch.Tensor,
    *,
    io_unit: float,
    tf32: bool,
) -> dict[str, torch.Tensor]:
    """Elementwise bounds on a float32 evaluation's errors (module docstring), for inputs exact in their dtype.

    Args:
        q: Queries `(B, H, N, D)` (exact values, as for [`reference`][norga.info.bounds.reference]).
        k: Token keys `(B, H, M, D)`.
        v: Token values `(B, H, M, D)`.
        pk: Prefix keys `(B, H, L, D)`.
        pv: Prefix values `(B, H, L, D)`.
        alpha: The gate's `alpha`.
        tau: The gate's `tau`.
        bias: Token bias `(1, H, N, M)` or `None`.
        scale: Score scale.
        d_out: The upstream gradient `(B, H, N, D)`, exact in the input dtype.
        io_unit: Unit roundoff of the input dtype when lower than float32's, else 0.
        tf32: Whether float32 matrix products may round their operands to TF32 (CUDA).

    Returns:
        Bounds of the shapes of the output (`"out"`) and of the gradients of `q`, `k`, `v`, `pk`, `pv`, `bias`
        (`(1, H, N, M)`), `alpha` and `tau` (scalars).
    """
    u, w_tf = 2.0**-24, (2.0**-11 if tf32 else 0.0)
    q, k, v, pk, pv, d_out = (t.detach().double() for t in (q, k, v, pk, pv, d_out))
    n_q, d = q.shape[-2], q.shape[-1]
    length, n = pk.shape[-2], pk.shape[-2] + k.shape[-2]
    s = scale * q @ pk.transpose(-2, -1)
    act = torch.tanh(tau * s)
    residual = (alpha * act).abs()
    slope = (1 + alpha * tau * (1 - act**2)).abs()
    abs_pre = abs(scale) * q.abs() @ pk.abs().transpose(-2, -1)
    abs_tok = abs(scale) * q.abs() @ k.abs().transpose(-2, -1)
    t = scale * q @ k.transpose(-2, -1)
    ds_tok = ((d + 3) * u + 2 * w_tf) * abs_tok
    if bias is not None:
        b64 = bias.detach().double()
        t = t + b64
        ds_tok = ds_tok + u * (t.abs() + b64.abs())
    else:
        ds_tok = ds_tok + u * t.abs()
    ds_pre = slope * ((d + 3) * u + 2 * w_tf) * abs_pre + 8 * u * (slope.clamp(min=1) * abs_pre + residual)
    ds_pre = ds_pre + 2 * io_unit * (abs_pre + residual)
    scores = torch.cat([s + alpha * act, t], dim=-1)
    p = torch.softmax(scores, dim=-1)
    top = scores.amax(dim=-1, keepdim=True)
    ds = torch.cat([ds_pre, ds_tok], dim=-1) + u * ((scores - top).abs() + top.abs() + math.log(n) + 2)
    rho = ds + (p * ds).sum(-1, keepdim=True) + (2 * n + 92) * u + io_unit
    values = torch.cat([pv, v], dim=-2)
    o = p @ values
    e_o = (p * rho) @ values.abs() + (n * u + 4 * io_unit) * (p @ values.abs())

    dO = d_out.abs()
    terms = p * (dO @ values.abs().transpose(-2, -1) + (dO * o.abs()).sum(-1, keepdim=True))
    err = (rho + (d + 3) * u + io_unit) * terms + p * (dO * e_o).sum(-1, keepdim=True)
    t_pre, t_tok, e_pre, e_tok = terms[..., :length], terms[..., length:], err[..., :length], err[..., length:]
    gated_t, gated_e = (slope + 2) * t_pre, (slope + 2) * (e_pre + 5 * u * t_pre)
    c = abs(scale)

    def rows(e: torch.Tensor, tt: torch.Tensor, count: int, other: torch.Tensor) -> torch.Tensor:  # sum over columns
        return c * ((e + (count + 2) * u * tt) @ other.abs() + io_unit * tt @ other.abs())

    def cols(e: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:  # sum over query rows, against q
        return c * ((e + (n_q + 2) * u * tt).transpose(-2, -1) @ q.abs() + io_unit * tt.transpose(-2, -1) @ q.abs())

    def values_grad(pp: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        return (pp * rr).transpose(-2, -1) @ dO + ((n_q + 1) * u + 2 * io_unit) * pp.transpose(-2, -1) @ dO

    # q's gradient: the token part and the prefix part, each rounded to the input dtype, and their sum once more
    e_q = (
        rows(e_tok, t_tok, n, k) + rows(gated_e, gated_t, n, pk) + io_unit * c * (t_tok @ k.abs() + gated_t @ pk.abs())
    )
    count = e_pre.numel()
    batch = q.shape[0]
    bounds = {
        "out": e_o,
        "q": e_q,
        "k": cols(e_tok, t_tok),
        "pk": cols(gated_e, gated_t),
        "v": values_grad(p[..., length:], rho[..., length:]),
        "pv": values_grad(p[..., :length], rho[..., :length]),
        "bias": (e_tok + (batch + 1) * u * t_tok + io_unit * t_tok).sum(0, keepdim=True),
        "alpha": (act.abs() * (e_pre + (count + 4) * u * t_pre)).sum(),
        "tau": ((alpha * s * (1 - act**2)).abs() * (e_pre + (count + 6) * u * t_pre)).sum(),
    }
    return bounds
