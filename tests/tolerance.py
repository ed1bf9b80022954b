"""Tolerances from rounding-error analysis: every bound in the tests comes from here or from ``tol``.

A computation in a floating-point ``dtype`` rounds each operation with relative error at most the unit
roundoff ``u = torch.finfo(dtype).eps / 2``. The classic bound for a sum or a dot product of ``n`` terms,
in *any* order (sequential, blocked, pairwise, SIMD lanes, split over threads, with or without FMA), is
``|fl(sum) - sum| <= gamma_n * sum(|terms|)`` with ``gamma_n = n u / (1 - n u)`` (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., sec. 3.1). This is why such bounds hold on any x86 CPU and
for any thread count, where the last bits of the results differ. A library function documented to
``k`` ulp counts as ``2k`` roundings (an ulp is at most ``2u`` relative).

The bounds are worst-case and first order in ``u``: they use the operands' actual magnitudes (measured
on the test's data in float64) but assume every rounding error has the worst sign. Two float32 paths
compared with each other differ by at most the sum of their bounds.

Attention (``attention_tol``), for an output ``o_i = sum_j w_ij v_j``, ``w = softmax(s)`` over ``n = L + M``
columns (``L`` prefix, ``M`` tokens), head dim ``D``, computed in float32 as every norga backend does
(whatever the input dtype), elementwise on the test's data:

* each score's error: a dot product of ``D`` terms and the scale, and the casts of q and the prefix key to
  float32: ``(D + 3) u scale sum_d |q_id k_jd|``; a gate ``g(s) = s + a act(t s)`` multiplies this by its
  slope ``|g'(s)|`` and adds 8 roundings of ``|s| + |g(s) - s|`` (``t s``, the activation (1 ulp), ``a *``,
  ``+``, the no-grad path's shift, the parameters' float32 rounding); a bias adds one rounding of
  ``|t| + |bias|``; the shift by the row's max, and the merge backend's ``lse_tok`` (a log (1 ulp) of a sum
  whose relative error is ``n u``, carried by the token columns), move a score by at most
  ``u (|s - max| + |max| + log n + 2)``: ``ds_ij``.
* each weight's relative error ``rho_ij = ds_ij + sum_k w_ik ds_ik + (2 n + 92) u``: a score error moves
  ``w_ij`` by ``ds_ij - sum_k w_ik ds_ik``; ``exp`` in PyTorch's fused CPU attention kernel is ``exp_u20``
  (documented 20 ulp, ``40 u``, once in ``w_ij`` and once in its normaliser: ``80 u``); the normalising sum
  of ``n`` positive terms, the merge's second softmax over ``L + 1`` columns and a dozen single roundings
  (divisions, the merge's multiply and add, the online-softmax rescale, casts) the rest.
* each output element: ``e_o = sum_j w_ij rho_ij |v_jd| + n u sum_j w_ij |v_jd|`` (the weighted sum of ``n``
  values).

Inputs already rounded to bfloat16/float16 (``io_dtype``) are exact inputs: the references are computed
from the same rounded tensors. What is rounded to ``io_dtype`` inside adds ``u_io``: the weights in the
fused kernel's ``P @ V`` (to ``rho``), its token output, a float32 prefix value cast to ``io_dtype``, the
final output (``4 u_io sum_j w_ij |v_jd|``), and on the ``sdpa`` backend the gate residual ``g - s`` in the
mask and a float32 prefix key cast to ``io_dtype`` (``2 u_io (|s| + |g - s|)`` in the prefix scores).

The other helpers: ``attention_grad_tol`` (the attention's backward), ``norga_gate_err`` (the gate alone),
``linear_err`` (a linear layer), ``routing_err`` (SMoPE's routing logits), ``cross_entropy_err``,
``router_loss_tol``, ``prototype_loss_tol`` (SMoPE's losses), ``prefix_layer_tol`` / ``prefix_layer_grad_tol`` (a
``PrefixMoEAttention``: qkv, attention, projection), ``projection_tol`` (two layers that differ only in their
attention, through the shared projection), ``network_tol`` (a whole timm ViT: every rounding's local bound weighted
by the output's Jacobian), ``assert_within`` (elementwise bounds).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import reference as ref
import torch

ACT_SLOPE = {"tanh": 1.0, "sigmoid": 0.25, "gelu": 1.1290}  # max |act'(x)| (gelu: 1.12899 at x = 1.4142)
GELU_MIN = 0.1700  # |gelu(x)| <= max(x, 0.17) (its minimum is -0.16997 at x = -0.7518)


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2``: the largest relative error of one rounding to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def gamma(dtype: torch.dtype, n: float) -> float:
    """``gamma_n = n u / (1 - n u)``: relative error bound of ``n`` chained roundings (a sum of ``n`` terms)."""
    nu = n * unit_roundoff(dtype)
    assert nu < 0.5, f"{n} roundings in {dtype}: the first-order bound does not apply"
    return nu / (1 - nu)


def tol(dtype: torch.dtype, n: float, magnitude: float = 1.0) -> float:
    """Error bound of a sum or dot product of ``n`` terms (or ``n`` chained roundings) in ``dtype``, whose
    absolute terms sum to at most ``magnitude``: ``gamma_n * magnitude``."""
    return gamma(dtype, n) * magnitude


def _max(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.abs().max()) if t.numel() else 0.0


def _abs_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * sum_d |q_id| |k_jd|``: the sum of the absolute terms of each score, ``(B, H, N, M)``."""
    return abs(scale) * (q.detach().double().abs() @ k.detach().double().abs().transpose(-2, -1))


def gate_bounds(act: Optional[str], alpha: float, tau: float, score: float) -> "tuple[float, float]":
    """``(G, A)`` for the gate ``g(s) = s + alpha act(tau s)`` on scores ``|s| <= score``: its slope
    ``G >= max |g'|`` and ``A >= max |alpha act(tau s)|``. ``act=None`` is the linear gate: ``(1, 0)``."""
    if act is None:
        return 1.0, 0.0
    alpha, tau = abs(float(alpha)), abs(float(tau))
    reach = 1.0 if act in ("tanh", "sigmoid") else max(tau * score, GELU_MIN)
    return 1.0 + alpha * tau * ACT_SLOPE[act], alpha * reach


# Error of the built-in activations in units of u: absolute for tanh (2 sigmoid(2x) - 1 without autograd:
# the sigmoid's exp (1 ulp), add and division, doubled, and the subtraction) and sigmoid; relative to
# max(1, |x|) for GELU, whose float32 erf is the Abramowitz-Stegun 7.1.26 polynomial (absolute error
# 1.5e-7, 2.5 u) inside 0.5 x (1 + erf(x / sqrt 2)).
ACT_ERR = {"tanh": 16.0, "sigmoid": 8.0, "gelu": 12.0}


def norga_gate_err(
    s: torch.Tensor, act: str, alpha: float, tau: float, dtype: torch.dtype, param_err: float = 0.0
) -> torch.Tensor:
    """Elementwise bound on ``|NoRGaGate(act, alpha, tau)(s) - reference.norga_gate(s, ...)|``, the gate
    evaluated in ``dtype`` on exact scores ``s``: the roundings of ``tau * s`` (moved by ``alpha act'``), of
    the activation (``ACT_ERR``), of ``alpha * act``, of the sum and of the shift; ``param_err``: a relative
    error of alpha and tau themselves (the gate stores them in float32, and casts them to ``dtype``) when
    the reference takes the exact ones. The float64 reference's own roundings, the same chain in float64,
    are added (they matter when ``dtype`` is float64)."""
    alpha, tau = float(alpha), float(tau)
    with torch.enable_grad():
        x = (tau * s.detach().double()).requires_grad_(True)
        a = ref.ACTS[act](x)
        (da,) = torch.autograd.grad(a.sum(), x)
    a, x = a.detach(), x.detach()
    g = s.detach().double() + alpha * a
    act_err = ACT_ERR[act] * (x.abs().clamp(min=1) if act == "gelu" else 1.0)
    moved = (alpha * da * x).abs()  # the activation's change for a relative change of tau * s

    def chain(u: float, param: float) -> torch.Tensor:
        err = (u + param) * (moved + (alpha * a).abs()) + abs(alpha) * act_err * u
        # the parameters' error to second order: max |act''| <= 0.8 (tanh 0.77, sigmoid 0.10, GELU 0.80)
        err = err + param**2 * abs(alpha) * (0.8 * x**2 + 2 * ACT_SLOPE[act] * x.abs())
        return err + 2 * u * (g.abs() + abs(alpha))  # the add, and the shift of the no-grad tanh path

    return chain(unit_roundoff(dtype), param_err) + chain(unit_roundoff(torch.float64), 0.0)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, msg: str = "") -> None:
    """``|actual - expected| <= bound`` elementwise (``bound`` a float or a broadcastable tensor), in float64;
    non-finite values must match exactly."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{msg} shape {tuple(a.shape)} != {tuple(e.shape)}"
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite), f"{msg} non-finite values differ"
    assert torch.equal(a[~finite], e[~finite]), f"{msg} non-finite values differ"
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(e)
    excess = torch.where(finite, (a - e).abs() - bound, torch.zeros_like(e))
    if excess.numel() and float(excess.max()) > 0:
        i = int(excess.flatten().argmax())
        raise AssertionError(
            f"{msg} |actual - expected| exceeds the bound at flat index {i}: actual {a.flatten()[i].item()!r}, "
            f"expected {e.flatten()[i].item()!r}, difference {(a - e).abs().flatten()[i].item():.3g} > bound "
            f"{bound.flatten()[i].item():.3g} ({int((excess > 0).sum())} of {e.numel()} elements over)"
        )


def gate_args(gate: Optional[torch.nn.Module]) -> dict:
    """``act``, ``alpha``, ``tau`` of a built-in :class:`norga.NoRGaGate` (nothing for the linear gate)."""
    if gate is None:
        return {}
    assert gate.activation_name in ACT_SLOPE, "a custom activation: pass gate= and gate_slope= instead"
    return {"act": gate.activation_name, "alpha": gate.alpha.item(), "tau": gate.tau.item()}


class _Analysis:
    """The float64 quantities of one attention and the elementwise error bounds of its float32 evaluation.

    ``ds`` bounds each score's error, ``rho`` each softmax weight's relative error, ``e_o`` each output
    element's error (module docstring). Shapes: scores and weights ``(B, H, N, L + M)``, outputs
    ``(B, H, N, Dv)``.
    """

    def __init__(
        self, q, k, v, pk, pv, *, scale, act, alpha, tau, gate, gate_slope, bias, logits, dtype,
        io_dtype, score_err, value_err, qk_err, pk_err, logits_err,
    ):  # fmt: skip
        u = self.u = unit_roundoff(dtype)
        q, k, v = (t.detach().double() for t in (q, k, v))
        B, H, N, D = q.shape
        if pk is None or pk.shape[-2] == 0:
            pk, pv, logits = q.new_zeros(B, H, 0, D), v.new_zeros(B, H, 0, v.shape[-1]), None
        pk, pv = pk.detach().double(), pv.detach().double()
        self.q, self.k, self.pk, self.scale = q, k, pk, abs(scale)
        L = self.L = pk.shape[-2]
        n = self.n = L + k.shape[-2]
        t = scale * q @ k.transpose(-2, -1)
        abs_tok = _abs_scores(q, k, scale)
        ds_tok = (D + 3) * u * abs_tok + u * t.abs()
        if bias is not None:
            b = bias.detach().double().expand_as(t)
            t = t + b
            ds_tok = ds_tok + u * torch.where(torch.isfinite(b), t.abs() + b.abs(), torch.zeros_like(b))
        if logits is not None:
            lin = logits.detach().double().expand(B, H, N, L)
            abs_pre, lin_err = lin.abs(), u * lin.abs()  # float32 given (exact) or cast (one rounding)
            lin_err = lin_err + torch.as_tensor(logits_err, dtype=torch.float64).expand(B, H, N, L)
        else:
            lin = scale * q @ pk.transpose(-2, -1)
            abs_pre = _abs_scores(q, pk, scale)
            lin_err = (D + 3) * u * abs_pre
        if act is not None:
            with torch.enable_grad():
                x = (float(tau) * lin).requires_grad_(True)
                f = ref.ACTS[act](x)
                (df,) = torch.autograd.grad(f.sum(), x)
            g = lin + float(alpha) * f.detach()
            slope = (1 + float(alpha) * float(tau) * df).abs()
            self.d_alpha, self.d_tau = f.detach().abs(), (float(alpha) * lin * df).abs()
        elif gate is not None:
            assert gate_slope is not None, "a custom gate needs gate_slope"
            g = gate(lin).detach().double()
            slope = torch.full_like(lin, float(gate_slope))
        else:
            g, slope = lin, torch.ones_like(lin)
        self.slope = slope
        residual = (g - lin).abs()
        ds_pre = slope * lin_err + 8 * u * (slope.clamp(min=1) * abs_pre + residual)
        s = torch.cat([g, t], dim=-1)
        self.P = P = torch.softmax(s, dim=-1).nan_to_num(0.0)
        finite = torch.isfinite(s)
        m = torch.where(finite, s, torch.full_like(s, -math.inf)).amax(-1, keepdim=True).nan_to_num(0.0, 0.0, 0.0)
        shift = torch.where(finite, (s - m).abs(), torch.zeros_like(s))
        ds = torch.cat([ds_pre, ds_tok], dim=-1) + u * (shift + m.abs() + math.log(max(n, 1)) + 2) + score_err
        self.e_q, self.e_k = torch.zeros_like(q), torch.zeros_like(k)
        if qk_err is not None:  # errors of q and k move the scores: scale (e_q . |k| + |q| . e_k), gated
            self.e_q, self.e_k = (
                torch.as_tensor(e, dtype=torch.float64).expand_as(t_) for e, t_ in zip(qk_err, (q, k))
            )
            moved_tok = abs(scale) * (self.e_q @ k.abs().transpose(-2, -1) + q.abs() @ self.e_k.transpose(-2, -1))
            moved_pre = abs(scale) * slope * (self.e_q @ pk.abs().transpose(-2, -1)) if logits is None else 0 * g
            ds = ds + torch.cat([moved_pre, moved_tok], dim=-1)
        self.e_pk = torch.zeros_like(pk)
        if pk_err is not None and logits is None:  # an error of the prefix key moves the prefix scores
            self.e_pk = torch.as_tensor(pk_err, dtype=torch.float64).expand_as(pk)
            moved = abs(scale) * slope * (q.abs() @ self.e_pk.transpose(-2, -1))
            ds = ds + torch.cat([moved, torch.zeros_like(t)], dim=-1)
        u_io = unit_roundoff(io_dtype) if io_dtype is not None else 0.0
        if u_io > u:  # sdpa: the gate residual in the io_dtype mask and a float32 prefix key cast to io_dtype
            ds = ds + torch.cat([2 * u_io * (abs_pre + residual), torch.zeros_like(t)], dim=-1)
        else:
            u_io = 0.0
        ds = torch.where(finite, ds, torch.zeros_like(ds))
        self.rho = ds + (P * ds).sum(-1, keepdim=True) + (2 * n + 92) * u + u_io
        self.V = V = torch.cat([pv, v], dim=-2)
        self.o = P @ V
        PV = P @ V.abs()
        self.u_io, self.value_err = u_io, value_err
        self.e_o = (P * self.rho) @ V.abs() + (n * u + 4 * u_io) * PV + value_err * (1 + self.rho.amax(-1, True))

    def output(self) -> float:
        return _max(self.e_o)


def _analysis(q, k, v, pk, pv, scale, kw) -> _Analysis:
    opts = {
        "act": None, "alpha": 1.0, "tau": 1.0, "gate": None, "gate_slope": None, "bias": None,
        "logits": None, "dtype": torch.float32, "io_dtype": None, "score_err": 0.0, "value_err": 0.0, "qk_err": None,
        "pk_err": None, "logits_err": 0.0,
    }  # fmt: skip
    unknown = set(kw) - set(opts)
    assert not unknown, f"unknown options {unknown}"
    opts.update(kw)
    return _Analysis(q, k, v, pk, pv, scale=scale, **opts)


def attention_tol(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pk: torch.Tensor | None = None,
    pv: torch.Tensor | None = None,
    *,
    scale: float,
    **kw,
) -> float:
    """Bound on ``max |o - o_exact|`` of gated prefix attention computed in ``dtype`` (module docstring).

    Takes the float64 reference's arguments (``q, k, v`` ``(B, H, N|M, D)``, ``pk, pv`` ``(B, H, L, D)``,
    ``bias``, ``logits``) and: ``act``/``alpha``/``tau`` for a :class:`norga.NoRGaGate` (:func:`gate_args`),
    or ``gate`` (the float64 gate) and ``gate_slope``, a bound on how much it moves its output per unit of
    input (``max_i sum_j |dg_i / ds_j|``) for another gate; ``dtype`` the compute precision (float32);
    ``io_dtype`` that of the inputs and output when lower; errors the inputs already carry: ``qk_err``
    (bounds on the errors of ``q`` and ``k``, floats or tensors of their shapes), ``pk_err`` (of the prefix
    key), ``logits_err`` (of given ``logits``, before the gate, which scales it by its slope), ``score_err``
    (on the scores, a float or a ``(B, H, N, L + M)`` tensor) and ``value_err`` (on the values, a float).
    """
    if q.numel() == 0:
        return 0.0
    return _analysis(q, k, v, pk, pv, scale, kw).output()


def attention_grad_tol(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    d_out: torch.Tensor,
    *,
    scale: float,
    **kw,
) -> dict:
    """Bounds on the errors of the gradients of ``sum(d_out * o)`` (``o`` as in :func:`attention_tol`).

    Backward of attention, with ``P`` the weights, ``V`` the values ``[pv; v]``, ``dO = d_out``:
    ``dP_ij = dO_i . V_j`` and ``Delta_i = dO_i . o_i`` (``D`` terms), ``dS = P (dP - Delta)``,
    ``dV_j = sum_i P_ij dO_i`` (``N`` terms), ``dq_i = scale sum_j dS_ij k_j`` (``n``), ``dk_j = scale
    sum_i dS_ij q_i`` (``N``), the prefix scores' ``dS`` times the gate slope (plus 2: the ``sdpa``
    backend also differentiates ``g - s`` in its mask, whose two parts cancel in exact arithmetic), the
    gate's ``alpha``/``tau`` sum ``d g / d theta * dS`` over every prefix score. Each gradient's error is
    the forward's relative weight error ``rho`` plus its own roundings, times the sum of its absolute
    terms (``T = P (|dO| |V| + |dO| |o|)`` for ``dS``, computed here in float64); ``Delta`` also carries
    the output error ``e_o``.

    Options as :func:`attention_tol`, and ``d_out_err``: a bound on the error ``d_out`` itself carries
    (float or tensor). With a lower ``io_dtype`` the token kernel's backward also rounds ``dS``, its ``P``
    and its outputs ``dq, dk, dv`` to it.

    Returns maxima over the entries of the head-space gradients ``q, k, v, pk, pv`` ``(B, H, ., D)``, of
    ``scores`` (one prefix score) and ``bias`` (one token score), and of sums over a broadcast batch
    (``pk_batch``, ``pv_batch``, ``bias_batch``) or query rows (``logits_rows``), ``alpha``, ``tau``, and
    under ``tensors`` the elementwise bounds of ``q, k, v`` with the sums of their absolute terms.
    """
    d_out_err = kw.pop("d_out_err", 0.0)
    a = _analysis(q, k, v, pk, pv, scale, kw)
    u, u_io, L, n, P, V, c = a.u, a.u_io, a.L, a.n, a.P, a.V, a.scale
    q, k, pk, dO = a.q, a.k, a.pk, d_out.detach().double().abs()
    e_dO = torch.as_tensor(d_out_err, dtype=torch.float64).expand_as(dO)
    B, N, D = q.shape[0], q.shape[-2], q.shape[-1]
    T = P * (dO @ V.abs().transpose(-2, -1) + (dO * a.o.abs()).sum(-1, keepdim=True))
    E = (a.rho + (D + 3) * u + u_io) * T  # the forward's weights; dP, Delta; dS rounded to io_dtype
    E = E + P * ((dO * a.e_o).sum(-1, keepdim=True) + dO.sum(-1, keepdim=True) * a.value_err)  # o and V in them
    E = E + P * (e_dO @ V.abs().transpose(-2, -1) + (e_dO * a.o.abs()).sum(-1, keepdim=True))  # dO's own error
    T_pre, T_tok, E_pre, E_tok = T[..., :L], T[..., L:], E[..., :L], E[..., L:]
    slope = a.slope + 2
    T_ds, E_ds = slope * T_pre, slope * (E_pre + 5 * u * T_pre)
    C_v = P.transpose(-2, -1) @ dO
    e_v = (P * a.rho).transpose(-2, -1) @ dO + P.transpose(-2, -1) @ e_dO + ((N + 1) * u + 2 * u_io) * C_v
    terms_pk = c * T_ds.transpose(-2, -1) @ q.abs()
    e_pk = c * (E_ds + (N + 2) * u * T_ds).transpose(-2, -1) @ q.abs() + c * T_ds.transpose(-2, -1) @ a.e_q
    terms_q = c * (T_tok @ k.abs() + T_ds @ pk.abs())
    e_q = c * ((E_tok + (n + 2) * u * T_tok) @ k.abs() + (E_ds + (n + 2) * u * T_ds) @ pk.abs())
    e_q = e_q + c * (T_tok @ a.e_k + T_ds @ a.e_pk)
    terms_k = c * T_tok.transpose(-2, -1) @ q.abs()
    e_k = c * (E_tok + (N + 2) * u * T_tok).transpose(-2, -1) @ q.abs() + c * T_tok.transpose(-2, -1) @ a.e_q
    e_q, e_k = e_q + u_io * terms_q, e_k + u_io * terms_k  # written to io_dtype
    count = E_pre.numel()

    def batch_sum(err: torch.Tensor, terms: torch.Tensor) -> float:
        return _max(err.sum(0) + B * u * terms.sum(0))

    out = {
        "q": _max(e_q),
        "k": _max(e_k),
        "v": _max(e_v[..., L:, :]),
        "pk": _max(e_pk),
        "pv": _max(e_v[..., :L, :]),
        "scores": _max(E_ds),
        "bias": _max(E_tok + u * T_tok),
        "pk_batch": batch_sum(e_pk, terms_pk),
        "pv_batch": batch_sum(e_v[..., :L, :], C_v[..., :L, :]),
        "bias_batch": batch_sum(E_tok + u * T_tok, T_tok),
        "logits_rows": _max((E_ds + N * u * T_ds).sum(-2)),
        "tensors": {
            "q": e_q,
            "k": e_k,
            "v": e_v[..., L:, :],
            "terms_q": terms_q,
            "terms_k": terms_k,
            "terms_v": C_v[..., L:, :],
        },
    }
    if hasattr(a, "d_alpha"):
        out["alpha"] = float((a.d_alpha * (E_pre + (count + 4) * u * T_pre)).sum())
        out["tau"] = float((a.d_tau * (E_pre + (count + 6) * u * T_pre)).sum())
    return out


def linear_err(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    io_dtype: torch.dtype | None = None,
    round_inputs: bool = False,
    x_err: float = 0.0,
) -> torch.Tensor:
    """Elementwise bound on the error of ``x @ weight.T + bias`` accumulated in ``dtype``: a dot product of
    ``k = in_features`` terms and the bias, ``gamma_{k+1} (|x| |W|^T + |b|)``; an error ``x_err`` already in
    ``x`` adds ``max_j sum_k |W_jk| x_err``. With a lower ``io_dtype`` (bfloat16/float16) the output is
    rounded to it (twice: the product, then the bias add), and under autocast (``round_inputs``) ``x``,
    ``W`` and ``b`` are rounded to it first (``2 u_io`` of each product, ``u_io`` of the bias)."""
    x64, w64 = x.detach().double(), weight.detach().double()
    b64 = torch.zeros(w64.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    terms = x64.abs() @ w64.abs().T
    err = tol(dtype, w64.shape[1] + 1, 1.0) * (terms + b64.abs()) + w64.abs().sum(1) * x_err
    if io_dtype is not None and unit_roundoff(io_dtype) > unit_roundoff(dtype):
        u_io = unit_roundoff(io_dtype)
        err = err + 2 * u_io * (x64 @ w64.T + b64).abs() + u_io * (terms + b64.abs())
        if round_inputs:
            err = err + 2 * u_io * terms + u_io * b64.abs()
    return err


def routing_err(
    q: torch.Tensor, key: torch.Tensor, scale: float, *, dtype: torch.dtype = torch.float32, q_err=0.0
) -> torch.Tensor:
    """Elementwise bound on the error of SMoPE's routing logits ``scale * mean_n(q_n) . key_j`` computed in
    ``dtype``: the mean is a sum of ``N`` terms and a division (relative ``(N + 1) u`` of ``mean_n |q_nd|``), the
    dot product ``D`` terms, the scale one rounding: ``(D + N + 2) u scale sum_d mean_n |q_nd| |key_jd|``. An
    error ``q_err`` (float or ``q``'s shape) that ``q`` already carries adds ``scale sum_d mean_n q_err_nd
    |key_jd|``. ``q`` ``(B, H, N, D)``; ``key`` every expert ``(H, E, D)`` or the selected ones ``(B, H, K, D)``;
    returns ``(B, H, E)`` or ``(B, H, K)``."""
    q = q.detach().double()
    N, D = q.shape[-2:]
    e_q = torch.as_tensor(q_err, dtype=torch.float64).expand_as(q)
    weight = (D + N + 2) * unit_roundoff(dtype) * q.abs().mean(-2) + e_q.mean(-2)  # (B, H, D)
    key = key.detach().double().abs()
    key = key.unsqueeze(0) if key.dim() == 3 else key
    return abs(scale) * (weight.unsqueeze(-2) * key).sum(-1)


def _cross_entropy(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z) - z_t`` in float64 over the last dimension; ``target`` ``(...)``."""
    return torch.logsumexp(z, -1) - z.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def routing_logits(q: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """SMoPE's row-constant logits ``scale * mean_n(q_n) . key_j`` in float64, ``(B, H, 1, K)`` for ``q``
    ``(B, H, N, D)`` and the selected keys ``(B, H, K, D)``."""
    return scale * q.double().mean(-2, keepdim=True) @ key.double().transpose(-1, -2)


def cross_entropy_err(z: torch.Tensor, z_err: torch.Tensor, target: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Bound on the error of ``CE = logsumexp(z) - z_t`` (or ``-log_softmax(z)_t``) computed in ``dtype`` from
    logits that carry errors ``z_err``: the errors move ``CE`` by at most ``max_j z_err_j + z_err_t``; its own
    roundings are the shifts by the row's max (``u range`` each, ``range = max z - min z``), each ``exp``
    (allowed 20 ulp, ``40 u``, as ``exp_u20``), the sum of ``E`` positive terms (``E u``), the log (1 ulp of
    ``log sum <= log E``) and the final subtraction (``u |CE|``). ``z``, ``z_err`` ``(..., E)`` float64,
    ``target`` ``(...)``; returns ``(...)``."""
    z, z_err = z.double(), torch.as_tensor(z_err, dtype=torch.float64).expand_as(z)
    u, E = unit_roundoff(dtype), z.shape[-1]
    ce = _cross_entropy(z, target)
    spread = z.amax(-1) - z.amin(-1)
    moved = z_err.amax(-1) + z_err.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return moved + u * (2 * spread + E + 40 + 2 * math.log(E) + ce.abs())


def router_loss_tol(s: torch.Tensor, s_err: torch.Tensor, idx: torch.Tensor, eps: float) -> float:
    """Bound on the error of SMoPE's float32 router loss ``mean_b sum_h sum_{i in idx} CE(z_bh, i)`` with
    ``z = s + eps (1 - mask) (max s - min s)``: the raw scores ``s`` ``(B, H, E)`` carry ``s_err``
    (:func:`routing_err` with scale 1); the range adds ``2 max s_err + u range``, the margin's two products
    and the add one rounding each; each CE as :func:`cross_entropy_err`; the sum of ``B H K`` positive terms
    and the division by ``B`` ``gamma_{BHK+1}`` of the loss."""
    u = unit_roundoff(torch.float32)
    s, s_err = s.double(), torch.as_tensor(s_err, dtype=torch.float64).expand_as(s)
    B, H, _ = s.shape
    unselected = torch.ones_like(s).scatter_(-1, idx, 0.0)
    spread = (s.amax(-1) - s.amin(-1)).unsqueeze(-1)
    z = s + eps * unselected * spread
    margin_err = eps * (2 * s_err.amax(-1, keepdim=True) + u * spread) + 2 * u * eps * spread
    z_err = s_err + unselected * margin_err + u * z.abs()
    K = idx.shape[-1]
    zk, ek = (t.unsqueeze(2).expand(-1, -1, K, -1) for t in (z, z_err))
    loss = float(_cross_entropy(zk, idx).sum()) / B
    return float(cross_entropy_err(zk, ek, idx).sum()) / B + tol(torch.float32, B * H * K + 1, loss)


def prototype_loss_tol(old: torch.Tensor, now: torch.Tensor, frequent: torch.Tensor, top_k: int) -> float:
    """Bound on the error of SMoPE's float32 prototype loss ``sum_h mean_{p frequent} sum_{i < K} CE(old_p .
    now^T, i-th top-K target)``: each logit a dot product of ``D`` terms (``gamma_D`` of ``|old_p| . |now_e|``),
    each CE as :func:`cross_entropy_err`, the sums of ``K``, ``E`` and ``H`` positive terms and the division
    by the count of prototypes ``gamma_{K+E+H+1}`` of the loss. The targets (a top-K of exact values) are
    taken from float64."""
    old, now = old.double(), now.double()
    H, E, D = old.shape
    z = old @ now.transpose(-1, -2)  # (H, E prototypes, E experts)
    z_err = tol(torch.float32, D) * (old.abs() @ now.abs().transpose(-1, -2))
    targets = (old @ old.transpose(-1, -2)).topk(top_k, dim=-1).indices  # (H, E, K)
    zk, ek = (t.unsqueeze(2).expand(-1, -1, top_k, -1) for t in (z, z_err))
    ce = _cross_entropy(zk, targets)  # (H, E, K)
    mask = frequent.double()
    count = mask.sum(-1).clamp_min(1)
    loss = float(((ce.sum(-1) * mask).sum(-1) / count).sum())
    err = float(((cross_entropy_err(zk, ek, targets).sum(-1) * mask).sum(-1) / count).sum())
    return err + tol(torch.float32, top_k + E + H + 1, loss)


def prefix_layer_tol(
    layer: torch.nn.Module,
    x: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    *,
    act: str | None = None,
    alpha: float = 1.0,
    tau: float = 1.0,
    autocast: torch.dtype | None = None,
    routing_scale: float | None = None,
) -> float:
    """Bound on the output error of a ``PrefixMoEAttention`` (timm ``Attention`` without qk-norm, scale-norm
    or output gate) against the float64 equations on its weights: the ``qkv`` linear (:func:`linear_err`),
    attention on the rounded ``q, k, v`` (a ``q``/``k`` error ``e`` moves a score by ``scale (e . |k| +
    |q| . e)``, times the gate slope on prefix scores; a ``v`` error passes with weight 1), heads merged
    (exact), the ``proj`` linear. ``pk, pv`` in head space ``(B, H, L, D)``, ``x`` ``(B, N, C)``.
    ``routing_scale``: the prefix scores are SMoPE's row-constant logits ``routing_scale * mean_n(q_n) . pk``
    (:func:`routing_err`, with the ``qkv`` linear's error of ``q``) instead of ``scale * q . pk``.

    The linears accumulate in float64 for a float64 layer, else in float32 (a bfloat16 layer rounds their
    outputs to bfloat16); the attention is float32 (norga's backends). ``autocast``: the layer runs under
    ``torch.autocast`` to that dtype (inputs of the linears rounded to it too)."""
    H = layer.num_heads
    B, N, C = x.shape
    D = C // H
    scale = D**-0.5
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    io = autocast if autocast is not None else (x.dtype if x.dtype in (torch.bfloat16, torch.float16) else None)
    lin = {"dtype": acc, "io_dtype": io, "round_inputs": autocast is not None}
    qkv = x.detach().double() @ layer.qkv.weight.detach().double().T
    if layer.qkv.bias is not None:
        qkv = qkv + layer.qkv.bias.detach().double()
    e_qkv = linear_err(x, layer.qkv.weight, layer.qkv.bias, **lin)
    q, k, v = (ref.heads(qkv[..., i * C : (i + 1) * C], H) for i in range(3))
    e_q, e_k, e_v = (ref.heads(e_qkv[..., i * C : (i + 1) * C], H) for i in range(3))
    opts = {} if act is None else {"act": act, "alpha": alpha, "tau": tau}
    if routing_scale is not None:
        opts["logits"] = routing_logits(q, pk, routing_scale)
        opts["logits_err"] = routing_err(q, pk, routing_scale, q_err=e_q).unsqueeze(2)
    a = _analysis(q, k, v, pk, pv, scale, {"io_dtype": io, "qk_err": (e_q, e_k), "value_err": _max(e_v), **opts})
    o = torch.cat([a.o[:, h] for h in range(H)], dim=-1)  # (B, N, C), heads in order
    return _max(linear_err(o, layer.proj.weight, layer.proj.bias, **lin, x_err=a.output()))


def capture_stages(layer: torch.nn.Module, run: Callable[[], torch.Tensor], grad: bool = False):
    """``run()`` (a call of ``layer``, a ``PrefixMoEAttention``) recording what each stage got and gave: the
    qkv linear's input and output, the projection's input (the attention's output) and, with ``grad``, the
    gradients of the qkv output and of the projection's input. Returns ``(output, record)``."""
    seen: dict = {}

    def keep(name):
        def hook(module, args, out):
            seen[name + "_in"], seen[name + "_out"] = args[0], out
            if grad and name == "qkv":
                out.register_hook(lambda g: seen.__setitem__("qkv_grad", g))
            if grad and name == "proj":
                args[0].register_hook(lambda g: seen.__setitem__("proj_in_grad", g))

        return hook

    handles = [layer.qkv.register_forward_hook(keep("qkv")), layer.proj.register_forward_hook(keep("proj"))]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return out, seen


def rounded_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, io_dtype: torch.dtype
) -> "tuple[torch.Tensor, torch.Tensor]":
    """The float64 linear of ``x``, ``weight`` and ``bias`` rounded to ``io_dtype`` (what a bfloat16/float16
    layer or autocast gives the kernel), and the bound on the kernel's float32-accumulated, ``io_dtype``-
    rounded result (:func:`linear_err`)."""
    xs, w = x.detach().to(io_dtype), weight.detach().to(io_dtype)
    b = None if bias is None else bias.detach().to(io_dtype)
    want = xs.double() @ w.double().T + (0.0 if b is None else b.double())
    return want, linear_err(xs, w, b, io_dtype=io_dtype)


def assert_prefix_layer_stages(
    layer: torch.nn.Module,
    seen: dict,
    out: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    io_dtype: torch.dtype,
    gate: dict,
) -> None:
    """Each stage of a ``PrefixMoEAttention`` run in ``io_dtype`` (a bfloat16/float16 layer, or autocast)
    against the float64 equations of what that stage got (:func:`capture_stages`): the qkv linear, the
    attention (``pk, pv`` in head space, ``gate`` as :func:`gate_args`), the projection. Through several
    stages the worst case of ``io_dtype`` rounding (``u`` of every operand, moved by each linear's
    ``max_j sum_k |W_jk|``) bounds nothing useful; each stage alone is bounded tightly."""
    H = layer.num_heads
    B, N, three_c = seen["qkv_out"].shape
    D = three_c // (3 * H)
    assert_within(seen["qkv_out"], *rounded_linear(seen["qkv_in"], layer.qkv.weight, layer.qkv.bias, io_dtype), "qkv")
    q, k, v = seen["qkv_out"].detach().reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    g = None if not gate else (lambda s: ref.norga_gate(s, gate["act"], gate["alpha"], gate["tau"]))
    o = ref.prefix_attention(q, k, v, pk, pv, scale=D**-0.5, gate=g)
    o_bound = attention_tol(q, k, v, pk, pv, scale=D**-0.5, io_dtype=io_dtype, **gate)
    assert_within(seen["proj_in"], torch.cat([o[:, h] for h in range(H)], dim=-1), o_bound, "attention")
    assert_within(out, *rounded_linear(seen["proj_in"], layer.proj.weight, layer.proj.bias, io_dtype), "proj")


def _layer_norm_err(x: torch.Tensor, mod: torch.nn.LayerNorm, u: float) -> torch.Tensor:
    """Bound on a LayerNorm's error over rows of ``n`` features: the mean (``n`` terms) moves every
    centred value ``d = x - mean`` by ``gamma_n mean|x|``; the variance, a sum of ``n`` squares of those,
    and ``1 / sqrt`` give ``rstd`` a relative error ``(n / 2 + 4) u`` plus the centring's share
    ``gamma_n mean|x| / sigma``; the scale, weight and bias add three roundings."""
    n = math.prod(mod.normalized_shape)
    dims = tuple(range(-len(mod.normalized_shape), 0))
    mu = x.mean(dims, keepdim=True)
    d = (x - mu).abs()
    sigma = x.var(dims, unbiased=False, keepdim=True).sqrt()
    rstd = (sigma**2 + mod.eps).rsqrt()
    mean_abs = x.abs().mean(dims, keepdim=True)
    w = 1.0 if mod.weight is None else mod.weight.detach().abs()
    b = 0.0 if mod.bias is None else mod.bias.detach().abs()
    centring = (n + 1) * u * mean_abs
    return w * rstd * ((n / 2 + 8) * u * d + centring * (1 + d / sigma.clamp(min=1e-300))) + u * b


def network_tol(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    features: bool = False,
    dtype: torch.dtype = torch.float32,
    param_err: dict | None = None,
) -> torch.Tensor:
    """First-order bound on each output element's error when a timm ``VisionTransformer`` (optionally
    patched by norga) runs in ``dtype``: ``sum_m sum_j |d out / d h_mj| eps_mj`` over every rounding site
    ``m`` with local error bound ``eps_m`` (what one operation adds, its inputs exact), the Jacobian rows
    computed by autograd on a float64 copy. Sites: every ``Linear`` and ``Conv2d`` (``gamma_{k+1}`` of the
    absolute terms), ``LayerNorm`` (:func:`_layer_norm_err`), ``GELU`` (``ACT_ERR`` relative to ``|x|``),
    ``LayerScale`` and each residual or position-embedding add (one rounding), and each attention's core
    (:func:`attention_tol`, elementwise, with a norga layer's prefix and gate). ``features``: bound
    ``forward_features`` instead of the logits; ``param_err``: ``{parameter name: bound}`` for parameters
    that carry an error of their own (a resampled position table). Operations under ``no_grad`` (the query pass of
    a ``QueryPrompt``, which selects prompts but is not differentiated) are not sites: use it where the output
    depends on them only through discrete choices (L2P, DualPrompt). Returns a tensor of the output's shape."""
    import copy

    from timm.layers import LayerScale

    u = unit_roundoff(dtype)
    m = copy.deepcopy(model).double().eval()
    for mod in m.modules():  # explicit formulas, whose backward batches well over Jacobian rows (vmap)
        if isinstance(mod, torch.nn.LayerNorm):
            mod.forward = _explicit_layer_norm(mod)
        elif isinstance(mod, torch.nn.GELU):
            mod.forward = _explicit_gelu(mod)
        if hasattr(mod, "backend"):  # a norga layer: the readable backend
            mod.backend = "math"
    sites: list = []
    qkv_out: dict = {}
    handles = []

    def site(t: torch.Tensor, eps: torch.Tensor) -> None:
        if t.requires_grad:  # a QueryPrompt's query pass runs under no_grad: the output is constant in it
            sites.append((t, eps.detach()))

    def linear(mod, args, out):
        xa = args[0].detach().abs()
        b = 0.0 if mod.bias is None else mod.bias.detach().abs()
        site(out, tol(dtype, mod.in_features + 1) * (xa @ mod.weight.detach().abs().T + b))

    def conv(mod, args, out):
        k = mod.in_channels // mod.groups * math.prod(mod.kernel_size)
        terms = torch.nn.functional.conv2d(
            args[0].detach().abs(), mod.weight.detach().abs(), None, mod.stride, mod.padding, mod.dilation, mod.groups
        )
        b = 0.0 if mod.bias is None else mod.bias.detach().abs().view(-1, 1, 1)
        site(out, tol(dtype, k + 1) * (terms + b))

    def attention_core(mod, args):
        o = args[0]  # (B, N, C): the heads' outputs, merged
        B, N, C = o.shape
        H = mod.num_heads
        assert isinstance(mod.q_norm, torch.nn.Identity) and isinstance(mod.k_norm, torch.nn.Identity)
        q, k, v = qkv_out[mod].detach().reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        pk = pv = None
        kw = {}
        p = mod.prompt(q) if getattr(mod, "prompt", None) is not None else None  # a Prefix in head space
        if p is not None:  # (a QueryPrompt's layer gives none in its query pass)
            pk, pv = p.key.expand(B, -1, -1, -1), p.value.expand(B, -1, -1, -1)
            kw = gate_args(mod.prefix_gate)
            if p.logits is not None:  # SMoPE: row-constant routing logits, gated inside the prompt
                smope = mod.prompt
                kw = {
                    **gate_args(smope.gate),
                    "logits": routing_logits(q, pk, smope.scale),
                    "logits_err": routing_err(q, pk, smope.scale).unsqueeze(2),
                }
        e = _analysis(q, k, v, pk, pv, mod.scale, {"dtype": dtype, **kw}).e_o
        site(o, torch.cat([e[:, h] for h in range(H)], dim=-1))

    for mod in m.modules():
        if isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_hook(linear))
        elif isinstance(mod, torch.nn.Conv2d):
            handles.append(mod.register_forward_hook(conv))
        elif isinstance(mod, torch.nn.LayerNorm):
            handles.append(mod.register_forward_hook(lambda md, a, o: site(o, _layer_norm_err(a[0].detach(), md, u))))
        elif isinstance(mod, torch.nn.GELU):
            handles.append(
                mod.register_forward_hook(lambda md, a, o: site(o, ACT_ERR["gelu"] * u * a[0].detach().abs()))
            )
        elif isinstance(mod, LayerScale):
            handles.append(mod.register_forward_hook(lambda md, a, o: site(o, u * o.detach().abs())))
        if hasattr(mod, "qkv") and hasattr(mod, "proj") and hasattr(mod, "num_heads"):
            handles.append(mod.qkv.register_forward_hook(lambda md, a, o, att=mod: qkv_out.__setitem__(att, o)))
            handles.append(mod.proj.register_forward_pre_hook(lambda md, a, att=mod: attention_core(att, a)))
        if all(hasattr(mod, n) for n in ("norm1", "attn", "norm2", "mlp")):  # a Block: two residual adds
            handles.append(mod.norm2.register_forward_pre_hook(lambda md, a: site(a[0], u * a[0].detach().abs())))
            handles.append(mod.register_forward_hook(lambda md, a, o: site(o, u * o.detach().abs())))
    if getattr(m, "pos_drop", None) is not None:  # the position-embedding add
        handles.append(m.pos_drop.register_forward_pre_hook(lambda md, a: site(a[0], u * a[0].detach().abs())))
    x64 = x.detach().double().requires_grad_(True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _explicit_sdpa
    try:
        out = m.forward_features(x64) if features else m(x64)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    B = out.shape[0]
    # samples do not interact: one Jacobian row per output position serves every sample at once, each
    # sample's sites (batch first) giving its own row; a shared parameter's error needs rows per sample
    per_sample = not param_err
    assert all(t.shape[0] == B for t, _ in sites), "every rounding site must be batch-first"
    for name, err in (param_err or {}).items():
        site(m.get_parameter(name), torch.as_tensor(err, dtype=torch.float64))
    tensors, eps = [t for t, _ in sites], [e for _, e in sites]
    torch.set_flush_denormal(True)  # float64 denormals (Jacobian entries below 1e-308) are slow; 0 is as good
    try:
        return _rows(out, tensors, eps, B, per_sample)
    finally:
        torch.set_flush_denormal(False)


def _rows(out: torch.Tensor, tensors: list, eps: list, B: int, per_sample: bool) -> torch.Tensor:
    """``sum_m sum_j |d out_i / d t_mj| eps_mj`` for every output element ``i`` (network_tol)."""
    n = out[0].numel() if per_sample else out.numel()
    bound = torch.zeros(B, n, dtype=torch.float64) if per_sample else torch.zeros(out.numel(), dtype=torch.float64)
    chunk = 64
    for start in range(0, n, chunk):  # Jacobian rows, a chunk at a time (vmapped backward)
        rows = torch.arange(start, min(n, start + chunk))
        seeds = torch.zeros(len(rows), *((B, n) if per_sample else (n,)), dtype=torch.float64)
        seeds[torch.arange(len(rows)), ..., rows] = 1.0
        grads = torch.autograd.grad(
            out, tensors, seeds.view(len(rows), *out.shape), retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        for g, e in zip(grads, eps):
            if g is None:
                continue
            contrib = (g.abs() * e).flatten(2 if per_sample else 1)
            if per_sample:
                bound[:, rows] += contrib.sum(-1).T
            else:
                bound[rows] += contrib.sum(-1)
    return bound.view(out.shape)


def _explicit_layer_norm(mod: torch.nn.LayerNorm):
    dims = tuple(range(-len(mod.normalized_shape), 0))

    def forward(x):
        mu = x.mean(dims, keepdim=True)
        y = (x - mu) * torch.rsqrt(((x - mu) ** 2).mean(dims, keepdim=True) + mod.eps)
        return y * (1.0 if mod.weight is None else mod.weight) + (0.0 if mod.bias is None else mod.bias)

    return forward


def _explicit_gelu(mod: torch.nn.GELU):
    assert mod.approximate == "none"
    return lambda x: 0.5 * x * (1 + torch.erf(x * 0.5**0.5))


def _explicit_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    assert dropout_p == 0.0 and not is_causal
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        s = s + attn_mask if attn_mask.dtype != torch.bool else s.masked_fill(~attn_mask, float("-inf"))
    w = torch.exp(s - s.amax(-1, keepdim=True).detach())
    return (w * w.sum(-1, keepdim=True).reciprocal()) @ v


def projection_tol(proj: torch.nn.Linear, o: torch.Tensor, o_err: float, dtype=torch.float32) -> float:
    """Bound on ``|proj(o1) - proj(o2)|`` for two float32 evaluations whose inputs differ from ``o`` by at
    most ``o_err`` in total: ``max_j sum_k |W_jk| o_err`` plus each side's own rounding of the projection
    (:func:`linear_err`)."""
    own = linear_err(o, proj.weight, proj.bias, dtype=dtype)
    return _max(linear_err(o, proj.weight, proj.bias, dtype=dtype, x_err=o_err) + own)


def prefix_layer_grad_tol(
    layer: torch.nn.Module,
    x: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    w: torch.Tensor,
    *,
    act: str | None = None,
    alpha: float = 1.0,
    tau: float = 1.0,
) -> dict:
    """:func:`attention_grad_tol` for the gradients of ``sum(w * layer(x, prefix))`` of a float32
    ``PrefixMoEAttention`` (as :func:`prefix_layer_tol`): the attention's inputs carry the qkv linear's
    errors, its upstream gradient ``w @ W_proj`` the projection backward's (:func:`linear_err`)."""
    H = layer.num_heads
    B, N, C = x.shape
    qkv = x.detach().double() @ layer.qkv.weight.detach().double().T
    if layer.qkv.bias is not None:
        qkv = qkv + layer.qkv.bias.detach().double()
    e_qkv = linear_err(x, layer.qkv.weight, layer.qkv.bias)
    q, k, v = (ref.heads(qkv[..., i * C : (i + 1) * C], H) for i in range(3))
    e_q, e_k, e_v = (ref.heads(e_qkv[..., i * C : (i + 1) * C], H) for i in range(3))
    d_o = ref.heads(w.detach().double() @ layer.proj.weight.detach().double(), H)
    e_do = ref.heads(linear_err(w, layer.proj.weight.T), H)
    gate = {} if act is None else {"act": act, "alpha": alpha, "tau": tau}
    return attention_grad_tol(
        q, k, v, pk, pv, d_o, scale=(C // H) ** -0.5, qk_err=(e_q, e_k), value_err=_max(e_v), d_out_err=e_do, **gate
    )
