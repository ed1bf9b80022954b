"""Every CUDA line of ``merge`` (and ``flex``'s forward) run on fake CUDA tensors (``FakeTensorMode``: shapes, dtypes
and strides without data or a GPU), PyTorch's CUDA attention operators running their meta kernels.

For each kernel, dtype and token bias, ``prefix_attention(..., backend="merge")`` runs forward and, through the
``_MergeFunction`` node's own ``apply`` (the autograd engine needs a CUDA context), backward. Each operator call is
checked against its registered schema on this torch (``tests/cuda_kernels.py``: a changed signature fails here) and
its contract (the layouts the CUDA code needs and the meta kernels do not check); every tensor an operator allocates
is recorded, and none has ``N x N`` elements or more but copies of a given token bias and, for a bias that requires
grad, its gradient (the kernel's score gradient ``(B, H, N, M)``).

What fake tensors cannot run: compiled FlexAttention (Inductor's code generation needs the CUDA driver, and even
the ``aot_eager`` backend moves a constant to a real CUDA device) and FlexAttention's backward (its autograd needs a
CUDA context). ``flex``'s score_mod is traced here by Dynamo into FlexAttention's operator on fake CUDA tensors; its
gradients are checked on CPU through FlexAttention's reference implementation (``test_flex_reference.py``).
"""

from unittest import mock

import pytest
import torch
from cuda_kernels import EFFICIENT, EFFICIENT_BWD, FLASH, FLASH_BWD, Calls, SizeRecorder, bnhd, fake_call
from torch._subclasses.fake_tensor import FakeTensorMode
from versions import needs

from norga import NoRGaGate, Prefix, prefix_attention
from norga.functional import available_backends, cuda, flex, select_backend

pytestmark = needs("fake_cuda")  # older torch aborts the process (no CUDA driver) on a fake tensor's autograd view

B, H, N, D, L = 2, 2, 197, 32, 20  # q, k, v and every (B, H, N, L + 1) buffer are below N * N elements
BIG = N * N

# dtype, bias ("bias": float32 and unaligned rows, trained; "aligned": rows 208 apart, of q's dtype, fixed), logits
CASES = {
    "bf16": (torch.bfloat16, None, False),
    "fp16-logits": (torch.float16, None, True),
    "fp32": (torch.float32, None, False),
    "fp32-bias": (torch.float32, "bias", False),
    "bf16-bias": (torch.bfloat16, "bias", False),
    "fp16-aligned-logits": (torch.float16, "aligned", True),
}


def _fresh_alloc(func):
    """Whether ``func`` allocates its outputs (not a view, not an in-place op)."""
    return not any(r.alias_info is not None for r in func._schema.returns)


class _Allocations(SizeRecorder):
    """The shapes of the tensors operators allocate (views and in-place results left out)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _fresh_alloc(func):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.made.append((str(func), tuple(t.shape), t.untyped_storage().nbytes() // t.element_size()))
        return out


@pytest.fixture
def fake_cuda():
    """Fake tensors on a fake CUDA device of compute capability 9.0."""
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)), FakeTensorMode():
        yield


@pytest.mark.usefixtures("fake_cuda")
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("case", list(CASES))
def test_merge_on_fake_cuda(case, grad, monkeypatch):
    dtype, bias_kind, use_logits = CASES[case]
    calls = Calls()
    monkeypatch.setattr(cuda, "_aten", calls.through(fake_call))
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype, requires_grad=grad)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    pk, pv = (torch.randn(L, H * D, device="cuda", requires_grad=grad) for _ in range(2))
    with torch.device("cuda"):
        gate = NoRGaGate("tanh")
    bias = None
    if bias_kind == "bias":
        bias = torch.randn(1, H, N, N, device="cuda", requires_grad=grad)
    elif bias_kind == "aligned":
        bias = torch.randn(1, H, N, 208, device="cuda", dtype=dtype)[..., :N]
    logits = torch.randn(B, H, 1, L, device="cuda", requires_grad=grad) if use_logits else None
    prefix = Prefix(pk, pv, logits) if use_logits else (pk, pv)
    assert select_backend(q, "auto") == "sdpa" and select_backend(q, "merge") == "merge"

    allocs = _Allocations()
    with allocs, torch.set_grad_enabled(grad):
        out = prefix_attention(q, k, v, prefix, gate=gate, attn_bias=bias, backend="merge")
    fwd, bwd = (EFFICIENT, EFFICIENT_BWD) if bias is not None or dtype == torch.float32 else (FLASH, FLASH_BWD)
    assert [c[0] for c in calls.calls] == [fwd]
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == (B, H, N, D) and bnhd(out)
    if grad:
        node = out.grad_fn
        assert type(node).__name__ == "_MergeFunctionBackward"
        with allocs:
            grads = node.apply(torch.randn_like(out))
        assert [c[0] for c in calls.calls] == [fwd, bwd]
        dq, dk, dv, dbias, dg, dpv = grads[:6]
        for g, t in zip((dq, dk, dv), (q, k, v)):
            assert g.shape == t.shape and g.dtype == dtype and g.stride(-1) == 1
        assert dg.shape == (B, H, N, L) and dg.dtype == torch.float32
        assert dpv.shape == (B, H, L, D) and dpv.dtype == torch.float32
        if bias is not None and bias.requires_grad:
            assert dbias.shape == (1, H, N, N) and dbias.dtype == dtype
        else:
            assert dbias is None

    # nothing of N x N elements or more, except copies of the given bias (its dtype, padded rows) and its gradient
    allowed = set()
    if bias is not None:
        allowed |= {(1, H, N, N), (1, H, N, 200)}  # in q's dtype; rows padded to a multiple of 8 elements
        if grad and bias.requires_grad:
            allowed |= {(B, H, N, N)}  # the kernel's score gradient, summed to the bias's shape
    big = [(f, shape, size) for f, shape, size in allocs.made if size >= BIG]
    assert all(shape in allowed for _, shape, _ in big), big
    if bias_kind == "aligned":
        assert not big, big  # an aligned bias of q's dtype is read where it is


@pytest.mark.usefixtures("fake_cuda")
def test_merge_on_fake_cuda_refuses_what_no_kernel_takes():
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.float64)
    pk = torch.randn(L, H * D, device="cuda", dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16 inputs"):
        prefix_attention(q, q, q, (pk, pk), backend="merge")
    assert "merge" in available_backends(q.device)


@needs("flex")
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_flex_forward_traces_on_fake_cuda(dtype, monkeypatch):
    """``flex`` on fake CUDA tensors: Dynamo traces its score_mod (the gate, logits and a token bias read by index)
    into FlexAttention's operator, whose reference implementation gives the output's shape and dtype. (Compiled,
    even with the ``aot_eager`` backend, FlexAttention moves a constant to a real CUDA device, which fake tensors
    do not allow; Inductor's kernels need the driver.)"""
    from torch.nn.attention.flex_attention import flex_attention as reference_flex

    monkeypatch.setattr(flex, "_COMPILED", [reference_flex])
    with FakeTensorMode():
        qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        pk, pv = (torch.randn(B, H, L, D, device="cuda") for _ in range(2))
        logits = torch.randn(B, H, 1, L, device="cuda")
        bias = torch.randn(1, H, N, N, device="cuda")
        with torch.device("cuda"):
            gate = NoRGaGate("tanh")
        with torch.no_grad():
            out = prefix_attention(q, k, v, Prefix(pk, pv, logits), gate=gate, attn_bias=bias, backend="flex")
        assert out.device.type == "cuda" and out.shape == (B, H, N, D) and out.dtype == dtype


def test_schema_check_fails_on_a_changed_signature():
    """The schema check refuses an argument the schema lacks, a missing required one, a value of the wrong type and
    an undefined tensor where PyTorch's code would not take one; it passes the calls norga makes (above)."""
    from cuda_kernels import FLASH, check_schema

    t = torch.empty(1, 1, 2, 8)
    good = {"query": t, "key": t, "value": t, "dropout_p": 0.0, "is_causal": False, "return_debug_mask": False}
    check_schema(FLASH, {**good, "scale": 0.5})
    for bad in (
        {**good, "dropout": 0.0},  # a renamed argument
        {k: v for k, v in good.items() if k != "query"},  # a missing one
        {**good, "dropout_p": 0},  # an int for a float
        {**good, "query": None},  # an undefined tensor where it is required
    ):
        with pytest.raises(AssertionError):
            check_schema(FLASH, bad)
