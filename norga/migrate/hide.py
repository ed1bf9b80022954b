"""NoRGa and HiDe-Prompt checkpoints: the E-prompt and NoRGa's gates (layouts in `norga.migrate`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import nn

from .._checks import check_float_tensor
from ..gates import NoRGaGate
from ..patch import DEFAULT_LAYERS, attention_layers, patch_vit
from ..prompts import PrefixPool
from .common import Checkpoint, authors_state_dict, check_heads, checked_head, chosen_layers, copy_head

__all__ = ["act_scale_to_gates", "e_prompt_to_pool", "load_norga_checkpoint"]

Activation = Union[str, Callable[[torch.Tensor], torch.Tensor]]


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
    chosen = chosen_layers(model, layers, DEFAULT_LAYERS, num_layers, "prompts")
    check_heads(model, chosen, int(raw.shape[4]), int(raw.shape[5]), "e_prompt.prompt")
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
    head = checked_head(model, state, ["head"]) if include_head else None
    pool = PrefixPool(num_tasks, num_layers, length, dim)
    with torch.no_grad():
        pool.prompts.copy_(prompts)
    template = None if gates is None else NoRGaGate(activation, learnable=learnable_gates)  # type: ignore[arg-type]
    patch_vit(model, gate=template, layers=chosen, prompt=pool, backend=backend)  # checks all, then changes the model
    if head is not None:
        copy_head(*head)
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
