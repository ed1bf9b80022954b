"""The functional core: attention over `[prefix; tokens]` with gated prefix scores.

The gate touches only the `N x L` prefix block, so the token-token attention can run in a fused kernel and be
merged exactly with the small prefix block through the log-sum-exp. One file per backend: `math` (the readable
reference), `merge` (a fused token kernel plus the prefix block, `auto` on CPU; its kernels in `kernels` (CPU)
and `cuda`), `sdpa` (an additive mask; `auto` elsewhere), `flex` (FlexAttention, opt-in). Under `torch.fx`,
`prefix_attention` is one graph node that runs it, backend selection included. The gate is an opaque callable;
see `norga.gates` for the gate protocol and its optional fast path.
"""

from .dispatch import BACKENDS, available_backends, prefix_attention, select_backend
from .prefix import (
    Gate,
    Prefix,
    PrefixLike,
    attention_bias,
    is_traced,
    merge_heads,
    normalize_prefix,
    prefix_heads,
    prefix_scores,
    split_heads,
    split_qkv,
)

__all__ = [
    "BACKENDS",
    "Gate",
    "Prefix",
    "PrefixLike",
    "attention_bias",
    "available_backends",
    "is_traced",
    "merge_heads",
    "normalize_prefix",
    "prefix_attention",
    "prefix_heads",
    "prefix_scores",
    "select_backend",
    "split_heads",
    "split_qkv",
]
