"""The `merge` backend: fused token attention merged exactly with the small gated prefix block.

A fused kernel (PyTorch's CPU flash kernel on CPU; its flash or memory-efficient kernel on CUDA, behind the
[`TokenKernel`][norga.functional.kernels.TokenKernel] interface) attends over the tokens and returns `o_tok` and
its log-sum-exp `lse_tok`. One
softmax over the `L + 1` columns `[g_1, ..., g_L, lse_tok]` gives at once the prefix block `p` of the full softmax
and the weight `w = exp(lse_tok - lse)` of the token part, so

    out = p @ pv + w * o_tok,      lse = logsumexp([g, lse_tok])

The backward runs the fused backward kernel with the *merged* `lse` and output: its recomputed probabilities and
row sums are then those of the full softmax, so `dq`, `dk`, `dv` are exact; the prefix block's gradients are
explicit. No `N x N` buffer (except to differentiate a token bias that itself requires grad). Float32 after the
kernel. The same equations on every device (`merge_forward`, `merge_backward`); the inference epilogue without
autograd (`merge_attention_no_grad`) is CPU-only.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import Tensor

from . import cuda
from .kernels import CPU_FLASH, Saved, TokenInputs, TokenKernel, cpu_flash_available
from .prefix import Gate, float32, prefix_scores

#: Which of `(q, k, v, bias, g, pv)` need a gradient.
Needs = Tuple[bool, ...]

__all__ = ["merge_attention", "merge_attention_no_grad", "merge_backward", "merge_forward", "token_kernel"]


def token_kernel(q: torch.Tensor, bias: torch.Tensor | None) -> TokenKernel:
    """The token kernel `merge` uses for `q` `(B, H, N, D)` and a token bias (or `None`) on `q`'s device.

    On CPU the fused CPU flash kernel; on CUDA the flash kernel for float16/bfloat16 without a bias, else the
    memory-efficient one (`norga.functional.cuda.cuda_kernel`).

    Raises:
        ValueError: no fused kernel for this device, dtype, head dim or GPU.
    """
    if q.device.type == "cpu" and cpu_flash_available():
        return CPU_FLASH
    if q.device.type == "cuda" and cuda.cuda_kernels_available():
        return cuda.cuda_kernel(q, bias)
    raise ValueError(f"backend 'merge' has no fused token kernel on device {q.device.type!r}; use 'sdpa' or 'math'")


def _merged_lse(lse_tok: torch.Tensor, w_tok: torch.Tensor) -> torch.Tensor:
    """`logsumexp([g, lse_tok])` from the token weight `w_tok = exp(lse_tok - lse)`: `lse_tok - log(w_tok)`.

    Where `w_tok` underflows to 0 (the prefix outweighs every token by ~100 nats, or every token is masked) `lse`
    is `+inf`: the token columns' weights `exp(t - lse)` are then 0, as they are to float32 precision.
    """
    # lse_tok - log(0) is already +inf for a finite lse_tok; a row whose tokens are all masked (lse_tok = -inf,
    # w_tok = 0) gives -inf - (-inf) = NaN, set to +inf in place: three passes over (B, H, N), not five
    return torch.sub(lse_tok.float(), torch.log(w_tok)).nan_to_num_(float("inf"), float("inf"), float("-inf"))


def _bias4d(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if bias is None:
        return None
    bias = bias.to(dtype)
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)) if bias.dim() < 4 else bias


def merge_forward(
    kernel: TokenKernel, x: TokenInputs, g: Tensor, pv: Tensor, need_lse: bool
) -> tuple[Tensor, Tensor, Tensor, Saved]:
    """The merge's forward through `kernel` (module docstring), without autograd.

    Args:
        kernel: The token kernel ([`TokenKernel`][norga.functional.kernels.TokenKernel]).
        x: The token attention's inputs ([`TokenInputs`][norga.functional.kernels.TokenInputs]).
        g: Gated prefix scores `(B, H, N, L)`, float32.
        pv: Prefix values `(B, H, L, D)`.
        need_lse: Whether to compute the merged log-sum-exp (for a backward).

    Returns:
        `(out, weights, lse, saved)`: `out` `(B, H, N, D)` in the dtype of `v` and the kernel's memory layout;
        `weights` `(B, H, N, L + 1)` float32, the prefix block of the full softmax and the token weight; `lse`
        `(B, H, N)` float32 (empty without `need_lse`); `saved`, what the kernel's backward needs.
    """
    o_tok, lse_tok, saved = kernel.forward(x)
    length = g.shape[-1]
    with float32(x.q):
        cols = torch.cat([g, lse_tok.float().unsqueeze(-1)], dim=-1)  # (B, H, N, L + 1)
        weights = torch.softmax(cols, dim=-1)
        # in the kernel's memory layout ((B, N, H, D) for timm's strided q): the module's transpose(1, 2)
        # .reshape(B, N, C) after it is free, and the gradient arrives in that layout. (One addcmul with out= the
        # token output would save a pass, but Dynamo cannot trace an out= into a non-contiguous tensor, and this is
        # also the form torch.compile traces.)
        out = o_tok.float().mul(weights[..., length:]).add_(torch.matmul(weights[..., :length], pv.float()))
        out = out.to(x.v.dtype)
        lse = _merged_lse(lse_tok, weights[..., length]) if need_lse else cols.new_empty(0)
    return out, weights, lse, saved


def merge_backward(
    kernel: TokenKernel, x: TokenInputs, grad: Tensor, state: tuple[Tensor, Tensor, Tensor, Tensor, Saved], needs: Needs
) -> tuple[Tensor | None, ...]:
    """The merge's backward (module docstring): the kernel's backward given the merged output and log-sum-exp for
    the token gradients, the prefix block's explicitly.

    Args:
        kernel: The token kernel given to [`merge_forward`][norga.functional.merge.merge_forward].
        x: The token attention's inputs given to it.
        grad: Gradient of the output, `(B, H, N, D)`.
        state: `(weights, pv, out, lse, saved)`: the prefix values given to `merge_forward` and what it returned.
        needs: Which of `(q, k, v, bias, g, pv)` need a gradient (`ctx.needs_input_grad`).

    Returns:
        `(dq, dk, dv, dbias, dg, dpv)`: `dq`, `dk`, `dv` in the kernel's layout; `dbias` of `bias`'s shape, `dg`
        `(B, H, N, L)` float32 and `dpv` `(B, H, L, D)` where needed, else `None`.
    """
    weights, pv, out, lse, saved = state
    length = pv.shape[-2]
    p_pre = weights[..., :length]  # the prefix block of the full softmax (the last column is the tokens')
    bias_grad = x.bias is not None and needs[3]
    dq, dk, dv, ds = kernel.backward(x, grad, out, lse, saved, bias_grad)
    dg = dpv = dbias = None
    if bias_grad:
        assert x.bias is not None and ds is not None
        dbias = ds.sum_to_size(x.bias.shape).to(x.bias.dtype)
    with float32(x.q):
        do32 = grad.float()
        if needs[4] and needs[5]:
            do32 = do32.contiguous()  # one copy for both GEMMs (each would copy a strided operand)
        if needs[4]:
            delta = (do32 * out.float()).sum(dim=-1, keepdim=True)
            dg = torch.matmul(do32, pv.float().transpose(-2, -1)).sub_(delta).mul_(p_pre)
        if needs[5]:  # contiguous left operand: all L + 1 rows, then drop the tokens' row
            dpv = torch.matmul(weights.transpose(-2, -1), do32)[..., :length, :].to(pv.dtype)
    # q's gradient through the prefix scores flows back through g, outside this function
    return dq, dk, dv, dbias, dg, dpv


class _MergeFunction(torch.autograd.Function):
    """`out = p @ pv + w * o_tok` (module docstring) with the fused kernels' exact backward."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        g: Tensor,
        pv: Tensor,
        scale: float,
        need_lse: bool,
        kernel: TokenKernel,
    ) -> Tensor:
        out, weights, lse, saved = merge_forward(kernel, TokenInputs(q, k, v, bias, scale), g, pv, need_lse)
        ctx.save_for_backward(q, k, v, bias, weights, pv, out, lse, *saved)
        ctx.scale, ctx.kernel = scale, kernel
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, bias, weights, pv, out, lse, *saved = ctx.saved_tensors
        x = TokenInputs(q, k, v, bias, ctx.scale)
        grads = merge_backward(ctx.kernel, x, grad, (weights, pv, out, lse, tuple(saved)), ctx.needs_input_grad)
        return (*grads, None, None, None)


def merge_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    pv: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    kernel: TokenKernel | None = None,
) -> torch.Tensor:
    """`merge` for gated prefix scores `g` `(B, H, N, L)`, differentiable in every input.

    The token kernel is [`token_kernel`][norga.functional.merge.token_kernel]'s for `q`'s device, dtype and bias,
    unless `kernel` is given.

    Raises:
        ValueError: no fused token kernel for this device, dtype, head dim or GPU.
    """
    b, h, _, _ = q.shape
    bias = _bias4d(bias, q.dtype)
    kernel = token_kernel(q, bias) if kernel is None else kernel
    pv = pv.expand(b, h, -1, -1)
    need_lse = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias, g, pv))
    out: torch.Tensor = _MergeFunction.apply(q, k, v, bias, g, pv, scale, need_lse, kernel)
    return out


def _scaled_prefix_rows(q: Tensor, pk: Tensor, scale: float, buf: Tensor) -> None:
    """Rows `0..L-1` of `buf` `(B, H, L + 1, N)` float32 become `scale * pk . q`, row `L` zero (`q` `(B, H, N, D)`,
    `pk` `(B or 1, H, L, D)`).

    One multiplication gives every sample's `[scale * pk; 0]` (the scale on the small key rather than on the
    scores; the zero row lets the GEMM fill all `L + 1` rows of the contiguous buffer, where a GEMM into a strided
    slice of it runs per head), then one batched GEMM over every sample and head. For timm's strided `q` (views of
    the `qkv` projection) that GEMM first copies `q`; one GEMM per sample would read the strided rows without the
    copy, but as `B` small operations, each waiting for every core: on a machine whose other core is busy that
    costs far more than the copy saves (docs/benchmarks.md, "Fewer, larger operations").
    """
    length = pk.shape[-2]
    pk_pad = q.new_zeros((pk.shape[0], pk.shape[1], length + 1, pk.shape[-1]), dtype=torch.float32)
    torch.mul(pk.float(), scale, out=pk_pad[:, :, :length])
    torch.matmul(pk_pad, q.float().transpose(-2, -1), out=buf)


def merge_attention_no_grad(
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
    """`merge` without autograd (inference, CPU): the same equations, with a working buffer instead of temporaries.

    After the fused token kernel, one float32 buffer of `(H, L + 1, N)` rows per sample: rows `0..L-1` hold the
    prefix scores `scale * pk . q`, one batched GEMM for the batch (`_scaled_prefix_rows`), gated in place
    through the gate's `inplace_` (the gate protocol, `norga.gates`); row `L` holds `lse_tok`; one softmax over
    the rows gives the prefix weights and the token weight. `p @ pv` goes into a small contiguous temporary, and
    one `addcmul` writes `w * o_tok + p @ pv` over the kernel's output, in its memory layout. Given `logits`, or a
    gate without `inplace_` (or one that declines), the scores are built and gated on the whole `(B, H, N, L)` block
    first, exactly as on the autograd path.
    """
    bias = _bias4d(bias, q.dtype)
    o_tok, lse_tok, _ = CPU_FLASH.forward(TokenInputs(q, k, v, bias, scale))
    b, h, n, _ = q.shape
    length = pk.shape[-2]
    with float32(q):
        out = o_tok if o_tok.dtype == torch.float32 else o_tok.float()  # a float32 kernel output is ours
        inplace = getattr(gate, "inplace_", None) if gate is not None else None
        g = None
        if logits is not None or (gate is not None and inplace is None):
            g = prefix_scores(q, pk, scale, gate, logits)
        buf = q.new_empty((b, h, length + 1, n), dtype=torch.float32)
        if g is None:
            _scaled_prefix_rows(q, pk, scale, buf)
            if inplace is not None and inplace(buf[:, :, :length]) is NotImplemented:
                g = prefix_scores(q, pk, scale, gate, logits)  # the gate declined: the (B, H, N, L) block
        if g is not None:
            buf[:, :, :length].copy_(g.transpose(-2, -1))
        buf[:, :, length] = lse_tok
        weights = torch.softmax(buf, dim=-2)
        # p @ pv into a contiguous temporary (a batched GEMM into out's strided rows runs per head), then one
        # pass: out = p @ pv + w * out
        p_pv = torch.matmul(weights[:, :, :length].transpose(-2, -1), pv.float())
        torch.addcmul(p_pv, out, weights[:, :, length].unsqueeze(-1), out=out)
    return out.to(v.dtype)
