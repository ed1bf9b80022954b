"""Migration from the authors' checkpoints: NoRGa, HiDe-Prompt and SMoPE.

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
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from ._checks import check_float_tensor
from .gates import NoRGaGate
from .patch import DEFAULT_LAYERS, attention_layers, patch_vit
from .prompts import PrefixPool, SMoPE, smope_factory

__all__ = [
    "act_scale_to_gates",
    "authors_state_dict",
    "e_prompt_to_pool",
    "load_norga_checkpoint",
    "load_smope_checkpoint",
    "smope_experts",
]

Checkpoint = Union[str, "os.PathLike[str]", Mapping[str, Any]]
Activation = Union[str, Callable[[torch.Tensor], torch.Tensor]]

_SMOPE_KEY = re.compile(r"^(?P<prefix>.*?)e_p(?P<kv>[kv])_(?P<layer>\d+)_(?P<expert>\d+)_(?P<head>\d+)$")


def e_prompt_to_pool(prompt: torch.Tensor) -> torch.Tensor:
    """Convert `e_prompt.prompt` `(layers, 2, pool, L, H, D)` to `PrefixPool.prompts` layout.

    Returns:
        A new contiguous tensor of shape `(pool, layers, 2, L, H * D)` with
        `out[t, i, kv, l, h * D + d] = prompt[i, kv, t, l, h, d]`.

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: not 6-dimensional, or dimension 1 is not 2 (key, value).
    """
    prompt = check_float_tensor("e_prompt.prompt", prompt)
    if prompt.dim() != 6 or prompt.shape[1] != 2:
        raise ValueError(
            "e_prompt.prompt must have shape (layers, 2, pool, length, num_heads, head_dim) (the prefix-tuning "
            f"E-prompt of NoRGa / HiDe-Prompt), got {tuple(prompt.shape)}"
        )
    layers, _, pool, length, heads, head_dim = prompt.shape
    return prompt.detach().permute(2, 0, 1, 3, 4, 5).reshape(pool, layers, 2, length, heads * head_dim).clone()


def act_scale_to_gates(act_scale: torch.Tensor, activation: Activation, *, learnable: bool = True) -> list[NoRGaGate]:
    """One [`NoRGaGate`][norga.gates.NoRGaGate] per layer from NoRGa's `act_scale` `(layers, 2, 1, 1)`.

    `act_scale[i, 0]` is `tau` and `act_scale[i, 1]` is `alpha` (the authors compute
    `s + act(s * act_scale[0]) * act_scale[1]`).

    Args:
        act_scale: The `e_prompt.act_scale` tensor.
        activation: The `--gate_act` the model was trained with: `"tanh"`, `"sigmoid"`, `"gelu"`
            or a callable (e.g. `torch.relu`; `lambda s: s` for their identity `gate_act=None`).
        learnable: Whether `alpha`/`tau` are parameters (True) or buffers.

    Raises:
        ValueError: wrong shape or non-finite values.
    """
    act_scale = check_float_tensor("act_scale", act_scale)
    if act_scale.dim() < 2 or act_scale.shape[1] != 2 or any(int(s) != 1 for s in act_scale.shape[2:]):
        raise ValueError(
            f"act_scale must have shape (layers, 2, 1, 1) (tau, alpha per layer), got {tuple(act_scale.shape)}"
        )
    flat = act_scale.detach().reshape(act_scale.shape[0], 2).double()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("act_scale has non-finite values")
    return [
        NoRGaGate(activation, alpha=float(flat[i, 1]), tau=float(flat[i, 0]), learnable=learnable)
        for i in range(flat.shape[0])
    ]


def smope_experts(
    state_dict: Mapping[str, torch.Tensor], layer: int, *, prefix: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather SMoPE's per-expert parameters of one layer into `(keys, values)` of shape `(H, E, D)`.

    Args:
        state_dict: The authors' state dict (keys `{prefix}e_pk_{layer}_{expert}_{head}` and
            `{prefix}e_pv_...`, each `(1, D)` or `(D,)`).
        layer: The authors' layer index `e`.
        prefix: Key prefix (e.g. `"prompt."`); `None` detects it (it must be unique).

    Returns:
        `(keys, values)` with `keys[h, j] = state_dict[f"{prefix}e_pk_{layer}_{j}_{h}"].reshape(D)`.

    Raises:
        ValueError: no experts for `layer`, a missing expert/head (the grid must be complete), or
            inconsistent shapes.
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    found: dict[tuple[str, int, int], torch.Tensor] = {}
    prefixes = set()
    for key, value in state_dict.items():
        m = _SMOPE_KEY.match(key)
        if m is None or int(m["layer"]) != layer:
            continue
        if prefix is not None and m["prefix"] != prefix:
            continue
        prefixes.add(m["prefix"])
        found[(m["kv"], int(m["expert"]), int(m["head"]))] = check_float_tensor(key, value)
    if not found:
        raise ValueError(f"no SMoPE expert parameters e_pk_{layer}_<expert>_<head> found (prefix {prefix!r})")
    if len(prefixes) > 1:
        raise ValueError(
            f"SMoPE experts of layer {layer} appear under several prefixes {sorted(prefixes)}; pass prefix="
        )
    pre = prefixes.pop()
    experts = 1 + max(e for _, e, _ in found)
    heads = 1 + max(h for _, _, h in found)
    missing = [
        f"{pre}e_p{kv}_{layer}_{e}_{h}"
        for kv in "kv"
        for e in range(experts)
        for h in range(heads)
        if (kv, e, h) not in found
    ]
    if missing:
        raise ValueError(
            f"SMoPE layer {layer}: expected a full grid of {experts} experts x {heads} heads, missing {missing[:8]}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )
    dims = {int(t.numel()) for t in found.values()}
    shapes = {tuple(t.shape) for t in found.values()}
    if len(dims) != 1 or any(len([s for s in shape if s != 1]) > 1 for shape in shapes):
        raise ValueError(
            f"SMoPE layer {layer}: each expert must be a (1, head_dim) vector, got shapes {sorted(shapes)}"
        )
    head_dim = dims.pop()
    out = []
    for kv in "kv":
        t = torch.empty(heads, experts, head_dim, dtype=next(iter(found.values())).dtype)
        for h in range(heads):
            for e in range(experts):
                t[h, e] = found[(kv, e, h)].detach().reshape(head_dim)
        out.append(t)
    return out[0], out[1]


def authors_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The flat state dict of an authors' checkpoint (a path or an already loaded object).

    Accepts `{"model": state_dict, ...}` (HiDe-Prompt / NoRGa `torch.save`), `{"state_dict": ...}` or
    a state dict, and strips a `module.` prefix (DDP). A path is read with
    `torch.load(weights_only=True)`; a checkpoint that pickles other objects (e.g. `args`) is refused
    there: load it yourself with `weights_only=False` if you trust it and pass the dict.
    """
    obj: Any = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            obj = torch.load(os.fspath(checkpoint), map_location="cpu", weights_only=True)
        except Exception as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(
                f"could not read {os.fspath(checkpoint)!r} with torch.load(weights_only=True) ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). If you trust the file, load it with "
                "torch.load(path, map_location='cpu', weights_only=False) and pass the result"
            ) from e
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint must be a path or a mapping, got {type(obj).__name__}")
    for container in ("model", "state_dict"):
        if isinstance(obj.get(container), Mapping):
            obj = obj[container]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError("the checkpoint holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _layers(model: nn.Module, layers: Sequence[int] | None, default: Sequence[int], count: int, what: str) -> list[int]:
    chosen = list(default if layers is None else layers)
    if len(chosen) != count:
        raise ValueError(
            f"the checkpoint has {what} for {count} layers but layers={chosen} names {len(chosen)}; pass the "
            "block indices the model was trained with"
        )
    found = attention_layers(model)
    for i in chosen:
        if not 0 <= i < len(found):
            raise ValueError(f"layer index {i} out of range: the model has {len(found)} attention layers")
    return chosen


def _check_heads(model: nn.Module, layers: list[int], heads: int, head_dim: int, what: str) -> None:
    found = attention_layers(model)
    for i in layers:
        attn = found[i].module
        n = int(getattr(attn, "num_heads", -1))
        d = int(getattr(attn, "head_dim", -1)) if hasattr(attn, "head_dim") else None
        if n != heads or (d is not None and d != head_dim):
            raise ValueError(
                f"{what} has {heads} heads of width {head_dim}, but layer {i} ({found[i].name}) has {n} heads"
                + (f" of width {d}" if d is not None else "")
            )


def _checked_head(
    model: nn.Module, state: Mapping[str, torch.Tensor], names: Sequence[str]
) -> tuple[nn.Linear, torch.Tensor, torch.Tensor | None]:
    """The model's classifier and the checkpoint's weight and bias for it, checked; nothing is copied yet."""
    get = getattr(model, "get_classifier", None)
    head = get() if get is not None else None
    if not isinstance(head, nn.Linear):
        raise TypeError(f"include_head=True but the model's classifier is {type(head).__name__}, not nn.Linear")
    for name in names:
        w, b = state.get(f"{name}.weight"), state.get(f"{name}.bias")
        if w is None:
            continue
        w = check_float_tensor(f"{name}.weight", w)
        if tuple(w.shape) != tuple(head.weight.shape):
            raise ValueError(
                f"the checkpoint's classifier {name}.weight has shape {tuple(w.shape)}, the model's head "
                f"{tuple(head.weight.shape)} (create the model with num_classes={w.shape[0]})"
            )
        if (b is None) != (head.bias is None):
            raise ValueError(
                f"the checkpoint's classifier {name} {'has no' if b is None else 'has a'} bias, the model's head "
                f"{'has one' if b is None else 'has none'}: the head would load only in part"
            )
        if b is not None and head.bias is not None and tuple(b.shape) != tuple(head.bias.shape):
            raise ValueError(
                f"the checkpoint's classifier {name}.bias has shape {tuple(b.shape)}, the model's head "
                f"{tuple(head.bias.shape)}"
            )
        return head, w, None if b is None else check_float_tensor(f"{name}.bias", b)
    raise ValueError(f"include_head=True but the checkpoint has none of {[n + '.weight' for n in names]}")


@torch.no_grad()
def _copy_head(head: nn.Linear, w: torch.Tensor, b: torch.Tensor | None) -> None:
    head.weight.copy_(w)
    if b is not None and head.bias is not None:
        head.bias.copy_(b)


def load_norga_checkpoint(
    model: nn.Module,
    checkpoint: Checkpoint,
    *,
    activation: Activation | None = None,
    layers: Sequence[int] | None = None,
    learnable_gates: bool = True,
    include_head: bool = True,
    backend: str = "auto",
) -> nn.Module:
    """Patch a timm ViT with the prompts (and NoRGa gates) of a NoRGa or HiDe-Prompt checkpoint.

    The backbone weights are not touched: load the pretrained timm weights the authors used first.

    Args:
        model: An unpatched timm ViT of the same size (heads and width) as the authors'.
        checkpoint: A path or the loaded checkpoint (`{"model": state_dict}` or a state dict).
        activation: The `--gate_act` of a NoRGa checkpoint (`"tanh"`, `"sigmoid"`, `"gelu"` or a
            callable); must be `None` for a HiDe-Prompt checkpoint (no `act_scale`).
        layers: Prompted blocks (default 0-4, the authors' `e_prompt_layer_idx`).
        learnable_gates: `alpha`/`tau` as parameters (True) or frozen buffers.
        include_head: Also copy the classifier `head.weight`/`head.bias` into `model.get_classifier()`.
        backend: Prefix-attention backend of the patched layers.

    Returns:
        `model`, patched in place, with `model.prompt_pool` holding one prompt per task.

    Raises:
        ValueError: no `e_prompt.prompt`, wrong shapes, a missing or superfluous `activation`, or a
            model with other heads / head width / number of classes.
    """
    state = authors_state_dict(checkpoint)
    if "e_prompt.prompt" not in state:
        raise ValueError(
            f"not a NoRGa / HiDe-Prompt prefix checkpoint: no 'e_prompt.prompt' key (found e.g. {sorted(state)[:5]})"
        )
    raw = check_float_tensor("e_prompt.prompt", state["e_prompt.prompt"])
    prompts = e_prompt_to_pool(raw)
    num_tasks, num_layers, _, length, dim = prompts.shape
    chosen = _layers(model, layers, DEFAULT_LAYERS, num_layers, "prompts")
    _check_heads(model, chosen, int(raw.shape[4]), int(raw.shape[5]), "e_prompt.prompt")
    act_scale = state.get("e_prompt.act_scale")
    gates: list[NoRGaGate] | None = None
    if act_scale is not None:
        if activation is None:
            raise ValueError(
                "this is a NoRGa checkpoint (it has e_prompt.act_scale); pass activation= the --gate_act it was "
                "trained with ('tanh', 'sigmoid', 'gelu' or a callable): the checkpoint does not store it"
            )
        gates = act_scale_to_gates(act_scale, activation, learnable=learnable_gates)
        if len(gates) != num_layers:
            raise ValueError(f"act_scale has {len(gates)} layers but e_prompt.prompt has {num_layers}")
    elif activation is not None:
        raise ValueError(
            f"activation={activation!r} given but the checkpoint has no e_prompt.act_scale (a HiDe-Prompt "
            "checkpoint: plain prefix tuning, no gate); pass activation=None"
        )
    head = _checked_head(model, state, ["head"]) if include_head else None
    pool = PrefixPool(num_tasks, num_layers, length, dim)
    with torch.no_grad():
        pool.prompts.copy_(prompts)
    template = None if gates is None else NoRGaGate(activation, learnable=learnable_gates)  # type: ignore[arg-type]
    patch_vit(model, gate=template, layers=chosen, prompt=pool, backend=backend)  # checks all, then changes the model
    if head is not None:
        _copy_head(*head)
    if gates is not None:
        found = attention_layers(model)
        with torch.no_grad():
            for i, gate in zip(chosen, gates):
                layer_gate = getattr(found[i].module, "prefix_gate", None)
                if not isinstance(layer_gate, NoRGaGate):  # patch_vit deep-copies the template gate
                    raise TypeError(
                        f"layer {i} has {type(layer_gate).__name__} as prefix_gate after patching, not NoRGaGate"
                    )
                layer_gate.alpha.copy_(gate.alpha)
                layer_gate.tau.copy_(gate.tau)
    return model


def load_smope_checkpoint(
    model: nn.Module,
    checkpoint: Checkpoint,
    *,
    layers: Sequence[int] | None = None,
    top_k: int = 5,
    noise_eps: float = 0.4,
    include_head: bool = True,
    prefix: str | None = None,
    backend: str = "auto",
) -> nn.Module:
    """Patch a timm ViT with [`SMoPE`][norga.prompts.SMoPE] layers holding the experts of an SMoPE checkpoint.

    The authors' layer `e` (`e_pk_{e}_...`) goes to block `layers[k]` where `e` is the `k`-th
    smallest layer index in the checkpoint (default blocks 0-5, as the authors prompt). `top_k` and
    `noise_eps` are not stored by the authors: pass their values (defaults: K=5, eps=0.4).

    Raises:
        ValueError: no SMoPE experts, an incomplete expert grid, or a model with other heads/widths.
    """
    state = authors_state_dict(checkpoint)
    src_layers = sorted({int(m["layer"]) for k in state if (m := _SMOPE_KEY.match(k)) is not None})
    if not src_layers:
        raise ValueError(
            f"not an SMoPE checkpoint: no e_pk_<layer>_<expert>_<head> keys (found e.g. {sorted(state)[:5]})"
        )
    experts = {e: smope_experts(state, e, prefix=prefix) for e in src_layers}
    shapes = {tuple(k.shape) for k, _ in experts.values()}
    if len(shapes) != 1:
        raise ValueError(f"SMoPE layers have different (heads, experts, head_dim): {sorted(shapes)}")
    heads, num_experts, head_dim = shapes.pop()
    chosen = _layers(model, layers, (0, 1, 2, 3, 4, 5), len(src_layers), "SMoPE experts")
    _check_heads(model, chosen, heads, head_dim, "the SMoPE checkpoint")
    head = _checked_head(model, state, ["last", "head"]) if include_head else None
    patch_vit(
        model,
        layers=chosen,
        prompt=smope_factory(num_experts=num_experts, top_k=top_k, noise_eps=noise_eps),
        backend=backend,
    )  # checks all, then changes the model
    if head is not None:
        _copy_head(*head)
    found = attention_layers(model)
    with torch.no_grad():
        for e, i in zip(src_layers, chosen):
            smope = getattr(found[i].module, "prompt", None)
            if not isinstance(smope, SMoPE):
                raise TypeError(f"layer {i} has {type(smope).__name__} as prompt after patching, not SMoPE")
            keys, values = experts[e]
            smope.keys.copy_(keys)
            smope.values.copy_(values)
    return model
