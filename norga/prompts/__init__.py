"""Prompt modules: what a patched layer calls as `prompt(q)` to get its prefix, and the helpers around them.

- [`PrefixPrompt`][norga.prompts.PrefixPrompt]: one learnable prefix for one layer.
- [`PrefixPool`][norga.prompts.PrefixPool]: per-task prefixes for several layers (NoRGa, HiDe-Prompt), with
  per-sample task ids ([`set_task`][norga.prompts.set_task], [`use_task`][norga.prompts.use_task]) and the
  authors' prompt momentum.
- [`SMoPE`][norga.prompts.SMoPE]: one shared prompt split into sparse experts, with its losses, usage counts
  and dense warm-up.
- The methods of the papers' comparison tables that route on a query of the frozen model
  ([`QueryPrompt`][norga.prompts.QueryPrompt]): [`L2P`][norga.prompts.L2P] (L2P++),
  [`DualPrompt`][norga.prompts.DualPrompt], [`CODAPrompt`][norga.prompts.CODAPrompt] and
  [`VQPrompt`][norga.prompts.VQPrompt], with [`use_query`][norga.prompts.use_query] and
  [`prompt_losses`][norga.prompts.prompt_losses].

A new prompt type is a module whose `forward(q)` (`q`: the layer's queries `(B, H, N, D)`) returns a
[`Prefix`][norga.functional.Prefix] in head space `(1 or B, H, L, D)`, given to `patch_vit` through a factory
`factory(layer_index, attn) -> module` (see [`patch_vit`][norga.patch.patch_vit] for the optional hooks).
"""

from .coda import CODAPrompt
from .dualprompt import DualPrompt
from .l2p import L2P, L2P_DEEP_LAYERS
from .pool import POOL_NAME, PoolPrompt, PrefixPool, TaskSpec
from .prefix import PrefixPrompt
from .query import QueryLayerPrompt, QueryPrompt
from .smope import SMOPE_DEFAULT_LAYERS, SMoPE, SMoPEFactory, smope_factory
from .tasks import (
    Phase,
    compute_query,
    count_usage,
    end_task,
    model_prompt,
    prefix_pools,
    prompt_losses,
    query_prompts,
    set_dense,
    set_task,
    smope_layers,
    smope_losses,
    training_phases,
    use_query,
    use_task,
)
from .vq import VQPrompt

__all__ = [
    "L2P",
    "L2P_DEEP_LAYERS",
    "POOL_NAME",
    "SMOPE_DEFAULT_LAYERS",
    "CODAPrompt",
    "DualPrompt",
    "Phase",
    "PoolPrompt",
    "PrefixPool",
    "PrefixPrompt",
    "QueryLayerPrompt",
    "QueryPrompt",
    "SMoPE",
    "SMoPEFactory",
    "TaskSpec",
    "VQPrompt",
    "compute_query",
    "count_usage",
    "end_task",
    "model_prompt",
    "prefix_pools",
    "prompt_losses",
    "query_prompts",
    "set_dense",
    "set_task",
    "smope_factory",
    "smope_layers",
    "smope_losses",
    "training_phases",
    "use_query",
    "use_task",
]
