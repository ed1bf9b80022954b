"""Argument validation for the whole package (private module): its only home.

Every check raises a `TypeError` (wrong kind or dtype) or a `ValueError` (wrong shape or value) whose
message names what was expected and what was given, so that a bad call never surfaces as a
`RuntimeError` or `IndexError` from deep inside torch, a hard crash of a fused kernel, or a silently
wrong result (the fused CPU kernel does not check that `k` and `v` match `q`).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence
from typing import NoReturn

import torch
from torch import nn

from ._compat import graph_break

__all__ = [
    "check_attention_inputs",
    "check_bool",
    "check_float_tensor",
    "check_int",
    "check_mask",
    "check_model",
    "check_prefix_dims",
    "check_real",
    "fail",
    "refuse_torchscript",
    "shape_str",
]


def shape_str(t: torch.Tensor | Sequence[int]) -> str:
    """`(2, 3, 4)` for a tensor or a shape."""
    dims = t.shape if isinstance(t, torch.Tensor) else t
    return "(" + ", ".join(str(int(s)) for s in dims) + ")"


def check_int(name: str, value: object, minimum: int | None = 0) -> int:
    """`value` as an `int` of at least `minimum` (`None`: any); `TypeError` for non-integers and bools."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_real(
    name: str, value: object, *, minimum: float | None = None, maximum: float | None = None, positive: bool = False
) -> float:
    """`value` as a finite `float` in `[minimum, maximum]` (`> 0` if `positive`); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if (minimum is not None and x < minimum) or (maximum is not None and x > maximum):
        lo = "-inf" if minimum is None else f"{minimum:g}"
        hi = "inf" if maximum is None else f"{maximum:g}"
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return x


def check_bool(name: str, value: object) -> bool:
    """`value` itself if it is a `bool` (not a string, an int or a tensor)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_model(what: str, model: object) -> nn.Module:
    """`model` itself if it is an `nn.Module`; `what` names the caller in the message."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be an nn.Module (a patched model), got {type(model).__name__}")
    return model


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_tensor(name: str, value: object) -> torch.Tensor:
    """`value` itself if it is a floating-point tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_mask(name: str, mask: object, target: tuple[int, int, int, int]) -> torch.Tensor | None:
    """`mask` is `None` or a boolean / floating tensor broadcastable to `target` `(B, H, N, M)`."""
    if mask is None:
        return None
    mask = _check_tensor(name, mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a boolean or floating tensor, got dtype {mask.dtype}")
    ok = mask.dim() <= 4
    if ok:
        try:
            ok = tuple(torch.broadcast_shapes(tuple(mask.shape), target)) == tuple(target)
        except RuntimeError:
            ok = False
    if not ok:
        b, h, n, m = target
        raise ValueError(f"{name} must be broadcastable to (B={b}, H={h}, N={n}, M={m}), got shape {shape_str(mask)}")
    return mask


def check_attention_inputs(
    q: object, k: object, v: object, *, attn_bias: object = None, scale: object = None, dropout_p: object = 0.0
) -> None:
    """Validate the arguments of [`prefix_attention`][norga.functional.prefix_attention].

    `q` is `(B, H, N, D)`; `k` and `v` are `(B, H, M, D)` with the same floating dtype and device
    as `q`; `H` and `D` are positive; `attn_bias` is broadcastable to `(B, H, N, M)`; `scale` is
    `None` or a finite real number; `dropout_p` is in `[0, 1]`.
    """
    q = _check_tensor("q", q)
    k = _check_tensor("k", k)
    v = _check_tensor("v", v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    b, h, n, d = q.shape
    if h == 0 or d == 0:
        raise ValueError(f"q must have at least one head and a positive head dim, got shape {shape_str(q)}")
    m = k.shape[2]
    expected = (b, h, m, d)
    if tuple(k.shape) != expected or tuple(v.shape) != expected:
        raise ValueError(
            f"k and v must have shape (B={b}, H={h}, M, D={d}) with the same M, got k {shape_str(k)} "
            f"and v {shape_str(v)} for q {shape_str(q)}"
        )
    if attn_bias is not None:
        bias = _check_tensor("attn_bias", attn_bias)
        if bias.dtype == torch.bool:
            raise TypeError("attn_bias must be an additive float tensor; resolve boolean masks with attention_bias()")
        check_mask("attn_bias", bias, (b, h, n, m))
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be None or a real number, got {type(scale).__name__} ({scale!r})")
        # under torch.compile(dynamic=True) the scale may be symbolic, and math.isfinite cannot be traced
        if not torch.compiler.is_compiling() and not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number in [0, 1], got {type(dropout_p).__name__} ({dropout_p!r})")
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p!r}")


def check_prefix_dims(batch: object, num_heads: object, head_dim: object, num_queries: object) -> None:
    """Validate the sizes passed to [`normalize_prefix`][norga.functional.normalize_prefix]."""
    check_int("batch", batch, 0)
    check_int("num_heads", num_heads, 1)
    check_int("head_dim", head_dim, 1)
    if num_queries is not None:
        check_int("num_queries", num_queries, 0)


def refuse_torchscript(module: object) -> NoReturn:
    """`__prepare_scriptable__` of norga's modules (`torch.jit.script` calls it first, on every submodule) and of
    the functions that `torch.fx` graphs of patched models call (called on each function it compiles)."""
    what = f"{module.__module__}.{module.__qualname__}" if inspect.isfunction(module) else type(module).__name__
    raise NotImplementedError(
        f"norga: TorchScript is not supported ({what} cannot be scripted). Use torch.export.export"
        "(model, (x,)) or torch.compile(model) instead (both work with prompts), or norga.unpatch_vit(model) to "
        "script the plain timm model"
    )


def fail(error: Exception) -> NoReturn:
    """Raise `error` from a forward; inside `torch.compile` first a graph break that carries its message.

    Dynamo reports an exception raised in a `fullgraph=True` region as "Observed exception" and keeps the
    message in its debug context; a graph break with the message puts it in the error's explanation.
    Without `fullgraph` the break runs the rest eagerly, which raises `error` itself.
    """
    if torch.compiler.is_compiling():
        graph_break(error)  # with the message from torch 2.14 (norga._compat)
    raise error
