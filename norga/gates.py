"""Gates on the scores of prefix (prompt) experts.

A prefix-tuned attention head is a mixture of experts whose prompt experts have *linear* gating scores
`s = scale * q . key`. NoRGa (Le et al., 2024, arXiv 2405.14124) replaces each prefix score by the
non-linear residual gate `s + alpha * act(tau * s)`. A gate touches only the prefix columns of the attention
scores, before the softmax; token-token scores are never changed.

**The gate protocol.** For [`prefix_attention`][norga.functional.prefix_attention] and the patched layers a
gate is any callable that maps the prefix scores `(B, H, N, L)` to a tensor of the same shape, elementwise.
The core never inspects its class. A gate may also offer one optional fast path:

- `gate.inplace_(scores) -> Tensor`: write `gate(scores)` into `scores` (any layout, a view of a larger buffer
  included) without autograd and return it, or return `NotImplemented` to decline. The `merge` backend's
  inference path uses it to gate its working buffer without a copy; without it, the gate gets the
  `(B, H, N, L)` block.

[`NoRGaGate`][norga.gates.NoRGaGate] implements both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_bool, check_model, check_real, refuse_torchscript

__all__ = ["ACTIVATIONS", "NoRGaGate", "freeze_gates", "resolve_gate"]


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


#: The activations the paper studies, by name. GELU is the exact (erf) form, as `nn.GELU()`.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": _gelu,
}

Activation = Union[str, Callable[[torch.Tensor], torch.Tensor]]


class NoRGaGate(nn.Module):
    """Non-linear residual gate `g(s) = s + alpha * act(tau * s)`, elementwise.

    One gate holds one `(alpha, tau)` pair, shared by all heads and prefix columns of its layer: the authors
    run one pair per prompted layer, learnable, initialised to 1, frozen after the first task
    ([`freeze_gates`][norga.gates.freeze_gates]).

    Args:
        activation: `"tanh"`, `"sigmoid"`, `"gelu"` or a callable mapping a tensor to a tensor of the same
            shape, elementwise. The paper uses sigmoid for Sup-21K backbones, tanh by default and GELU for
            MoCo v3.
        alpha: Initial residual scale; finite.
        tau: Initial temperature inside the activation; finite.
        learnable: `alpha` and `tau` as `nn.Parameter` scalars (`True`) or as buffers (saved in the
            `state_dict` and moved by `.to()`, not trained).

    Shape:
        Any shape in, the same shape out, in the input's dtype.

    Examples:
        >>> gate = NoRGaGate("tanh", alpha=1.0, tau=1.0)
        >>> gate(torch.zeros(2, 3))
        tensor([[0., 0., 0.],
                [0., 0., 0.]], grad_fn=<AddBackward0>)
    """

    __prepare_scriptable__ = refuse_torchscript

    alpha: torch.Tensor
    tau: torch.Tensor

    def __init__(
        self, activation: Activation = "tanh", alpha: float = 1.0, tau: float = 1.0, learnable: bool = True
    ) -> None:
        super().__init__()
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError(
                    f"NoRGaGate: unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)} or a callable"
                )
            self.activation_name = activation
            self.act: Callable[[torch.Tensor], torch.Tensor] = ACTIVATIONS[activation]
        elif callable(activation):
            self.activation_name = getattr(activation, "__name__", type(activation).__name__)
            self.act = activation
        else:
            raise TypeError(
                f"NoRGaGate: activation must be one of {sorted(ACTIVATIONS)} or a callable, "
                f"got {type(activation).__name__}"
            )
        a = torch.tensor(check_real("NoRGaGate: alpha", alpha))
        t = torch.tensor(check_real("NoRGaGate: tau", tau))
        self.learnable = check_bool("NoRGaGate: learnable", learnable)
        if learnable:
            self.alpha, self.tau = nn.Parameter(a), nn.Parameter(t)
        else:
            self.register_buffer("alpha", a)
            self.register_buffer("tau", t)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores + alpha * act(tau * scores)`.

        Raises:
            TypeError: `scores` is not a floating-point tensor.
            ValueError: a custom activation did not return a tensor of the shape of `scores`.
        """
        if isinstance(scores, torch.fx.Proxy):  # symbolic tracing: the formula, nothing to check
            return scores + self.alpha.to(scores.dtype) * self.act(self.tau.to(scores.dtype) * scores)
        if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
            got = f"dtype {scores.dtype}" if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise TypeError(f"NoRGaGate: scores must be a floating-point tensor, got {got}")
        return scores + self.alpha.to(scores.dtype) * self._act(scores)

    def inplace_(self, scores: torch.Tensor) -> Any:
        """The gate protocol's fast path: `scores <- g(scores)` in place, without autograd; returns `scores`.

        Declines (returns `NotImplemented`) for a custom activation, which need not be elementwise on a view
        of another layout.
        """
        if self.act is not ACTIVATIONS.get(self.activation_name):
            return NotImplemented
        return scores.addcmul_(self._act(scores), self.alpha.to(scores.dtype))

    def _act(self, scores: torch.Tensor) -> torch.Tensor:
        a = self.act(self.tau.to(scores.dtype) * scores)
        if not isinstance(a, torch.Tensor) or a.shape != scores.shape:
            got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise ValueError(
                f"NoRGaGate: activation {self.activation_name!r} must be elementwise: expected shape "
                f"{tuple(scores.shape)}, got {got}"
            )
        return a

    def freeze(self) -> NoRGaGate:
        """Stop training `alpha` and `tau` (the authors freeze them after the first task)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def checkpoint_config(self) -> dict[str, Any]:
        """What [`save_prompts`][norga.checkpoint.save_prompts] records and `load_prompts` compares."""
        return {"kind": "NoRGaGate", "activation": self.activation_name, "learnable": bool(self.learnable)}

    def extra_repr(self) -> str:
        return (
            f"activation={self.activation_name}, alpha={self.alpha.item():.4g}, tau={self.tau.item():.4g}, "
            f"learnable={self.learnable}"
        )


def resolve_gate(gate: NoRGaGate | nn.Module | str | None) -> nn.Module | None:
    """A gate argument as a module: `None` (the linear gate), the module itself, or an activation name.

    Raises:
        TypeError: `gate` is none of these.
        ValueError: an unknown activation name.
    """
    if gate is None or isinstance(gate, nn.Module):
        return gate
    if isinstance(gate, str):
        return NoRGaGate(gate)
    raise TypeError(
        f"gate must be None, an nn.Module (e.g. NoRGaGate) or an activation name {sorted(ACTIVATIONS)}, "
        f"got {type(gate).__name__} ({gate!r})"
    )


def freeze_gates(model: nn.Module, frozen: bool = True) -> int:
    """Stop (or restart) training every learnable [`NoRGaGate`][norga.gates.NoRGaGate]'s `alpha` and `tau`.

    The NoRGa authors train `alpha` and `tau` on the first task only. This sets their `requires_grad`; call it
    before building the optimizer (and before wrapping the model in DDP, which fixes the trainable parameters
    when it is built).

    Args:
        model: A patched model (or a wrapper of one).
        frozen: `True` freezes, `False` makes the gates trainable again.

    Returns:
        The number of gates changed.

    Raises:
        TypeError: `model` is not an `nn.Module` or `frozen` not a bool.
        ValueError: the model has no learnable `NoRGaGate`.
    """
    check_model("freeze_gates", model)
    check_bool("frozen", frozen)
    gates = [m for m in model.modules() if isinstance(m, NoRGaGate) and m.learnable]
    if not gates:
        raise ValueError("freeze_gates: the model has no NoRGaGate with learnable alpha/tau")
    for gate in gates:
        for p in (gate.alpha, gate.tau):
            p.requires_grad_(not frozen)
    return len(gates)
