"""GPU checks: every CUDA backend, in fp32 and bf16, with and without a token bias and with SMoPE's logits, against
the float64 equations computed on the CPU (``tests/reference.py``), forward and gradients; and every attention layer
of a patched ViT of every timm family (``tests/test_patch.py``'s models) on the GPU, each layer's attention against
the float64 equations of what it got, forward and gradients.

Skipped without CUDA. ``NORGA_GPU_TEST_DEVICE=cpu`` runs the same tests on the CPU (``benchmarks/gpu.sh --dry-run``
does, so that they cannot rot where no GPU is): there ``flex`` runs forward only, PyTorch having no CPU
FlexAttention backward."""

import os

import pytest
import reference as ref
import torch
from test_patch import FAMILY_MODELS, _model
from tolerance import assert_within, attention_grad_tol, attention_tol, unit_roundoff
from versions import has, needs

import norga
import norga.layers.base
from norga import NoRGaGate, Prefix, PrefixPool, patch_vit, prefix_attention
from norga.functional import available_backends, select_backend
from norga.patch import attention_layers

DEVICE = os.environ.get("NORGA_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = DEVICE == "cuda"

B, H, N, D, L = 2, 4, 37, 32, 6
# Inside the kernels (tests/tolerance.py): float32 accumulation; on CUDA fp32 inputs may go through TF32 in the
# matmuls (Triton's tl.dot does by default: a 10-bit mantissa, float16's unit roundoff 2**-11), bf16 kernels round
# P and their outputs to bf16. Either is an `io_dtype` of that unit roundoff.
IO = {torch.float32: torch.float16 if CUDA else None, torch.bfloat16: torch.bfloat16}
TF32 = unit_roundoff(torch.float16) if CUDA else 0.0


def _bound_args(q, k, v, pk, pv, dtype, in_err=0.0, **gate):
    """attention_tol's arguments for float64 ``q, k, v, pk, pv`` (head space): the kernels' io dtype, TF32's operand
    rounding for fp32 on CUDA, and ``in_err``, a relative error the inputs carry (their rounding to ``dtype``)."""
    err = in_err + (TF32 if dtype == torch.float32 else 0.0)
    return {
        "io_dtype": IO[dtype], "qk_err": (err * q.abs(), err * k.abs()), "pk_err": err * pk.abs(),
        "value_err": err * max(float(v.abs().max()), float(pv.abs().max())), **gate,
    }  # fmt: skip


def _inputs():
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.rand(B, L, H * D, dtype=torch.float64) * 2 - 1 for _ in range(2))
    return q, k, v, pk, pv


@pytest.mark.parametrize("extra", [None, "bias", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["math", "sdpa", "merge", pytest.param("flex", marks=needs("flex")), "auto"])
def test_backend_matches_float64_reference(backend, dtype, extra):
    assert backend == "auto" or backend in available_backends(DEVICE)
    grad = not (backend == "flex" and not CUDA)  # no CPU FlexAttention backward
    q64, k64, v64, pk64, pv64 = _inputs()
    gate = NoRGaGate("tanh", alpha=0.8, tau=1.2).to(DEVICE)
    leaves = [t.to(DEVICE, dtype).requires_grad_(grad) for t in (q64, k64, v64, pk64, pv64)]
    names = ["q", "k", "v", "pk", "pv", "alpha", "tau"]
    r = [t.clone().requires_grad_(True) for t in (q64, k64, v64, pk64, pv64)]
    r += [torch.tensor(p.item(), dtype=torch.float64, requires_grad=True) for p in (gate.alpha, gate.tau)]
    bias = logits = r_bias = r_logits = None
    if extra == "bias":  # exact in dtype: its rounding is no error of the backend
        b64 = torch.randn(1, H, N, N, dtype=torch.float64).to(dtype).double()
        bias, r_bias = b64.to(DEVICE, dtype).requires_grad_(grad), b64.clone().requires_grad_(True)
    if extra == "logits":  # float32, as SMoPE hands them out
        l64 = torch.randn(B, H, 1, L, dtype=torch.float64).float().double()
        logits, r_logits = l64.to(DEVICE, torch.float32).requires_grad_(grad), l64.clone().requires_grad_(True)
    q, k, v, pk, pv = leaves
    prefix = Prefix(pk, pv, logits) if logits is not None else (pk, pv)
    with torch.set_grad_enabled(grad):
        out = prefix_attention(q, k, v, prefix, gate=gate, attn_bias=bias, backend=backend)
    assert out.dtype == dtype and out.device.type == DEVICE
    pk_h, pv_h = ref.heads(r[3], H), ref.heads(r[4], H)
    want = ref.prefix_attention(
        r[0], r[1], r[2], pk_h, pv_h, scale=D**-0.5, gate=lambda s: ref.norga_gate(s, "tanh", r[5], r[6]),
        bias=None if r_bias is None else r_bias.expand(B, H, N, N),
        logits=None if r_logits is None else r_logits.expand(B, H, 1, L),
    )  # fmt: skip
    # The float64 reference takes the unrounded q, k, v, pk, pv: their rounding to `dtype` is an input error
    h64 = [t.detach() for t in (r[0], r[1], r[2], pk_h, pv_h)]
    gate_kw = {"act": "tanh", "alpha": gate.alpha.item(), "tau": gate.tau.item()}
    args = {"scale": D**-0.5, **_bound_args(*h64, dtype, in_err=unit_roundoff(dtype), **gate_kw)}
    if r_bias is not None:
        args["bias"] = r_bias.detach().expand(B, H, N, N)
    if r_logits is not None:
        args["logits"] = r_logits.detach().expand(B, H, 1, L)
    assert_within(out.cpu(), want, attention_tol(*h64, **args), "output")
    if not grad:
        return
    extra_leaves = [t for t in (bias, logits) if t is not None]
    extra_refs = [t for t in (r_bias, r_logits) if t is not None]
    names += [extra] if extra else []
    if logits is not None:  # the logits replace the prefix keys' scores
        leaves, r, names = leaves[:3] + leaves[4:], r[:3] + r[4:], names[:3] + names[4:]
    w = torch.randn(want.shape, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w.to(DEVICE)).sum(), leaves + [gate.alpha, gate.tau] + extra_leaves)
    exp = torch.autograd.grad((want * w).sum(), r + extra_refs)
    gb = attention_grad_tol(*h64, w, **args)
    bounds = {**gb, "bias": gb["bias_batch"], "logits": gb["logits_rows"]}
    for g, e, name in zip(got, exp, names):
        assert torch.isfinite(g).all(), name
        assert_within(g.cpu(), e, bounds[name], name)


def test_auto_selection_and_named_fused_backends():
    q = torch.randn(1, H, N, D, device=DEVICE)
    assert select_backend(q, "auto") == ("sdpa" if CUDA else "merge")
    assert ({"merge", "flex"} if has("flex") else {"merge"}) <= set(available_backends(DEVICE))
    assert select_backend(q, "merge") == "merge"
    if CUDA:
        with pytest.raises(ValueError, match="float32, float16 or bfloat16 inputs"):
            select_backend(q.double(), "merge")


def _record_attention(monkeypatch):
    """Every prefix_attention call of the patched layers: its inputs and output, as the layer made them."""
    calls = []
    real = norga.layers.base.prefix_attention

    def record(q, k, v, prefix, **kw):
        out = real(q, k, v, prefix, **kw)
        calls.append((q, k, v, prefix, kw, out))
        return out

    monkeypatch.setattr(norga.layers.base, "prefix_attention", record)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["merge", "auto"])
@pytest.mark.parametrize("key", list(FAMILY_MODELS))
def test_patched_family_attention_matches_float64_reference(key, backend, dtype, monkeypatch):
    """A patched model of every family on the device, in ``dtype``: each prompted layer's attention, forward and its
    gradients (q, k, v, the prefix, alpha, tau and a token bias from the family, if it needs grad), against the
    float64 equations of the very q, k, v, prefix and bias the layer computed (timm's code, on the device)."""
    model, size = _model(key)
    found = attention_layers(model)
    eligible = [layer for layer in found if not layer.windowed]
    width = norga.layers.attention_width(found[0].module)
    pool = PrefixPool(num_tasks=3, num_layers=len(eligible), length=4, dim=width)
    patch_vit(model, gate=NoRGaGate("tanh", alpha=0.9, tau=1.3), layers="all", prompt=pool, backend=backend)
    model.to(DEVICE, dtype).train()
    norga.set_task(model, torch.tensor([2, 0]))
    calls = _record_attention(monkeypatch)
    out = model(torch.randn(2, 3, size, size, device=DEVICE, dtype=dtype))
    assert torch.isfinite(out).all() and len(calls) == len(eligible)
    for q, k, v, prefix, kw, o in calls:
        gate, bias, b = kw["gate"], kw["attn_bias"], q.shape[0]
        inputs = [q, k, v, prefix.key, prefix.value, gate.alpha, gate.tau]
        inputs += [bias] if bias is not None and bias.requires_grad else []
        r = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
        pk64, pv64 = (t.expand(b, -1, -1, -1) for t in r[3:5])
        rbias = None if bias is None else (r[7] if len(r) > 7 else bias.detach().double().cpu())
        if rbias is not None:
            rbias = rbias.expand(b, q.shape[1], q.shape[2], k.shape[2])
        want = ref.prefix_attention(
            r[0], r[1], r[2], pk64, pv64, scale=kw["scale"], gate=lambda s, r=r: ref.norga_gate(s, "tanh", r[5], r[6]),
            bias=rbias,
        )  # fmt: skip
        h64 = [t.detach() for t in (r[0], r[1], r[2], pk64, pv64)]
        gate_kw = {"act": "tanh", "alpha": gate.alpha.item(), "tau": gate.tau.item()}
        args = {
            "scale": kw["scale"],
            "bias": None if rbias is None else rbias.detach(),
            **_bound_args(*h64, dtype, **gate_kw),
        }
        assert_within(o.cpu(), want, attention_tol(*h64, **args), f"{key} output")
        w = torch.randn(want.shape, dtype=torch.float64)
        got = torch.autograd.grad((o.double() * w.to(DEVICE)).sum(), inputs, retain_graph=True)
        exp = torch.autograd.grad((want * w).sum(), r)
        gb = attention_grad_tol(*h64, w, **args)
        bounds = dict(gb)
        for name, t in (("pk", prefix.key), ("pv", prefix.value), ("bias", bias)):
            if t is not None and not (t.dim() == 4 and t.shape[0] == b):  # summed over a broadcast batch
                bounds[name] = gb[name + "_batch"]
        for g, e, name in zip(got, exp, ["q", "k", "v", "pk", "pv", "alpha", "tau", "bias"]):
            assert_within(g.cpu(), e, bounds[name], f"{key} {name}")
