import math

import pytest
import torch
from reference import norga_gate

from norga import NoRGaGate


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "gelu"])
def test_gate_matches_equation(act):
    s = torch.randn(3, 4, 7, 5, dtype=torch.float64) * 3
    gate = NoRGaGate(act, alpha=0.7, tau=1.9).double()
    alpha, tau = gate.alpha.item(), gate.tau.item()  # 0.7 and 1.9 rounded to float32 at construction
    assert alpha == pytest.approx(0.7) and tau == pytest.approx(1.9)
    torch.testing.assert_close(gate(s), norga_gate(s, act, alpha, tau), rtol=1e-12, atol=1e-12)


def test_gate_learnable_parameters_and_gradients():
    gate = NoRGaGate("tanh", alpha=0.5, tau=2.0, learnable=True)
    assert {n for n, _ in gate.named_parameters()} == {"alpha", "tau"}
    s = torch.randn(10, dtype=torch.float64)
    gate = gate.double()
    gate(s).sum().backward()
    # d/dalpha = sum tanh(tau s); d/dtau = sum alpha * s * (1 - tanh^2(tau s))
    t = torch.tanh(2.0 * s)
    torch.testing.assert_close(gate.alpha.grad, t.sum())
    torch.testing.assert_close(gate.tau.grad, (0.5 * s * (1 - t**2)).sum())


def test_gate_not_learnable_uses_buffers_and_freeze():
    gate = NoRGaGate("sigmoid", learnable=False)
    assert list(gate.parameters()) == []
    assert set(gate.state_dict()) == {"alpha", "tau"}
    g2 = NoRGaGate("sigmoid").freeze()
    assert all(not p.requires_grad for p in g2.parameters())


def test_gate_callable_activation():
    gate = NoRGaGate(torch.relu, alpha=2.0, tau=1.0)
    s = torch.tensor([-1.0, 0.5])
    torch.testing.assert_close(gate(s), torch.tensor([-1.0, 1.5]), rtol=0, atol=1e-7)


def test_gate_state_dict_round_trip():
    a = NoRGaGate("gelu", alpha=0.3, tau=0.9)
    b = NoRGaGate("gelu")
    b.load_state_dict(a.state_dict())
    assert b.alpha.item() == pytest.approx(0.3) and b.tau.item() == pytest.approx(0.9)


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
