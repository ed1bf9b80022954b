"""norga: prompt experts (prefix tuning, NoRGa, SMoPE) for stock timm vision transformers.

>>> import timm, norga
>>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
>>> pool = norga.PrefixPool(num_tasks=5, num_layers=5, length=5, dim=192)
>>> model = norga.patch_vit(model, gate=norga.NoRGaGate("tanh"), prompt=pool)
"""

from __future__ import annotations

import logging

from .attention import PrefixAttentionMixin, PrefixMoEAttention
from .checkpoint import load_prompts, read_prompt_metadata, save_prompts
from .cl import freeze_gates
from .distributed import sync_smope_usage
from .functional import Prefix, prefix_attention
from .gates import NoRGaGate
from .migrate import load_norga_checkpoint, load_smope_checkpoint
from .patch import attention_layers, patch_vit, patched_layers, supported_families, unpatch_vit
from .prompts import PoolPrompt, PrefixPool, PrefixPrompt, set_task, use_task
from .smope import (
    SMoPE,
    SMoPEFactory,
    count_usage,
    end_task,
    set_dense,
    smope_factory,
    smope_layers,
    smope_losses,
)

__version__ = "0.1.0"

__all__ = [
    "NoRGaGate",
    "PoolPrompt",
    "Prefix",
    "PrefixAttentionMixin",
    "PrefixMoEAttention",
    "PrefixPool",
    "PrefixPrompt",
    "SMoPE",
    "SMoPEFactory",
    "attention_layers",
    "count_usage",
    "end_task",
    "freeze_gates",
    "patch_vit",
    "patched_layers",
    "prefix_attention",
    "set_dense",
    "set_task",
    "smope_factory",
    "smope_layers",
    "smope_losses",
    "supported_families",
    "unpatch_vit",
    "use_task",
    "load_prompts",
    "read_prompt_metadata",
    "save_prompts",
    "sync_smope_usage",
    "load_norga_checkpoint",
    "load_smope_checkpoint",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
