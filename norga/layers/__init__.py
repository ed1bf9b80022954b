"""Attention layers with prompt experts: `PrefixMoEAttention` (timm's `Attention`) and the other timm families.

| timm class | norga class |
| --- | --- |
| `timm.layers.Attention` (vit, deit, dinov2, clip, ...) | `PrefixMoEAttention` |
| `timm.layers.AttentionRope` (`vit_*_rope`, pe_core) | `PrefixAttentionRope` |
| `timm.models.eva.EvaAttention` (eva02; fused and unfused qkv) | `PrefixEvaAttention` |
| `timm.models.beit.Attention` (relative position bias) | `PrefixBeitAttention` |
| `timm.models.vision_transformer_relpos.RelPosAttention` | `PrefixRelPosAttention` |
| `timm.models.vision_transformer_sam.Attention` (global blocks) | `PrefixSamAttention` |

A new family goes in `families.py`: a subclass of the timm class that repeats its forward with `self._attend` in
place of the attention, and an entry in `FAMILIES`.
"""

from .attention import PrefixMoEAttention
from .base import PrefixAttentionMixin, attention_width
from .families import (
    FAMILIES,
    PrefixAttentionRope,
    PrefixBeitAttention,
    PrefixEvaAttention,
    PrefixRelPosAttention,
    PrefixSamAttention,
    supported_families,
)

__all__ = [
    "FAMILIES",
    "PrefixAttentionMixin",
    "PrefixAttentionRope",
    "PrefixBeitAttention",
    "PrefixEvaAttention",
    "PrefixMoEAttention",
    "PrefixRelPosAttention",
    "PrefixSamAttention",
    "attention_width",
    "supported_families",
]
