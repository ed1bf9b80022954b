"""The CUDA ``merge`` algorithm run on CPU: norga's CUDA token kernels (``norga.functional.cuda``) with PyTorch's four
CUDA attention operators replaced by CPU stand-ins of the same signatures and output layouts
(``tests/cuda_kernels.py``: the fused CPU flash kernel, the memory-efficient log-sum-exp padded to 32 rows with
``+inf``, NaN rows where every token is masked), each call checked against the operator's contract and schema, the
result against the float64 equations, forward and backward. Also the choice of CUDA kernel and its errors."""

from unittest import mock

import pytest
import reference as ref
import torch
from cuda_kernels import EFFICIENT, EFFICIENT_BWD, FLASH, FLASH_BWD, Calls, cpu_stand_in
from tolerance import assert_within, attention_grad_tol, attention_tol, unit_roundoff
from versions import has

from norga import NoRGaGate
from norga.functional import available_backends, cuda, prefix_scores
from norga.functional.merge import merge_attention, token_kernel

B, H, N, D, L = 2, 3, 37, 8, 5  # N = 37: the memory-efficient log-sum-exp has 64 rows, 27 of them padding
SCALE = D**-0.5

# (kernel, dtype, bias: None, "bias" (a trained one, unaligned rows: copied once into padded rows), "aligned" (rows
# already a multiple of 8 elements apart: used as a view), "masked" (rows 0 and 4 fully masked), logits)
CASES = {
    "flash-bf16": (cuda.CUDA_FLASH, torch.bfloat16, None, False),
    "flash-fp16-logits": (cuda.CUDA_FLASH, torch.float16, None, True),
    "efficient-fp32": (cuda.CUDA_EFFICIENT, torch.float32, None, False),
    "efficient-fp32-bias": (cuda.CUDA_EFFICIENT, torch.float32, "bias", False),
    "efficient-fp32-aligned-logits": (cuda.CUDA_EFFICIENT, torch.float32, "aligned", True),
    "efficient-bf16-bias": (cuda.CUDA_EFFICIENT, torch.bfloat16, "bias", False),
    "efficient-fp16-masked": (cuda.CUDA_EFFICIENT, torch.float16, "masked", False),
}


def _bias(kind, dtype):
    """A token bias ``(1, H, N, N)`` float32 whose values ``dtype`` holds exactly (its rounding is no error of the
    backend), requiring grad."""
    if kind == "aligned":  # rows 40 elements apart in a larger buffer
        bias = torch.randn(1, H, N, 40)[..., :N]
    else:
        bias = torch.randn(1, H, N, N)
    if kind == "masked":
        bias = bias.masked_fill(torch.rand(1, 1, N, N) > 0.7, float("-inf"))
        bias[:, :, [0, 4]] = float("-inf")
    return bias.to(dtype).float().requires_grad_(True)


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_merge_with_cpu_stand_ins_matches_reference(case, monkeypatch):
    kernel, dtype, bias_kind, use_logits = CASES[case]
    calls = Calls()
    monkeypatch.setattr(cuda, "_aten", calls.through(cpu_stand_in))
    qkv = torch.randn(B, N, 3, H, D).to(dtype).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # timm's strided views
    pk, pv = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(2))
    gate = NoRGaGate("tanh", alpha=0.8, tau=1.7)
    bias = None if bias_kind is None else _bias(bias_kind, dtype)
    logits = torch.randn(B, H, 1, L, requires_grad=True) if use_logits else None
    g = prefix_scores(q, pk, SCALE, gate, logits)
    out = merge_attention(q, k, v, g, pv, bias, SCALE, kernel=kernel)
    assert out.dtype == dtype and out.shape == (B, H, N, D) and out.transpose(1, 2).is_contiguous()

    fwd, bwd = (FLASH, FLASH_BWD) if kernel is cuda.CUDA_FLASH else (EFFICIENT, EFFICIENT_BWD)
    leaves = {"qkv": qkv, "pk": pk, "pv": pv, "alpha": gate.alpha, "tau": gate.tau, "bias": bias, "logits": logits}
    leaves = {name: t for name, t in leaves.items() if t is not None}
    if logits is not None:
        del leaves["pk"]  # the logits replace the prefix keys' scores
    r = {name: t.detach().double().requires_grad_(True) for name, t in leaves.items()}
    rq, rk, rv = r["qkv"].permute(2, 0, 3, 1, 4).unbind(0)
    rbias = None if bias is None else r["bias"].expand(B, H, N, N)
    rlogits = None if logits is None else r["logits"].expand(B, H, 1, L)
    pk64 = r.get("pk", pk.detach().double())
    want = ref.prefix_attention(
        rq, rk, rv, pk64, r["pv"], scale=SCALE, gate=lambda s: ref.norga_gate(s, "tanh", r["alpha"], r["tau"]),
        bias=rbias, logits=rlogits,
    )  # fmt: skip
    assert torch.isfinite(want).all()
    io = dtype if dtype != torch.float32 else None
    args = {
        "scale": SCALE, "act": "tanh", "alpha": gate.alpha.item(), "tau": gate.tau.item(), "io_dtype": io,
        "bias": None if rbias is None else rbias.detach(), "logits": None if rlogits is None else rlogits.detach(),
    }  # fmt: skip
    q64, k64, v64, pk64, pv64 = (t.detach() for t in (rq, rk, rv, pk64, r["pv"]))
    assert_within(out, want, attention_tol(q64, k64, v64, pk64, pv64, **args), "output")
    assert [c[0] for c in calls.calls] == [fwd]

    w = torch.randn(want.shape, dtype=torch.float64)
    got = dict(zip(leaves, torch.autograd.grad((out.double() * w).sum(), list(leaves.values()))))
    exp = dict(zip(r, torch.autograd.grad((want * w).sum(), list(r.values()))))
    assert [c[0] for c in calls.calls] == [fwd, bwd]  # one kernel backward, given the merged output and lse
    gb = attention_grad_tol(q64, k64, v64, pk64, pv64, w, **args)
    t = gb["tensors"]
    u_io = unit_roundoff(dtype) if io else 0.0
    # q's gradient is the kernel's (in dtype) plus the prefix scores' (float32, cast to dtype): one more rounding
    # of the sum, u_io of its absolute terms
    bounds = {"qkv": torch.stack([t["q"] + u_io * t["terms_q"], t["k"], t["v"]]).permute(1, 3, 0, 2, 4)}
    bounds.update({name: gb[name] for name in ("pk", "pv", "alpha", "tau")})
    # the kernel's score gradients in dtype, summed over the batch and rounded to dtype once
    bounds["bias"] = (
        gb["bias_batch"] + u_io * (float(exp["bias"].abs().max()) + gb["bias_batch"]) if bias is not None else 0
    )
    bounds["logits"] = gb["logits_rows"]
    for name in leaves:
        assert_within(got[name], exp[name], bounds[name], name)


def test_cuda_kernel_choice_and_errors():
    """Flash for float16/bfloat16 without a bias on compute capability 8.0+, memory-efficient otherwise; a dtype,
    head dim or GPU neither takes is a ValueError naming what it needs."""
    bias = torch.zeros(1, 1, 4, 4)

    def kernel(dtype, d=64, capability=(9, 0), with_bias=False):
        with mock.patch("torch.cuda.get_device_capability", return_value=capability):
            return cuda.cuda_kernel(torch.zeros(1, 1, 4, d, dtype=dtype), bias if with_bias else None)

    assert kernel(torch.bfloat16) is cuda.CUDA_FLASH and kernel(torch.float16) is cuda.CUDA_FLASH
    assert kernel(torch.bfloat16, with_bias=True) is cuda.CUDA_EFFICIENT
    assert (
        kernel(torch.float32) is cuda.CUDA_EFFICIENT and kernel(torch.float32, capability=(7, 5)) is cuda.CUDA_EFFICIENT
    )
    assert kernel(torch.float16, capability=(7, 5)) is cuda.CUDA_EFFICIENT
    with pytest.raises(ValueError, match=r"compute capability 8.0 or newer for bfloat16, got 7.5"):
        kernel(torch.bfloat16, capability=(7, 5))
    with pytest.raises(ValueError, match=r"float32, float16 or bfloat16 inputs .*got torch.float64"):
        kernel(torch.float64)
    for d in (12, 264):
        with pytest.raises(ValueError, match=rf"multiple of 8 and at most 256, got {d}"):
            kernel(torch.float16, d=d)


def test_cuda_backends_listed():
    """This torch has the four CUDA operators, so CUDA lists `merge` (and `flex`, from torch 2.11) by name."""
    assert cuda.cuda_kernels_available()
    assert available_backends("cuda") == ("math", "merge", "sdpa") + (("flex",) if has("flex") else ())


def test_efficient_bias_layout():
    """An aligned bias is expanded as a view; another is copied once into rows padded to 8 elements; the padded
    log-sum-exp is +inf past N."""
    aligned = torch.randn(1, H, N, 40)[..., :N]
    view = cuda.efficient_bias(aligned, B, H, N, N)
    assert view.data_ptr() == aligned.data_ptr() and view.shape == (B, H, N, N) and view.stride()[:2] == (0, N * 40)
    unaligned = torch.randn(1, H, N, N)
    copy = cuda.efficient_bias(unaligned, B, H, N, N)
    assert copy.stride() == (0, N * 40, 40, 1) and torch.equal(copy[0], unaligned[0])
    lse = torch.randn(B, H, N)
    padded = cuda.padded_lse(lse, N)
    assert padded.shape == (B, H, 64) and padded.is_contiguous()
    assert torch.equal(padded[..., :N], lse) and torch.isposinf(padded[..., N:]).all()


def test_layout_helpers_copy_only_what_is_not_laid_out():
    """A bias whose rows are a multiple of 8 elements but not contiguous is made contiguous; an output not laid out
    (B, N, H, D) is copied into that layout (the memory-efficient backward reads it so), one that is is passed as is."""
    strided = torch.randn(1, H, 40, N).transpose(-2, -1)  # (1, H, N, 40), last dimension not contiguous
    made = cuda.efficient_bias(strided, B, H, N, 40)
    assert made.stride() == (0, N * 40, 40, 1) and torch.equal(made[0], strided[0])
    bhnd = torch.randn(B, H, N, D)
    copied = cuda._bnhd(bhnd)
    assert copied.transpose(1, 2).is_contiguous() and torch.equal(copied, bhnd)
    assert cuda._bnhd(copied) is copied


def test_no_token_kernel_elsewhere():
    with pytest.raises(ValueError, match="no fused token kernel on device 'meta'"):
        token_kernel(torch.empty(1, 1, 2, 8, device="meta"), None)
