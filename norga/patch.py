"""Patching stock timm ViTs in place: :func:`patch_vit` and :func:`unpatch_vit`.

``patch_vit`` swaps the attention modules of chosen blocks for norga subclasses of the *same* timm
classes. The new module shares the old one's parameters, buffers and submodules (so weights,
``state_dict`` keys, ``fused_attn``, qk-norm, scale-norm, rope and relative-position behaviour are kept)
and adds a ``prefix_gate`` and a ``prompt``. With no prompt, a patched layer runs timm's own forward.

Supported families (exact class match, so subclasses with other forwards are never mis-patched):

=========================================================  ==========================================
timm class                                                 norga class
=========================================================  ==========================================
``timm.layers.Attention`` (vit, deit, dinov2, clip, ...)    :class:`norga.PrefixMoEAttention`
``timm.layers.AttentionRope`` (vit_*_rope, pe_core)         :class:`PrefixAttentionRope`
``timm.models.eva.EvaAttention`` (eva02; fused/unfused)     :class:`PrefixEvaAttention`
``timm.models.beit.Attention`` (relative position bias)     :class:`PrefixBeitAttention`
``timm.models.vision_transformer_relpos.RelPosAttention``   :class:`PrefixRelPosAttention`
``timm.models.vision_transformer_sam.Attention``            :class:`PrefixSamAttention` (global blocks)
=========================================================  ==========================================
"""

from __future__ import annotations

import copy
import importlib
import numbers
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union, cast

import torch
from torch import nn

from .attention import PrefixAttentionMixin, PrefixMoEAttention, _TimmAttention
from .functional import PrefixLike, merge_heads, split_heads, split_qkv
from .gates import NoRGaGate
from .prompts import PrefixPool

__all__ = [
    "patch_vit",
    "unpatch_vit",
    "attention_layers",
    "patched_layers",
    "supported_families",
    "PrefixAttentionRope",
    "PrefixEvaAttention",
    "PrefixBeitAttention",
    "PrefixRelPosAttention",
    "PrefixSamAttention",
    "DEFAULT_LAYERS",
]

#: NoRGa prompts blocks 0-4.
DEFAULT_LAYERS: tuple[int, ...] = (0, 1, 2, 3, 4)

_NORGA_ATTRS = ("prefix_gate", "prompt", "backend")
POOL_NAME = "prompt_pool"


def _timm_class(module: str, name: str) -> type | None:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # pragma: no cover - depends on the installed timm
        return None


_AttentionRope = _timm_class("timm.layers", "AttentionRope")
_EvaAttention = _timm_class("timm.models.eva", "EvaAttention")
_BeitAttention = _timm_class("timm.models.beit", "Attention")
_RelPosAttention = _timm_class("timm.models.vision_transformer_relpos", "RelPosAttention")
_SamAttention = _timm_class("timm.models.vision_transformer_sam", "Attention")


def _rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor | None, npt: int, half: bool):
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    if rope is None:
        return q, k
    q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    return q, k


def _output(self: Any, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The common tail: merge heads, scale-norm, timm's output gate, projection, dropout."""
    o = self.norm(merge_heads(o))
    if getattr(self, "gate", None) is not None:
        o = o * self.gate(x).sigmoid()
    return self.proj_drop(self.proj(o))


if _AttentionRope is not None:

    class PrefixAttentionRope(PrefixAttentionMixin, _AttentionRope):  # type: ignore[misc,valid-type]
        """timm ``AttentionRope`` with prompt experts. Rope is applied to tokens only, never to the prefix."""

        def forward(
            self,
            x: torch.Tensor,
            rope: Optional[torch.Tensor] = None,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            prefix: PrefixLike | None = None,
        ) -> torch.Tensor:
            if prefix is None and self.prompt is None:
                return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
            if self.qkv is not None:
                q, k, v = split_qkv(self.qkv(x), self.num_heads)
            else:
                q = split_heads(self.q_proj(x), self.num_heads)
                k = split_heads(self.k_proj(x), self.num_kv_heads)
                v = split_heads(self.v_proj(x), self.num_kv_heads)
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = _rope(q, k, v, rope, self.num_prefix_tokens, getattr(self, "rotate_half", False))
            groups = getattr(self, "num_kv_groups", 1)
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            return _output(self, self._attend(q, k, v, prefix, attn_mask, is_causal), x)

else:  # pragma: no cover
    PrefixAttentionRope = None  # type: ignore[assignment,misc]


if _EvaAttention is not None:

    class PrefixEvaAttention(PrefixAttentionMixin, _EvaAttention):  # type: ignore[misc,valid-type]
        """timm ``EvaAttention`` (fused or unfused qkv, rope) with prompt experts."""

        def forward(
            self,
            x: torch.Tensor,
            rope: Optional[torch.Tensor] = None,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            prefix: PrefixLike | None = None,
        ) -> torch.Tensor:
            if prefix is None and self.prompt is None:
                return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
            if self.qkv is not None:
                if self.q_bias is None:
                    qkv = self.qkv(x)
                else:
                    qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                    if self.qkv_bias_separate:
                        qkv = self.qkv(x) + qkv_bias
                    else:
                        qkv = nn.functional.linear(x, weight=self.qkv.weight, bias=qkv_bias)
                q, k, v = split_qkv(qkv, self.num_heads)
            else:
                q = split_heads(self.q_proj(x), self.num_heads)
                k = split_heads(self.k_proj(x), self.num_heads)
                v = split_heads(self.v_proj(x), self.num_heads)
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = _rope(q, k, v, rope, self.num_prefix_tokens, getattr(self, "rotate_half", False))
            return _output(self, self._attend(q, k, v, prefix, attn_mask, is_causal), x)

else:  # pragma: no cover
    PrefixEvaAttention = None  # type: ignore[assignment,misc]


if _BeitAttention is not None:

    class PrefixBeitAttention(PrefixAttentionMixin, _BeitAttention):  # type: ignore[misc,valid-type]
        """timm BEiT ``Attention`` (relative position bias) with prompt experts.

        The relative position bias covers token-token scores only; prefix columns get none.
        """

        def forward(
            self,
            x: torch.Tensor,
            shared_rel_pos_bias: Optional[torch.Tensor] = None,
            prefix: PrefixLike | None = None,
        ) -> torch.Tensor:
            if prefix is None and self.prompt is None:
                return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                if self.qkv_bias_separate:
                    qkv = self.qkv(x) + qkv_bias
                else:
                    qkv = nn.functional.linear(x, weight=self.qkv.weight, bias=qkv_bias)
            q, k, v = split_qkv(qkv, self.num_heads)
            bias = None
            if self.relative_position_bias_table is not None:
                bias = self._get_rel_pos_bias()
            if shared_rel_pos_bias is not None:
                bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
            return self.proj_drop(self.proj(merge_heads(self._attend(q, k, v, prefix, bias))))

else:  # pragma: no cover
    PrefixBeitAttention = None  # type: ignore[assignment,misc]


if _RelPosAttention is not None:

    class PrefixRelPosAttention(PrefixAttentionMixin, _RelPosAttention):  # type: ignore[misc,valid-type]
        """timm ``RelPosAttention`` with prompt experts (the relative bias covers token columns only)."""

        def forward(
            self,
            x: torch.Tensor,
            shared_rel_pos: Optional[torch.Tensor] = None,
            prefix: PrefixLike | None = None,
        ) -> torch.Tensor:
            if prefix is None and self.prompt is None:
                return super().forward(x, shared_rel_pos=shared_rel_pos)
            q, k, v = split_qkv(self.qkv(x), self.num_heads)
            q, k = self.q_norm(q), self.k_norm(k)
            # As timm's fused path: the layer's own relative bias, else the shared one.
            bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
            return self.proj_drop(self.proj(merge_heads(self._attend(q, k, v, prefix, bias))))

else:  # pragma: no cover
    PrefixRelPosAttention = None  # type: ignore[assignment,misc]


if _SamAttention is not None:

    class PrefixSamAttention(PrefixAttentionMixin, _SamAttention):  # type: ignore[misc,valid-type]
        """timm SAM ViT ``Attention`` (decomposed relative position or rope) with prompt experts.

        Input and output are ``(B, H, W, C)`` as in timm. Only global-attention blocks can be prompted:
        in windowed blocks the attention batch is ``B * windows`` and per-sample prefixes have no meaning.
        """

        def forward(self, x: torch.Tensor, prefix: PrefixLike | None = None) -> torch.Tensor:
            if prefix is None and self.prompt is None:
                return super().forward(x)
            from timm.layers.pos_embed_sincos import apply_rot_embed_cat
            from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

            B, H, W, _ = x.shape
            tokens = x.reshape(B, H * W, -1)
            q, k, v = (t.flatten(0, 1) for t in split_qkv(self.qkv(tokens), self.num_heads))  # (B * H, N, D)
            q, k = self.q_norm(q), self.k_norm(k)
            bias = None
            if self.use_rel_pos:
                bias = get_decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
                bias = bias.unflatten(0, (B, -1))
            elif self.rope is not None:
                rope = self.rope.get_embed()
                q = apply_rot_embed_cat(q, rope).type_as(v)
                k = apply_rot_embed_cat(k, rope).type_as(v)
            q, k, v = (t.unflatten(0, (B, -1)) for t in (q, k, v))
            o = self.proj_drop(self.proj(merge_heads(self._attend(q, k, v, prefix, bias))))
            return o.view(B, H, W, -1)

else:  # pragma: no cover
    PrefixSamAttention = None  # type: ignore[assignment,misc]


def _families() -> dict[type, type]:
    pairs = [
        (_TimmAttention, PrefixMoEAttention),
        (_AttentionRope, PrefixAttentionRope),
        (_EvaAttention, PrefixEvaAttention),
        (_BeitAttention, PrefixBeitAttention),
        (_RelPosAttention, PrefixRelPosAttention),
        (_SamAttention, PrefixSamAttention),
    ]
    return {timm_cls: norga_cls for timm_cls, norga_cls in pairs if timm_cls is not None}


FAMILIES: dict[type, type] = _families()


def supported_families() -> dict[str, str]:
    """``{timm class path: norga class name}`` for the families this timm install supports."""
    return {f"{t.__module__}.{t.__qualname__}": n.__name__ for t, n in FAMILIES.items()}


@dataclass(frozen=True)
class AttentionLayer:
    """A global-attention layer found in a model: its index among them, module path and module."""

    index: int
    name: str
    module: nn.Module
    windowed: bool = False


def _is_windowed(model: nn.Module, name: str) -> bool:
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return (
        int(getattr(parent, "window_size", 0) or 0) > 0
        and _SamAttention is not None
        and isinstance(model.get_submodule(name), _SamAttention)
    )


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The supported (or already patched) attention layers of ``model``, in module order.

    Their position in this list is the layer index that ``patch_vit(layers=...)`` takes.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
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
    """The layers of ``model`` that :func:`patch_vit` has patched."""
    patched = set(FAMILIES.values())
    return [layer for layer in attention_layers(model) if type(layer.module) in patched]


#: Attention-like timm classes norga refuses, with the reason (see docs/families.md).
REFUSED: dict[str, str] = {
    "DiffAttention": "differential attention subtracts two softmax maps; where prompt experts would enter it "
    "(one map, both) is not defined by NoRGa or SMoPE",
    "ParallelScalingBlock": "attention and MLP share one fused input projection; there is no attention module to patch",
    "ParallelThingsBlock": "parallel attention branches summed in one block; not patched",
    "WindowAttention": "windowed attention: the attention batch is samples x windows, so per-sample prompts have "
    "no meaning",
}


def _refusal(module: nn.Module) -> str | None:
    return REFUSED.get(type(module).__name__)


def _convert(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s parameters, buffers, submodules and attributes."""
    new = cls.__new__(cls)
    state = {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()}
    new.__dict__.update(state)
    return new


def _width(module: nn.Module) -> int:
    """The attention width ``num_heads * head_dim`` (the width of a prefix vector)."""
    qkv = getattr(module, "qkv", None)
    if qkv is not None:
        return int(qkv.weight.shape[0]) // 3
    q_proj = cast(nn.Linear, module.q_proj)
    return int(q_proj.weight.shape[0])


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# the model each PrefixPool was attached to by patch_vit (kept out of the pool: a weakref does not pickle)
_POOL_OWNERS: "weakref.WeakKeyDictionary[PrefixPool, weakref.ref[nn.Module]]" = weakref.WeakKeyDictionary()

LayerSpec = Union[Sequence[int], str, None]
PromptSpec = Union[PrefixPool, Callable[[int, nn.Module], Optional[nn.Module]], None]


def _select_layers(
    layers: LayerSpec, found: list[AttentionLayer], default: Sequence[int] = DEFAULT_LAYERS
) -> list[AttentionLayer]:
    eligible = [layer for layer in found if not layer.windowed]
    if layers is None:
        chosen = [layer for layer in eligible if layer.index in default]
        if len(chosen) < min(len(default), len(eligible)):  # e.g. SAM: first global blocks instead
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
        raise ValueError(f"layers has duplicates: {list(layers)}")
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


def patch_vit(
    model: nn.Module,
    *,
    gate: NoRGaGate | nn.Module | str | None = None,
    layers: LayerSpec = None,
    prompt: PromptSpec = None,
    backend: str = "auto",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Give a timm ViT prompt experts, in place, and return it.

    Args:
        model: Any timm global-attention ViT (see :func:`supported_families`), built with
            ``pretrained=False`` or loaded from a local checkpoint before or after patching (keys do not
            change).
        gate: Gate on the prefix scores of every patched layer: ``None`` (linear: plain prefix tuning),
            an activation name (``"tanh"``, ``"sigmoid"``, ``"gelu"``) or a module such as
            ``NoRGaGate("sigmoid")``. Each patched layer gets its own deep copy, i.e. its own
            ``(alpha, tau)``, as the authors run it.
        layers: Indices into :func:`attention_layers` (block order) to patch and prompt; ``None`` is
            NoRGa's blocks 0-4 (the first five global-attention layers where some are windowed), or the
            prompt factory's ``default_layers`` (blocks 0-5 for :func:`norga.smope_factory`);
            ``"all"`` patches every global-attention layer.
        prompt: Where each patched layer's prefix comes from:

            * ``None``: no prompt attached (pass ``prefix=`` to the layers yourself, or attach later);
            * a :class:`norga.PrefixPool` with ``num_layers == len(layers)``: registered on the model as
              ``model.prompt_pool``; layer ``j`` of the selection reads slice ``j``; choose tasks with
              :func:`norga.set_task`;
            * a callable ``factory(layer_index, attn_module) -> nn.Module | None``, e.g.
              :func:`norga.smope_factory` (an SMoPE per layer, sized from the layer) or
              ``lambda i, attn: norga.PrefixPrompt(length=8, dim=768)``.
        backend: Prefix-attention backend of the patched layers (see :mod:`norga.functional`).
        filter_fn: Optional ``filter_fn(module, name) -> bool`` to further restrict the patched layers.

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: no supported attention in ``model`` (the message names the classes searched for), a
            layer index out of range, a windowed layer, an already patched model, or a pool whose shape
            does not match the selection.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_vit expects an nn.Module, got {type(model).__name__}")
    found = attention_layers(model)
    if not found:
        searched = ", ".join(supported_families())
        refused = sorted({f"{type(m).__name__} ({why})" for m in model.modules() for why in [_refusal(m)] if why})
        what = f" It has {'; '.join(refused)}." if refused else ""
        raise ValueError(
            f"patch_vit: no supported global attention found in {type(model).__name__}.{what} Searched for "
            f"{searched}. Windowed/hierarchical models (Swin, MaxViT, PVT, ...) and CNNs are not supported."
        )
    if any(type(layer.module) in set(FAMILIES.values()) for layer in found):
        raise ValueError("patch_vit: the model is already patched; call norga.unpatch_vit(model) first")
    if any(layer.name == "" for layer in found):
        raise ValueError("patch_vit expects a model that contains attention layers, not a single attention layer")
    default = tuple(getattr(prompt, "default_layers", DEFAULT_LAYERS))  # SMoPE factories: blocks 0-5
    chosen = _select_layers(layers, found, default)
    if filter_fn is not None:
        chosen = [layer for layer in chosen if filter_fn(layer.module, layer.name)]
    if not chosen:
        raise ValueError("patch_vit: the layer selection is empty")
    if isinstance(prompt, PrefixPool):
        if prompt.num_layers != len(chosen):
            raise ValueError(
                f"the PrefixPool has num_layers={prompt.num_layers} but {len(chosen)} layers are patched "
                f"({[layer.index for layer in chosen]})"
            )
        if hasattr(model, POOL_NAME):
            raise ValueError(f"the model already has an attribute {POOL_NAME!r}")
    elif prompt is not None and not callable(prompt):
        raise TypeError(
            f"prompt must be None, a PrefixPool or a callable factory(layer_index, attn), got {type(prompt).__name__}"
        )
    if gate is not None and not isinstance(gate, (str, nn.Module)):
        raise TypeError(f"gate must be None, an activation name or an nn.Module, got {type(gate).__name__}")

    if isinstance(prompt, PrefixPool):
        owner = _POOL_OWNERS.get(prompt)
        if owner is not None and getattr(owner(), POOL_NAME, None) is prompt:
            raise ValueError(
                "patch_vit: this PrefixPool is already attached to another model (its prompt_pool); one pool "
                "serves one model, or training one would change the other. Give each model its own pool "
                "(copy.deepcopy(pool) copies the prompts), or unpatch_vit the other model first"
            )
        for layer in chosen:
            if _width(layer.module) != prompt.dim:
                raise ValueError(
                    f"the PrefixPool has dim={prompt.dim} but layer {layer.index} ({layer.name}) has width "
                    f"{_width(layer.module)}"
                )

    # Build every new module before changing the model: a factory or gate that raises leaves it untouched.
    replacements = []
    for j, layer in enumerate(chosen):
        module = layer.module
        if isinstance(prompt, PrefixPool):
            layer_prompt: nn.Module | None = prompt.layer(j)
        elif prompt is not None:
            layer_prompt = prompt(layer.index, module)
            if layer_prompt is not None and not isinstance(layer_prompt, nn.Module):
                raise TypeError(
                    f"the prompt factory must return an nn.Module or None, got {type(layer_prompt).__name__} "
                    f"for layer {layer.index} ({layer.name})"
                )
        else:
            layer_prompt = None
        new = _convert(module, FAMILIES[type(module)])
        layer_gate = copy.deepcopy(gate) if isinstance(gate, nn.Module) else gate
        cast(PrefixAttentionMixin, new)._init_prefix(layer_gate, layer_prompt, backend)
        for added in (new.prefix_gate, new.prompt):  # new prompts and gates follow the layer's mode
            if isinstance(added, nn.Module):
                added.train(module.training)
        replacements.append((layer.name, new))
    for name, new in replacements:
        _replace(model, name, new)
    if isinstance(prompt, PrefixPool):
        prompt.train(model.training)
        model.add_module(POOL_NAME, prompt)
        _POOL_OWNERS[prompt] = weakref.ref(model)
    return model


def unpatch_vit(model: nn.Module) -> nn.Module:
    """Restore the original timm attention modules of a patched model (in place) and return it.

    Prompts, gates and the prompt pool are dropped; the backbone's parameters are the same objects.

    Raises:
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
        old = layer.module
        new = _convert(old, timm_of[type(old)])
        for attr in _NORGA_ATTRS:
            new._modules.pop(attr, None)
            new.__dict__.pop(attr, None)
        replacements.append((layer.name, new))
    for name, new in replacements:
        _replace(model, name, new)
    pool = getattr(model, POOL_NAME, None)
    if isinstance(pool, PrefixPool):
        delattr(model, POOL_NAME)
        _POOL_OWNERS.pop(pool, None)
    return model
