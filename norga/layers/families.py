"""timm's other global-attention families with prompt experts, and the table of every supported family.

Each class subclasses the timm class it patches and repeats its forward with
[`_attend`][norga.layers.PrefixAttentionMixin] in place of the attention (the two rotary-embedding families share
one forward); with no prefix and no prompt it runs timm's forward. Rope and relative position biases act on the
tokens only: prefix keys are free parameters in head space, never rotated, and prefix columns get no bias.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import Attention, AttentionRope
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from timm.models.vision_transformer_relpos import RelPosAttention
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias
from torch import nn

from ..functional import PrefixLike, merge_heads, split_heads, split_qkv
from .attention import PrefixMoEAttention
from .base import PrefixAttentionMixin

__all__ = [
    "FAMILIES",
    "PrefixAttentionRope",
    "PrefixBeitAttention",
    "PrefixEvaAttention",
    "PrefixRelPosAttention",
    "PrefixSamAttention",
    "supported_families",
]


def _rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor | None, npt: int, half: bool):
    """timm's rotary embedding on the tokens after the `npt` prefix tokens (as `AttentionRope.forward` does)."""
    if rope is None:
        return q, k
    q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    return q, k


def _biased_qkv(self: Any, x: torch.Tensor) -> torch.Tensor:
    """timm's fused `qkv`, with EVA's and BEiT's separate biases `[q_bias, k_bias (zeros), v_bias]` where present."""
    if getattr(self, "q_bias", None) is None:
        return self.qkv(x)
    qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
    if self.qkv_bias_separate:
        return self.qkv(x) + qkv_bias
    return nn.functional.linear(x, weight=self.qkv.weight, bias=qkv_bias)


def _qkv_heads(self: Any, x: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values `(B, heads, N, head_dim)` from a fused `qkv` or from separate `q/k/v_proj`.

    `kv_heads` is the number of key/value heads of the separate projections (fewer than the query heads under
    grouped-query attention); a fused `qkv` always has `num_heads` of each.
    """
    if self.qkv is not None:
        return split_qkv(_biased_qkv(self, x), self.num_heads)
    return (
        split_heads(self.q_proj(x), self.num_heads),
        split_heads(self.k_proj(x), kv_heads),
        split_heads(self.v_proj(x), kv_heads),
    )


def _output(self: Any, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The common tail: merge heads, scale-norm, timm's output gate, projection, dropout."""
    o = self.norm(merge_heads(o))
    if getattr(self, "gate", None) is not None:
        o = o * self.gate(x).sigmoid()
    return self.proj_drop(self.proj(o))


class _PrefixRopeForward(PrefixAttentionMixin):
    """The forward of timm's rotary-embedding attention classes (`AttentionRope`, `EvaAttention`) with prompt experts.

    Mixed in before the timm class, so `super().forward` is that class's own forward (used without prompts).
    """

    # Provided by both timm classes.
    q_norm: nn.Module
    k_norm: nn.Module
    num_prefix_tokens: int

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        prefix: PrefixLike | None = None,
    ) -> torch.Tensor:
        if prefix is None and self.prompt is None:
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)  # type: ignore[misc]
        # `AttentionRope` may have fewer key/value heads (grouped-query attention); `EvaAttention` has none.
        q, k, v = _qkv_heads(self, x, getattr(self, "num_kv_heads", self.num_heads))
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rope(q, k, v, rope, self.num_prefix_tokens, getattr(self, "rotate_half", False))
        groups = getattr(self, "num_kv_groups", 1)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return _output(self, self._attend(q, k, v, prefix, attn_mask, is_causal), x)


class PrefixAttentionRope(_PrefixRopeForward, AttentionRope):  # type: ignore[misc]
    """timm `AttentionRope` (`vit_*_rope`, pe_core) with prompt experts."""


class PrefixEvaAttention(_PrefixRopeForward, EvaAttention):  # type: ignore[misc]
    """timm `EvaAttention` (eva02; fused or unfused qkv, rope) with prompt experts."""


class PrefixBeitAttention(PrefixAttentionMixin, BeitAttention):  # type: ignore[misc]
    """timm BEiT `Attention` (relative position bias) with prompt experts."""

    def forward(
        self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None, prefix: PrefixLike | None = None
    ) -> torch.Tensor:
        if prefix is None and self.prompt is None:
            return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        q, k, v = split_qkv(_biased_qkv(self, x), self.num_heads)
        bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        return self.proj_drop(self.proj(merge_heads(self._attend(q, k, v, prefix, bias))))


class PrefixRelPosAttention(PrefixAttentionMixin, RelPosAttention):  # type: ignore[misc]
    """timm `RelPosAttention` (`vit_relpos_*`) with prompt experts."""

    def forward(
        self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None, prefix: PrefixLike | None = None
    ) -> torch.Tensor:
        if prefix is None and self.prompt is None:
            return super().forward(x, shared_rel_pos=shared_rel_pos)
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos  # type: ignore[operator]
        return self.proj_drop(self.proj(merge_heads(self._attend(q, k, v, prefix, bias))))


class PrefixSamAttention(PrefixAttentionMixin, SamAttention):  # type: ignore[misc]
    """timm SAM ViT `Attention` (decomposed relative position or rope) with prompt experts.

    Input and output are `(B, H, W, C)` as in timm. Only global-attention blocks can be prompted: in windowed
    blocks the attention batch is `B * windows`, where per-sample prefixes have no meaning.
    """

    def forward(self, x: torch.Tensor, prefix: PrefixLike | None = None) -> torch.Tensor:
        if prefix is None and self.prompt is None:
            return super().forward(x)
        B, H, W, _ = x.shape
        q, k, v = (t.flatten(0, 1) for t in split_qkv(self.qkv(x.reshape(B, H * W, -1)), self.num_heads))
        q, k = self.q_norm(q), self.k_norm(k)  # (B * heads, N, D), as timm normalises
        bias = None
        if self.use_rel_pos:
            bias = get_decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W)).unflatten(0, (B, -1))
        elif self.rope is not None:
            rope = self.rope.get_embed()  # type: ignore[operator]
            q, k = (apply_rot_embed_cat(q, rope).type_as(v), apply_rot_embed_cat(k, rope).type_as(v))
        q, k, v = (t.unflatten(0, (B, -1)) for t in (q, k, v))
        o = self.proj_drop(self.proj(merge_heads(self._attend(q, k, v, prefix, bias))))
        return o.view(B, H, W, -1)


#: timm attention class -> the norga class that patches it (exact class match: subclasses with other forwards are
#: never mis-patched).
FAMILIES: dict[type[nn.Module], type[nn.Module]] = {
    Attention: PrefixMoEAttention,
    AttentionRope: PrefixAttentionRope,
    EvaAttention: PrefixEvaAttention,
    BeitAttention: PrefixBeitAttention,
    RelPosAttention: PrefixRelPosAttention,
    SamAttention: PrefixSamAttention,
}


def supported_families() -> dict[str, str]:
    """`{timm class path: norga class name}` for the supported timm attention classes."""
    return {f"{t.__module__}.{t.__qualname__}": n.__name__ for t, n in FAMILIES.items()}
