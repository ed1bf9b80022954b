import pytest
import reference as ref
import torch
from timm.layers import Attention
from tolerance import prefix_layer_tol
from torch import nn
from versions import needs_timm

from norga import NoRGaGate, Prefix, PrefixMoEAttention, PrefixPrompt

DIM, HEADS = 32, 4
HD = DIM // HEADS


def _pair(**kw):
    timm_attn = Attention(DIM, num_heads=HEADS, qkv_bias=True, **kw).eval()
    ours = PrefixMoEAttention(DIM, num_heads=HEADS, qkv_bias=True, **kw).eval()
    ours.load_state_dict(timm_attn.state_dict(), strict=True)
    return timm_attn, ours


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"qk_norm": True, "norm_layer": nn.LayerNorm},
        {"scale_norm": True, "norm_layer": nn.LayerNorm},
        pytest.param({"gated": True}, marks=needs_timm((1, 0, 28), "timm's output gate (Attention(gated=True))")),
    ],
)
def test_identical_to_timm_without_prefix(fused, kw):
    timm_attn, ours = _pair(**kw)
    timm_attn.fused_attn = ours.fused_attn = fused
    assert list(ours.state_dict()) == list(timm_attn.state_dict())
    x = torch.randn(3, 9, DIM)
    # no prefix: the same operations as timm's forward on the same weights, so the same bits
    assert torch.equal(ours(x), timm_attn(x))
    mask = torch.rand(3, 1, 9, 9) > 0.3
    mask[..., 0] = True
    assert torch.equal(ours(x, attn_mask=mask), timm_attn(x, attn_mask=mask))


def _reference_layer(layer, x, pk, pv, gate=None):
    """The layer's output from its weights and the equations, written independently of norga."""
    B, N, _ = x.shape
    qkv = x.double() @ layer.qkv.weight.double().T + layer.qkv.bias.double()
    q, k, v = (ref.heads(qkv[..., i * DIM : (i + 1) * DIM], HEADS) for i in range(3))
    o = ref.prefix_attention(q, k, v, pk, pv, scale=HD**-0.5, gate=gate)
    o = torch.cat([o[:, h] for h in range(HEADS)], dim=-1)  # merge heads
    return o @ layer.proj.weight.double().T + layer.proj.bias.double()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("act", [None, "tanh", "sigmoid", "gelu"])
def test_prefix_matches_reference(fused, act):
    gate = NoRGaGate(act, alpha=0.6, tau=1.4) if act else None
    layer = PrefixMoEAttention(DIM, num_heads=HEADS, qkv_bias=True, gate=gate).eval()
    layer.fused_attn = fused
    x = torch.randn(2, 7, DIM)
    pk, pv = torch.randn(2, 5, DIM), torch.randn(2, 5, DIM)
    out = layer(x, prefix=(pk, pv))
    ref_gate = (
        (lambda s: ref.norga_gate(s, act, layer.prefix_gate.alpha.item(), layer.prefix_gate.tau.item()))
        if act
        else None
    )
    pk_h, pv_h = ref.heads(pk, HEADS), ref.heads(pv, HEADS)
    expected = _reference_layer(layer, x, pk_h, pv_h, ref_gate)
    # float32 qkv (32-term dot products), attention and projection against the float64 equations
    gate_tol = {} if act is None else {"act": act, "alpha": gate.alpha.item(), "tau": gate.tau.item()}
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=prefix_layer_tol(layer, x, pk_h, pv_h, **gate_tol))


def test_prompt_module_supplies_prefix_and_gets_queries():
    seen = {}

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = PrefixPrompt(4, DIM)

        def forward(self, q):
            seen["q"] = q.shape
            return self.inner(q)

    layer = PrefixMoEAttention(DIM, num_heads=HEADS, prompt=Spy()).eval()
    x = torch.randn(2, 6, DIM)
    explicit = layer(x, prefix=Prefix(layer.prompt.inner.prompt[0], layer.prompt.inner.prompt[1]))
    seen.clear()
    via_prompt = layer(x)
    assert seen["q"] == (2, HEADS, 6, HD)
    # the same prefix in another layout: two float32 evaluations of the layer, each within `bound`
    pk, pv = (ref.heads(t.detach(), HEADS).unsqueeze(0).expand(2, -1, -1, -1) for t in layer.prompt.inner.prompt)
    bound = prefix_layer_tol(layer, x, pk, pv)
    torch.testing.assert_close(via_prompt, explicit, rtol=0, atol=2 * bound)
    empty = torch.zeros(2, HEADS, 0, HD)
    without = layer(x, prefix=(torch.zeros(0, DIM), torch.zeros(0, DIM)))
    assert (via_prompt - without).abs().max() > bound + prefix_layer_tol(layer, x, empty, empty)


def test_gradients_reach_prefix_gate_and_qkv():
    layer = PrefixMoEAttention(DIM, num_heads=HEADS, gate=NoRGaGate("tanh"), prompt=PrefixPrompt(5, DIM))
    layer(torch.randn(2, 6, DIM)).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_invariance_per_sample_prefix():
    layer = PrefixMoEAttention(DIM, num_heads=HEADS, gate="sigmoid").eval()
    x = torch.randn(5, 8, DIM)
    pk, pv = torch.randn(5, 3, DIM), torch.randn(5, 3, DIM)
    batched = layer(x, prefix=(pk, pv))
    for b in range(5):
        alone = layer(x[b : b + 1], prefix=(pk[b : b + 1], pv[b : b + 1]))
        # other shapes may take other kernels and summation orders: two evaluations, each within `bound`
        bound = prefix_layer_tol(
            layer, x[b : b + 1], ref.heads(pk[b : b + 1], HEADS), ref.heads(pv[b : b + 1], HEADS), act="sigmoid"
        )
        torch.testing.assert_close(alone, batched[b : b + 1], rtol=0, atol=2 * bound)


def test_state_dict_round_trip_with_gate():
    a = PrefixMoEAttention(DIM, num_heads=HEADS, gate=NoRGaGate("gelu", alpha=0.2))
    b = PrefixMoEAttention(DIM, num_heads=HEADS, gate=NoRGaGate("gelu"))
    b.load_state_dict(a.state_dict(), strict=True)
    x, p = torch.randn(2, 4, DIM), (torch.randn(3, DIM), torch.randn(3, DIM))
    assert torch.equal(a(x, prefix=p), b(x, prefix=p))  # the same weights and operations: the same bits


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match=r"dim must be divisible by num_heads, got dim=30 and num_heads=4"):
        PrefixMoEAttention(30, num_heads=4)
    with pytest.raises(ValueError, match=r"unknown activation 'swish'"):
        PrefixMoEAttention(DIM, num_heads=HEADS, gate="swish")
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'"):
        PrefixMoEAttention(DIM, num_heads=HEADS, backend="cuda")
    with pytest.raises(TypeError, match=r"prompt must be an nn.Module"):
        PrefixMoEAttention(DIM, num_heads=HEADS, prompt=lambda q: None)
    layer = PrefixMoEAttention(DIM, num_heads=HEADS)
    with pytest.raises(ValueError, match=r"x must be \(B, N, dim\), got shape \(4, 32\)"):
        layer(torch.randn(4, DIM))
    with pytest.raises(ValueError, match=r"prefix width must be num_heads \* head_dim = 32, got .*\(2, 3, 16\)"):
        layer(torch.randn(2, 4, DIM), prefix=(torch.randn(2, 3, 16), torch.randn(2, 3, 16)))
    with pytest.raises(ValueError, match=r"prefix batch must be 1 or B=2, got 3"):
        layer(torch.randn(2, 4, DIM), prefix=(torch.randn(3, 3, DIM), torch.randn(3, 3, DIM)))
