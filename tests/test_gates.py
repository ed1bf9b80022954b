import math

import pytest
import torch
from reference import norga_gate
from tolerance import assert_within, norga_gate_err, tol, unit_roundoff

from norga import NoRGaGate

U32 = unit_roundoff(torch.float32)  # alpha and tau are stored in float32: a Python float is rounded by <= u


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "gelu"])
def test_gate_matches_equation(act):
    s = torch.randn(3, 4, 7, 5, dtype=torch.float64) * 3
    gate = NoRGaGate(act, alpha=0.7, tau=1.9).double()
    alpha, tau = gate.alpha.item(), gate.tau.item()  # 0.7 and 1.9 rounded to float32 at construction
    assert alpha == pytest.approx(0.7, rel=U32, abs=0) and tau == pytest.approx(1.9, rel=U32, abs=0)
    # float64 on both sides: the roundings of tau * s, the activation, alpha * act and the sum, twice
    assert_within(gate(s), norga_gate(s, act, alpha, tau), norga_gate_err(s, act, alpha, tau, torch.float64))


def test_gate_learnable_parameters_and_gradients():
    gate = NoRGaGate("tanh", alpha=0.5, tau=2.0, learnable=True)
    assert {n for n, _ in gate.named_parameters()} == {"alpha", "tau"}
    s = torch.randn(10, dtype=torch.float64)
    gate = gate.double()
    gate(s).sum().backward()
    # d/dalpha = sum tanh(tau s); d/dtau = sum alpha * s * (1 - tanh^2(tau s)). Both sides sum 10 float64
    # terms (in possibly different orders) of a few roundings each: gamma_{10 + 4} of the absolute terms.
    t = torch.tanh(2.0 * s)
    d_tau = 0.5 * s * (1 - t**2)
    torch.testing.assert_close(gate.alpha.grad, t.sum(), rtol=0, atol=2 * tol(torch.float64, 14, t.abs().sum()))
    torch.testing.assert_close(gate.tau.grad, d_tau.sum(), rtol=0, atol=2 * tol(torch.float64, 14, d_tau.abs().sum()))


def test_gate_not_learnable_uses_buffers_and_freeze():
    gate = NoRGaGate("sigmoid", learnable=False)
    assert list(gate.parameters()) == []
    assert set(gate.state_dict()) == {"alpha", "tau"}
    g2 = NoRGaGate("sigmoid").freeze()
    assert all(not p.requires_grad for p in g2.parameters())


def test_gate_callable_activation():
    gate = NoRGaGate(torch.relu, alpha=2.0, tau=1.0)
    s = torch.tensor([-1.0, 0.5])
    assert torch.equal(gate(s), torch.tensor([-1.0, 1.5]))  # 1 * s, relu, 2 * 0.5 and 0.5 + 1 are exact


def test_gate_state_dict_round_trip():
    a = NoRGaGate("gelu", alpha=0.3, tau=0.9)
    b = NoRGaGate("gelu")
    b.load_state_dict(a.state_dict())
    assert b.alpha.item() == pytest.approx(0.3, rel=U32, abs=0) and b.tau.item() == pytest.approx(0.9, rel=U32, abs=0)


def test_gate_errors():
    with pytest.raises(ValueError, match=r"unknown activation 'relu6'.*'gelu', 'sigmoid', 'tanh'"):
        NoRGaGate("relu6")
    with pytest.raises(ValueError, match=r"alpha must be finite, got nan"):
        NoRGaGate("tanh", alpha=math.nan)
    with pytest.raises(ValueError, match=r"tau must be finite, got inf"):
        NoRGaGate("tanh", tau=math.inf)
    with pytest.raises(TypeError, match=r"alpha must be a real number, got str"):
        NoRGaGate("tanh", alpha="1")
    with pytest.raises(TypeError, match=r"activation must be one of"):
        NoRGaGate(3)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "gelu"])
def test_gate_without_autograd_matches_equation_and_keeps_input(act, dtype, mode):
    """Without a graph the built-in activations run in place on one temporary (tanh as 2 sigmoid(2x) - 1):
    same values as the equation, within a few ulps, and the input is left as it was."""
    s = torch.randn(2, 3, 9, 6, dtype=dtype) * 4
    kept = s.clone()
    gate = NoRGaGate(act, alpha=1.3, tau=0.6).to(dtype)
    if mode == "frozen":
        gate.freeze()
        out = gate(s)
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            out = gate(s)
    want = norga_gate(s.double(), act, gate.alpha.item(), gate.tau.item())
    assert out.dtype == dtype and not out.requires_grad
    # the in-place chain (tanh as 2 sigmoid(2x) - 1, then the shift) in dtype: tolerance.norga_gate_err
    assert_within(out, want, norga_gate_err(s, act, gate.alpha.item(), gate.tau.item(), dtype))
    assert torch.equal(s, kept)


def test_gate_without_autograd_custom_activation_output_untouched():
    """A custom activation may return a tensor it keeps; the gate never updates it in place."""
    kept = torch.full((2, 5), 0.25)
    gate = NoRGaGate(lambda x: kept, alpha=2.0)
    with torch.no_grad():
        out = gate(torch.ones(2, 5))
    assert torch.equal(out, torch.full((2, 5), 1.5))  # 1 + 2 * 0.25: exact
    assert torch.equal(kept, torch.full((2, 5), 0.25))


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "gelu"])
def test_gate_inplace_matches_equation(act):
    """The gate protocol's fast path: inplace_ overwrites a (strided) view with g(s) and returns it."""
    base = torch.randn(3, 8, 11, dtype=torch.float64) * 4
    s = base[:, :6]  # a strided view, as the merge backend passes it
    kept, outside = s.clone(), base[:, 6:].clone()
    gate = NoRGaGate(act, alpha=-0.7, tau=1.4).double()
    with torch.no_grad():
        out = gate.inplace_(s)
    assert out is s
    want = norga_gate(kept, act, gate.alpha.item(), gate.tau.item())
    assert_within(s, want, norga_gate_err(kept, act, gate.alpha.item(), gate.tau.item(), torch.float64))
    assert torch.equal(base[:, 6:], outside)


def test_gate_inplace_declines_a_custom_activation():
    """A custom activation need not be elementwise on a view: inplace_ declines and changes nothing."""
    x = torch.randn(3, 4)
    kept = x.clone()
    for act in (torch.relu, lambda t: torch.tanh(t)):
        with torch.no_grad():
            assert NoRGaGate(act).inplace_(x) is NotImplemented
        assert torch.equal(x, kept)
    with torch.no_grad():  # the paper's function under its own name takes the fast path
        assert NoRGaGate(torch.tanh).inplace_(x) is x
