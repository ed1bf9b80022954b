"""Prompt modules: what a patched layer calls as `prompt(q)` to get its prefix, and the helpers around them.

- [`PrefixPrompt`][norga.prompts.PrefixPrompt]: one learnable prefix for one layer.
- [`PrefixPool`][norga.prompts.PrefixPool]: per-task prefixes for several layers (NoRGa, HiDe-Prompt), with
  per-sample task ids ([`set_task`][norga.prompts.set_task], [`use_task`][norga.prompts.use_task]) and the
  authors' prompt momentum.
- [`SMoPE`][norga.prompts.SMoPE]: one shared prompt split into sparse experts, with its losses, usage counts
  and dense warm-up.

A new prompt type is a module whose `forward(q)` (`q`: the layer's queries `(B, H, N, D)`) returns a
[`Prefix`][norga.functional.Prefix] in head space `(1 or B, H, L, D)`, given to `patch_vit` through a factory
`factory(layer_index, attn) -> module` (see [`patch_vit`][norga.patch.patch_vit] for the optional hooks).
"""

from .pool import POOL_NAME, PoolPrompt, PrefixPool, TaskSpec
from .prefix import PrefixPrompt
from .smope import SMOPE_DEFAULT_LAYERS, SMoPE, SMoPEFactory, smope_factory
from .tasks import (
    Phase,
    count_usage,
    end_task,
    model_prompt,
    prefix_pools,
    set_dense,
    set_task,
    smope_layers,
    smope_losses,
    training_phases,
    use_task,
)

__all__ = [
    "POOL_NAME",
    "SMOPE_DEFAULT_LAYERS",
    "Phase",
    "PoolPrompt",
    "PrefixPool",
    "PrefixPrompt",
    "SMoPE",
    "SMoPEFactory",
    "TaskSpec",
    "count_usage",
    "end_task",
    "model_prompt",
    "prefix_pools",
    "set_dense",
    "set_task",
    "smope_factory",
    "smope_layers",
    "smope_losses",
    "training_phases",
    "use_task",
]
