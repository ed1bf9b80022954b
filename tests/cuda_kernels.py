"""What the CUDA token kernels of ``merge`` require, checked where no GPU is: the contracts of PyTorch's fused flash and
memory-efficient attention operators, their registered schemas, a recorder of every tensor an operator makes, and CPU
stand-ins for the four operators.

PyTorch's meta kernels (what runs under ``FakeTensorMode``) compute output shapes only: they do not check what the
CUDA implementations check. The contracts below are those of the CUDA code of PyTorch (``attention.cu``,
``attention_backward.cu``, the memory-efficient kernels' ``check_supported`` and ``Params``, FlashAttention's
``mha_fwd``/``mha_bwd``), written out so that a call that would fail or read out of bounds on a GPU fails here:

flash forward
    q, k, v float16/bfloat16 of one dtype, ``(B, H, N|M, D)``, last dimension contiguous, ``D`` a multiple of 8 and
    at most 256; no dropout, not causal.
flash backward
    ``grad_out`` and ``out`` of q's dtype and shape (the kernel copies them to ``(B, N, H, D)`` if they are not laid
    out so; norga passes ``out`` in that layout, so no copy is made); ``logsumexp`` ``(B, H, N)`` float32 contiguous;
    ``cum_seq_q``/``cum_seq_k`` undefined (``None``: a defined one selects the variable-length kernel); ``max_q = N``,
    ``max_k = M``; the philox state the forward returned.
memory-efficient forward
    q, k, v float32/float16/bfloat16; a bias ``(B, H, N, M)`` exactly (its batch and head sizes are checked) of q's
    dtype, last dimension contiguous, every other stride of a dimension of size > 1 and the storage offset multiples
    of the kernel's alignment (8 elements covers every dtype); ``compute_log_sumexp``.
memory-efficient backward
    ``out`` laid out as ``(B, N, H, D)`` contiguous (the kernel reads it with a row stride of ``H * D``);
    ``logsumexp`` ``(B, H, ceil(N / 32) * 32)`` float32 contiguous (its rows are read in blocks past ``N``: the
    forward pads them with ``+inf``); the bias the forward got (or an undefined one) and ``grad_input_mask[3]`` only
    with a bias; the philox seed and offset the forward returned.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

FLASH = "_scaled_dot_product_flash_attention"
FLASH_BWD = "_scaled_dot_product_flash_attention_backward"
EFFICIENT = "_scaled_dot_product_efficient_attention"
EFFICIENT_BWD = "_scaled_dot_product_efficient_attention_backward"
OPS = (FLASH, FLASH_BWD, EFFICIENT, EFFICIENT_BWD)
HALF = (torch.float16, torch.bfloat16)
# Arguments declared `Tensor` (not `Tensor?`) that PyTorch's own autograd passes undefined, and that its C++ code
# tests with `.defined()`: flash's sequence lengths (defined selects the variable-length kernel) and the
# memory-efficient backward's bias (undefined: no bias).
UNDEFINED_OK = {(FLASH_BWD, "cum_seq_q"), (FLASH_BWD, "cum_seq_k"), (EFFICIENT_BWD, "attn_bias")}


def real_op(name):
    return getattr(torch.ops.aten, name).default


def bnhd(t):
    """Whether ``t`` ``(B, H, N, D)`` is laid out as a contiguous ``(B, N, H, D)``."""
    return t.transpose(1, 2).is_contiguous()


def check_schema(name, kwargs):
    """``kwargs`` bind to the registered schema of ``aten.<name>`` on this torch: the same names (every argument
    without a default given, none unknown), each value of the declared type."""
    schema = real_op(name)._schema
    declared = {a.name: a for a in schema.arguments}
    assert set(kwargs) <= set(declared), f"{name}: arguments not in its schema {set(kwargs) - set(declared)}"
    missing = [a.name for a in schema.arguments if a.name not in kwargs and not a.has_default_value()]
    assert not missing, f"{name}: schema arguments not given {missing}"
    for key, value in kwargs.items():
        arg = declared[key]
        kind = arg.type
        if kind.kind() == "OptionalType":
            if value is None:
                continue
            kind = kind.getElementType()
        label = f"{name}.{key}: {value!r} for {arg.type}"
        if value is None:
            assert (name, key) in UNDEFINED_OK, label
        elif kind.kind() == "TensorType":
            assert isinstance(value, torch.Tensor), label
        elif kind.kind() == "FloatType":
            assert isinstance(value, float), label
        elif kind.kind() == "BoolType":
            assert isinstance(value, bool), label
        elif kind.kind() in ("IntType", "SymIntType"):
            assert isinstance(value, int) and not isinstance(value, bool), label
        elif kind.kind() == "ListType" and str(kind.getElementType()) == "bool":
            assert isinstance(value, list) and all(isinstance(b, bool) for b in value), label
            assert arg.N is None or len(value) == arg.N, label
        else:
            raise AssertionError(f"{name}.{key}: a schema type this check does not know: {arg.type}")


def _bias_aligned(bias):
    strides = [s for s, n in zip(bias.stride()[:-1], bias.shape[:-1]) if n > 1]
    return bias.stride(-1) == 1 and bias.storage_offset() % 8 == 0 and all(s % 8 == 0 for s in strides)


class Calls:
    """The calls of one ``merge`` forward and backward: each operator's keyword arguments and outputs, checked
    against its contract (module docstring) when made."""

    def __init__(self):
        self.calls = []

    def outputs(self, name):
        return [out for n, _, out in self.calls if n == name]

    def check(self, name, kw):
        """The contract of ``name`` on its keyword arguments ``kw`` (shapes, dtypes, strides; what values a fake
        tensor has not, the CPU stand-ins check)."""
        q, k, v = kw["query"], kw["key"], kw["value"]
        b, h, n, d = q.shape
        m = k.shape[2]
        assert k.shape == v.shape == (b, h, m, d) and q.dtype == k.dtype == v.dtype, name
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, f"{name}: q, k, v last dimension not contiguous"
        assert d % 8 == 0 and d <= 256, f"{name}: head dim {d}"
        assert kw["dropout_p"] == 0.0 and kw["is_causal"] is False, name
        if name in (FLASH, FLASH_BWD):
            assert q.dtype in HALF, f"{name}: {q.dtype}"
        else:
            assert q.dtype in (torch.float32, *HALF), f"{name}: {q.dtype}"
        if name == FLASH:
            assert kw["return_debug_mask"] is False
        if name == EFFICIENT:
            assert kw["compute_log_sumexp"] is True
            bias = kw["attn_bias"]
            if bias is not None:
                assert bias.shape == (b, h, n, m) and bias.dtype == q.dtype, f"bias {tuple(bias.shape)} {bias.dtype}"
                assert _bias_aligned(bias), f"bias strides {bias.stride()} offset {bias.storage_offset()}"
        if name in (FLASH_BWD, EFFICIENT_BWD):
            grad = kw["grad_out" if name == FLASH_BWD else "grad_out_"]
            out, lse = kw["out"], kw["logsumexp"]
            assert grad.shape == out.shape == q.shape and grad.dtype == out.dtype == q.dtype, name
            assert bnhd(out), f"{name}: out strides {out.stride()}"
            assert lse.dtype == torch.float32 and lse.is_contiguous(), f"{name}: lse {lse.dtype} {lse.stride()}"
        if name == FLASH_BWD:
            (fwd,) = self.outputs(FLASH)[-1:]
            assert kw["logsumexp"].shape == (b, h, n)
            assert kw["cum_seq_q"] is None and kw["cum_seq_k"] is None
            assert kw["max_q"] == n and kw["max_k"] == m
            assert kw["philox_seed"] is fwd[6] and kw["philox_offset"] is fwd[7], "flash philox state not the forward's"
        if name == EFFICIENT_BWD:
            (fwd_kw, fwd) = [(c[1], c[2]) for c in self.calls if c[0] == EFFICIENT][-1]
            assert kw["logsumexp"].shape == (b, h, math.ceil(n / 32) * 32), f"lse {tuple(kw['logsumexp'].shape)}"
            assert kw["philox_seed"] is fwd[2] and kw["philox_offset"] is fwd[3], "philox seed/offset not the forward's"
            assert kw["attn_bias"] is fwd_kw["attn_bias"], "the backward's bias is not the forward's"
            assert not kw["grad_input_mask"][3] or kw["attn_bias"] is not None
            assert kw["grad_input_mask"][:3] == [True, True, True]

    def through(self, call):
        """An ``_aten(name)`` for norga that checks the schema and the contract of each call, then runs
        ``call(name, kwargs)`` and records it."""

        def aten(name):
            def op(**kw):
                check_schema(name, kw)
                self.check(name, kw)
                out = call(name, kw)
                self.calls.append((name, kw, out))
                return out

            return op

        return aten


class SizeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an operator returns (inside ``FakeTensorMode``: fake ones)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.made.append((str(func), tuple(t.shape)))
        return out


def meta_layout(name, kw):
    """The outputs of the real ``aten.<name>`` on fake CUDA tensors of ``kw``'s shapes, strides and dtypes: the
    layouts the CUDA operator returns."""
    with FakeTensorMode():
        fake = {
            key: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
            if isinstance(t, torch.Tensor)
            else t
            for key, t in kw.items()
        }
        return real_op(name)(**fake)


def _like(meta, value):
    """``value`` copied into a CPU tensor of ``meta``'s shape, strides and dtype."""
    return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype).copy_(value)


def _token_scores_grad(q, k, v, bias, out, lse, grad_out, scale):
    """The gradient of the token scores that the memory-efficient backward returns for a bias, from its equations
    in float64: ``P = exp(s - lse)``, ``dS = P (dO v^T - rowsum(dO out))``."""
    q, k, v, out, grad_out = (t.double() for t in (q, k, v, out, grad_out))
    s = scale * q @ k.transpose(-2, -1) + bias.double()
    p = torch.exp(s - lse.double().unsqueeze(-1))
    return p * (grad_out @ v.transpose(-2, -1) - (grad_out * out).sum(-1, keepdim=True))


def cpu_stand_in(name, kw):
    """The CUDA operator ``name`` computed on CPU tensors by PyTorch's fused CPU flash kernel (and, for the
    memory-efficient backward's bias gradient, its float64 equations), its outputs in the layouts and dtypes of the
    CUDA operator (``meta_layout``). The memory-efficient forward's padded log-sum-exp rows are ``+inf`` and a row
    whose token keys are all masked gets a NaN output (the kernel normalises by a zero sum); its backward checks
    that the padding it reads is ``+inf`` and that the log-sum-exp of real rows is finite or ``+inf``."""
    meta = meta_layout(name, kw)
    q, k, v, scale = kw["query"], kw["key"], kw["value"], kw["scale"]
    n = q.shape[2]
    cpu, cpu_bwd = (
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
    )
    if name == FLASH:
        o, lse = cpu(q, k, v, 0.0, False, scale=scale)
        rng, unused = torch.zeros(2, dtype=torch.uint64), torch.zeros((), dtype=torch.uint64)
        return (
            _like(meta[0], o),
            _like(meta[1], lse),
            None,
            None,
            n,
            k.shape[2],
            rng,
            unused,
            torch.empty(0, dtype=q.dtype),
        )
    if name == EFFICIENT:
        bias = kw["attn_bias"]
        o, lse = cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        if bias is not None:
            o = o.masked_fill(torch.isneginf(bias).all(-1, keepdim=True), float("nan"))
        lse_pad = torch.full(meta[1].shape, float("inf"))
        lse_pad[..., :n] = lse
        seed, offset = torch.tensor(0), torch.tensor(0)
        return _like(meta[0], o), _like(meta[1], lse_pad), seed, offset
    lse = kw["logsumexp"]
    if name == EFFICIENT_BWD:
        assert torch.isposinf(lse[..., n:]).all(), "the log-sum-exp padding is not +inf"
        lse = lse[..., :n].contiguous()
    assert not torch.isnan(lse).any() and not torch.isneginf(lse).any(), "a NaN or -inf log-sum-exp"
    grad = kw["grad_out" if name == FLASH_BWD else "grad_out_"]
    bias = kw.get("attn_bias")
    dq, dk, dv = cpu_bwd(grad, q, k, v, kw["out"], lse, 0.0, False, attn_mask=bias, scale=scale)
    grads = [_like(m, g) for m, g in zip(meta, (dq, dk, dv))]
    if name == FLASH_BWD:
        return tuple(grads)
    ds = None
    if kw["grad_input_mask"][3]:
        ds = _like(meta[3], _token_scores_grad(q, k, v, bias, kw["out"], lse, grad, scale))
    return (*grads, ds)


def fake_call(name, kw):
    """The real operator (on fake CUDA tensors: its meta kernel)."""
    return real_op(name)(**kw)


def cuda_like(t, device="cuda"):
    """A tensor on ``device`` with ``t``'s shape, strides, storage offset and dtype (in ``FakeTensorMode``: fake)."""
    storage = t.untyped_storage().nbytes() // t.element_size()
    base = torch.empty(storage, dtype=t.dtype, device=device)
    return base.as_strided(t.shape, t.stride(), t.storage_offset())
