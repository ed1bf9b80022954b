"""CUDA checks: every backend usable on the GPU, in fp32 and bf16, against the float64 equations computed
on the CPU (``tests/reference.py``), forward and backward. Skipped without CUDA."""

import pytest
import reference as ref
import torch
from tolerance import assert_within, attention_grad_tol, attention_tol, unit_roundoff

from norga import NoRGaGate, prefix_attention
from norga.functional import available_backends, select_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

B, H, N, D, L = 2, 4, 37, 32, 6
# Inside the kernels (tests/tolerance.py): float32 accumulation; fp32 inputs may go through TF32 in the
# matmuls (Triton's tl.dot does by default: a 10-bit mantissa, float16's unit roundoff 2**-11), bf16
# kernels round P and their outputs to bf16. Either is an `io_dtype` of that unit roundoff.
IO = {torch.float32: torch.float16, torch.bfloat16: torch.bfloat16}


def _inputs(dtype):
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.rand(B, L, H * D, dtype=torch.float64) * 2 - 1 for _ in range(2))
    return q, k, v, pk, pv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["math", "sdpa", "flex", "auto"])
def test_cuda_backend_matches_float64_reference(backend, dtype):
    assert backend == "auto" or backend in available_backends("cuda")
    q64, k64, v64, pk64, pv64 = _inputs(dtype)
    gate = NoRGaGate("tanh", alpha=0.8, tau=1.2).cuda()
    leaves = [t.to("cuda", dtype).requires_grad_(True) for t in (q64, k64, v64, pk64, pv64)]
    q, k, v, pk, pv = leaves
    leaves += [gate.alpha, gate.tau]
    out = prefix_attention(q, k, v, (pk, pv), gate=gate, backend=backend)
    assert out.dtype == dtype and out.device.type == "cuda"

    r = [t.clone().requires_grad_(True) for t in (q64, k64, v64, pk64, pv64)]
    r += [
        gate.alpha.detach().double().cpu().requires_grad_(True),
        gate.tau.detach().double().cpu().requires_grad_(True),
    ]
    want = ref.prefix_attention(
        r[0],
        r[1],
        r[2],
        ref.heads(r[3], H),
        ref.heads(r[4], H),
        scale=D**-0.5,
        gate=lambda s: ref.norga_gate(s, "tanh", r[5], r[6]),
    )
    # The float64 reference takes the unrounded inputs: converting them to `dtype` (and TF32's operand
    # rounding for fp32) is an input error of relative size in_err.
    in_err = unit_roundoff(dtype) + (unit_roundoff(torch.float16) if dtype == torch.float32 else 0.0)
    q_h, k_h, v_h, pk_h, pv_h = (t.detach() for t in (r[0], r[1], r[2], ref.heads(r[3], H), ref.heads(r[4], H)))
    args = {
        "scale": D**-0.5, "act": "tanh", "alpha": gate.alpha.item(), "tau": gate.tau.item(), "io_dtype": IO[dtype],
        "qk_err": (in_err * q_h.abs(), in_err * k_h.abs()), "pk_err": in_err * pk_h.abs(),
        "value_err": in_err * max(float(v_h.abs().max()), float(pv_h.abs().max())),
    }  # fmt: skip
    torch.testing.assert_close(out.double().cpu(), want, rtol=0, atol=attention_tol(q_h, k_h, v_h, pk_h, pv_h, **args))

    w = torch.randn(want.shape, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w.cuda()).sum(), leaves)
    exp = torch.autograd.grad((want * w).sum(), r)
    gb = attention_grad_tol(q_h, k_h, v_h, pk_h, pv_h, w, **args)
    for g, e, name in zip(got, exp, ["q", "k", "v", "pk", "pv", "alpha", "tau"]):
        assert torch.isfinite(g).all()
        assert_within(g.cpu(), e, gb[name], name)


def test_cuda_auto_selection_and_merge_refused():
    q = torch.randn(1, H, N, D, device="cuda")
    assert select_backend(q, "auto") in available_backends("cuda")
    if "merge" not in available_backends("cuda"):
        with pytest.raises(ValueError, match="not available on device 'cuda'"):
            select_backend(q, "merge")
