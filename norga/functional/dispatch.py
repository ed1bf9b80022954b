"""`prefix_attention` and the choice of its backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_attention_inputs
from .._compat import is_exporting
from ..gates import resolve_gate
from .cuda import cuda_kernel, cuda_kernels_available
from .flex import flex_attention, flex_available, require_flex
from .kernels import cpu_flash_available
from .math import math_attention
from .merge import merge_attention, merge_attention_no_grad
from .prefix import Gate, PrefixLike, fx_call, fx_leaf, is_traced, normalize_prefix, prefix_scores
from .sdpa import sdpa_attention

__all__ = ["BACKENDS", "available_backends", "prefix_attention", "select_backend"]

BACKENDS = ("auto", "math", "merge", "sdpa", "flex")


def available_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The concrete backends usable on `device` (`"math"` and `"sdpa"` always are).

    `"merge"` needs PyTorch's fused CPU flash kernel on CPU, its fused flash and memory-efficient kernels on CUDA
    (where it takes float32, float16 and bfloat16; see docs/backends.md); `"flex"` is listed on CPU and CUDA, and
    on CPU it runs without autograd only (PyTorch has no CPU FlexAttention backward).
    """
    device = torch.device(device)
    names = ["math", "sdpa"]
    if (device.type == "cpu" and cpu_flash_available()) or (device.type == "cuda" and cuda_kernels_available()):
        names.insert(1, "merge")
    if flex_available(device):
        names.append("flex")
    return tuple(names)


def select_backend(q: torch.Tensor, backend: str = "auto", dropout_p: float = 0.0) -> str:
    """The concrete backend for `q`: `"auto"` is `"merge"` on CPU without dropout, else `"sdpa"`
    (also under `torch.export`, whose programs keep no custom backward, and on CUDA, where no GPU run has yet
    timed the fused paths).

    `"flex"` is never picked automatically; `"merge"` and `"flex"` on CUDA only by name. An explicit backend that
    cannot run here is a `ValueError`; there is no silent fallback.

    Raises:
        ValueError: an unknown backend, or one that cannot run on `q`'s device, dtype or head dim, or with dropout.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        # torch.export keeps an autograd.Function's forward only, so an exported merge could not be differentiated
        fused = q.device.type == "cpu" and dropout_p == 0.0 and cpu_flash_available()
        return "merge" if fused and not is_exporting() else "sdpa"  # before torch 2.7: not under torch.compile
    if backend in ("merge", "flex"):
        if backend == "flex":
            require_flex()  # names the torch release, a clearer message than the next
        if backend not in available_backends(q.device):
            raise ValueError(
                f"backend {backend!r} is not available on device {q.device.type!r}; "
                f"available: {available_backends(q.device)}"
            )
        if dropout_p > 0.0:
            raise ValueError(
                f"backend {backend!r} does not support attention dropout (dropout_p={dropout_p}); use 'sdpa' or 'math'"
            )
        if backend == "merge" and q.device.type == "cuda":
            cuda_kernel(q, None)  # a dtype, head dim or GPU that no fused CUDA kernel takes: its ValueError
    return backend


@fx_leaf
def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: PrefixLike | None = None,
    *,
    gate: Gate | str = None,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-head attention over `[prefix; tokens]` with gated prefix scores.

    For a query row `i`, `o_i = softmax([g(s_i1), ..., g(s_iL), t_i1, ..., t_iM]) @ [pv; v]` with prefix scores
    `s_il = scale * q_i . pk_l` (or the prefix's `logits`), the gate `g` and token scores
    `t_ij = scale * q_i . k_j + bias_ij`. Prefix scores, the gate and the softmax statistics are float32 (with
    autocast off for them); the output has the dtype of `v`. Under `torch.fx` symbolic tracing the call is one
    graph node that calls `prefix_attention` with the same arguments at run time (backend selection included),
    so a traced module computes what the eager one does, bit for bit.

    Args:
        q: Queries `(B, H, N, D)`.
        k: Token keys `(B, H, M, D)`.
        v: Token values `(B, H, M, D)`.
        prefix: `None` (plain attention), a `(key, value)` pair or a [`Prefix`][norga.functional.Prefix] (shapes:
            [`normalize_prefix`][norga.functional.normalize_prefix]).
        gate: On the `(B, H, N, L)` prefix scores, elementwise: a callable such as a
            [`NoRGaGate`][norga.gates.NoRGaGate] (the gate protocol: `norga.gates`), an activation name
            (`"tanh"`, `"sigmoid"`, `"gelu"`: a `NoRGaGate` with `alpha = tau = 1`), or `None`, the linear gate of
            plain prefix tuning.
        scale: Score scale, default `D ** -0.5`.
        attn_bias: Additive float bias over the *token* columns, broadcastable to `(B, H, N, M)` (relative position
            bias, masks). Prefix columns are never masked.
        dropout_p: Attention dropout on the full softmax.
        backend: `"auto"`, `"math"` (readable reference), `"merge"` (fused token kernel merged with the prefix
            block; CPU and CUDA), `"sdpa"` (additive mask over `[prefix; tokens]`) or `"flex"` (FlexAttention); see
            docs/backends.md.

    Returns:
        `(B, H, N, D)` in the dtype of `v`.

    Raises:
        TypeError: a wrong type of tensor, gate or number; under `torch.fx`, a gate that is neither a name nor a
            module of the traced module.
        ValueError: mismatched shapes, devices or values, or a backend that cannot run here.
    """
    if is_traced(q):  # torch.fx: one graph node, this call with the same arguments at run time
        kwargs = dict(gate=gate, scale=scale, attn_bias=attn_bias, dropout_p=dropout_p, backend=backend)
        return fx_call(prefix_attention, q, q, k, v, prefix, **kwargs)
    if isinstance(gate, str) or (gate is not None and not callable(gate)):
        gate = resolve_gate(gate)  # a name, or a clear TypeError
    check_attention_inputs(q, k, v, attn_bias=attn_bias, scale=scale, dropout_p=dropout_p)
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if prefix is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)
    p = normalize_prefix(prefix, b, h, d, num_queries=n)
    pk, pv = p.key.to(q.device), p.value.to(v.device)
    if pk.shape[2] == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)
    name = select_backend(q, backend, dropout_p)
    if name == "merge" and (n == 0 or k.shape[2] == 0):  # the fused CPU kernel divides by zero (kills the process)
        if backend == "merge":
            raise ValueError(
                f"backend 'merge' needs at least one query and one token key, got N={n}, M={k.shape[2]}; "
                "use 'sdpa' or 'math'"
            )
        name = "sdpa"
    if name == "flex":
        if n == 0:  # the compiled CPU kernel divides by zero (kills the process)
            raise ValueError(f"backend 'flex' needs at least one query, got N={n}; use 'sdpa' or 'math'")
        return flex_attention(q, k, v, pk, pv, gate, p.logits, attn_bias, scale)
    cpu = q.device.type == "cpu"
    if name == "merge" and cpu and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # eager inference on CPU: the working-buffer epilogue; under torch.compile (and on CUDA) the batched form
        # below, which inductor fuses (Dynamo cannot trace the in-place writes into strided outputs)
        return merge_attention_no_grad(q, k, v, pk, pv, gate, p.logits, attn_bias, scale)
    g = prefix_scores(q, pk, scale, gate, p.logits)
    if name == "math":
        return math_attention(q, k, v, g, pv, attn_bias, scale, dropout_p)
    if name == "sdpa":
        return sdpa_attention(q, k, v, g, pk, pv, attn_bias, scale, dropout_p)
    return merge_attention(q, k, v, g, pv, attn_bias, scale)
