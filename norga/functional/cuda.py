"""The CUDA token kernels of `merge`: PyTorch's fused flash and memory-efficient attention, which return their
log-sum-exp, behind the [`TokenKernel`][norga.functional.kernels.TokenKernel] interface.

- **flash** (`_scaled_dot_product_flash_attention` and its backward): float16 and bfloat16 without a token bias,
  on GPUs of compute capability 8.0 or newer. Its log-sum-exp is `(B, H, N)` float32; it hands the backward its
  philox state (`rng_state`, `unused`) and the sequence lengths.
- **memory-efficient** (`_scaled_dot_product_efficient_attention` and its backward): float32, float16 and
  bfloat16 (bfloat16 on compute capability 8.0 or newer), with or without a token bias. Its log-sum-exp is
  `(B, H, ceil(N / 32) * 32)` float32, the rows past `N` set to `+inf`; the backward reads it in that layout. It
  hands the backward its philox seed and offset. A token bias must be `(B, H, N, M)` with a contiguous last
  dimension and the other strides multiples of 8 elements (what PyTorch's SDPA makes of a mask before this
  kernel): a bias that is not is copied once into a padded buffer; broadcast dimensions stay stride-0 views. Its
  backward also returns the gradient of the token scores, which a token bias that requires grad gets.

cuDNN attention (`_scaled_dot_product_cudnn_attention`) is not used: what it accepts depends on the cuDNN
version and the GPU generation in ways a CPU cannot check, and flash and memory-efficient already cover every
dtype, with and without a bias.

Every operator is called with keyword arguments named as in its registered schema, so a changed signature fails
at the call with the operator's own message. The kernels need the last dimension of `q`, `k`, `v` contiguous
(timm's `qkv` split gives that), a head dim that is a multiple of 8 and at most 256, and float16, bfloat16 or
float32; `cuda_kernel` says which of these a call lacks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import Grads, Saved, TokenInputs, masked_rows
from .prefix import float32

__all__ = ["CUDA_EFFICIENT", "CUDA_FLASH", "cuda_kernel", "cuda_kernels_available", "efficient_bias", "padded_lse"]

_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_efficient_attention_backward",
)
_HALF = (torch.float16, torch.bfloat16)
LSE_ALIGN = 32  # the memory-efficient kernel's log-sum-exp rows are padded to a multiple of this
BIAS_ALIGN = 8  # strides (in elements) the memory-efficient kernel needs for a bias, as PyTorch's SDPA pads it
MAX_HEAD_DIM = 256


def _aten(name: str) -> Any:
    """`torch.ops.aten.<name>.default`: every CUDA operator call goes through here (tests substitute it)."""
    return getattr(torch.ops.aten, name).default


def cuda_kernels_available() -> bool:
    """Whether this torch has the fused CUDA flash and memory-efficient kernels and their backwards."""
    return all(hasattr(torch.ops.aten, name) for name in _OPS)


def padded_lse(lse: torch.Tensor, n: int) -> torch.Tensor:
    """A log-sum-exp `(B, H, N)` in the memory-efficient kernel's layout: `(B, H, ceil(N / 32) * 32)` float32,
    contiguous, the rows past `N` `+inf` (as its forward writes them)."""
    b, h = lse.shape[0], lse.shape[1]
    width = -(-n // LSE_ALIGN) * LSE_ALIGN
    buf = lse.new_full((b, h, width), float("inf"), dtype=torch.float32)
    buf[..., :n] = lse
    return buf


def efficient_bias(bias: torch.Tensor, b: int, h: int, n: int, m: int) -> torch.Tensor:
    """`bias` `(B or 1, H or 1, N, M)` as the memory-efficient kernel reads it: `(B, H, N, M)`, last dimension
    contiguous, every other stride and the storage offset multiples of 8 elements.

    An aligned bias is only expanded (a view); another is first copied into a buffer whose rows are padded to a
    multiple of 8 elements, as PyTorch's SDPA does.
    """
    aligned = bias.stride(-1) == 1 and bias.storage_offset() % BIAS_ALIGN == 0
    aligned = aligned and all(s % BIAS_ALIGN == 0 for s, size in zip(bias.stride()[:-1], bias.shape[:-1]) if size > 1)
    if not aligned:
        pad = -m % BIAS_ALIGN
        bias = F.pad(bias, (0, pad))[..., :m] if pad else bias.contiguous()
    return bias.expand(b, h, n, m)


def _bnhd(t: torch.Tensor) -> torch.Tensor:
    """`t` `(B, H, N, D)` laid out as `(B, N, H, D)` in memory (what the kernels write and their backwards read)."""
    return t if t.transpose(1, 2).is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)


class _CudaFlash:
    """`_scaled_dot_product_flash_attention`: float16/bfloat16, no bias, `(B, H, N)` log-sum-exp (module docstring)."""

    name = "cuda_flash"

    def forward(self, x: TokenInputs) -> tuple[Tensor, Tensor, Saved]:
        assert x.bias is None, "the flash kernel takes no bias"
        with float32(x.q):  # autocast off: the kernel runs in q's dtype, which the backward gets too
            out, lse, _, _, _, _, rng_state, unused, _ = _aten("_scaled_dot_product_flash_attention")(
                query=x.q, key=x.k, value=x.v, dropout_p=0.0, is_causal=False, return_debug_mask=False, scale=x.scale
            )
        return out, lse, (rng_state, unused)

    def backward(self, x: TokenInputs, grad: Tensor, out: Tensor, lse: Tensor, saved: Saved, bias_grad: bool) -> Grads:
        rng_state, unused = saved
        # cum_seq_q/k: the undefined tensors the dense forward returns (a defined one selects the varlen kernel)
        dq, dk, dv = _aten("_scaled_dot_product_flash_attention_backward")(
            grad_out=grad, query=x.q, key=x.k, value=x.v, out=_bnhd(out), logsumexp=lse.contiguous(),
            cum_seq_q=None, cum_seq_k=None, max_q=x.q.shape[2], max_k=x.k.shape[2], dropout_p=0.0, is_causal=False,
            philox_seed=rng_state, philox_offset=unused, scale=x.scale,
        )  # fmt: skip
        return dq, dk, dv, None


class _CudaEfficient:
    """`_scaled_dot_product_efficient_attention`: float32/float16/bfloat16, with or without a bias, a log-sum-exp
    padded to a multiple of 32 rows (module docstring)."""

    name = "cuda_efficient"

    def forward(self, x: TokenInputs) -> tuple[Tensor, Tensor, Saved]:
        b, h, n, _ = x.q.shape
        kernel_bias = None if x.bias is None else efficient_bias(x.bias, b, h, n, x.k.shape[2])
        with float32(x.q):  # autocast off: the kernel runs in q's dtype
            out, lse, seed, offset = _aten("_scaled_dot_product_efficient_attention")(
                query=x.q, key=x.k, value=x.v, attn_bias=kernel_bias, compute_log_sumexp=True, dropout_p=0.0,
                is_causal=False, scale=x.scale,
            )  # fmt: skip
        lse = lse[..., :n]
        if x.bias is not None:  # rows whose tokens are all masked: lse -inf and a zero output, whatever it wrote
            rows = masked_rows(x.bias)
            lse = lse.masked_fill(rows, float("-inf"))
            out.masked_fill_(rows.unsqueeze(-1), 0.0)  # the kernel's fresh output, in its layout
        return out, lse, (seed, offset) if kernel_bias is None else (seed, offset, kernel_bias)

    def backward(self, x: TokenInputs, grad: Tensor, out: Tensor, lse: Tensor, saved: Saved, bias_grad: bool) -> Grads:
        seed, offset = saved[:2]
        kernel_bias = saved[2] if len(saved) > 2 else None  # None: the undefined tensor of a call without bias
        dq, dk, dv, ds = _aten("_scaled_dot_product_efficient_attention_backward")(
            grad_out_=grad, query=x.q, key=x.k, value=x.v, attn_bias=kernel_bias, out=_bnhd(out),
            logsumexp=padded_lse(lse, x.q.shape[2]), philox_seed=seed, philox_offset=offset, dropout_p=0.0,
            grad_input_mask=[True, True, True, bias_grad and kernel_bias is not None], is_causal=False, scale=x.scale,
        )  # fmt: skip
        return dq, dk, dv, ds if bias_grad else None


#: PyTorch's fused CUDA flash kernel behind the [`TokenKernel`][norga.functional.kernels.TokenKernel] interface.
CUDA_FLASH = _CudaFlash()
#: PyTorch's fused CUDA memory-efficient kernel behind the same interface.
CUDA_EFFICIENT = _CudaEfficient()


def cuda_kernel(q: torch.Tensor, bias: torch.Tensor | None) -> _CudaFlash | _CudaEfficient:
    """The CUDA token kernel for `q` `(B, H, N, D)` and a token bias (or `None`): flash for float16/bfloat16 without
    a bias on compute capability 8.0 or newer, else memory-efficient.

    Raises:
        ValueError: a dtype, head dim or GPU that neither kernel takes (the message names what it needs).
    """
    d = q.shape[-1]
    if q.dtype not in (torch.float32, *_HALF):
        raise ValueError(
            f"backend 'merge' on CUDA needs float32, float16 or bfloat16 inputs (PyTorch's fused CUDA kernels), "
            f"got {q.dtype}; use 'sdpa' or 'math'"
        )
    if d % 8 != 0 or d > MAX_HEAD_DIM:
        raise ValueError(
            f"backend 'merge' on CUDA needs a head dim that is a multiple of 8 and at most {MAX_HEAD_DIM}, got {d}; "
            "use 'sdpa' or 'math'"
        )
    major, minor = torch.cuda.get_device_capability(q.device)
    if q.dtype in _HALF and bias is None and major >= 8:
        return CUDA_FLASH
    if q.dtype == torch.bfloat16 and major < 8:
        raise ValueError(
            f"backend 'merge' on CUDA needs compute capability 8.0 or newer for bfloat16, got {major}.{minor}; "
            "use float16, float32, 'sdpa' or 'math'"
        )
    return CUDA_EFFICIENT
