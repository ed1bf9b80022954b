"""Prompt-only checkpoints ([`save_prompts`][norga.checkpoint.save_prompts],
[`load_prompts`][norga.checkpoint.load_prompts]) and the training state that resumes training exactly
([`training_state`][norga.checkpoint.training_state], [`load_training_state`][norga.checkpoint.load_training_state]).

A patched model's backbone is a stock timm model anyone can rebuild; what training adds is small: the prompt
pool, each patched layer's gate and prompt module (with SMoPE's usage buffers), and optionally the head. These
functions store exactly that as a [safetensors](https://huggingface.co/docs/safetensors) file whose header
carries JSON metadata: versions, the model name and class, the prompted layers (index, module path, norga
class, prompt and gate configuration), the pool's configuration, the head's path and every tensor's shape and
dtype. `load_prompts` compares all of it with the model and with the tensors the file holds, and raises one
`ValueError` listing every difference before it changes anything.

```python
norga.save_prompts(model, "task3.safetensors", include_head=True)
fresh = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
fresh.load_state_dict(backbone_weights)                     # the same pretrained backbone
norga.patch_vit(fresh, gate=norga.NoRGaGate("sigmoid"), prompt=norga.PrefixPool(10, 5, 20, 768))
norga.load_prompts(fresh, "task3.safetensors")              # identical outputs to `model`
```

Modules: `files` (paths and atomic writes), `metadata` (what a file records and how it is compared),
`prompts` (the two calls), `state` (the training state).
"""

from .files import PathLike
from .metadata import FORMAT, FORMAT_VERSION, prompt_state_dict, unwrap_model
from .prompts import LoadResult, load_prompts, read_prompt_metadata, save_prompts
from .state import STATE_FORMAT, STATE_FORMAT_VERSION, load_training_state, training_state

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "STATE_FORMAT",
    "STATE_FORMAT_VERSION",
    "LoadResult",
    "PathLike",
    "load_prompts",
    "load_training_state",
    "prompt_state_dict",
    "read_prompt_metadata",
    "save_prompts",
    "training_state",
    "unwrap_model",
]
