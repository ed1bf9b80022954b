"""Property-based fuzzing of the public API (hypothesis).

Random shapes, dtypes (float32, float64, bfloat16) and bad values are thrown at ``NoRGaGate``,
``prefix_attention`` (every backend), ``normalize_prefix``, ``PrefixMoEAttention`` and
``PrefixPool``/``set_task``, ``SMoPE`` and ``patch_vit``. Every example must either

* give the right answer, compared with the float64 references of ``tests/reference.py`` (written from
  the equations, not from norga) at a tolerance set by the dtype, or
* raise a ``ValueError``/``TypeError`` whose message names what was given (and what was expected),

never an exception from deep inside torch (``RuntimeError``, ``IndexError``, ...), a crash, or a silently
wrong result. The profile is derandomized, so a run is reproducible; the whole file takes well under a
minute on two cores.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tolerance import (
    assert_prefix_layer_stages,
    assert_within,
    attention_grad_tol,
    attention_tol,
    capture_stages,
    norga_gate_err,
    prefix_layer_tol,
    tol,
    unit_roundoff,
)

import norga
from norga import NoRGaGate, Prefix, PrefixMoEAttention, PrefixPool, prefix_attention
from norga.functional import normalize_prefix

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
ACTS = ["tanh", "sigmoid", "gelu"]
BACKENDS = ["math", "merge", "sdpa", "auto"]

# Bounds from tests/tolerance.py. norga computes prefix scores, the gate, the softmax statistics and the
# merge in float32 whatever the input dtype (so float64 inputs get float32 accuracy); bfloat16 inputs are
# exact inputs of the references (computed from the same rounded tensors), and what norga rounds to
# bfloat16 inside adds its unit roundoff.
LOW = {torch.float32: None, torch.float64: None, torch.bfloat16: torch.bfloat16}


def _close(got: torch.Tensor, want: torch.Tensor, bound) -> None:
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    assert torch.isfinite(got.double()).all(), "non-finite output where the reference is finite"
    assert_within(got, want, bound)


def _clear_error(fn: Callable[[], object], *fragments: str) -> str:
    """``fn()`` must raise ValueError/TypeError whose message contains every fragment (case-insensitive)."""
    try:
        fn()
    except (ValueError, TypeError) as e:
        msg = str(e)
    else:
        raise AssertionError(f"no error raised; expected one naming {fragments}")
    for f in fragments:
        assert f.lower() in msg.lower(), f"error message {msg!r} does not name {f!r}"
    return msg


def _shape(*dims: int) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------------
# NoRGaGate

finite = st.floats(min_value=-3.0, max_value=3.0, allow_nan=False, allow_infinity=False)


@FUZZ
@given(
    act=st.sampled_from(ACTS),
    alpha=finite,
    tau=finite,
    learnable=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_gate_matches_reference(act, alpha, tau, learnable, dtype, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    s = (_randn(gen, *shape) * 3).to(dtype)
    gate = NoRGaGate(act, alpha=alpha, tau=tau, learnable=learnable)
    out = gate(s)
    assert out.dtype == dtype and out.shape == s.shape
    want = ref.norga_gate(s.double(), act, alpha, tau)
    # the reference takes the exact alpha and tau; the gate stores them in float32, then casts them to dtype
    param_err = unit_roundoff(torch.float32) + (unit_roundoff(dtype) if dtype == torch.bfloat16 else 0.0)
    _close(out, want, norga_gate_err(s, act, alpha, tau, dtype, param_err=param_err))


bad_numbers = st.sampled_from(
    [float("nan"), float("inf"), float("-inf"), "1.0", None, True, 1 + 2j, torch.tensor(1.0), [1.0]]
)


@FUZZ
@given(which=st.sampled_from(["alpha", "tau"]), bad=bad_numbers)
def test_gate_rejects_bad_alpha_tau(which, bad):
    kwargs = {which: bad}
    if isinstance(bad, float):  # nan / inf: a ValueError naming the value
        _clear_error(lambda: NoRGaGate("tanh", **kwargs), which, "finite", repr(bad))
    else:
        _clear_error(lambda: NoRGaGate("tanh", **kwargs), which, type(bad).__name__)


@FUZZ
@given(name=st.text(min_size=0, max_size=8).filter(lambda s: s not in ACTS))
def test_gate_rejects_unknown_activation(name):
    _clear_error(lambda: NoRGaGate(name), repr(name), "tanh")


@FUZZ
@given(bad=st.sampled_from([3, 2.5, b"tanh", None, ("tanh",)]))
def test_gate_rejects_non_callable_activation(bad):
    _clear_error(lambda: NoRGaGate(bad), type(bad).__name__)


@FUZZ
@given(
    kind=st.sampled_from(["int64", "int32", "bool", "list", "ndarray", "reduce", "scalar"]),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
)
def test_gate_rejects_bad_scores(kind, shape):
    gate = NoRGaGate("sigmoid", alpha=0.5)
    if kind in ("int64", "int32", "bool"):
        # alpha = 0.5 cast to an integer dtype would silently be 0: that must be an error.
        s = torch.ones(shape, dtype=getattr(torch, kind))
        _clear_error(lambda: gate(s), "floating", str(s.dtype))
    elif kind == "list":
        _clear_error(lambda: gate([1.0] * shape[0]), "list")
    elif kind == "ndarray":
        _clear_error(lambda: gate(np.ones(shape)), "ndarray")
    else:  # a custom activation that is not elementwise would be broadcast silently
        act = (lambda x: x.sum(-1, keepdim=True)) if kind == "reduce" else (lambda x: x.sum())
        bad_gate = NoRGaGate(act)
        s = torch.randn(*shape, 3)
        _clear_error(lambda: bad_gate(s), "elementwise", str(tuple(s.shape)))


# --------------------------------------------------------------------------------------------------
# prefix_attention against the float64 reference


@st.composite
def attention_cases(draw):
    c = {
        "dtype": draw(st.sampled_from(DTYPES)),
        "B": draw(st.integers(0, 3)),
        "H": draw(st.integers(1, 3)),
        "D": draw(st.integers(1, 8)),
        "N": draw(st.integers(0, 6)),
        "M": draw(st.integers(0, 6)),
        "L": draw(st.integers(0, 5)),
        "layout": draw(st.sampled_from(["shared", "per_sample", "per_head", "per_head_b1", "none"])),
        "gate": draw(st.sampled_from([None] + ACTS)),
        "alpha": draw(finite),
        "tau": draw(finite),
        "bias": draw(st.sampled_from([None, "full", "heads", "rows", "2d"])),
        "logits": draw(st.sampled_from([None, "rows", "constant"])),
        "scale": draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        "backend": draw(st.sampled_from(BACKENDS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }
    c["prefix_dtype"] = draw(st.sampled_from([c["dtype"], torch.float32]))
    return c


def _build(c, grad: bool = False):
    """Inputs for norga and for the reference (``pk``, ``pv`` as (B, H, L, D), bias/logits expanded).

    With ``grad``, q, k, v and the prefix key/value are leaves that require grad."""
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, D, N, M, L, dt = c["B"], c["H"], c["D"], c["N"], c["M"], c["L"], c["dtype"]
    q, k, v = (_randn(gen, B, H, n, D, dtype=dt) for n in (N, M, M))
    pdt = c["prefix_dtype"]
    layout = c["layout"]
    prefix = pk = pv = None
    shape = {"shared": (L, H * D), "per_sample": (B, L, H * D), "per_head": (B, H, L, D), "per_head_b1": (1, H, L, D)}
    if layout != "none":
        key, value = (_randn(gen, *shape[layout], dtype=pdt).requires_grad_(grad) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_(grad)
    if layout == "shared":
        pk, pv = (ref.heads(t, H).unsqueeze(0).expand(B, -1, -1, -1) for t in (key, value))
    elif layout == "per_sample":
        pk, pv = ref.heads(key, H), ref.heads(value, H)
    elif layout in ("per_head", "per_head_b1"):
        pk, pv = key.expand(B, -1, -1, -1), value.expand(B, -1, -1, -1)
    logits = ref_logits = None
    if layout != "none":
        if c["logits"] is not None:
            rows = N if c["logits"] == "rows" else 1
            logits = _randn(gen, 1, H, rows, L) * 2
            ref_logits = logits.expand(B, H, rows, L)
            prefix = Prefix(key, value, logits)
        else:
            prefix = (key, value)
    bias = ref_bias = None
    if c["bias"] is not None:
        shape = {"full": (B, H, N, M), "heads": (1, H, 1, M), "rows": (N, M), "2d": (1, M)}[c["bias"]]
        bias = _randn(gen, *shape, dtype=dt)
        ref_bias = bias.expand(B, H, N, M)
    gate = ref_gate = None
    if c["gate"] is not None:
        gate = NoRGaGate(c["gate"], alpha=c["alpha"], tau=c["tau"])
        act, alpha, tau = c["gate"], c["alpha"], c["tau"]
        ref_gate = lambda s: ref.norga_gate(s, act, alpha, tau)
    return q, k, v, prefix, pk, pv, gate, ref_gate, bias, ref_bias, logits, ref_logits


@settings(FUZZ, max_examples=200)
@given(c=attention_cases())
def test_prefix_attention_matches_reference(c):
    q, k, v, prefix, pk, pv, gate, ref_gate, bias, ref_bias, _, ref_logits = _build(c)
    B, H, D, N, M, L = c["B"], c["H"], c["D"], c["N"], c["M"], c["L"]
    has_prefix = prefix is not None and L > 0
    run = lambda: prefix_attention(q, k, v, prefix, gate=gate, scale=c["scale"], attn_bias=bias, backend=c["backend"])
    if has_prefix and c["backend"] == "merge" and (N == 0 or M == 0):
        # The fused CPU kernel cannot run on empty sequences (it divides by zero): a clear error.
        _clear_error(run, "merge", f"N={N}", f"M={M}")
        return
    out = run()
    assert out.shape == (B, H, N, D) and out.dtype == v.dtype
    if M == 0 and not has_prefix:
        return  # attention over no key at all has no defined value; only the shape is checked
    scale = D**-0.5 if c["scale"] is None else c["scale"]
    if not has_prefix:
        pk = pv = torch.zeros(B, H, 0, D)
        ref_logits = None if ref_logits is None else ref_logits[..., :0]
    args = {"scale": scale, "bias": ref_bias, "logits": ref_logits}
    want = ref.prefix_attention(q, k, v, pk, pv, gate=ref_gate if has_prefix else None, **args)
    gate_tol = {"act": c["gate"], "alpha": c["alpha"], "tau": c["tau"]} if has_prefix and gate is not None else {}
    _close(out, want, attention_tol(q, k, v, pk, pv, io_dtype=LOW[c["dtype"]], **args, **gate_tol))


@settings(FUZZ, max_examples=40)
@given(
    c=attention_cases().filter(
        lambda c: c["dtype"] != torch.bfloat16 and c["layout"] != "none" and min(c["B"], c["N"], c["M"], c["L"]) > 0
    ),
    backend=st.sampled_from(["math", "merge", "sdpa"]),
)
def test_prefix_attention_gradients_match_reference(c, backend):
    q, k, v, prefix, pk, pv, gate, ref_gate, bias, ref_bias, _, ref_logits = _build(c, grad=True)
    leaves = [q, k, v, prefix[0], prefix[1]]
    out = prefix_attention(q, k, v, prefix, gate=gate, scale=c["scale"], attn_bias=bias, backend=backend)
    scale = c["D"] ** -0.5 if c["scale"] is None else c["scale"]
    args = {"scale": scale, "bias": ref_bias, "logits": ref_logits}
    want = ref.prefix_attention(q, k, v, pk, pv, gate=ref_gate, **args)
    w = torch.randn(want.shape, generator=torch.Generator().manual_seed(c["seed"]), dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), leaves, allow_unused=True)
    exp = torch.autograd.grad((want * w).sum(), leaves, allow_unused=True)
    gate_tol = {} if gate is None else {"act": c["gate"], "alpha": c["alpha"], "tau": c["tau"]}
    gb = attention_grad_tol(q, k, v, pk, pv, w, **args, **gate_tol)
    # a prefix shared by the batch (a (L, dim) or (1, H, L, D) leaf) sums the per-sample gradients
    summed = c["layout"] in ("shared", "per_head_b1") and c["B"] > 1
    names = ["q", "k", "v", "pk_batch" if summed else "pk", "pv_batch" if summed else "pv"]
    for g, e, name in zip(got, exp, names):
        if e is None:
            continue
        assert g is not None
        assert_within(g, e, gb[name], name)


# Corruptions of a valid call: (name, builder) where the builder takes the valid arguments and returns
# new ones plus the fragments the error message must contain (what was given, what was expected).
def _corrupt(name, q, k, v, prefix, kw):
    B, H, N, D = q.shape
    M = k.shape[2]
    key, value = prefix
    if name == "k_dtype":
        return (q, k.double() if k.dtype != torch.float64 else k.float(), v, prefix, kw), ["dtype"]
    if name == "int_q":
        return (q.long(), k.long(), v.long(), prefix, kw), ["floating", "int64"]
    if name == "q_list":
        return (q.tolist(), k, v, prefix, kw), ["list"]
    if name == "q_3d":
        return (q[0], k, v, prefix, kw), [str(tuple(q[0].shape)).replace(",)", ")")]
    if name == "k_head_dim":
        k2 = torch.randn(B, H, M, D + 1, dtype=k.dtype)
        return (q, k2, v, prefix, kw), [_shape(B, H, M, D + 1), f"D={D}"]
    if name == "v_tokens":
        v2 = torch.randn(B, H, M + 1, D, dtype=v.dtype)
        return (q, k, v2, prefix, kw), [_shape(B, H, M + 1, D)]
    if name == "kv_batch":
        k2, v2 = (torch.randn(B + 1, H, M, D, dtype=k.dtype) for _ in range(2))
        return (q, k2, v2, prefix, kw), [_shape(B + 1, H, M, D), f"B={B}"]
    if name == "kv_heads":
        k2, v2 = (torch.randn(B, H + 1, M, D, dtype=k.dtype) for _ in range(2))
        return (q, k2, v2, prefix, kw), [_shape(B, H + 1, M, D), f"H={H}"]
    if name == "bias_shape":
        return (q, k, v, prefix, {**kw, "attn_bias": torch.randn(N + 2, M + 3)}), [_shape(N + 2, M + 3), f"M={M}"]
    if name == "bias_bool":
        return (q, k, v, prefix, {**kw, "attn_bias": torch.ones(N, M, dtype=torch.bool)}), ["float"]
    if name == "scale_nan":
        return (q, k, v, prefix, {**kw, "scale": float("nan")}), ["scale", "nan"]
    if name == "scale_str":
        return (q, k, v, prefix, {**kw, "scale": "0.1"}), ["scale", "str"]
    if name == "dropout":
        return (q, k, v, prefix, {**kw, "dropout_p": 1.5, "backend": "sdpa"}), ["dropout_p", "1.5"]
    if name == "backend":
        return (q, k, v, prefix, {**kw, "backend": "flash"}), ["'flash'", "merge"]
    if name == "kv_mismatch":
        return (q, k, v, (key, value[..., :-1, :]), kw), ["same shape"]
    if name == "width":
        bad = torch.randn(3, H * D + 1)
        return (q, k, v, (bad, bad), kw), [_shape(3, H * D + 1), str(H * D)]
    if name == "prefix_batch":
        bad = torch.randn(B + 2, 3, H * D)
        return (q, k, v, (bad, bad), kw), [f"B={B}", str(B + 2)]
    if name == "prefix_1d":
        bad = torch.randn(H * D)
        return (q, k, v, (bad, bad), kw), [f"got {_shape(H * D)}"]  # shape_str's format: "(6)"
    if name == "prefix_int":
        bad = torch.ones(3, H * D, dtype=torch.long)
        return (q, k, v, (torch.randn(3, H * D), bad), kw), ["floating", "int64"]
    if name == "prefix_triple":
        return (q, k, v, (key, value, value), kw), ["tuple"]
    if name == "logits_shape":
        bad = torch.randn(1, H + 1, 1, 3)
        p = Prefix(torch.randn(3, H * D), torch.randn(3, H * D), bad)
        return (q, k, v, p, kw), [_shape(1, H + 1, 1, 3), f"H={H}"]
    if name == "gate_reduce":
        return (q, k, v, prefix, {**kw, "gate": lambda s: s.sum(-1, keepdim=True)}), ["elementwise", _shape(B, H, N, 3)]
    raise AssertionError(name)


CORRUPTIONS = [
    "k_dtype", "int_q", "q_list", "q_3d", "k_head_dim", "v_tokens", "kv_batch", "kv_heads", "bias_shape",
    "bias_bool", "scale_nan", "scale_str", "dropout", "backend", "kv_mismatch", "width", "prefix_batch",
    "prefix_1d", "prefix_int", "prefix_triple", "logits_shape", "gate_reduce",
]  # fmt: skip


@settings(FUZZ, max_examples=150)
@given(
    name=st.sampled_from(CORRUPTIONS),
    backend=st.sampled_from(BACKENDS),
    dtype=st.sampled_from(DTYPES),
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    N=st.integers(1, 5),
    M=st.integers(1, 5),
    D=st.integers(1, 6),
)
def test_prefix_attention_rejects_bad_inputs(name, backend, dtype, B, H, N, M, D):
    q, k, v = (
        torch.randn(B, H, N, D, dtype=dtype),
        torch.randn(B, H, M, D, dtype=dtype),
        torch.randn(B, H, M, D, dtype=dtype),
    )
    prefix = (torch.randn(3, H * D), torch.randn(3, H * D))
    (q, k, v, prefix, kw), fragments = _corrupt(name, q, k, v, prefix, {"backend": backend})
    _clear_error(lambda: prefix_attention(q, k, v, prefix, **kw), *fragments)


# --------------------------------------------------------------------------------------------------
# normalize_prefix


@FUZZ
@given(
    layout=st.sampled_from(["shared", "per_sample", "per_head", "per_head_b1"]),
    B=st.integers(0, 3),
    H=st.integers(1, 4),
    D=st.integers(1, 5),
    L=st.integers(0, 4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_normalize_prefix_layouts(layout, B, H, D, L, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if layout == "shared":
        key, value = _randn(gen, L, H * D, dtype=dtype), _randn(gen, L, H * D, dtype=dtype)
        want_k, want_v = ref.heads(key, H).unsqueeze(0), ref.heads(value, H).unsqueeze(0)
    elif layout == "per_sample":
        key, value = _randn(gen, B, L, H * D, dtype=dtype), _randn(gen, B, L, H * D, dtype=dtype)
        want_k, want_v = ref.heads(key, H), ref.heads(value, H)
    else:
        b = B if layout == "per_head" else 1
        key, value = _randn(gen, b, H, L, D, dtype=dtype), _randn(gen, b, H, L, D, dtype=dtype)
        want_k, want_v = key, value
    p = normalize_prefix((key, value), B, H, D)
    assert isinstance(p, Prefix) and p.logits is None
    # a pure re-layout: bit-exact, same dtype
    assert p.key.dtype == dtype and torch.equal(p.key, want_k) and torch.equal(p.value, want_v)


@FUZZ
@given(
    which=st.sampled_from(["batch", "num_heads", "head_dim", "num_queries"]),
    bad=st.sampled_from([-1, 0, 2.0, "2", None, True]),
)
def test_normalize_prefix_rejects_bad_sizes(which, bad):
    args = {"batch": 2, "num_heads": 2, "head_dim": 3, "num_queries": 4}
    if bad == 0 and which in ("batch", "num_queries"):
        bad = -1  # zero samples or queries is valid
    if bad is None and which == "num_queries":
        bad = -3  # None means "not validated"
    args[which] = bad
    prefix = (torch.randn(5, 6), torch.randn(5, 6))
    _clear_error(
        lambda: normalize_prefix(prefix, **args),
        which,
        repr(bad) if not isinstance(bad, (str, type(None), float, bool)) else type(bad).__name__,
    )


# --------------------------------------------------------------------------------------------------
# PrefixMoEAttention


def _layer_reference(layer: PrefixMoEAttention, x: torch.Tensor, pk, pv, ref_gate) -> torch.Tensor:
    """The layer's computation from its weights, in float64: qkv projection, head split by slicing,
    the reference prefix attention, head merge, output projection."""
    H = layer.num_heads
    W, b = layer.qkv.weight.double(), layer.qkv.bias
    y = x.double() @ W.T + (0 if b is None else b.double())
    dim = y.shape[-1] // 3
    q, k, v = (ref.heads(y[..., i * dim : (i + 1) * dim], H) for i in range(3))
    D = dim // H
    o = ref.prefix_attention(q, k, v, pk, pv, scale=D**-0.5, gate=ref_gate)
    o = torch.cat([o[:, h] for h in range(H)], dim=-1)  # (B, N, H*D), heads in order
    return o @ layer.proj.weight.double().T + layer.proj.bias.double()


@FUZZ
@given(
    H=st.integers(1, 4),
    D=st.integers(1, 6),
    B=st.integers(1, 3),
    N=st.integers(1, 6),
    L=st.integers(1, 4),
    qkv_bias=st.booleans(),
    gate=st.sampled_from([None] + ACTS),
    layout=st.sampled_from(["shared", "per_sample"]),
    backend=st.sampled_from(BACKENDS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_prefix_moe_attention_matches_reference(H, D, B, N, L, qkv_bias, gate, layout, backend, dtype, seed):
    torch.manual_seed(seed)
    dim = H * D
    layer = PrefixMoEAttention(dim, num_heads=H, qkv_bias=qkv_bias, gate=gate, backend=backend).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, B, N, dim, dtype=dtype)
    if layout == "shared":
        key, value = _randn(gen, L, dim, dtype=dtype), _randn(gen, L, dim, dtype=dtype)
        pk, pv = (ref.heads(t, H).unsqueeze(0).expand(B, -1, -1, -1) for t in (key, value))
    else:
        key, value = _randn(gen, B, L, dim, dtype=dtype), _randn(gen, B, L, dim, dtype=dtype)
        pk, pv = ref.heads(key, H), ref.heads(value, H)
    ref_gate = None if gate is None else (lambda s: ref.norga_gate(s, gate, 1.0, 1.0))
    with torch.no_grad():
        out, seen = capture_stages(layer, lambda: layer(x, prefix=(key, value)))
    assert out.shape == (B, N, dim) and out.dtype == dtype
    want = _layer_reference(layer, x, pk, pv, ref_gate)
    _close(out, want, prefix_layer_tol(layer, x, pk, pv, act=gate))
    if dtype == torch.bfloat16:  # the end-to-end worst case is loose in bfloat16: each stage on its own
        assert_prefix_layer_stages(
            layer, seen, out, pk, pv, dtype, {} if gate is None else {"act": gate, "alpha": 1.0, "tau": 1.0}
        )


@FUZZ
@given(
    kind=st.sampled_from(["width", "rank", "int", "dtype", "list", "mask_shape", "mask_int", "causal_and_mask"]),
    with_prefix=st.booleans(),
    H=st.integers(1, 3),
    D=st.integers(1, 4),
    N=st.integers(1, 5),
)
def test_prefix_moe_attention_rejects_bad_inputs(kind, with_prefix, H, D, N):
    dim = H * D
    layer = PrefixMoEAttention(dim, num_heads=H, gate="tanh")
    prefix = (torch.randn(2, dim), torch.randn(2, dim)) if with_prefix else None
    x = torch.randn(2, N, dim)
    call = {"x": x}
    if kind == "width":
        call["x"], frags = torch.randn(2, N, dim + 1), [_shape(2, N, dim + 1), f"dim={dim}"]
    elif kind == "rank":
        call["x"], frags = torch.randn(N, dim), [_shape(N, dim)]
    elif kind == "int":
        call["x"], frags = torch.ones(2, N, dim, dtype=torch.long), ["floating", "int64"]
    elif kind == "dtype":
        call["x"], frags = x.double(), ["float64", "float32"]
    elif kind == "list":
        call["x"], frags = x.tolist(), ["list"]
    elif kind == "mask_shape":
        call["attn_mask"], frags = torch.ones(N + 1, N + 2, dtype=torch.bool), [_shape(N + 1, N + 2), f"N={N}"]
    elif kind == "mask_int":
        call["attn_mask"], frags = torch.ones(N, N, dtype=torch.long), ["int64"]
    else:
        call["attn_mask"], call["is_causal"], frags = torch.ones(N, N, dtype=torch.bool), True, ["is_causal"]
    _clear_error(lambda: layer(prefix=prefix, **call), *frags)


@FUZZ
@given(
    kw=st.sampled_from(
        [
            ({"dim": 16.0}, ["16.0"]),
            ({"dim": 0}, ["dim", "0"]),
            ({"num_heads": 0}, ["num_heads", "0"]),
            ({"num_heads": 3}, ["dim=16", "num_heads=3"]),
            ({"gate": 3}, ["gate", "int"]),
            ({"gate": "relu"}, ["'relu'"]),
            ({"backend": "cuda"}, ["'cuda'"]),
            ({"prompt": "p"}, ["prompt", "str"]),
            ({"attn_drop": 1.5}, ["1.5"]),
        ]
    )
)
def test_prefix_moe_attention_constructor_errors(kw):
    args, frags = kw
    full = {"dim": 16, "num_heads": 4, **args}
    _clear_error(lambda: PrefixMoEAttention(**full), *frags)


# --------------------------------------------------------------------------------------------------
# PrefixPool and set_task

INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


@FUZZ
@given(
    T=st.integers(1, 5),
    layers=st.integers(1, 4),
    L=st.integers(1, 4),
    dim=st.integers(1, 8),
    per_sample=st.booleans(),
    B=st.integers(0, 5),
    int_dtype=st.sampled_from(INT_DTYPES),
    data=st.data(),
)
def test_pool_selects_each_samples_own_task(T, layers, L, dim, per_sample, B, int_dtype, data):
    pool = PrefixPool(T, layers, L, dim)
    model = torch.nn.Sequential(torch.nn.Identity())
    model.prompt_pool = pool
    layer = data.draw(st.integers(0, layers - 1), label="layer")
    if per_sample:
        ids = data.draw(st.lists(st.integers(0, T - 1), min_size=B, max_size=B), label="ids")
        task = torch.tensor(ids, dtype=int_dtype)
        norga.set_task(model, task)
        p = pool.select(layer, B)
        assert p.key.shape == (B, L, dim)
        for b, t in enumerate(ids):
            assert torch.equal(p.key[b], pool.prompts[t, layer, 0])
            assert torch.equal(p.value[b], pool.prompts[t, layer, 1])
    else:
        t = data.draw(st.integers(0, T - 1), label="task")
        norga.set_task(model, t)
        p = pool.select(layer, B)
        assert torch.equal(p.key, pool.prompts[t, layer, 0]) and torch.equal(p.value, pool.prompts[t, layer, 1])
    # use_task restores the previous selection
    before = pool.task
    with norga.use_task(model, T - 1):
        assert pool.task == T - 1
    assert pool.task is before


@FUZZ
@given(
    T=st.integers(1, 5),
    bad=st.sampled_from(
        ["neg", "high", "float", "bool", "np_int", "float_tensor", "2d", "0d", "str", "neg_tensor", "high_tensor"]
    ),
)
def test_set_task_rejects_bad_tasks(T, bad):
    pool = PrefixPool(T, 2, 3, 4)
    model = torch.nn.Sequential(torch.nn.Identity())
    model.prompt_pool = pool
    cases = {
        "neg": (-1, [f"[0, {T})", "-1"]),
        "high": (T, [f"[0, {T})", str(T)]),
        "float": (1.0, ["float"]),
        "bool": (True, ["bool"]),
        "np_int": (np.int64(0), ["int64"]),
        "float_tensor": (torch.zeros(3), ["float32"]),
        "2d": (torch.zeros(2, 2, dtype=torch.long), ["(B,)", "(2, 2)"]),
        "0d": (torch.tensor(0), ["(B,)", "()"]),
        "str": ("0", ["str"]),
        "neg_tensor": (torch.tensor([0, -2]), [f"[0, {T})", "-2"]),
        "high_tensor": (torch.tensor([0, T + 3]), [f"[0, {T})", str(T + 3)]),
    }
    task, frags = cases[bad]
    before = pool.task
    _clear_error(lambda: norga.set_task(model, task), *frags)
    assert pool.task is before  # a rejected task changes nothing


@FUZZ
@given(
    kind=st.sampled_from(["layer_high", "layer_neg", "layer_float", "batch_mismatch", "no_pool", "not_module", "ctor"]),
    T=st.integers(1, 4),
    layers=st.integers(1, 4),
)
def test_pool_errors(kind, T, layers):
    pool = PrefixPool(T, layers, 3, 4)
    if kind == "layer_high":
        _clear_error(lambda: pool.select(layers, 2), f"[0, {layers})", str(layers))
    elif kind == "layer_neg":
        _clear_error(lambda: pool.select(-1, 2), f"[0, {layers})", "-1")
    elif kind == "layer_float":
        _clear_error(lambda: pool.select(0.0, 2), "0.0")
    elif kind == "batch_mismatch":
        pool.set_task(torch.zeros(3, dtype=torch.long))
        _clear_error(lambda: pool.select(0, 5), "3 task ids", "5 samples")
    elif kind == "no_pool":
        _clear_error(lambda: norga.set_task(torch.nn.Linear(2, 2), 0), "PrefixPool")
    elif kind == "not_module":
        _clear_error(lambda: norga.set_task("model", 0), "nn.Module", "str")
    else:
        for args, frag in (((0, 1, 1, 1), "num_tasks"), ((1, -2, 1, 1), "num_layers"), ((1, 1, 2.0, 1), "length")):
            _clear_error(lambda a=args: PrefixPool(*a), frag)
        _clear_error(lambda: PrefixPool(1, 1, 1, 1, init="normal"), "'normal'", "uniform")


@pytest.mark.parametrize("backend", ["merge", "auto"])
def test_merge_on_empty_sequences_does_not_crash(backend):
    """The fused CPU kernel kills the process (SIGFPE) on N = 0 or M = 0; norga must not call it there."""
    q, k, v = torch.randn(2, 2, 0, 4), torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    prefix = (torch.randn(2, 8), torch.randn(2, 8))
    for args in ((q, k, v), (torch.randn(2, 2, 3, 4), k[:, :, :0], v[:, :, :0])):
        if backend == "merge":
            _clear_error(lambda a=args: prefix_attention(*a, prefix, backend=backend), "merge", "N=", "M=")
        else:
            out = prefix_attention(*args, prefix, backend=backend)
            assert out.shape == args[0].shape and math.isfinite(out.sum().item())


# --------------------------------------------------------------------------------------------------
# SMoPE


@FUZZ
@given(
    heads=st.integers(1, 4),
    head_dim=st.integers(1, 6),
    experts=st.integers(1, 8),
    top_k=st.integers(1, 8),
    B=st.integers(1, 3),
    N=st.integers(1, 5),
    dtype=st.sampled_from(DTYPES),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_smope_routes_like_the_reference_or_refuses(heads, head_dim, experts, top_k, B, N, dtype, train, seed):
    """Any configuration: a top-K routing equal to the reference, or a clear error for top_k > num_experts."""
    dim = heads * head_dim
    if top_k > experts:
        _clear_error(lambda: norga.SMoPE(dim, heads, experts, top_k), f"top_k={top_k}", f"num_experts={experts}")
        return
    torch.manual_seed(seed)
    m = norga.SMoPE(dim, heads, experts, top_k).train(train)
    q = _randn(torch.Generator().manual_seed(seed), B, heads, N, head_dim, dtype=dtype)
    p = m(q)
    assert p.key.shape == p.value.shape == (B, heads, top_k, head_dim) and p.key.dtype == dtype
    assert p.logits.shape == (B, heads, 1, top_k) and torch.isfinite(p.logits).all()
    # reference: s_j = mean_n(q) . key_j in float64; the selected experts are a top-K set of s (no noise:
    # nothing is frequent before end_task), compared by score so that ties cannot fail the test
    s = torch.einsum("bhd,hed->bhe", q.double().mean(2), m.keys.detach().double())
    # SMoPE scores in float32: the mean of N queries (N terms and the division) dotted with a key (D terms)
    err = tol(torch.float32, N + head_dim + 2, 1.0) * torch.einsum(
        "bhd,hed->bhe", q.double().abs().mean(2), m.keys.detach().double().abs()
    )
    chosen = s.gather(-1, p.indices)
    kth = s.topk(top_k, dim=-1).values[..., -1:]
    # a selected expert may beat an unselected one only by the two scores' errors
    assert (chosen >= kth - 2 * err.amax(-1, keepdim=True)).all()
    assert all(len(set(row)) == top_k for row in p.indices.reshape(-1, top_k).tolist())
    # the logit is scale * s: its error and one more rounding
    bound = m.scale * err.gather(-1, p.indices) + unit_roundoff(torch.float32) * (m.scale * chosen).abs()
    assert_within(p.logits[:, :, 0], m.scale * chosen, bound)


@FUZZ
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=6),
    dtype=st.sampled_from([torch.float32, torch.int64, torch.bool]),
)
def test_smope_rejects_bad_queries(shape, dtype):
    m = norga.SMoPE(8, 2, num_experts=4, top_k=2)
    good = len(shape) == 4 and shape[1] == 2 and shape[3] == 4 and shape[2] >= 1
    q = torch.zeros(shape, dtype=dtype)
    if good and dtype == torch.float32:
        assert m(q).key.shape == (shape[0], 2, 2, 4)
    elif not good:
        _clear_error(lambda: m(q), "q must have shape", str(tuple(shape)))
    else:
        _clear_error(lambda: m(q), "floating-point", str(dtype))


@FUZZ
@given(
    which=st.sampled_from(["dim", "num_heads", "num_experts", "top_k", "noise_eps"]),
    bad=st.sampled_from([0, -3, 2.5, float("nan"), float("inf"), "4", True]),
)
def test_smope_rejects_bad_configuration(which, bad):
    args = {"dim": 8, "num_heads": 2, "num_experts": 4, "top_k": 2, "noise_eps": 0.4}
    if (
        which == "noise_eps"
        and isinstance(bad, (int, float))
        and not isinstance(bad, bool)
        and bad >= 0
        and math.isfinite(bad)
    ):
        return  # 2.5 is a valid noise level
    args[which] = bad
    _clear_error(lambda: norga.SMoPE(**args), which)


# --------------------------------------------------------------------------------------------------
# patch_vit

_DEPTH = 3


@settings(FUZZ, max_examples=30)
@given(
    layers=st.one_of(
        st.none(),
        st.just("all"),
        st.text(max_size=4),
        st.lists(st.integers(-2, _DEPTH + 1), max_size=4),
    ),
    gate=st.sampled_from([None, "tanh", "sigmoid", "gelu", "relu", 3]),
)
@example(layers="", gate=3)  # two bad arguments: the layer selection is checked first, as the test expects
@example(layers=[], gate=3)
def test_patch_vit_layers_and_gates(layers, gate):
    """Any layer selection and gate: the right layers patched (and parity without prompts), or a clear error."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=_DEPTH, num_classes=3
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    if isinstance(layers, str) and layers != "all":
        _clear_error(lambda: norga.patch_vit(model, layers=layers, gate=gate), repr(layers))
        return
    if isinstance(layers, list):
        if len(set(layers)) != len(layers):
            _clear_error(lambda: norga.patch_vit(model, layers=layers, gate=gate), "duplicates")
            return
        bad = [i for i in sorted(layers) if not 0 <= i < _DEPTH]
        if bad:
            _clear_error(lambda: norga.patch_vit(model, layers=layers, gate=gate), f"layer index {bad[0]}")
            return
        if not layers:
            _clear_error(lambda: norga.patch_vit(model, layers=layers, gate=gate), "empty")
            return
    if gate == 3:
        _clear_error(lambda: norga.patch_vit(model, layers=layers, gate=gate), "gate", "int")
        return
    if gate == "relu":
        _clear_error(lambda: norga.patch_vit(model, layers=layers, gate=gate), "relu")
        return
    norga.patch_vit(model, layers=layers, gate=gate)
    expected = list(range(_DEPTH)) if layers in (None, "all") else sorted(layers)
    assert [layer.index for layer in norga.patch.patched_layers(model)] == expected
    assert torch.equal(model(x), before)  # no prompt: timm's own forward, the same operations, bit for bit
