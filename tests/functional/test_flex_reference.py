"""``flex`` training, checked on CPU: the score_mod that ``flex`` hands FlexAttention (the gate on the prefix columns,
SMoPE's logits and the token bias read by index) through FlexAttention's uncompiled reference implementation, whose
backward differentiates the score_mod's captured tensors as the compiled CUDA kernels do. Output and the gradients
of q, k, v, the prefix, alpha, tau, the logits and the token bias against the float64 equations.

PyTorch's ``flex_attention`` refuses CPU inputs that require grad before choosing an implementation (its compiled
CPU kernel has no backward); the reference implementation behind it has one, so the test lifts that check.
"""

import pytest
import reference as ref
import torch
from tolerance import assert_within, attention_grad_tol, attention_tol
from versions import needs

from norga import NoRGaGate
from norga.functional import flex

B, H, N, D, L = 2, 3, 11, 8, 5
SCALE = D**-0.5
pytestmark = [needs("flex"), needs("flex_reference")]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("act, extra", [("tanh", "bias"), ("gelu", "logits")])
def test_flex_score_mod_gradients_through_reference_implementation(act, extra, monkeypatch):
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *tensors: None)
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    pk, pv = ((torch.rand(B, H, L, D) * 2 - 1).requires_grad_(True) for _ in range(2))
    gate = NoRGaGate(act, alpha=0.8, tau=1.7)
    bias = torch.randn(1, H, N, N, requires_grad=True) if extra == "bias" else None
    logits = torch.randn(B, H, 1, L, requires_grad=True) if extra == "logits" else None
    out = flex.flex_attention(q, k, v, pk, pv, gate, logits, bias, SCALE, attend=fa.flex_attention)
    assert out.grad_fn is not None

    leaves = {"qkv": qkv, "pk": pk, "pv": pv, "alpha": gate.alpha, "tau": gate.tau, "bias": bias, "logits": logits}
    leaves = {name: t for name, t in leaves.items() if t is not None}
    if logits is not None:
        del leaves["pk"]
    r = {name: t.detach().double().requires_grad_(True) for name, t in leaves.items()}
    rq, rk, rv = r["qkv"].permute(2, 0, 3, 1, 4).unbind(0)
    rpk = r.get("pk", pk.detach().double())
    rbias = None if bias is None else r["bias"].expand(B, H, N, N)
    rlogits = None if logits is None else r["logits"].expand(B, H, 1, L)
    want = ref.prefix_attention(
        rq, rk, rv, rpk, r["pv"], scale=SCALE, gate=lambda s: ref.norga_gate(s, act, r["alpha"], r["tau"]),
        bias=rbias, logits=rlogits,
    )  # fmt: skip
    args = {
        "scale": SCALE, "act": act, "alpha": gate.alpha.item(), "tau": gate.tau.item(),
        "bias": None if rbias is None else rbias.detach(), "logits": None if rlogits is None else rlogits.detach(),
    }  # fmt: skip
    q64, k64, v64, pk64, pv64 = (t.detach() for t in (rq, rk, rv, rpk, r["pv"]))
    assert_within(out, want, attention_tol(q64, k64, v64, pk64, pv64, **args), "output")

    w = torch.randn(want.shape, dtype=torch.float64)
    got = dict(zip(leaves, torch.autograd.grad((out.double() * w).sum(), list(leaves.values()))))
    exp = dict(zip(r, torch.autograd.grad((want * w).sum(), list(r.values()))))
    gb = attention_grad_tol(q64, k64, v64, pk64, pv64, w, **args)
    t = gb["tensors"]
    bounds = {"qkv": torch.stack([t["q"], t["k"], t["v"]]).permute(1, 3, 0, 2, 4), "bias": gb["bias_batch"]}
    bounds.update({name: gb[name] for name in ("pk", "pv", "alpha", "tau")}, logits=gb["logits_rows"])
    for name in leaves:
        assert_within(got[name], exp[name], bounds[name], name)
