"""Patching stock timm ViTs in place: `patch_vit`, `unpatch_vit`, and the layers they find.

`patch_vit` swaps the attention modules of chosen blocks for norga subclasses of the *same* timm classes
(`norga.layers`). The new module shares the old one's parameters, buffers and submodules, so weights,
`state_dict` keys, `fused_attn`, qk-norm, scale-norm, rope and relative position behaviour are kept; it adds a
`prefix_gate` and a `prompt`. With no prompt, a patched layer runs timm's own forward.

**The prompt factory protocol.** `patch_vit` knows prompts only through it:

- `factory(layer_index, attn) -> nn.Module | None`: the prompt of one patched layer, called for each layer in
  block order before the model changes (`layer_index`: the index in `attention_layers(model)`).
- Optional `factory.default_layers`: the layers to patch when `layers=None` (SMoPE: blocks 0-5).
- Optional `factory.prepare(model, layers)`: called first with the chosen `AttentionLayer`s; it may raise, and
  nothing has changed yet (a `PrefixPool` checks its shape here).
- Optional `factory.attach(model)`: called once the layers are patched (a `PrefixPool` registers itself as
  `model.prompt_pool`).
- Optional `prompt.detach(model)` on a prompt module: called by `unpatch_vit` before the layers are restored.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union, cast

from timm.models.vision_transformer_sam import Attention as SamAttention
from torch import nn

from .gates import NoRGaGate
from .layers import FAMILIES, PrefixAttentionMixin, supported_families

__all__ = [
    "DEFAULT_LAYERS",
    "REFUSED",
    "AttentionLayer",
    "attention_layers",
    "patch_vit",
    "patched_layers",
    "unpatch_vit",
]

#: NoRGa prompts blocks 0-4.
DEFAULT_LAYERS: tuple[int, ...] = (0, 1, 2, 3, 4)

#: Attention-like timm classes norga refuses, with the reason (see docs/families.md).
REFUSED: dict[str, str] = {
    "DiffAttention": "differential attention subtracts two softmax maps; where prompt experts would enter it "
    "(one map, both) is not defined by NoRGa or SMoPE",
    "ParallelScalingBlock": "attention and MLP share one fused input projection; there is no attention module to patch",
    "ParallelThingsBlock": "parallel attention branches summed in one block; not patched",
    "WindowAttention": "windowed attention: the attention batch is samples x windows, so per-sample prompts have "
    "no meaning",
}

_NORGA_ATTRS = ("prefix_gate", "prompt", "backend")

LayerSpec = Union[Sequence[int], str, None]
PromptFactory = Callable[[int, nn.Module], nn.Module | None]


@dataclass(frozen=True)
class AttentionLayer:
    """A global-attention layer found in a model: its index among them, module path and module."""

    index: int
    name: str
    module: nn.Module
    windowed: bool = False


def _is_windowed(model: nn.Module, name: str) -> bool:
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return int(getattr(parent, "window_size", 0) or 0) > 0 and isinstance(model.get_submodule(name), SamAttention)


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The supported (or already patched) attention layers of `model`, in module order.

    Their position in this list is the layer index that `patch_vit(layers=...)` takes.

    Raises:
        TypeError: `model` is not an `nn.Module`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attention_layers expects an nn.Module, got {type(model).__name__}")
    patched = set(FAMILIES.values())
    found: list[AttentionLayer] = []
    for name, module in model.named_modules():
        if type(module) in FAMILIES or type(module) in patched:
            found.append(AttentionLayer(len(found), name, module, _is_windowed(model, name)))
    return found


def patched_layers(model: nn.Module) -> list[AttentionLayer]:
    """The layers of `model` that [`patch_vit`][norga.patch.patch_vit] has patched."""
    patched = set(FAMILIES.values())
    return [layer for layer in attention_layers(model) if type(layer.module) in patched]


def _convert(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A `cls` instance sharing `module`'s parameters, buffers, submodules and attributes."""
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()})
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _select_layers(layers: LayerSpec, found: list[AttentionLayer], default: Sequence[int]) -> list[AttentionLayer]:
    eligible = [layer for layer in found if not layer.windowed]
    if layers is None:
        chosen = [layer for layer in eligible if layer.index in default]
        if len(chosen) < min(len(default), len(eligible)):  # e.g. SAM: its first global blocks instead
            chosen = eligible[: len(default)]
        return chosen
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be a sequence of ints, 'all' or None, got {layers!r}")
        return eligible
    try:
        items = list(layers)
    except TypeError as e:
        raise TypeError(f"layers must be a sequence of ints, 'all' or None, got {type(layers).__name__}") from e
    bad = [i for i in items if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad:
        raise TypeError(f"layers must be a sequence of ints, 'all' or None, got {items!r} (not ints: {bad!r})")
    indices = [int(i) for i in items]
    if len(set(indices)) != len(indices):
        raise ValueError(f"layers has duplicates: {indices}")
    chosen = []
    for i in sorted(indices):
        if not 0 <= i < len(found):
            raise ValueError(
                f"layer index {i} is out of range: the model has {len(found)} attention layers (0..{len(found) - 1})"
            )
        if found[i].windowed:
            raise ValueError(
                f"layer {i} ({found[i].name}) uses windowed attention and cannot be prompted; "
                f"global-attention layers: {[layer.index for layer in eligible]}"
            )
        chosen.append(found[i])
    return chosen


def _no_attention_error(model: nn.Module) -> ValueError:
    refused = sorted(
        {f"{type(m).__name__} ({REFUSED[type(m).__name__]})" for m in model.modules() if type(m).__name__ in REFUSED}
    )
    what = f" It has {'; '.join(refused)}." if refused else ""
    return ValueError(
        f"patch_vit: no supported global attention found in {type(model).__name__}.{what} Searched for "
        f"{', '.join(supported_families())}. Windowed/hierarchical models (Swin, MaxViT, PVT, ...) and CNNs are not "
        "supported."
    )


def patch_vit(
    model: nn.Module,
    *,
    gate: NoRGaGate | nn.Module | str | None = None,
    layers: LayerSpec = None,
    prompt: PromptFactory | None = None,
    backend: str = "auto",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Give a timm ViT prompt experts, in place, and return it.

    Everything is checked and every new module is built before the model changes: a call that raises (a bad
    argument, a factory that fails at some layer) leaves the model as it was.

    Args:
        model: Any timm global-attention ViT (`norga.layers.supported_families()`), built with `pretrained=False`
            or loaded from a local checkpoint before or after patching (the keys do not change).
        gate: Gate on the prefix scores of every patched layer: `None` (linear: plain prefix tuning), an
            activation name (`"tanh"`, `"sigmoid"`, `"gelu"`) or a module such as `NoRGaGate("sigmoid")`. Each
            patched layer gets its own deep copy, i.e. its own `(alpha, tau)`, as the authors run it.
        layers: Indices into [`attention_layers`][norga.patch.attention_layers] (block order) to patch; `None` is
            the prompt factory's `default_layers`, else NoRGa's blocks 0-4 (the first five global-attention layers
            where some are windowed); `"all"` is every global-attention layer.
        prompt: A prompt factory (module docstring): `None` (no prompt; pass `prefix=` to the layers, or attach
            later), a [`PrefixPool`][norga.prompts.PrefixPool] (its `num_layers` must equal the number of
            patched layers; it becomes `model.prompt_pool`), [`smope_factory`][norga.prompts.smope_factory]`()`,
            or any `factory(layer_index, attn) -> nn.Module | None`, e.g.
            `lambda i, attn: norga.PrefixPrompt(length=8, dim=768)`.
        backend: [`prefix_attention`][norga.functional.prefix_attention] backend of the patched layers.
        filter_fn: Optional `filter_fn(module, name) -> bool` to further restrict the patched layers.

    Returns:
        `model`, modified in place.

    Raises:
        TypeError: `model`, `gate`, `layers` or `prompt` of the wrong kind, or a factory that returns something
            other than a module or `None`.
        ValueError: no supported attention in `model` (the message says what the model has and why it is
            refused), a layer index out of range, a windowed layer, an already patched model, an empty selection,
            or a prompt that does not fit (e.g. a pool of another shape or already attached to a model).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_vit expects an nn.Module, got {type(model).__name__}")
    found = attention_layers(model)
    if not found:
        raise _no_attention_error(model)
    if any(type(layer.module) in set(FAMILIES.values()) for layer in found):
        raise ValueError("patch_vit: the model is already patched; call norga.unpatch_vit(model) first")
    if any(layer.name == "" for layer in found):
        raise ValueError("patch_vit expects a model that contains attention layers, not a single attention layer")
    if prompt is not None and not callable(prompt):
        raise TypeError(
            f"prompt must be None, a PrefixPool or a callable factory(layer_index, attn), got {type(prompt).__name__}"
        )
    chosen = _select_layers(layers, found, tuple(getattr(prompt, "default_layers", DEFAULT_LAYERS)))
    if filter_fn is not None:
        chosen = [layer for layer in chosen if filter_fn(layer.module, layer.name)]
    if not chosen:
        raise ValueError("patch_vit: the layer selection is empty")
    if gate is not None and not isinstance(gate, (str, nn.Module)):
        raise TypeError(f"gate must be None, an activation name or an nn.Module, got {type(gate).__name__}")
    prepare = getattr(prompt, "prepare", None)
    if callable(prepare):
        prepare(model, chosen)

    replacements = []
    for layer in chosen:
        module = layer.module
        layer_prompt = prompt(layer.index, module) if prompt is not None else None
        if layer_prompt is not None and not isinstance(layer_prompt, nn.Module):
            raise TypeError(
                f"the prompt factory must return an nn.Module or None, got {type(layer_prompt).__name__} for layer "
                f"{layer.index} ({layer.name})"
            )
        new = _convert(module, FAMILIES[type(module)])
        cast(PrefixAttentionMixin, new)._init_prefix(
            copy.deepcopy(gate) if isinstance(gate, nn.Module) else gate, layer_prompt, backend
        )
        for added in (cast(Any, new).prefix_gate, layer_prompt):  # new prompts and gates follow the layer's mode
            if isinstance(added, nn.Module):
                added.train(module.training)
        replacements.append((layer.name, new))
    for name, new in replacements:
        _replace(model, name, new)
    attach = getattr(prompt, "attach", None)
    if callable(attach):
        attach(model)
    return model


def unpatch_vit(model: nn.Module) -> nn.Module:
    """Restore the original timm attention modules of a patched model, in place, and return it.

    Prompts and gates are dropped (each prompt's optional `detach(model)` runs first: a pool leaves
    `model.prompt_pool`); the backbone's parameters are the same objects.

    Raises:
        TypeError: `model` is not an `nn.Module`.
        ValueError: the model has no patched layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_vit expects an nn.Module, got {type(model).__name__}")
    layers = patched_layers(model)
    if not layers:
        raise ValueError("unpatch_vit: the model has no norga-patched attention layer")
    timm_of = {n: t for t, n in FAMILIES.items()}
    replacements = []
    for layer in layers:
        new = _convert(layer.module, timm_of[type(layer.module)])
        for attr in _NORGA_ATTRS:
            new._modules.pop(attr, None)
            new.__dict__.pop(attr, None)
        replacements.append((layer, new))
    for layer, new in replacements:
        detach = getattr(getattr(layer.module, "prompt", None), "detach", None)
        if callable(detach):
            detach(model)
        _replace(model, layer.name, new)
    return model
