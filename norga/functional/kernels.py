"""The fused token-attention kernels behind the `merge` backend, one interface for every device.

`merge` attends over the tokens with a fused kernel that also returns its log-sum-exp, merges the result with the
gated prefix block, and differentiates through the kernel's own backward given the *merged* output and log-sum-exp
(`norga.functional.merge`). What differs between devices is only how the kernel is called: its argument lists,
the layout of its log-sum-exp, the state it hands from forward to backward (the philox seed and offset on CUDA),
and the layout it needs for a token bias. A [`TokenKernel`][norga.functional.kernels.TokenKernel] hides that:

- `forward(x) -> (o_tok, lse_tok, saved)` for [`TokenInputs`][norga.functional.kernels.TokenInputs] `x`: the token
  attention `o_tok` `(B, H, N, D)` in the dtype of `v`, in the kernel's memory layout, and its log-sum-exp
  `lse_tok` `(B, H, N)` (float32; float64 for float64 inputs on CPU), a view of whatever the kernel allocated; a
  query row whose token keys are all masked gets `lse_tok = -inf` and `o_tok = 0`. `saved`: the tensors the
  backward needs from the forward.
- `backward(x, grad, out, lse, saved, bias_grad) -> (dq, dk, dv, ds)`: the kernel's backward for the gradient
  `grad` of the merged output `out` and the merged log-sum-exp `lse` `(B, H, N)` float32, which it brings to its
  own layout; `ds` `(B, H, N, M)`, the gradient of the token scores (that of an additive token bias), only with
  `bias_grad`.

This module holds the interface and the CPU kernel (PyTorch's fused CPU flash kernel); `norga.functional.cuda` the
CUDA ones; [`token_kernel`][norga.functional.merge.token_kernel] chooses.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .prefix import float32

__all__ = ["CPU_FLASH", "Grads", "Saved", "TokenInputs", "TokenKernel", "cpu_flash_available", "masked_rows"]


class TokenInputs(NamedTuple):
    """The token attention's inputs.

    Attributes:
        q: Queries `(B, H, N, D)`.
        k: Token keys `(B, H, M, D)`.
        v: Token values `(B, H, M, D)`.
        bias: Additive token bias `(B or 1, H or 1, N, M)` in the dtype of `q`, or `None`.
        scale: Score scale.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    bias: Tensor | None
    scale: float


#: What a kernel's forward hands its backward.
Saved = Tuple[Tensor, ...]
#: `(dq, dk, dv, ds)`: gradients of `q`, `k`, `v` and, where asked, of the token scores `(B, H, N, M)`.
Grads = Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]


class TokenKernel(Protocol):
    """A fused token-attention kernel as `merge` calls it (module docstring).

    Attributes:
        name: The kernel's name in messages and tests (`"cpu_flash"`, `"cuda_flash"`, `"cuda_efficient"`).
    """

    name: str

    def forward(self, x: TokenInputs) -> tuple[Tensor, Tensor, Saved]:
        """Token attention over `x`: `(o_tok, lse_tok, saved)` (module docstring)."""
        ...

    def backward(self, x: TokenInputs, grad: Tensor, out: Tensor, lse: Tensor, saved: Saved, bias_grad: bool) -> Grads:
        """`(dq, dk, dv, ds)` for the gradient `grad` `(B, H, N, D)` of the merged output `out` with merged
        log-sum-exp `lse` `(B, H, N)` float32; `ds` `(B, H, N, M)` only with `bias_grad`, else `None`."""
        ...


def masked_rows(bias: torch.Tensor) -> torch.Tensor:
    """The query rows whose token keys are all masked: `bias` is `-inf` on the whole row, `(B|1, H|1, N)` boolean.

    A maximum per row, so no temporary of the bias's size is made.
    """
    return torch.isneginf(bias.amax(dim=-1))


def cpu_flash_available() -> bool:
    """Whether this torch has the fused CPU flash kernel and its backward (`merge`'s token attention on CPU)."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


class _CpuFlash:
    """PyTorch's fused CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu` and its backward): every
    floating dtype, an additive bias, a `(B, H, N)` log-sum-exp in float32 (float64 for float64 inputs)."""

    name = "cpu_flash"

    def forward(self, x: TokenInputs) -> tuple[Tensor, Tensor, Saved]:
        # The kernel reports a query row whose token keys are all masked with lse_tok = 0 and a zero output; such a
        # row's lse_tok is set to -inf, so that the merge gives it the softmax over the prefix columns alone
        o_tok, lse_tok = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            x.q, x.k, x.v, 0.0, False, attn_mask=x.bias, scale=x.scale
        )
        if x.bias is not None:
            lse_tok = lse_tok.masked_fill(masked_rows(x.bias), float("-inf"))
        return o_tok, lse_tok, ()

    def backward(self, x: TokenInputs, grad: Tensor, out: Tensor, lse: Tensor, saved: Saved, bias_grad: bool) -> Grads:
        q, k, v, bias, scale = x
        lse_k = lse.double() if q.dtype == torch.float64 else lse  # the kernel keeps float64 inputs' lse in float64
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse_k, 0.0, False, attn_mask=bias, scale=scale
        )
        ds = None
        if bias_grad:  # the kernel does not differentiate its mask: an explicit N x M computation
            assert bias is not None
            with float32(q):
                do32 = grad.float()
                delta = (do32 * out.float()).sum(dim=-1, keepdim=True)
                s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale + bias.float()
                p_tok = torch.exp(s - lse.unsqueeze(-1))
                ds = p_tok * (torch.matmul(do32, v.float().transpose(-2, -1)) - delta)
        return dq, dk, dv, ds


#: The fused CPU flash kernel behind the [`TokenKernel`][norga.functional.kernels.TokenKernel] interface.
CPU_FLASH: TokenKernel = _CpuFlash()
