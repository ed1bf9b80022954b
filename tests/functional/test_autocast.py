"""Autocast: bf16 and fp16 autocast give finite outputs close to fp32, with the gate, softmax statistics and
merge kept in float32. The fp32 reference is the float64 equations of ``tests/reference.py`` on the same
weights."""

import pytest
import reference as ref
import torch
from tolerance import (
    assert_prefix_layer_stages,
    assert_within,
    attention_grad_tol,
    attention_tol,
    capture_stages,
    gate_bounds,
    norga_gate_err,
    prefix_layer_tol,
    rounded_linear,
    tol,
    unit_roundoff,
)

from norga import NoRGaGate, PrefixMoEAttention, prefix_attention
from norga.functional import prefix_scores

B, N, DIM, HEADS, L = 2, 13, 64, 4, 6
D = DIM // HEADS


def _cpu_autocast_ok(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
        return out.dtype == dtype
    except (RuntimeError, ValueError):  # pragma: no cover - older torch without CPU fp16 autocast
        return False


DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _layer_and_reference(backend):
    layer = PrefixMoEAttention(
        DIM, num_heads=HEADS, qkv_bias=True, gate=NoRGaGate("tanh", alpha=0.7, tau=1.3), backend=backend
    )
    x = torch.randn(B, N, DIM)
    pk = torch.rand(B, L, DIM) * 2 - 1
    pv = torch.rand(B, L, DIM) * 2 - 1
    # float64 reference from the equations, on the same weights
    qkv = torch.nn.functional.linear(x.double(), layer.qkv.weight.double(), layer.qkv.bias.double())
    qkv = qkv.reshape(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)
    o = ref.prefix_attention(
        qkv[0],
        qkv[1],
        qkv[2],
        ref.heads(pk, HEADS),
        ref.heads(pv, HEADS),
        scale=D**-0.5,
        gate=lambda s: ref.norga_gate(s, "tanh", 0.7, 1.3),
    )
    o = torch.cat([o[:, h] for h in range(HEADS)], dim=-1)
    want = torch.nn.functional.linear(o, layer.proj.weight.double(), layer.proj.bias.double())
    return layer, x, pk, pv, want


def _stages(layer, x, pk, pv, dtype, grad=False):
    """The layer under autocast to ``dtype``, with what each stage got and gave (tolerance.capture_stages)."""

    def run():
        with torch.autocast("cpu", dtype=dtype):
            return layer(x, prefix=(pk, pv))

    return capture_stages(layer, run, grad)


def _heads_of(qkv):
    return qkv.reshape(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)


def _merge_heads(o):
    return torch.cat([o[:, h] for h in range(HEADS)], dim=-1)


def _gate(layer):
    g = layer.prefix_gate
    return {"act": "tanh", "alpha": g.alpha.item(), "tau": g.tau.item()}


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])  # merge has a no-grad path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["merge", "sdpa", "math", "auto"])
def test_layer_autocast_close_to_reference(dtype, backend, grad):
    """float32: the whole layer against the float64 equations. Autocast: each stage against the float64
    equations of what it got (the qkv linear, the attention with its float32 insides, the projection),
    since through several stages the worst case of bfloat16 rounding (2**-9 of every operand) bounds
    nothing."""
    if not _cpu_autocast_ok(dtype):
        pytest.skip(f"this torch has no CPU autocast for {dtype}")
    layer, x, pk, pv, want = _layer_and_reference(backend)
    pk_h, pv_h = ref.heads(pk, HEADS), ref.heads(pv, HEADS)
    with torch.set_grad_enabled(grad):
        full = layer(x, prefix=(pk, pv))
        low, seen = _stages(layer, x, pk, pv, dtype)
    # float32: the linears' dot products and the attention (tolerance.prefix_layer_tol); the reference takes
    # alpha = 0.7 and tau = 1.3, the gate their float32 roundings (within the gate's roundings there)
    bound = prefix_layer_tol(layer, x, pk_h, pv_h, act="tanh", alpha=0.7, tau=1.3)
    torch.testing.assert_close(full.double(), want, rtol=0, atol=bound)
    assert low.dtype == dtype  # the projection ran in low precision: autocast was active
    assert torch.isfinite(low).all()
    assert seen["qkv_out"].dtype == dtype
    assert_prefix_layer_stages(layer, seen, low, pk_h, pv_h, dtype, _gate(layer))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["merge", "sdpa", "math"])
def test_autocast_gradients_finite_and_close(dtype, backend):
    """Each stage of the backward under autocast against the float64 equations of what it got: the
    projection's input gradient, the attention's gradients (pk, pv, alpha, tau in float32; q, k, v), the
    qkv weight's gradient."""
    if not _cpu_autocast_ok(dtype):
        pytest.skip(f"this torch has no CPU autocast for {dtype}")
    layer, x, pk, pv, _ = _layer_and_reference(backend)
    gate = _gate(layer)
    pk.requires_grad_(True)
    pv.requires_grad_(True)
    w = torch.randn(B, N, DIM)
    params = [pk, pv, layer.prefix_gate.alpha, layer.prefix_gate.tau, layer.qkv.weight]
    out, seen = _stages(layer, x, pk, pv, dtype, grad=True)
    got = torch.autograd.grad((out.float() * w).sum(), params)
    for g in got:
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
    # the projection's backward: w (rounded to dtype, as the output is) times the projection's weight
    d_o = seen["proj_in_grad"]
    assert_within(d_o, *rounded_linear(w, layer.proj.weight.T, None, dtype), "projection input")
    # the attention's backward on what it got: q, k, v in dtype, pk, pv, alpha, tau in float32, and d_o
    qkv = seen["qkv_out"].detach().double().requires_grad_(True)
    leaves = [t.detach().double().requires_grad_(True) for t in params[:4]]
    pk64, pv64, alpha, tau = leaves
    q, k, v = _heads_of(qkv)
    pk_h, pv_h, d_o_h = (ref.heads(t, HEADS) for t in (pk64, pv64, d_o.double()))
    o = ref.prefix_attention(q, k, v, pk_h, pv_h, scale=D**-0.5, gate=lambda s: ref.norga_gate(s, "tanh", alpha, tau))
    want = torch.autograd.grad((o * d_o_h).sum(), leaves + [qkv])
    gb = attention_grad_tol(q, k, v, pk_h, pv_h, d_o_h, scale=D**-0.5, io_dtype=dtype, **gate)
    # sdpa takes the prefix key in dtype: its gradient through the keys is rounded to dtype too
    pk_bound = gb["pk"] + unit_roundoff(dtype) * float(gb["tensors"]["terms_k"].max())
    for g, e, bound, name in zip(got, want, [pk_bound, gb["pv"], gb["alpha"], gb["tau"]], ["pk", "pv", "alpha", "tau"]):
        assert_within(g, e, bound, name)
    t = gb["tensors"]
    d_qkv_bound = torch.cat([_merge_heads(t[name]) for name in ("q", "k", "v")], dim=-1)
    assert_within(seen["qkv_grad"], want[4], d_qkv_bound, "q, k, v")
    # the qkv weight's gradient: d_qkv^T x over B * N rows, in dtype (inputs and output rounded), float32 sums
    d_qkv, xs = seen["qkv_grad"].double().flatten(0, 1), x.to(dtype).double().flatten(0, 1)
    w_bound = (
        tol(torch.float32, B * N + 1, 1.0) * (d_qkv.abs().T @ xs.abs())
        + 2 * unit_roundoff(dtype) * (d_qkv.T @ xs).abs()
    )
    assert_within(got[4], d_qkv.T @ xs, w_bound, "qkv.weight")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_scores_stay_float32_under_autocast(dtype):
    if not _cpu_autocast_ok(dtype):
        pytest.skip(f"this torch has no CPU autocast for {dtype}")
    q = torch.randn(B, HEADS, N, D).to(dtype)
    pk = torch.randn(1, HEADS, L, D)
    gate = NoRGaGate("tanh")
    with torch.autocast("cpu", dtype=dtype):
        g = prefix_scores(q, pk, D**-0.5, gate)
    assert g.dtype == torch.float32
    s = D**-0.5 * q.double() @ pk.double().transpose(-2, -1)
    want = ref.norga_gate(s, "tanh", 1.0, 1.0)
    # q (already in dtype) is an exact input: the float32 product (D terms, the scale, the cast) moved by the
    # gate's slope, and the gate's own float32 roundings
    slope, _ = gate_bounds("tanh", 1.0, 1.0, 0.0)
    abs_terms = D**-0.5 * q.double().abs() @ pk.double().abs().transpose(-2, -1)
    bound = slope * tol(torch.float32, D + 2, 1.0) * abs_terms + norga_gate_err(s, "tanh", 1.0, 1.0, torch.float32)
    assert_within(g, want, bound)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["merge", "sdpa", "math"])
def test_low_precision_inputs_under_autocast_match_fp32_on_same_inputs(dtype, backend):
    """With the inputs already rounded to ``dtype``, the merge's float32 statistics keep the result close to
    the float64 equations on those same rounded inputs (only the fused token kernel runs in ``dtype``)."""
    if not _cpu_autocast_ok(dtype):
        pytest.skip(f"this torch has no CPU autocast for {dtype}")
    q, k, v = (torch.randn(B, HEADS, N, D).to(dtype) for _ in range(3))
    pk, pv = (torch.randn(1, HEADS, L, D).to(dtype) for _ in range(2))
    gate = NoRGaGate("tanh")
    with torch.autocast("cpu", dtype=dtype):
        out = prefix_attention(q, k, v, (pk, pv), gate=gate, backend=backend)
    assert out.dtype == dtype and torch.isfinite(out).all()
    want = ref.prefix_attention(
        q,
        k,
        v,
        pk.expand(B, -1, -1, -1),
        pv.expand(B, -1, -1, -1),
        scale=D**-0.5,
        gate=lambda s: ref.norga_gate(s, "tanh", 1.0, 1.0),
    )
    # the reference gets the same rounded inputs: float32 inside, plus what is rounded to `dtype` inside
    pk_h, pv_h = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
    bound = attention_tol(q, k, v, pk_h, pv_h, scale=D**-0.5, act="tanh", io_dtype=dtype)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=bound)
