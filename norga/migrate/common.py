"""What the migrations share: reading an authors' checkpoint, checking the model against it, the head."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from .._checks import check_float_tensor
from ..patch import attention_layers

__all__ = ["Checkpoint", "authors_state_dict", "check_heads", "checked_head", "chosen_layers", "copy_head"]

Checkpoint = Union[str, "os.PathLike[str]", Mapping[str, Any]]


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


def chosen_layers(
    model: nn.Module, layers: Sequence[int] | None, default: Sequence[int], count: int, what: str
) -> list[int]:
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


def check_heads(model: nn.Module, layers: list[int], heads: int, head_dim: int, what: str) -> None:
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


def checked_head(
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
def copy_head(head: nn.Linear, w: torch.Tensor, b: torch.Tensor | None) -> None:
    head.weight.copy_(w)
    if b is not None and head.bias is not None:
        head.bias.copy_(b)
