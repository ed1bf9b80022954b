"""Migration from the authors' checkpoints: NoRGa, HiDe-Prompt, SMoPE and the CODA-Prompt codebase.

Layouts (the authors' code, checked against their repositories):

**NoRGa / HiDe-Prompt E-prompt** (`EPrompt` with `use_prefix_tune_for_e_prompt=True`): one parameter
`e_prompt.prompt` of shape `(layers, 2, pool, L, H, D)`. Index 1 is key (0) / value (1); `pool` is
one prompt per task (`pool_size` = number of tasks); `(H, D)` are heads and head width, split like the
layer's keys. norga's [`PrefixPool`][norga.prompts.PrefixPool] holds `prompts` of shape `(tasks, layers, 2, L, H*D)`:

```python
pool.prompts[t, i, kv, l, h * D + d] == e_prompt.prompt[i, kv, t, l, h, d]
```

**NoRGa gates**: `e_prompt.act_scale` of shape `(layers, 2, 1, 1)`, initialised to ones. The
authors' attention computes (`NoRGa_Attention.forward`):

```python
prompt_attn = prompt_attn + gate_act(prompt_attn * act_scale[0]) * act_scale[1]
```

so `act_scale[i, 0]` is the temperature `tau` and `act_scale[i, 1]` the residual scale `alpha` of
layer `i`: `g(s) = s + alpha * act(tau * s)`, a [`NoRGaGate`][norga.gates.NoRGaGate] per layer. The activation
(`--gate_act`: tanh, sigmoid, gelu, ...) is a command-line option and is **not** stored in the
checkpoint, so it must be given. HiDe-Prompt checkpoints have no `act_scale`: plain prefix tuning
(linear gate, `gate=None`).

**SMoPE** (`OnePrompt`): one `(1, D)` parameter per layer `e`, expert `j` and head `h`, named
`e_pk_{e}_{j}_{h}` (key) and `e_pv_{e}_{j}_{h}` (value), usually under `prompt.`; the classifier is
`last`. norga's [`SMoPE`][norga.prompts.SMoPE] stores `keys`/`values` of shape `(H, E, D)`:

```python
smope.keys[h, j] == e_pk_{e}_{j}_{h}[0]
```

The authors keep expert usage counts and the "frequent" flags as Python attributes, so they are not
in the checkpoint; the migrated `usage`/`frequent` buffers start at zero (no adaptive noise until the
next `end_task`), and the key snapshot of the prototype loss is not set.

Which blocks are prompted is not stored either: NoRGa/HiDe-Prompt use blocks 0-4
(`--e_prompt_layer_idx`), SMoPE blocks 0-5. Pass `layers=` if yours differ.

**The CODA-Prompt codebase** (GT-RIPL/CODA-Prompt, and the SMoPE repository's L2P++, DualPrompt, CODA-Prompt
and VQ-Prompt): `ViTZoo.state_dict()`, with `prompt.e_p_{l}` `(M, length, dim)` (prompts or components),
`prompt.e_k_{l}` `(M, key_dim)` (keys), `prompt.e_a_{l}` `(M, key_dim)` (CODA-Prompt's attention vectors) and
`prompt.g_p_{l}` `(g_length, dim)` (DualPrompt's G-prompt) for each prompted block `l`, the backbone under
`feat.` and the classifier as `last`. [`load_coda_checkpoint`][norga.migrate.load_coda_checkpoint] puts layer
`l`'s tensors into row `i` of the norga module's stacked parameters, `i` the rank of `l` among the layers:

```python
l2p.prompts[i] == e_p_{l};  l2p.keys[i] == e_k_{l};  coda.attention[i] == e_a_{l};  dual.g_prompts[j] == g_p_{l}
```

Modules: `common` (reading a checkpoint, checks, the head), `hide` (NoRGa / HiDe-Prompt), `smope`, `coda`.
"""

from .coda import CODA_METHODS, coda_prompt_tensors, load_coda_checkpoint
from .common import Checkpoint, authors_state_dict
from .hide import act_scale_to_gates, e_prompt_to_pool, load_norga_checkpoint
from .smope import load_smope_checkpoint, smope_experts

__all__ = [
    "CODA_METHODS",
    "Checkpoint",
    "act_scale_to_gates",
    "authors_state_dict",
    "coda_prompt_tensors",
    "e_prompt_to_pool",
    "load_coda_checkpoint",
    "load_norga_checkpoint",
    "load_smope_checkpoint",
    "smope_experts",
]
