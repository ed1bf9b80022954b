"""The prefix: its container, shapes, scores and gate, and the head-space helpers shared by the backends."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, ContextManager, NamedTuple, Optional, TypeVar, Union, cast

import torch
from einops import rearrange
from timm.layers import resolve_self_attn_mask

from .._checks import check_prefix_dims, refuse_torchscript, shape_str

__all__ = [
    "Gate",
    "Prefix",
    "PrefixLike",
    "attention_bias",
    "fx_call",
    "fx_leaf",
    "is_traced",
    "merge_heads",
    "normalize_prefix",
    "prefix_heads",
    "prefix_scores",
    "split_heads",
    "split_qkv",
]


class Prefix(NamedTuple):
    """A prefix (prompt) for one attention layer.

    Attributes:
        key: Prefix keys, in head space: `(L, dim)` shared by the batch, `(B, L, dim)` per sample, or
            `(B, H, L, D)` per head (`B` may be 1 to broadcast).
        value: Prefix values, the shape of `key`.
        logits: Optional prefix scores `(B or 1, H, N or 1, L)`. When given they replace `scale * q . key` as the
            prefix score (SMoPE's row-constant logits); the gate, if any, is still applied to them.
        indices: Optional ids of the experts the prefix rows came from (SMoPE routing); informative only.
    """

    key: torch.Tensor
    value: torch.Tensor
    logits: torch.Tensor | None = None
    indices: torch.Tensor | None = None


PrefixLike = Union[Prefix, "tuple[torch.Tensor, torch.Tensor]"]
#: A gate: any callable from prefix scores `(B, H, N, L)` to a tensor of that shape (see `norga.gates`).
Gate = Optional[Callable[[torch.Tensor], torch.Tensor]]


def is_traced(t: object) -> bool:
    """Whether `t` is a `torch.fx` proxy: symbolic tracing, where shapes and values are unknown."""
    return isinstance(t, torch.fx.Proxy)


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def fx_leaf(fn: _Fn) -> _Fn:
    """Mark `fn` as a function that [`fx_call`][norga.functional.prefix.fx_call] records as one `torch.fx` node.

    `torch.jit.script` of a graph that calls it then raises norga's TorchScript message: TorchScript calls the
    `__prepare_scriptable__` of each function it compiles, before reading its code.
    """
    fn.__dict__["__prepare_scriptable__"] = functools.partial(refuse_torchscript, fn)
    return fn


def fx_call(fn: Callable[..., Any], proxy: object, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` recorded as one node of the graph that `proxy` (a `torch.fx.Proxy`, see
    [`is_traced`][norga.functional.is_traced]) is traced into, its body not traced.

    The graph calls `fn` at run time with these arguments (their values in place of the proxies), so it
    computes exactly what eager computes, including choices that depend on values, shapes or the device (a
    backend, a mask's resolution), which tracing cannot see. Submodules and parameters of the traced module
    are looked up at run time. `fn` itself makes this call when its first argument is a proxy, so that the
    graph's code, traced again (as unpickling a `GraphModule` does), records the same node.

    A [`Prefix`][norga.functional.Prefix] argument goes in as the tuple of its four fields (which
    [`normalize_prefix`][norga.functional.normalize_prefix] accepts): TorchScript cannot read the NamedTuple in a
    graph's code, and scripting the graph must reach norga's message (see
    [`fx_leaf`][norga.functional.prefix.fx_leaf]).

    Raises:
        TypeError: an argument that a graph cannot hold (a callable that is not a submodule of the traced
            module, for example): the trace stops there.
    """
    args = tuple(tuple(a) if isinstance(a, Prefix) else a for a in args)
    try:
        return cast(torch.fx.Proxy, proxy).tracer.create_proxy("call_function", fn, args, kwargs)
    except (NotImplementedError, NameError) as e:  # torch.fx's create_arg, on an argument it cannot store
        raise TypeError(
            f"torch.fx records {fn.__qualname__} as one graph node, so its arguments must be tensors, numbers, "
            f"strings, None, or modules and parameters of the traced module ({e})"
        ) from e


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused projection `(B, N, 3 * H * D)` as `q, k, v`, each `(B, H, N, D)` (timm's layout)."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`(B, N, H * D)` to `(B, H, N, D)`."""
    return t.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """`(B, H, N, D)` to `(B, N, H * D)`."""
    return o.transpose(1, 2).flatten(2)


def prefix_heads(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A prefix tensor `(1 or B, L, H * D)` in head space `(1 or B, H, L, D)`, the heads taken from `q`.

    Prompt modules hand their prefix out in head space, so that a layer needs no reshaping (and can be traced
    by `torch.fx`, where it cannot inspect shapes).
    """
    return t.unflatten(-1, (q.shape[1], q.shape[3])).transpose(1, 2)


def normalize_prefix(
    prefix: PrefixLike, batch: int, num_heads: int, head_dim: int, num_queries: int | None = None
) -> Prefix:
    """Validate a prefix and bring it to head space `(B or 1, H, L, D)`.

    Prefix vectors are free parameters already in head space: they are split into heads like `k` and `v`
    (`"... l (h d) -> ... h l d"`) and never projected.

    Args:
        prefix: A [`Prefix`][norga.functional.Prefix], a `(key, value)` pair, or `tuple(p)` of a `Prefix` `p`
            (its four fields, as `torch.fx` graphs pass it); key and value each `(L, dim)`, `(B, L, dim)` or
            `(B, H, L, D)`.
        batch: The attention batch size `B`.
        num_heads: `H`.
        head_dim: `D`.
        num_queries: `N`, to validate `logits`.

    Returns:
        A `Prefix` with `key` and `value` of shape `(B or 1, H, L, D)`.

    Raises:
        TypeError: `prefix` is not a pair of floating tensors.
        ValueError: the shapes do not match (the message names the expected and the given shape).
    """
    check_prefix_dims(batch, num_heads, head_dim, num_queries)
    if isinstance(prefix, (tuple, list)) and len(prefix) in (2, len(Prefix._fields)):  # a pair, or tuple(a Prefix)
        key, value, logits, indices = Prefix(*prefix)
    else:
        raise TypeError(
            "prefix must be a norga.Prefix or a (key, value) pair of tensors (or tuple(prefix) of a Prefix), got "
            f"{type(prefix).__name__}" + (f" of length {len(prefix)}" if isinstance(prefix, (tuple, list)) else "")
        )
    if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
        raise TypeError(f"prefix key and value must be tensors, got {type(key).__name__} and {type(value).__name__}")
    if key.shape != value.shape:
        raise ValueError(
            f"prefix key and value must have the same shape, got key {shape_str(key)} and value {shape_str(value)}"
        )
    if not (key.is_floating_point() and value.is_floating_point()):
        raise TypeError(f"prefix key and value must be floating point, got {key.dtype} and {value.dtype}")
    dim = num_heads * head_dim
    if key.dim() in (2, 3):
        layout = "(L, dim)" if key.dim() == 2 else "(B, L, dim)"
        if key.shape[-1] != dim:
            raise ValueError(
                f"prefix width must be num_heads * head_dim = {dim}, got a {layout} prefix of shape {shape_str(key)}"
            )
        pattern = "l (h d) -> 1 h l d" if key.dim() == 2 else "b l (h d) -> b h l d"
        key, value = (rearrange(key, pattern, h=num_heads), rearrange(value, pattern, h=num_heads))
    elif key.dim() == 4:
        if key.shape[1] != num_heads or key.shape[3] != head_dim:
            raise ValueError(
                f"a per-head prefix must have shape (B, H={num_heads}, L, D={head_dim}), got {shape_str(key)}"
            )
    else:
        raise ValueError(
            f"prefix must have shape (L, {dim}), (B, L, {dim}) or (B, {num_heads}, L, {head_dim}), got {shape_str(key)}"
        )
    if key.shape[0] not in (1, batch):
        raise ValueError(f"prefix batch must be 1 or B={batch}, got {key.shape[0]} (prefix shape {shape_str(key)})")
    length = key.shape[2]
    if logits is not None:
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"prefix logits must be a tensor, got {type(logits).__name__}")
        rows_ok = logits.dim() == 4 and (num_queries is None or logits.shape[2] in (1, num_queries))
        if not (
            rows_ok and logits.shape[0] in (1, batch) and logits.shape[1] == num_heads and logits.shape[3] == length
        ):
            n = "N" if num_queries is None else f"N={num_queries}"
            raise ValueError(
                f"prefix logits must have shape (1 or B={batch}, H={num_heads}, 1 or {n}, L={length}), "
                f"got {shape_str(logits)}"
            )
    return Prefix(key, value, logits, indices)


def float32(q: torch.Tensor) -> ContextManager[Any]:
    """Autocast off: prefix scores, the gate and the softmax statistics stay float32 (nothing under `torch.fx`)."""
    return nullcontext() if is_traced(q) else torch.autocast(device_type=q.device.type, enabled=False)


def prefix_scores(
    q: torch.Tensor, prefix_key: torch.Tensor, scale: float, gate: Gate = None, logits: torch.Tensor | None = None
) -> torch.Tensor:
    """Gated prefix scores `g(scale * q . pk)` (or `g(logits)`) in float32, shape `(B, H, N, L)`.

    Raises:
        ValueError: the gate failed on, or did not return a tensor of, the scores' shape.
    """
    with float32(q):
        if logits is None:  # the scale goes on the small (L, D) key rather than on the (N, L) scores
            s = torch.matmul(q.float(), (prefix_key.float() * scale).transpose(-2, -1))
        else:
            s = logits.float()
        s = apply_gate(gate, s)
    return s.expand(q.shape[0], q.shape[1], q.shape[2], prefix_key.shape[2])


def apply_gate(gate: Gate, s: torch.Tensor) -> torch.Tensor:
    """`gate(s)`, checked to be a tensor of the shape of `s` (`None`: `s` itself)."""
    if gate is None:
        return s
    if is_traced(s):
        return gate(s)
    try:
        out = gate(s)
    except RuntimeError as e:  # e.g. an nn.Linear of another width: name the contract, not the matmul
        raise ValueError(
            f"gate {type(gate).__name__} failed on prefix scores of shape {shape_str(s)}: a gate must map a "
            f"tensor to one of the same shape, elementwise ({e})"
        ) from e
    if not isinstance(out, torch.Tensor) or out.shape != s.shape:
        got = shape_str(out) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"gate must be elementwise: expected a tensor of shape {shape_str(s)}, got {got}")
    return out


def attention_bias(
    attn_mask: torch.Tensor | None, num_queries: int, is_causal: bool, like: torch.Tensor
) -> torch.Tensor | None:
    """SDPA-style `attn_mask` / `is_causal` as an additive float bias over the token keys (timm's resolution).

    A boolean mask marks allowed positions (`True` = attend), as in `F.scaled_dot_product_attention`.

    Raises:
        ValueError: both a mask and `is_causal=True`.
    """
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal=True are mutually exclusive")
    return resolve_self_attn_mask(num_queries, like, attn_mask, is_causal)
