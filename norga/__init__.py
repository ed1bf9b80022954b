"""norga: prompt experts (prefix tuning, NoRGa, SMoPE) for stock timm vision transformers.

The package in floors, each importing only those below it: `_checks` (argument validation), `gates`,
`functional` (prefix attention and its backends), `layers` (timm attention classes with prompt experts),
`prompts` (prompt modules and their training helpers), `patch` (patching timm models), then `checkpoint`,
`migrate` and `distributed`; `cl`, the continual-learning toolkit, stands apart. See docs/architecture.md.

Examples:
    >>> import timm, norga
    >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    >>> pool = norga.PrefixPool(num_tasks=5, num_layers=5, length=5, dim=192)
    >>> model = norga.patch_vit(model, gate=norga.NoRGaGate("tanh"), prompt=pool)
"""

from __future__ import annotations

import logging

from ._version import __version__
from .checkpoint import load_prompts, save_prompts
from .functional import Prefix, prefix_attention
from .gates import NoRGaGate
from .layers import PrefixMoEAttention
from .migrate import load_norga_checkpoint, load_smope_checkpoint
from .patch import patch_vit, unpatch_vit
from .prompts import (
    PrefixPool,
    PrefixPrompt,
    SMoPE,
    count_usage,
    end_task,
    prompt_losses,
    set_dense,
    set_task,
    smope_factory,
    smope_losses,
    use_query,
    use_task,
)

__all__ = [
    "NoRGaGate",
    "Prefix",
    "PrefixMoEAttention",
    "PrefixPool",
    "PrefixPrompt",
    "SMoPE",
    "__version__",
    "count_usage",
    "end_task",
    "load_norga_checkpoint",
    "load_prompts",
    "load_smope_checkpoint",
    "patch_vit",
    "prefix_attention",
    "prompt_losses",
    "save_prompts",
    "set_dense",
    "set_task",
    "smope_factory",
    "smope_losses",
    "unpatch_vit",
    "use_query",
    "use_task",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
