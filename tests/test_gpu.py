"""CUDA checks: every backend usable on the GPU, in fp32 and bf16, against the float64 equations computed
on the CPU (``tests/reference.py``), forward and backward. Skipped without CUDA."""

import pytest
import reference as ref
import torch

from norga import NoRGaGate, prefix_attention
from norga.functional import available_backends, select_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

B, H, N, D, L = 2, 4, 37, 32, 6
TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}  # fp32 may use TF32 in matmuls: 1e-4, not 1e-5


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
    tol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), want, rtol=0, atol=tol * max(1.0, want.abs().max().item()))

    w = torch.randn(want.shape, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w.cuda()).sum(), leaves)
    exp = torch.autograd.grad((want * w).sum(), r)
    for g, e in zip(got, exp):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double().cpu(), e, rtol=0, atol=2 * tol * max(1.0, e.abs().max().item()))


def test_cuda_auto_selection_and_merge_refused():
    q = torch.randn(1, H, N, D, device="cuda")
    assert select_backend(q, "auto") in available_backends("cuda")
    if "merge" not in available_backends("cuda"):
        with pytest.raises(ValueError, match="not available on device 'cuda'"):
            select_backend(q, "merge")
