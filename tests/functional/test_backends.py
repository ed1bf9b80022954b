import pytest
import reference as ref
import torch
from tolerance import attention_grad_tol, attention_tol, gate_args
from versions import needs

from norga import NoRGaGate, Prefix, prefix_attention
from norga.functional import attention_bias, available_backends, normalize_prefix, select_backend

BACKENDS = ["math", "merge", "sdpa"]
B, H, N, D, L = 3, 4, 11, 8, 5
SCALE = D**-0.5
# Every bound below is tolerance.attention_tol (or attention_grad_tol for gradients): the worst-case error
# of the float32 evaluation of these very scores and values, against the float64 reference on the same
# inputs (whose own error is ~1e-16); two float32 paths compared with each other get twice that.


def assert_grad_close(got, want, bound):
    """``bound`` from :func:`tolerance.attention_grad_tol`: the float32 backward against float64."""
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=bound)


def _leaf_bound(gb, leaf, name):
    """The gradient bound of one leaf: the head-space bound, or its sum over a broadcast batch."""
    if name == "qkv":
        return max(gb["q"], gb["k"], gb["v"])
    if name in ("pk", "pv"):
        return gb[name] if leaf.dim() == 4 or (leaf.dim() == 3 and leaf.shape[0] == B) else gb[name + "_batch"]
    if name == "bias":
        return gb["bias"] if leaf.shape[0] == B else gb["bias_batch"]
    return gb[name]  # alpha, tau, logits_rows


def _qkv(dtype=torch.float32):
    qkv = torch.randn(B, N, 3, H, D, dtype=dtype, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as timm produces them
    return qkv, q, k, v


def _check(backend, pk_flat, pv_flat, pk_h, pv_h, gate=None, ref_gate=None, bias=None, logits=None):
    qkv, q, k, v = _qkv()
    leaves = [qkv, pk_flat, pv_flat] + ([bias] if bias is not None and bias.requires_grad else [])
    leaves += list(gate.parameters()) if gate is not None else []
    names = ["qkv", "pk", "pv"] + (["bias"] if bias is not None and bias.requires_grad else [])
    names += ["alpha", "tau"] if gate is not None else []
    prefix = Prefix(pk_flat, pv_flat, logits) if logits is not None else (pk_flat, pv_flat)
    out = prefix_attention(q, k, v, prefix, gate=gate, attn_bias=bias, backend=backend)
    args = {
        "scale": SCALE,
        "bias": None if bias is None else bias.expand(B, H, N, N),
        "logits": None if logits is None else logits.expand(B, H, 1, -1),
    }
    expected = ref.prefix_attention(q, k, v, pk_h(), pv_h(), gate=ref_gate, **args)
    bound = attention_tol(q, k, v, pk_h(), pv_h(), **args, **gate_args(gate))
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=bound)
    w = torch.randn_like(expected)
    got = torch.autograd.grad((out.double() * w).sum(), leaves)
    want = torch.autograd.grad((expected * w).sum(), leaves)
    gb = attention_grad_tol(q, k, v, pk_h(), pv_h(), w, **args, **gate_args(gate))
    for g, e, leaf, name in zip(got, want, leaves, names):
        assert_grad_close(g, e, _leaf_bound(gb, leaf, name))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["shared", "per_sample", "per_head"])
def test_linear_gate_all_prefix_shapes(backend, shape):
    if shape == "shared":
        pk = torch.randn(L, H * D, requires_grad=True)
        pv = torch.randn(L, H * D, requires_grad=True)

        def pk_h():
            return ref.heads(pk, H).unsqueeze(0).expand(B, -1, -1, -1)

        def pv_h():
            return ref.heads(pv, H).unsqueeze(0).expand(B, -1, -1, -1)
    elif shape == "per_sample":
        pk = torch.randn(B, L, H * D, requires_grad=True)
        pv = torch.randn(B, L, H * D, requires_grad=True)

        def pk_h():
            return ref.heads(pk, H)

        def pv_h():
            return ref.heads(pv, H)
    else:
        pk = torch.randn(B, H, L, D, requires_grad=True)
        pv = torch.randn(B, H, L, D, requires_grad=True)

        def pk_h():
            return pk

        def pv_h():
            return pv

    _check(backend, pk, pv, pk_h, pv_h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "gelu"])
def test_norga_gate_with_bias(backend, act):
    pk = torch.randn(B, L, H * D, requires_grad=True)
    pv = torch.randn(B, L, H * D, requires_grad=True)
    gate = NoRGaGate(act, alpha=0.8, tau=1.7)
    bias = torch.randn(1, H, N, N, requires_grad=True)
    _check(
        backend,
        pk,
        pv,
        lambda: ref.heads(pk, H),
        lambda: ref.heads(pv, H),
        gate=gate,
        ref_gate=lambda s: ref.norga_gate(s, act, gate.alpha.double(), gate.tau.double()),
        bias=bias,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_constant_logits_replace_scores(backend):
    pk = torch.randn(B, H, L, D, requires_grad=True)
    pv = torch.randn(B, H, L, D, requires_grad=True)
    logits = torch.randn(B, H, 1, L, requires_grad=True)
    qkv, q, k, v = _qkv()
    out = prefix_attention(q, k, v, Prefix(pk, pv, logits), backend=backend)
    expected = ref.prefix_attention(q, k, v, pk, pv, scale=SCALE, logits=logits)
    torch.testing.assert_close(
        out.double(), expected, rtol=0, atol=attention_tol(q, k, v, pk, pv, scale=SCALE, logits=logits)
    )
    w = torch.randn_like(expected)
    leaves = [qkv, pv, logits]
    gb = attention_grad_tol(q, k, v, pk, pv, w, scale=SCALE, logits=logits)
    for g, e, leaf, name in zip(
        torch.autograd.grad((out.double() * w).sum(), leaves),
        torch.autograd.grad((expected * w).sum(), leaves),
        leaves,
        ["qkv", "pv", "logits_rows"],
    ):
        assert_grad_close(g, e, _leaf_bound(gb, leaf, name))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_scores_are_stable(backend):
    qkv, q, k, v = _qkv()
    q = q * 30
    pk = torch.randn(B, L, H * D) * 30
    pv = torch.randn(B, L, H * D)
    out = prefix_attention(q, k, v, (pk, pv), gate=NoRGaGate("sigmoid"), backend=backend)
    assert torch.isfinite(out).all()
    expected = ref.prefix_attention(
        q,
        k,
        v,
        ref.heads(pk, H),
        ref.heads(pv, H),
        scale=SCALE,
        gate=lambda s: ref.norga_gate(s, "sigmoid", 1.0, 1.0),
    )
    # q and the prefix keys scaled by 30: scores of hundreds, whose float32 errors grow with them (tolerance.py)
    bound = attention_tol(q, k, v, ref.heads(pk, H), ref.heads(pv, H), scale=SCALE, act="sigmoid")
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=bound)


def test_no_prefix_and_empty_prefix_equal_plain_attention():
    _, q, k, v = _qkv()
    plain = torch.softmax(q @ k.transpose(-1, -2) * SCALE, -1) @ v
    # SDPA's fused kernel and the explicit float32 softmax: two evaluations, each within attention_tol
    bound = 2 * attention_tol(q, k, v, scale=SCALE)
    torch.testing.assert_close(prefix_attention(q, k, v), plain, rtol=0, atol=bound)
    empty = torch.zeros(0, H * D)
    torch.testing.assert_close(prefix_attention(q, k, v, (empty, empty)), plain, rtol=0, atol=bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["merge", "sdpa", "math"])
def test_low_precision_close_to_fp32(dtype, backend):
    """Inputs in ``dtype``: the same values as the float32 run gets (the inputs' own rounding is no error
    of the backend), the output close to float32 within what is rounded to ``dtype`` inside."""
    _, q, k, v = _qkv()
    q, k, v = (t.detach().to(dtype) for t in (q, k, v))
    pk, pv = torch.randn(L, H * D).to(dtype), torch.randn(L, H * D).to(dtype)
    gate = NoRGaGate("tanh")
    full = prefix_attention(q.float(), k.float(), v.float(), (pk.float(), pv.float()), gate=gate, backend="math")
    low = prefix_attention(q, k, v, (pk, pv), gate=gate, backend=backend)
    assert low.dtype == dtype and torch.isfinite(low).all()
    pk_h, pv_h = (ref.heads(t, H).expand(B, -1, -1, -1) for t in (pk, pv))
    args = {"scale": SCALE, **gate_args(gate)}
    bound = attention_tol(q, k, v, pk_h, pv_h, io_dtype=dtype, **args) + attention_tol(q, k, v, pk_h, pv_h, **args)
    torch.testing.assert_close(low.float(), full, rtol=0, atol=bound)


def test_backend_selection():
    _, q, _, _ = _qkv()
    assert "merge" in available_backends("cpu")
    assert select_backend(q, "auto") == "merge"
    assert select_backend(q, "auto", dropout_p=0.1) == "sdpa"
    with pytest.raises(ValueError, match="does not support attention dropout"):
        select_backend(q, "merge", dropout_p=0.1)
    with pytest.raises(ValueError, match=r"unknown backend 'flash2'"):
        select_backend(q, "flash2")


def test_prefix_shape_errors():
    with pytest.raises(ValueError, match=r"prefix width must be num_heads \* head_dim = 32, got .*\(5, 30\)"):
        normalize_prefix((torch.randn(5, 30), torch.randn(5, 30)), 2, 4, 8)
    with pytest.raises(ValueError, match=r"same shape, got key \(5, 32\) and value \(6, 32\)"):
        normalize_prefix((torch.randn(5, 32), torch.randn(6, 32)), 2, 4, 8)
    with pytest.raises(ValueError, match=r"prefix batch must be 1 or B=2, got 3"):
        normalize_prefix((torch.randn(3, 5, 32), torch.randn(3, 5, 32)), 2, 4, 8)
    with pytest.raises(ValueError, match=r"\(B, H=4, L, D=8\), got \(2, 3, 5, 8\)"):
        normalize_prefix((torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)), 2, 4, 8)
    with pytest.raises(ValueError, match=r"prefix must have shape"):
        normalize_prefix((torch.randn(32), torch.randn(32)), 2, 4, 8)
    with pytest.raises(TypeError, match=r"norga.Prefix or a \(key, value\) pair"):
        normalize_prefix(torch.randn(5, 32), 2, 4, 8)
    with pytest.raises(TypeError, match=r"must be tensors"):
        normalize_prefix(([1.0], [1.0]), 2, 4, 8)
    with pytest.raises(
        ValueError, match=r"logits must have shape \(1 or B=2, H=4, 1 or N=7, L=5\), got \(2, 4, 3, 5\)"
    ):
        normalize_prefix(Prefix(torch.randn(5, 32), torch.randn(5, 32), torch.randn(2, 4, 3, 5)), 2, 4, 8, 7)


def test_a_tuple_of_a_prefixs_fields_is_that_prefix():
    """`tuple(prefix)`, its four fields (as torch.fx graphs pass a Prefix), is normalised as the Prefix itself;
    another length (a pair with logits, say) is a TypeError naming it."""
    key, value, logits = torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.randn(2, 4, 1, 5)
    prefix = Prefix(key, value, logits, torch.arange(5))
    got, want = normalize_prefix(tuple(prefix), 2, 4, 8, 7), normalize_prefix(prefix, 2, 4, 8, 7)
    assert type(got) is Prefix
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for length in (1, 3, 5):
        with pytest.raises(TypeError, match=rf"tuple\(prefix\) of a Prefix\), got tuple of length {length}"):
            normalize_prefix((key, value, logits, logits, logits)[:length], 2, 4, 8)


def _softmax_gate(s):
    """Shape-preserving but not elementwise: must see exactly the L prefix columns on every path."""
    return torch.softmax(s, dim=-1) * 3.0


# How far _softmax_gate moves its output per unit of input: its Jacobian 3 (diag(p) - p p^T) has row sums
# of absolute values 3 * 2 p_i (1 - p_i) <= 1.5.
SOFTMAX_GATE_SLOPE = 1.5


@pytest.mark.parametrize("gate_name", ["none", "tanh", "sigmoid", "gelu", "custom", "norga_custom"])
@pytest.mark.parametrize("shape", ["shared", "per_sample"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_merge_without_autograd_matches_reference(gate_name, shape, with_bias):
    """Under no_grad the merge backend takes its in-place path: same result as the float64 reference and
    as the autograd path, inputs untouched, and the output in the fused kernel's (B, N, H, D) layout."""
    _, q, k, v = _qkv()
    q, k, v = q.detach(), k.detach(), v.detach()
    lead = (L,) if shape == "shared" else (B, L)
    pk, pv = torch.randn(*lead, H * D), torch.randn(*lead, H * D)
    bias = torch.randn(1, H, N, N) if with_bias else None
    if gate_name in ("none", "custom"):
        gate, ref_gate = (None, None) if gate_name == "none" else (_softmax_gate, _softmax_gate)
        gate_tol = {} if gate_name == "none" else {"gate": _softmax_gate, "gate_slope": SOFTMAX_GATE_SLOPE}
    elif gate_name == "norga_custom":  # a NoRGaGate around a non-elementwise activation: also sees L columns
        gate = NoRGaGate(_softmax_gate, alpha=0.8, tau=1.7)
        ref_gate = lambda s: s + gate.alpha.item() * _softmax_gate(gate.tau.item() * s)  # noqa: E731
        gate_tol = {"gate": ref_gate, "gate_slope": 1 + gate.alpha.item() * gate.tau.item() * SOFTMAX_GATE_SLOPE}
    else:
        gate = NoRGaGate(gate_name, alpha=0.8, tau=1.7)
        ref_gate = lambda s, a=gate_name: ref.norga_gate(s, a, gate.alpha.item(), gate.tau.item())  # noqa: E731
        gate_tol = gate_args(gate)
    kept = [t.clone() for t in (q, k, v, pk, pv)]
    with torch.no_grad():
        out = prefix_attention(q, k, v, (pk, pv), gate=gate, attn_bias=bias, backend="merge")
    for t, c in zip((q, k, v, pk, pv), kept):
        assert torch.equal(t, c)
    assert out.transpose(1, 2).is_contiguous()
    pk_h, pv_h = ref.heads(pk, H), ref.heads(pv, H)
    if shape == "shared":
        pk_h, pv_h = pk_h.expand(B, -1, -1, -1), pv_h.expand(B, -1, -1, -1)
    bias_h = None if bias is None else bias.expand(B, H, N, N)
    expected = ref.prefix_attention(q, k, v, pk_h, pv_h, scale=SCALE, gate=ref_gate, bias=bias_h)
    bound = attention_tol(q, k, v, pk_h, pv_h, scale=SCALE, bias=bias_h, **gate_tol)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=bound)
    # two float32 evaluations (in-place chunks vs the autograd function), each within `bound` of the exact value
    with_graph = prefix_attention(q, k, v, (pk, pv), gate=gate, attn_bias=bias, backend="merge")
    torch.testing.assert_close(out, with_graph, rtol=0, atol=2 * bound)


@pytest.mark.parametrize("gate_name", ["none", "sigmoid"])
def test_merge_without_autograd_row_constant_logits(gate_name):
    """SMoPE's logits on the in-place path: gated at their own size, broadcast over the queries."""
    _, q, k, v = _qkv()
    q, k, v = q.detach(), k.detach(), v.detach()
    pk, pv, logits = torch.randn(B, H, L, D), torch.randn(B, H, L, D), torch.randn(B, H, 1, L)
    gate = None if gate_name == "none" else NoRGaGate(gate_name, alpha=0.8, tau=1.7)
    ref_gate = None if gate is None else (lambda s: ref.norga_gate(s, gate_name, gate.alpha.item(), gate.tau.item()))
    with torch.no_grad():
        out = prefix_attention(q, k, v, Prefix(pk, pv, logits), gate=gate, backend="merge")
    expected = ref.prefix_attention(q, k, v, pk, pv, scale=SCALE, gate=ref_gate, logits=logits)
    bound = attention_tol(q, k, v, pk, pv, scale=SCALE, logits=logits, **gate_args(gate))
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_without_autograd_low_precision(dtype):
    _, q, k, v = _qkv()
    q, k, v = (t.detach().to(dtype) for t in (q, k, v))
    pk, pv = torch.randn(B, L, H * D, dtype=dtype), torch.randn(B, L, H * D, dtype=dtype)
    gate = NoRGaGate("tanh")
    with torch.no_grad():
        out = prefix_attention(q, k, v, (pk, pv), gate=gate, backend="merge")
    expected = ref.prefix_attention(
        q,
        k,
        v,
        ref.heads(pk, H),
        ref.heads(pv, H),
        scale=SCALE,
        gate=lambda s: ref.norga_gate(s, "tanh", 1.0, 1.0),
    )
    assert out.dtype == dtype
    # the reference gets the same rounded inputs: only what is rounded to `dtype` inside adds (tolerance module)
    bound = attention_tol(q, k, v, ref.heads(pk, H), ref.heads(pv, H), scale=SCALE, act="tanh", io_dtype=dtype)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=bound)


def test_merge_without_autograd_bad_gate_is_a_clear_error():
    _, q, k, v = _qkv()
    pk = torch.randn(L, H * D)
    with torch.no_grad(), pytest.raises(ValueError, match="elementwise"):
        prefix_attention(q, k, v, (pk, pk), gate=lambda s: s[..., :1], backend="merge")


# One Inductor compilation each (about a minute on a cold cache), so the cases are few and each covers several
# things: a built-in gate with tanh and with erf (gelu), a custom callable gate, a bias, logits, and the three
# prefix layouts. sigmoid and the linear gate reach the kernel as tanh does (an elementwise score_mod).
FLEX_CASES = {
    "tanh-bias-per_sample": ("tanh", "bias", (B, L)),
    "gelu-logits-per_head": ("gelu", "logits", None),
    "custom-shared": ("custom", None, (L,)),
}


@needs("flex")
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.filterwarnings("error:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", list(FLEX_CASES))
def test_flex_forward_matches_reference(case):
    """FlexAttention with the gate as a score_mod (compiled C++ kernel on CPU, forward only there)."""
    act, extra, lead = FLEX_CASES[case]
    _, q, k, v = _qkv()
    q, k, v = q.detach(), k.detach(), v.detach()
    if lead is None:
        pk, pv = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
        pk_h, pv_h = pk, pv
    else:
        pk, pv = torch.randn(*lead, H * D), torch.randn(*lead, H * D)
        pk_h, pv_h = ref.heads(pk, H), ref.heads(pv, H)
        if len(lead) == 1:
            pk_h, pv_h = pk_h.expand(B, -1, -1, -1), pv_h.expand(B, -1, -1, -1)
    if act is None:
        gate, ref_gate, gate_tol = None, None, {}
    elif act == "custom":
        gate = ref_gate = lambda s: 0.5 * s - torch.sin(s)  # noqa: E731
        gate_tol = {"gate": ref_gate, "gate_slope": 1.5}  # |0.5 - cos(s)| <= 1.5
    else:
        gate = NoRGaGate(act, alpha=0.8, tau=1.7)
        ref_gate = lambda s: ref.norga_gate(s, act, gate.alpha.item(), gate.tau.item())  # noqa: E731
        gate_tol = gate_args(gate)
    bias = torch.randn(1, H, N, N) if extra == "bias" else None
    logits = torch.randn(B, H, 1, L) if extra == "logits" else None
    prefix = Prefix(pk, pv, logits) if logits is not None else (pk, pv)
    with torch.no_grad():
        out = prefix_attention(q, k, v, prefix, gate=gate, attn_bias=bias, backend="flex")
    args = {
        "scale": SCALE,
        "bias": None if bias is None else bias.expand(B, H, N, N),
        "logits": None if logits is None else logits.expand(B, H, 1, L),
    }
    expected = ref.prefix_attention(q, k, v, pk_h, pv_h, gate=ref_gate, **args)
    torch.testing.assert_close(
        out.double(), expected, rtol=0, atol=attention_tol(q, k, v, pk_h, pv_h, **args, **gate_tol)
    )


@needs("flex")
def test_flex_clear_errors_on_cpu():
    _, q, k, v = _qkv()
    pk = torch.randn(L, H * D)
    with pytest.raises(ValueError, match="no backward on CPU"):
        prefix_attention(q, k, v, (pk, pk), backend="flex")  # q requires grad
    with pytest.raises(ValueError, match="no backward on CPU"):  # the gate's alpha and tau do
        prefix_attention(q.detach(), k.detach(), v.detach(), (pk, pk), gate=NoRGaGate("tanh"), backend="flex")
    with pytest.raises(ValueError, match="dropout"):
        prefix_attention(q, k, v, (pk, pk), backend="flex", dropout_p=0.1)
    with torch.no_grad(), pytest.raises(ValueError, match="at least one query"):
        prefix_attention(q[:, :, :0], k, v, (pk, pk), backend="flex")
    assert "flex" in available_backends("cpu") and "flex" not in available_backends("meta")


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_token_rows_attend_to_the_prefix_alone(backend, grad):
    """A query row whose token keys are all masked still has its prefix columns: the full softmax is then
    the softmax over the prefix alone. (PyTorch's CPU flash kernel reports such rows with lse 0 and a zero
    output; merge must not take that for a token part of weight exp(0).)"""
    _, q, k, v = _qkv()
    q, k, v = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))
    pk, pv = (torch.randn(B, H, L, D, requires_grad=grad) for _ in range(2))
    allowed = torch.rand(B, 1, N, N) > 0.3
    allowed[:, :, [0, 4]] = False  # rows 0 and 4: every token key masked
    gate = NoRGaGate("tanh", alpha=0.8, tau=1.7)
    with torch.set_grad_enabled(grad):
        out = prefix_attention(
            q, k, v, (pk, pv), gate=gate, attn_bias=attention_bias(allowed, N, False, q), backend=backend
        )
    bias64 = torch.zeros(B, H, N, N, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    r = [t.detach().double().requires_grad_(grad) for t in (q, k, v, pk, pv)]
    a, t_ = gate.alpha.item(), gate.tau.item()
    want = ref.prefix_attention(*r, scale=SCALE, gate=lambda s: ref.norga_gate(s, "tanh", a, t_), bias=bias64)
    assert torch.isfinite(want).all()
    args = {"scale": SCALE, "bias": bias64, **gate_args(gate)}
    torch.testing.assert_close(out.double(), want, rtol=0, atol=attention_tol(q, k, v, pk, pv, **args))
    if grad:
        w = torch.randn(want.shape, dtype=torch.float64)
        got = torch.autograd.grad((out.double() * w).sum(), (q, k, v, pk, pv))
        exp = torch.autograd.grad((want * w).sum(), r)
        gb = attention_grad_tol(q, k, v, pk, pv, w, **args)
        for g_, e, name in zip(got, exp, ["q", "k", "v", "pk", "pv"]):
            assert_grad_close(g_, e, gb[name])


@pytest.mark.parametrize("gate_name", ["tanh", "custom", "logits"])
def test_merge_without_autograd_per_sample_prefixes(gate_name):
    """The in-place inference path with per-sample prefixes (scores per sample from the strided q, the gate in
    place, or on the whole block for a custom gate and for logits): the same result as the float64 reference."""
    _, q, k, v = _qkv()
    q, k, v = q.detach(), k.detach(), v.detach()
    pk, pv = torch.randn(B, L, H * D), torch.randn(B, L, H * D)
    logits = torch.randn(B, H, 1, L) if gate_name == "logits" else None
    gate = _softmax_gate if gate_name == "custom" else NoRGaGate("tanh", alpha=0.8, tau=1.7)
    ref_gate = (
        _softmax_gate
        if gate_name == "custom"
        else (lambda s: ref.norga_gate(s, "tanh", gate.alpha.item(), gate.tau.item()))
    )
    gate_tol = {"gate": _softmax_gate, "gate_slope": SOFTMAX_GATE_SLOPE} if gate_name == "custom" else gate_args(gate)
    prefix = Prefix(pk, pv, logits)
    with torch.no_grad():
        out = prefix_attention(q, k, v, prefix, gate=gate, backend="merge")
    pk_h, pv_h = ref.heads(pk, H), ref.heads(pv, H)
    want = ref.prefix_attention(q, k, v, pk_h, pv_h, scale=SCALE, gate=ref_gate, logits=logits)
    bound = attention_tol(q, k, v, pk_h, pv_h, scale=SCALE, logits=logits, **gate_tol)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=bound)
