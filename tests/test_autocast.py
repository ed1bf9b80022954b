"""Autocast: bf16 and fp16 autocast give finite outputs close to fp32, with the gate, softmax statistics and
merge kept in float32. The fp32 reference is the float64 equations of ``tests/reference.py`` on the same
weights."""

import pytest
import reference as ref
import torch

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


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])  # merge has a no-grad path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["merge", "sdpa", "math", "auto"])
def test_layer_autocast_close_to_reference(dtype, backend, grad):
    if not _cpu_autocast_ok(dtype):
        pytest.skip(f"this torch has no CPU autocast for {dtype}")
    layer, x, pk, pv, want = _layer_and_reference(backend)
    with torch.set_grad_enabled(grad):
        full = layer(x, prefix=(pk, pv))
        torch.testing.assert_close(full.double(), want, rtol=0, atol=1e-5)  # fp32 path is exact
        with torch.autocast("cpu", dtype=dtype):
            low = layer(x, prefix=(pk, pv))
    assert low.dtype == dtype  # the projection ran in low precision: autocast was active
    assert torch.isfinite(low).all()
    # bf16 has an 8-bit mantissa (rel. error 2**-8 per rounding), fp16 an 11-bit one.
    tol = 4e-2 if dtype == torch.bfloat16 else 6e-3
    torch.testing.assert_close(low.double(), want, rtol=0, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["merge", "sdpa", "math"])
def test_autocast_gradients_finite_and_close(dtype, backend):
    if not _cpu_autocast_ok(dtype):
        pytest.skip(f"this torch has no CPU autocast for {dtype}")
    layer, x, pk, pv, _ = _layer_and_reference(backend)
    pk.requires_grad_(True)
    pv.requires_grad_(True)
    w = torch.randn(B, N, DIM)
    params = [pk, pv, layer.prefix_gate.alpha, layer.prefix_gate.tau, layer.qkv.weight]
    want = torch.autograd.grad((layer(x, prefix=(pk, pv)) * w).sum(), params)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x, prefix=(pk, pv))
    got = torch.autograd.grad((out.float() * w).sum(), params)
    for g, e in zip(got, want):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        scale = e.abs().max().item()
        rel = (g - e).abs().max().item() / max(scale, 1e-6)
        assert rel < (0.1 if dtype == torch.bfloat16 else 0.02), rel


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
    want = ref.norga_gate(D**-0.5 * q.double() @ pk.double().transpose(-2, -1), "tanh", 1.0, 1.0)
    # only q's own rounding to `dtype` remains; the product and the gate are float32
    torch.testing.assert_close(g.double(), want, rtol=0, atol=1e-5)


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
    eps = 2**-8 if dtype == torch.bfloat16 else 2**-11
    torch.testing.assert_close(out.double(), want, rtol=0, atol=8 * eps * max(1.0, want.abs().max().item()))
