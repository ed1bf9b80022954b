"""SMoPE checkpoints: the authors' per-expert keys and values (layout in `norga.migrate`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .._checks import check_float_tensor
from ..patch import attention_layers, patch_vit
from ..prompts import SMoPE, smope_factory
from .common import Checkpoint, authors_state_dict, check_heads, checked_head, chosen_layers, copy_head

__all__ = ["load_smope_checkpoint", "smope_experts"]

_SMOPE_KEY = re.compile(r"^(?P<prefix>.*?)e_p(?P<kv>[kv])_(?P<layer>\d+)_(?P<expert>\d+)_(?P<head>\d+)$")


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
    chosen = chosen_layers(model, layers, (0, 1, 2, 3, 4, 5), len(src_layers), "SMoPE experts")
    check_heads(model, chosen, heads, head_dim, "the SMoPE checkpoint")
    head = checked_head(model, state, ["last", "head"]) if include_head else None
    patch_vit(
        model,
        layers=chosen,
        prompt=smope_factory(num_experts=num_experts, top_k=top_k, noise_eps=noise_eps),
        backend=backend,
    )  # checks all, then changes the model
    if head is not None:
        copy_head(*head)
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
