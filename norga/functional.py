"""Functional core: attention over ``[prefix; tokens]`` with gated prefix scores.

For a query row ``i`` the output is::

    o_i = softmax([g(s_i1), ..., g(s_iL), t_i1, ..., t_iN]) @ [pv; v]

with prefix scores ``s_il = scale * q_i . pk_l`` (or given ``logits``), the gate ``g`` (identity for plain
prefix tuning, :class:`norga.NoRGaGate` for NoRGa) and token scores ``t_ij = scale * q_i . k_j + bias_ij``.
The gate touches only the ``N x L`` prefix block, so token-token attention can run in a fused kernel and
be merged exactly with the small prefix block through the log-sum-exp::

    lse = logaddexp(lse_tok, logsumexp(g))
    o   = exp(lse_tok - lse) * o_tok + softmax-weights(g - lse) @ pv

Backends (``backend=``):

``"math"``
    The readable reference: concatenate the scores, softmax, multiply. Materialises ``N x (N + L)``.
``"merge"``
    Fused token attention that also returns its log-sum-exp (PyTorch's flash kernel for CPU), merged
    with the prefix block as above. Backward reuses the fused backward kernel with the *merged*
    log-sum-exp, which yields the exact gradients of the full softmax. Never builds ``N x N`` scores
    (except to differentiate a token bias that itself requires grad).
``"sdpa"``
    ``F.scaled_dot_product_attention`` over the concatenated keys, with the gate's residual passed as an
    additive mask on the prefix columns. Exact and differentiable everywhere, supports dropout, but
    materialises a ``B x H x N x (N + L)`` mask.
``"flex"``
    ``torch.nn.attention.flex_attention`` over ``[prefix; tokens]``, compiled, with the gate as a
    ``score_mod`` on the prefix columns (and ``logits``/``attn_bias`` read by index inside the kernel): one
    fused kernel, no ``N x N`` buffer. Opt-in. CUDA (Triton) and CPU (C++); PyTorch has no FlexAttention
    backward on CPU, so there it runs without autograd only (a clear ``ValueError`` otherwise). The first
    call per shape and activation compiles (seconds). No dropout.
``"auto"``
    By device, dtype and shape: ``merge`` where its kernel exists (CPU, any dtype the CPU flash kernel
    takes, no dropout, N and M > 0), else ``sdpa``. The fastest gated backend on every CPU shape measured
    (``docs/benchmarks.md``). See :func:`select_backend`.

All backends compute prefix scores, the gate, the softmax statistics and the merge in float32 (with
autocast disabled for those steps), and return the dtype of ``v``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, NamedTuple, Optional, Union, cast

import torch
import torch.nn.functional as F
from einops import rearrange

from ._validation import check_attention_inputs, check_prefix_dims, shape_str
from .gates import NoRGaGate, resolve_gate

__all__ = [
    "Prefix",
    "PrefixLike",
    "BACKENDS",
    "normalize_prefix",
    "prefix_attention",
    "prefix_scores",
    "select_backend",
    "available_backends",
    "attention_bias",
]

BACKENDS = ("auto", "math", "merge", "sdpa", "flex")


class Prefix(NamedTuple):
    """A prefix (prompt) for one attention layer.

    Attributes:
        key: Prefix keys, in head space: ``(L, dim)`` shared by the batch, ``(B, L, dim)`` per sample,
            or ``(B, H, L, D)`` per head (``B`` may be 1 to broadcast).
        value: Prefix values, the same shape as ``key``.
        logits: Optional prefix scores ``(B or 1, H, N or 1, L)``. When given they replace
            ``scale * q . key`` as the prefix score (SMoPE's row-constant logits); the gate, if any, is
            still applied to them.
        indices: Optional ids of the experts the prefix rows came from (SMoPE routing); informative only.
    """

    key: torch.Tensor
    value: torch.Tensor
    logits: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None


PrefixLike = Union[Prefix, "tuple[torch.Tensor, torch.Tensor]"]
Gate = Optional[Callable[[torch.Tensor], torch.Tensor]]


def is_traced(t: object) -> bool:
    """Whether ``t`` is a ``torch.fx`` proxy: symbolic tracing, where shapes and values are unknown."""
    return isinstance(t, torch.fx.Proxy)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """``(B, N, 3 * H * D)`` from a fused qkv projection to ``q, k, v``, each ``(B, H, N, D)`` (timm's layout)."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, N, H * D)`` to ``(B, H, N, D)``."""
    return t.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, D)`` to ``(B, N, H * D)``."""
    return o.transpose(1, 2).flatten(2)


def prefix_heads(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A prefix tensor ``(1 or B, L, H * D)`` in head space ``(1 or B, H, L, D)``, heads taken from ``q``.

    Prompt modules use it so that what they hand to a layer needs no reshaping there (and traces under
    ``torch.fx``, where the layer cannot inspect shapes).
    """
    return t.unflatten(-1, (q.shape[1], q.shape[3])).transpose(1, 2)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def normalize_prefix(
    prefix: PrefixLike, batch: int, num_heads: int, head_dim: int, num_queries: int | None = None
) -> Prefix:
    """Validate a prefix and bring it to head space ``(B or 1, H, L, D)``.

    Prefix vectors are free parameters already in head space: they are split into heads like ``k`` and
    ``v`` (``"... l (h d) -> ... h l d"``) and never projected.

    Args:
        prefix: A :class:`Prefix` or a ``(key, value)`` pair, each ``(L, dim)``, ``(B, L, dim)`` or
            ``(B, H, L, D)``.
        batch: The attention batch size ``B``.
        num_heads: ``H``.
        head_dim: ``D``.
        num_queries: ``N``, to validate ``logits``.

    Returns:
        A :class:`Prefix` with ``key``/``value`` of shape ``(B or 1, H, L, D)``.

    Raises:
        TypeError: ``prefix`` is not a pair of tensors.
        ValueError: the shapes do not match (the message names the expected and the given shape).
    """
    check_prefix_dims(batch, num_heads, head_dim, num_queries)
    if isinstance(prefix, Prefix):
        key, value, logits, indices = prefix
    elif isinstance(prefix, (tuple, list)) and len(prefix) == 2:
        key, value = prefix
        logits, indices = None, None
    else:
        raise TypeError(f"prefix must be a norga.Prefix or a (key, value) pair of tensors, got {type(prefix).__name__}")
    if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
        raise TypeError(f"prefix key and value must be tensors, got {type(key).__name__} and {type(value).__name__}")
    if key.shape != value.shape:
        raise ValueError(
            f"prefix key and value must have the same shape, got key {_shape(key)} and value {_shape(value)}"
        )
    if not (key.is_floating_point() and value.is_floating_point()):
        raise TypeError(f"prefix key and value must be floating point, got {key.dtype} and {value.dtype}")
    dim = num_heads * head_dim
    if key.dim() == 2:
        if key.shape[-1] != dim:
            raise ValueError(
                f"prefix width must be num_heads * head_dim = {dim}, got a (L, dim) prefix of shape {_shape(key)}"
            )
        key = rearrange(key, "l (h d) -> 1 h l d", h=num_heads)
        value = rearrange(value, "l (h d) -> 1 h l d", h=num_heads)
    elif key.dim() == 3:
        if key.shape[-1] != dim:
            raise ValueError(
                f"prefix width must be num_heads * head_dim = {dim}, got a (B, L, dim) prefix of shape {_shape(key)}"
            )
        key = rearrange(key, "b l (h d) -> b h l d", h=num_heads)
        value = rearrange(value, "b l (h d) -> b h l d", h=num_heads)
    elif key.dim() == 4:
        if key.shape[1] != num_heads or key.shape[3] != head_dim:
            raise ValueError(
                f"a per-head prefix must have shape (B, H={num_heads}, L, D={head_dim}), got {_shape(key)}"
            )
    else:
        raise ValueError(
            f"prefix must have shape (L, {dim}), (B, L, {dim}) or (B, {num_heads}, L, {head_dim}), got {_shape(key)}"
        )
    if key.shape[0] not in (1, batch):
        raise ValueError(f"prefix batch must be 1 or B={batch}, got {key.shape[0]} (prefix shape {_shape(key)})")
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
                f"got {_shape(logits)}"
            )
    return Prefix(key, value, logits, indices)


def prefix_scores(
    q: torch.Tensor, prefix_key: torch.Tensor, scale: float, gate: Gate = None, logits: torch.Tensor | None = None
) -> torch.Tensor:
    """Gated prefix scores ``g(scale * q . pk)`` (or ``g(logits)``) in float32, shape ``(B, H, N, L)``."""
    with _float32(q):
        if logits is None:
            # The scale goes on the small (L, D) key rather than on the (N, L) scores.
            s = torch.matmul(q.float(), (prefix_key.float() * scale).transpose(-2, -1))
        else:
            s = logits.float()
        s = _apply_gate(gate, s)
    return s.expand(q.shape[0], q.shape[1], q.shape[2], prefix_key.shape[2])


def _float32(q: torch.Tensor) -> ContextManager[Any]:
    """Autocast off (the prefix block and the softmax statistics stay float32); nothing under ``torch.fx``."""
    return nullcontext() if is_traced(q) else torch.autocast(device_type=q.device.type, enabled=False)


def _apply_gate(gate: Gate, s: torch.Tensor) -> torch.Tensor:
    if gate is None:
        return s
    shape = s.shape
    if is_traced(s):
        return gate(s)
    try:
        out = gate(s)
    except RuntimeError as e:  # e.g. an nn.Linear of another width: name the contract, not the matmul
        raise ValueError(
            f"gate {type(gate).__name__} failed on prefix scores of shape {shape_str(shape)}: a gate must map a "
            f"tensor to one of the same shape, elementwise ({e})"
        ) from e
    if not isinstance(out, torch.Tensor) or out.shape != shape:
        got = shape_str(out) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"gate must be elementwise: expected a tensor of shape {shape_str(shape)}, got {got}")
    return out


def attention_bias(
    attn_mask: torch.Tensor | None, num_queries: int, is_causal: bool, like: torch.Tensor
) -> torch.Tensor | None:
    """Resolve SDPA-style ``attn_mask``/``is_causal`` into an additive float bias over the token keys.

    A boolean mask marks allowed positions (``True`` = attend), as in ``F.scaled_dot_product_attention``.
    """
    if is_causal:
        if attn_mask is not None:
            raise ValueError("attn_mask and is_causal=True are mutually exclusive")
        return torch.full((num_queries, num_queries), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=like.dtype, device=like.device).masked_fill_(
            ~attn_mask, float("-inf")
        )
    return attn_mask


# --------------------------------------------------------------------------------------------------
# backends


def _math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    pv: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    with _float32(q):  # the reference stays float32
        tok = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
        if bias is not None:
            tok = tok + bias.float()
        attn = torch.cat([g, tok], dim=-1).softmax(dim=-1)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        values = torch.cat([pv.float().expand(v.shape[0], -1, -1, -1), v.float()], dim=-2)
        return torch.matmul(attn, values).to(v.dtype)


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    b, h, n, _ = q.shape
    keys = torch.cat([pk.to(k.dtype).expand(b, -1, -1, -1), k], dim=-2)
    values = torch.cat([pv.to(v.dtype).expand(b, -1, -1, -1), v], dim=-2)
    # SDPA adds scale * q . pk itself on the prefix columns; the mask carries the rest of g.
    with torch.autocast(device_type=q.device.type, enabled=False):
        linear = torch.matmul(q.float(), (pk.float() * scale).transpose(-2, -1))
    length = pk.shape[-2]
    mask = q.new_zeros(b, h, n, length + k.shape[-2])  # one B x H x N x (L + M) buffer, filled in place
    mask[..., :length] = g - linear
    if bias is not None:
        mask[..., length:] = bias
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _cpu_flash_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


def _token_attention_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> "tuple[torch.Tensor, torch.Tensor]":
    """PyTorch's fused CPU flash kernel over the tokens: ``(o_tok, lse_tok)``.

    The kernel reports a query row whose token keys are all masked (``bias`` is ``-inf`` on the whole row)
    with ``lse_tok = 0`` and a zero output. Such a row's ``lse_tok`` is set to ``-inf`` here, so that the
    merge gives it the softmax over the prefix columns alone, as the full softmax does.
    """
    o_tok, lse_tok = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale
    )
    if bias is not None:
        lse_tok = lse_tok.masked_fill(torch.isneginf(bias).all(dim=-1), float("-inf"))
    return o_tok, lse_tok


def _merged_lse(lse_tok: torch.Tensor, w_tok: torch.Tensor) -> torch.Tensor:
    """``logsumexp([g, lse_tok])`` from the token weight ``w_tok = exp(lse_tok - lse)`` of the merged softmax.

    ``lse = lse_tok - log(w_tok)``: a pass over ``(B, H, N)`` instead of a log-sum-exp over ``L + 1``
    columns. Where ``w_tok`` underflows to 0 (the prefix outweighs every token by ~100 nats, or every token
    is masked) ``lse`` is ``+inf``: the token columns' weights ``exp(t - lse)`` are then 0, as they are to
    float32 precision.
    """
    lse_tok = lse_tok.float()
    return torch.where(w_tok > 0, lse_tok - torch.log(w_tok), torch.full_like(lse_tok, float("inf")))


class _MergeFunction(torch.autograd.Function):
    """Fused token attention (with log-sum-exp) merged exactly with an explicit gated prefix block.

    The fused kernel returns ``o_tok`` and ``lse_tok``. One softmax over the ``L + 1`` columns
    ``[g_1, ..., g_L, lse_tok]`` gives at once the prefix block ``p`` of the full softmax and the weight
    ``w = exp(lse_tok - lse)`` of the token part, so::

        out = p @ pv + w * o_tok,      lse = logsumexp([g, lse_tok])  (only when a gradient is needed)

    Few operations: on a busy CPU every extra pass costs a thread synchronisation.
    Everything after the fused kernel runs in float32.
    """

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: Optional[torch.Tensor],
        g: torch.Tensor,
        pv: torch.Tensor,
        scale: float,
        need_lse: bool,
    ) -> torch.Tensor:
        o_tok, lse_tok = _token_attention_cpu(q, k, v, bias, scale)
        length = g.shape[-1]
        with torch.autocast(device_type=q.device.type, enabled=False):
            cols = torch.cat([g, lse_tok.float().unsqueeze(-1)], dim=-1)  # (B, H, N, L + 1) float32
            weights = torch.softmax(cols, dim=-1)
            # out = w_tok * o_tok + p @ pv, in the fused kernel's memory layout ((B, N, H, D) for timm's
            # strided q): the module's transpose(1, 2).reshape(B, N, C) is then free, and the gradient
            # arrives in that layout too
            out = o_tok.float().mul(weights[..., length:]).add_(torch.matmul(weights[..., :length], pv.float()))
            out = out.to(v.dtype)
            lse = _merged_lse(lse_tok, weights[..., length]) if need_lse else cols.new_empty(0)
        ctx.save_for_backward(q, k, v, bias, weights, pv, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, bias, weights, pv, out, lse = ctx.saved_tensors
        length = pv.shape[-2]
        p_pre = weights[..., :length]  # the prefix block of the full softmax (the last column is the tokens')
        scale = ctx.scale
        # The fused backward recomputes P = exp(s - lse) and D = rowsum(dO * out). With the merged lse and
        # the merged output these are the token columns of the *full* softmax, so dq, dk, dv are exact.
        # The kernel keeps float64 inputs' log-sum-exp in float64 (float32 otherwise).
        lse_k = lse.double() if q.dtype == torch.float64 else lse
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse_k, 0.0, False, attn_mask=bias, scale=scale
        )
        dg = dpv = dbias = None
        with torch.autocast(device_type=q.device.type, enabled=False):
            do32 = grad_out.float()
            need_delta = ctx.needs_input_grad[4] or (bias is not None and ctx.needs_input_grad[3])
            delta = (do32 * out.float()).sum(dim=-1, keepdim=True) if need_delta else None
            if ctx.needs_input_grad[4] and ctx.needs_input_grad[5]:
                do32 = do32.contiguous()  # one copy for both GEMMs (each would copy a strided operand)
            if ctx.needs_input_grad[4]:
                assert delta is not None
                dg = torch.matmul(do32, pv.float().transpose(-2, -1)).sub_(delta).mul_(p_pre)
            if ctx.needs_input_grad[5]:
                # contiguous left operand: all L + 1 rows, then drop the tokens' row
                dpv = torch.matmul(weights.transpose(-2, -1), do32)[..., :length, :].to(pv.dtype)
            if bias is not None and ctx.needs_input_grad[3]:
                s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale + bias.float()
                p_tok = torch.exp(s - lse.unsqueeze(-1))
                assert delta is not None
                ds = p_tok * (torch.matmul(do32, v.float().transpose(-2, -1)) - delta)
                dbias = ds.sum_to_size(bias.shape).to(bias.dtype)
        # q's gradient through the prefix scores flows back through ``g``, outside this function.
        return dq, dk, dv, dbias, dg, dpv, None, None


#: Float32 elements of the no-grad merge epilogue's working buffer (1 MiB): samples are processed in chunks
#: of this size, so that the buffer stays in cache.
_EPILOGUE_ELEMENTS = 2**18


def _merge_no_grad(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    gate: Gate,
    logits: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The ``merge`` backend without autograd: the equations of :class:`_MergeFunction`, in cache-sized chunks.

    After the fused token kernel, the batch is processed in chunks of samples whose float32 buffer of
    ``(H, L + 1, N)`` rows per sample fits in :data:`_EPILOGUE_ELEMENTS`: rows ``0..L-1`` hold the prefix
    scores ``scale * pk . q`` (one GEMM per sample straight from the strided ``q`` that timm's ``qkv`` split
    gives, no copy of ``q``), gated in place, and row ``L`` holds ``lse_tok``; one softmax over the rows
    gives the prefix weights and the token weight. ``p @ pv`` goes into a small contiguous temporary and one
    ``addcmul`` writes ``w_tok * o_tok + p @ pv`` over the kernel's token output, which keeps the kernel's
    memory layout (``(B, N, H, D)`` for timm's strided ``q``): a later ``transpose(1, 2).reshape(B, N, C)``
    is free, as after SDPA.

    A built-in :class:`~norga.NoRGaGate` is applied with :meth:`~norga.NoRGaGate.shifted_`, whose constant
    (``-alpha`` for tanh) goes onto the ``lse_tok`` row instead (a softmax row is shift-invariant). Given
    ``logits`` and any other gate are evaluated on the whole ``(B, H, N, L)`` block first, exactly as on
    the autograd path, so a gate always sees the ``L`` prefix columns.
    """
    bias = _bias4d(bias, q.dtype)
    o_tok, lse_tok = _token_attention_cpu(q, k, v, bias, scale)
    b, h, n, _ = q.shape
    length = pk.shape[-2]
    with torch.autocast(device_type=q.device.type, enabled=False):
        out = o_tok if o_tok.dtype == torch.float32 else o_tok.float()  # a float32 kernel output is ours
        in_place = logits is None and (gate is None or (isinstance(gate, NoRGaGate) and gate.builtin))
        lse_rows = lse_tok.float()
        g = shift = None
        if in_place:
            # [scale * pk; 0]: the GEMM fills all L + 1 rows of the contiguous buffer (a GEMM into a strided
            # slice of it runs per head); the scale goes on the small (L, D) key
            pk_pad = q.new_zeros((h, length + 1, pk.shape[-1]), dtype=torch.float32)
        else:
            g = prefix_scores(q, pk, scale, gate, logits)  # (B, H, N, L), float32
        pv32 = pv.float()
        # samples per chunk: the chunk's [prefix scores; lse_tok] rows stay within ~1 MiB (in cache), and
        # each elementwise op covers several samples (fewer thread synchronisations than one per sample)
        chunk = max(1, min(b, _EPILOGUE_ELEMENTS // (h * (length + 1) * n)))
        buf = q.new_empty((chunk, h, length + 1, n), dtype=torch.float32)
        for c0 in range(0, b, chunk):
            c1 = min(b, c0 + chunk)
            rows = buf[: c1 - c0]
            if g is None:
                for i in range(c0, c1):  # per sample: a GEMM straight from the strided q, no copy of q
                    if i == 0 or pk.shape[0] > 1:
                        torch.mul(pk[i if pk.shape[0] > 1 else 0].float(), scale, out=pk_pad[:, :length])
                    torch.matmul(pk_pad, q[i].float().transpose(-2, -1), out=rows[i - c0])
                if gate is not None:
                    shift = cast(NoRGaGate, gate).shifted_(rows[:, :, :length])
            else:
                rows[:, :, :length].copy_(g[c0:c1].transpose(-2, -1))
            # the gate's constant, left out of the prefix rows, goes onto the lse_tok row (shift-invariance)
            rows[:, :, length] = lse_rows[c0:c1] if shift is None else lse_rows[c0:c1] + shift
            weights = torch.softmax(rows, dim=-2)
            # p @ pv into a contiguous temporary (a batched GEMM into out's strided rows would run per head),
            # then one pass: out = p @ pv + w_tok * out
            p_pv = torch.matmul(weights[:, :, :length].transpose(-2, -1), pv32[c0:c1] if pv.shape[0] > 1 else pv32)
            torch.addcmul(p_pv, out[c0:c1], weights[:, :, length].unsqueeze(-1), out=out[c0:c1])
    return out.to(v.dtype)


def _bias4d(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if bias is None:
        return None
    bias = bias.to(dtype)
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)) if bias.dim() < 4 else bias


def _merge(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    pv: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    b, h, n, _ = q.shape
    bias = _bias4d(bias, q.dtype)
    pv = pv.expand(b, h, -1, -1)
    need_lse = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias, g, pv))
    return _MergeFunction.apply(q, k, v, bias, g, pv, scale, need_lse)


def _flex_available(device: torch.device) -> bool:
    if device.type not in ("cpu", "cuda"):
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch >= 2.5 has it
        return False
    return True


_FLEX: list = []  # the compiled flex_attention, built on first use


def _compiled_flex() -> Callable[..., torch.Tensor]:
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        # FlexAttention is fused only when compiled; inside an outer torch.compile this is inlined.
        _FLEX.append(torch.compile(flex_attention))
    return _FLEX[0]


def _flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    gate: Gate,
    logits: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """FlexAttention over ``[prefix; tokens]`` with the gate as a ``score_mod`` on the prefix columns.

    One fused kernel (compiled by inductor: Triton on CUDA, C++ on CPU): the scores are never
    materialised. ``logits`` and ``bias`` are read inside the kernel by index.
    """
    b, h, n, _ = q.shape
    length = pk.shape[-2]
    if q.device.type == "cpu" and torch.is_grad_enabled():
        needs = [t for t in (q, k, v, pk, pv, logits, bias) if t is not None and t.requires_grad]
        if needs or (isinstance(gate, torch.nn.Module) and any(p.requires_grad for p in gate.parameters())):
            raise ValueError(
                "backend 'flex' has no backward on CPU (a PyTorch limitation); use 'merge' or 'auto' when "
                "training on CPU, or run under torch.no_grad()"
            )
    keys = torch.cat([pk.to(k.dtype).expand(b, h, -1, -1), k], dim=-2)
    values = torch.cat([pv.to(v.dtype).expand(b, h, -1, -1), v], dim=-2)

    def at(t: torch.Tensor, bi, hi, qi, ki):  # index a broadcastable (B|1, H|1, N|1, X) tensor
        return t[bi if t.shape[0] > 1 else 0, hi if t.shape[1] > 1 else 0, qi if t.shape[2] > 1 else 0, ki]

    gated: Callable[[torch.Tensor], torch.Tensor]
    if isinstance(gate, NoRGaGate):
        act, alpha, tau = gate.act, gate.alpha, gate.tau
        gated = lambda x: x + alpha * act(tau * x)  # the gate's formula, traceable inside the kernel
    else:
        gated = gate if gate is not None else (lambda x: x)

    def score_mod(score, bi, hi, qi, ki):
        pre = score if logits is None else at(logits, bi, hi, qi, ki.clamp(max=length - 1)).to(score.dtype)
        tok = score if bias is None else score + at(bias, bi, hi, qi, (ki - length).clamp(min=0)).to(score.dtype)
        return torch.where(ki < length, gated(pre), tok)

    out = _compiled_flex()(q, keys, values, score_mod=score_mod, scale=scale)
    return out.to(v.dtype)


def available_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The concrete backends usable on ``device`` (``"math"`` and ``"sdpa"`` always are).

    ``"flex"`` is listed on CPU and CUDA; on CPU it runs without autograd only (PyTorch has no CPU
    FlexAttention backward).
    """
    device = torch.device(device)
    names = ["math", "sdpa"]
    if device.type == "cpu" and _cpu_flash_available():
        names.insert(1, "merge")
    if _flex_available(device):
        names.append("flex")
    return tuple(names)


def select_backend(q: torch.Tensor, backend: str = "auto", dropout_p: float = 0.0) -> str:
    """Pick the concrete backend for ``q``.

    ``"auto"`` picks ``"merge"`` on CPU without dropout (fused, O(N) extra memory), else ``"sdpa"``;
    ``"flex"`` is never picked automatically.
    An explicit backend that cannot run here raises ``ValueError``; there is no silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if q.device.type == "cpu" and dropout_p == 0.0 and _cpu_flash_available():
            return "merge"
        return "sdpa"
    if backend == "merge":
        if "merge" not in available_backends(q.device):
            raise ValueError(
                f"backend 'merge' is not available on device {q.device.type!r}; "
                f"available: {available_backends(q.device)}"
            )
        if dropout_p > 0.0:
            raise ValueError(
                f"backend 'merge' does not support attention dropout (dropout_p={dropout_p}); use 'sdpa' or 'math'"
            )
    if backend == "flex":
        if "flex" not in available_backends(q.device):
            raise ValueError(
                f"backend 'flex' is not available on device {q.device.type!r}; "
                f"available: {available_backends(q.device)}"
            )
        if dropout_p > 0.0:
            raise ValueError(
                f"backend 'flex' does not support attention dropout (dropout_p={dropout_p}); use 'sdpa' or 'math'"
            )
    return backend


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: PrefixLike | None = None,
    *,
    gate: Gate = None,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-head attention over ``[prefix; tokens]`` with gated prefix scores.

    Args:
        q: Queries ``(B, H, N, D)``.
        k: Token keys ``(B, H, M, D)``.
        v: Token values ``(B, H, M, D)``.
        prefix: ``None`` (plain attention), a ``(key, value)`` pair or a :class:`Prefix` (see
            :func:`normalize_prefix` for the accepted shapes).
        gate: Applied elementwise to the ``(B, H, N, L)`` prefix scores: a callable (e.g. a
            :class:`~norga.NoRGaGate`), an activation name (``"tanh"``, ``"sigmoid"``, ``"gelu"``: a
            ``NoRGaGate`` with ``alpha = tau = 1``), or ``None``, the linear gate of plain prefix tuning.
        scale: Score scale, default ``D ** -0.5``.
        attn_bias: Additive float bias over the *token* columns, broadcastable to ``(B, H, N, M)``
            (relative position bias, masks). Prefix columns are never masked.
        dropout_p: Attention dropout on the full softmax.
        backend: ``"auto"``, ``"math"``, ``"merge"``, ``"sdpa"`` or ``"flex"`` (module docstring).

    Returns:
        ``(B, H, N, D)`` in the dtype of ``v``.
    """
    if isinstance(gate, str) or (gate is not None and not callable(gate)):
        gate = resolve_gate(gate)  # a name, or a clear TypeError
    if is_traced(q):
        return _traced(q, k, v, prefix, gate, scale, attn_bias, False, dropout_p)
    check_attention_inputs(q, k, v, attn_bias=attn_bias, scale=scale, dropout_p=dropout_p)
    b, h, n, d = q.shape
    if scale is None:
        scale = d**-0.5
    if attn_bias is not None and attn_bias.dtype == torch.bool:
        raise TypeError("attn_bias must be an additive float tensor; resolve boolean masks with attention_bias()")
    if prefix is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)
    p = normalize_prefix(prefix, b, h, d, num_queries=n)
    pk, pv = p.key, p.value
    if pk.shape[2] == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)
    pk = pk.to(q.device)
    pv = pv.to(device=v.device)
    name = select_backend(q, backend, dropout_p)
    if name == "merge" and (n == 0 or k.shape[2] == 0):
        # The fused CPU kernel divides by zero on empty sequences (it kills the process).
        if backend == "merge":
            raise ValueError(
                f"backend 'merge' needs at least one query and one token key, got N={n}, M={k.shape[2]}; "
                "use 'sdpa' or 'math'"
            )
        name = "sdpa"
    if name == "flex":
        if n == 0:  # the compiled CPU kernel divides by zero (it kills the process)
            raise ValueError(f"backend 'flex' needs at least one query, got N={n}; use 'sdpa' or 'math'")
        return _flex(q, k, v, pk, pv, gate, p.logits, attn_bias, scale)
    if name == "merge" and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # eager inference: the in-place epilogue in chunks of samples; under torch.compile the batched form below,
        # which inductor fuses (Dynamo cannot trace the in-place writes into strided outputs)
        return _merge_no_grad(q, k, v, pk, pv, gate, p.logits, attn_bias, scale)
    g = prefix_scores(q, pk, scale, gate, p.logits)
    if name == "math":
        return _math(q, k, v, g, pv, attn_bias, scale, dropout_p)
    if name == "sdpa":
        return _sdpa(q, k, v, g, pk, pv, attn_bias, scale, dropout_p)
    return _merge(q, k, v, g, pv, attn_bias, scale)


def _traced(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: PrefixLike | None,
    gate: Gate,
    scale: float | None,
    attn_mask: torch.Tensor | None,
    is_causal: Any,
    dropout_p: float,
) -> torch.Tensor:
    """Under ``torch.fx`` symbolic tracing: the ``math`` backend, recorded as device-agnostic graph ops.

    Shapes are symbolic, so nothing is validated or dispatched on them, and the prefix must already be in
    head space ``(1 or B, H, L, D)`` (norga's prompt modules hand it out so). The gate's ops are traced; the
    mask resolution and the softmax over ``[prefix; tokens]`` are one graph node (:func:`_fx_math`), run
    with the real mask and ``is_causal`` (timm passes them as graph inputs).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if prefix is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    p = prefix if isinstance(prefix, Prefix) else Prefix(*prefix)
    g = prefix_scores(q, p.key, scale, gate, p.logits)
    return _fx_math(q, k, v, g, p.value, attn_mask, is_causal, scale, dropout_p)


@torch.fx.wrap
def _fx_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    pv: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """The ``math`` backend with the mask resolved at run time: a leaf of ``torch.fx`` graphs."""
    bias = attention_bias(attn_mask, q.shape[2], bool(is_causal), q)
    return _math(q, k, v, g, pv, bias, scale, dropout_p)
