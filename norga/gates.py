"""Gating functions for prefix (prompt) experts.

A prefix-tuned attention head is a mixture of experts whose prompt experts have *linear* gating scores
``s = scale * q . key``. NoRGa (Le et al., 2024, arXiv 2405.14124) replaces each prefix score by the
non-linear residual gate ``s + alpha * act(tau * s)``. The gate touches only the prefix columns of the
attention scores, before the softmax; token-token scores are never changed.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import refuse_torchscript

__all__ = ["NoRGaGate", "ACTIVATIONS", "resolve_gate"]


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


#: The activations the paper studies, by name. GELU is the exact (erf) form, as ``nn.GELU()``.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": _gelu,
}

Activation = Union[str, Callable[[torch.Tensor], torch.Tensor]]


def _check_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"NoRGaGate: {name} must be a real number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"NoRGaGate: {name} must be finite, got {value!r}")
    return float(value)


class NoRGaGate(nn.Module):
    """Non-linear residual gate: ``g(s) = s + alpha * act(tau * s)``, applied elementwise.

    One gate holds one ``(alpha, tau)`` pair, shared by all heads and all prefix columns of the layer it
    belongs to. This is what the authors run: one pair per prompted layer, learnable, initialised to 1,
    frozen after the first task (see :func:`NoRGaGate.freeze`).

    Args:
        activation: ``"tanh"``, ``"sigmoid"``, ``"gelu"`` or a callable mapping a tensor to a tensor of
            the same shape. The paper uses sigmoid for Sup-21K backbones, tanh by default and GELU for
            MoCo v3.
        alpha: Initial residual scale. Must be finite.
        tau: Initial temperature inside the activation. Must be finite.
        learnable: If True, ``alpha`` and ``tau`` are ``nn.Parameter`` scalars; otherwise they are
            buffers (saved in ``state_dict`` and moved by ``.to()``, but not trained).

    Shape:
        Any shape in, the same shape out. The gate is computed in the input's dtype.

    Example:
        >>> gate = NoRGaGate("tanh", alpha=1.0, tau=1.0)
        >>> gate(torch.zeros(2, 3))
        tensor([[0., 0., 0.],
                [0., 0., 0.]], grad_fn=<AddBackward0>)
    """

    __prepare_scriptable__ = refuse_torchscript

    alpha: torch.Tensor
    tau: torch.Tensor

    def __init__(
        self,
        activation: Activation = "tanh",
        alpha: float = 1.0,
        tau: float = 1.0,
        learnable: bool = True,
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
        a = torch.tensor(_check_finite("alpha", alpha))
        t = torch.tensor(_check_finite("tau", tau))
        if not isinstance(learnable, bool):
            raise TypeError(f"NoRGaGate: learnable must be a bool, got {type(learnable).__name__} ({learnable!r})")
        self.learnable = learnable
        if self.learnable:
            self.alpha = nn.Parameter(a)
            self.tau = nn.Parameter(t)
        else:
            self.register_buffer("alpha", a)
            self.register_buffer("tau", t)

    @property
    def builtin(self) -> bool:
        """Whether the activation is one of :data:`ACTIVATIONS` (elementwise by construction, with fast paths)."""
        return self.act is ACTIVATIONS.get(self.activation_name)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """Return ``scores + alpha * act(tau * scores)``.

        Raises:
            TypeError: ``scores`` is not a floating-point tensor.
            ValueError: a custom activation did not return a tensor of the shape of ``scores``.
        """
        if isinstance(scores, torch.fx.Proxy):  # symbolic tracing: the plain formula, nothing to check
            return scores + self.alpha.to(scores.dtype) * self.act(self.tau.to(scores.dtype) * scores)
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"NoRGaGate: scores must be a torch.Tensor, got {type(scores).__name__}")
        if not scores.is_floating_point():
            raise TypeError(f"NoRGaGate: scores must be a floating-point tensor, got dtype {scores.dtype}")
        alpha = self.alpha.to(scores.dtype)
        tau = self.tau.to(scores.dtype)
        if self.builtin and not (
            torch.is_grad_enabled() and (scores.requires_grad or alpha.requires_grad or tau.requires_grad)
        ):
            return self._forward_no_grad(scores, alpha, tau)
        a = self.act(tau * scores)
        if not isinstance(a, torch.Tensor) or a.shape != scores.shape:
            got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise ValueError(
                f"NoRGaGate: activation {self.activation_name!r} must be elementwise: expected shape "
                f"{tuple(scores.shape)}, got {got}"
            )
        return scores + alpha * a

    def _forward_no_grad(self, scores: torch.Tensor, alpha: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """The built-in activations without autograd: one temporary, updated in place (see :meth:`_residual`)."""
        act, coef, shift = self._residual(scores, alpha, tau)
        out = torch.addcmul(scores, act, coef, out=act)  # scores + coef * act, into the temporary
        return out if shift is None else out.sub_(shift)

    def _residual(
        self, scores: torch.Tensor, alpha: torch.Tensor, tau: torch.Tensor
    ) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]":
        """``(a, coef, shift)`` with ``g(scores) = scores + coef * a - shift`` (``shift`` None means 0).

        ``a`` is a new tensor. Built-in activations only, no autograd. ``tanh`` is evaluated as
        ``2 * sigmoid(2x) - 1``, i.e. ``alpha * tanh(tau * s) = 2 * alpha * sigmoid(2 * tau * s) - alpha``
        (the same function; the difference is a few float ulps of 1, about 1e-7 absolute in float32): on
        some CPUs (AMD EPYC here) PyTorch's tanh kernel is several times slower than its sigmoid, and the
        constant ``-alpha`` can be folded into a softmax row by a caller that owns the whole row
        (:func:`norga.functional.prefix_attention`'s ``merge`` backend).
        """
        if self.activation_name == "tanh":
            return torch.mul(scores, 2 * tau).sigmoid_(), 2 * alpha, alpha
        if self.activation_name == "sigmoid":
            return torch.mul(scores, tau).sigmoid_(), alpha, None
        return self.act(tau * scores), alpha, None

    def shifted_(self, scores: torch.Tensor) -> torch.Tensor | None:
        """In place and without autograd: ``scores <- g(scores) + shift``; returns ``shift`` (None = 0).

        For callers that put the gated scores into a softmax row that also holds other columns: adding
        ``shift`` to those columns instead saves one pass over ``scores``. Built-in activations only.

        Raises:
            ValueError: the gate has a custom activation, or autograd would need the result.
        """
        if not self.builtin:
            raise ValueError(f"NoRGaGate.shifted_ needs a built-in activation, got {self.activation_name!r}")
        if torch.is_grad_enabled() and (scores.requires_grad or self.alpha.requires_grad or self.tau.requires_grad):
            raise ValueError("NoRGaGate.shifted_ works in place without autograd; call it under torch.no_grad()")
        act, coef, shift = self._residual(scores, self.alpha.to(scores.dtype), self.tau.to(scores.dtype))
        scores.addcmul_(act, coef)
        return shift

    def freeze(self) -> "NoRGaGate":
        """Stop training ``alpha`` and ``tau`` (the authors freeze them after the first task)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def extra_repr(self) -> str:
        return (
            f"activation={self.activation_name}, alpha={self.alpha.item():.4g}, tau={self.tau.item():.4g}, "
            f"learnable={self.learnable}"
        )


def resolve_gate(gate: "NoRGaGate | nn.Module | str | None") -> nn.Module | None:
    """Turn a gate argument into a module: ``None`` (linear gate), a module, or an activation name."""
    if gate is None or isinstance(gate, nn.Module):
        return gate
    if isinstance(gate, str):
        return NoRGaGate(gate)
    raise TypeError(
        f"gate must be None, an nn.Module (e.g. NoRGaGate) or an activation name {sorted(ACTIVATIONS)}, "
        f"got {type(gate).__name__} ({gate!r})"
    )
