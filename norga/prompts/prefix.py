"""`PrefixPrompt`: one learnable prefix for one layer, shared by every sample."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import check_int, refuse_torchscript
from ..functional import Prefix, prefix_heads
from ..layers import attention_width

__all__ = ["PrefixPrompt", "check_widths", "init_prompt_"]


def check_widths(kind: str, dim: int, layers: Any) -> None:
    """Each of the `AttentionLayer`s `patch_vit` is about to patch has width `dim`; `kind` names the prompt.

    Raises:
        ValueError: a layer of another width.
    """
    for layer in layers:
        if attention_width(layer.module) != dim:
            raise ValueError(
                f"the {kind} has dim={dim} but layer {layer.index} ({layer.name}) has width "
                f"{attention_width(layer.module)}"
            )


def init_prompt_(t: torch.Tensor, init: str) -> None:
    """`"uniform"`: U(-1, 1), as the NoRGa authors initialise prompts; `"zeros"`: zeros. In place.

    Raises:
        ValueError: another `init`.
    """
    if init not in ("uniform", "zeros"):
        raise ValueError(f"init must be 'uniform' or 'zeros', got {init!r}")
    with torch.no_grad():
        t.uniform_(-1.0, 1.0) if init == "uniform" else t.zero_()


class PrefixPrompt(nn.Module):
    """One learnable prefix `(key, value)` of shape `(length, dim)`, shared by the batch.

    Give one per layer with a factory: `patch_vit(model, prompt=lambda i, attn: PrefixPrompt(8, 768))`.

    Args:
        length: Number of prompt experts `L`.
        dim: Width `num_heads * head_dim` of the layer.
        init: `"uniform"` draws U(-1, 1) as the NoRGa authors do; `"zeros"` starts at zero.
    """

    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, length: int, dim: int, init: str = "uniform") -> None:
        super().__init__()
        check_int("length", length, 1)
        check_int("dim", dim, 1)
        self.prompt = nn.Parameter(torch.empty(2, length, dim))
        init_prompt_(self.prompt, init)

    def forward(self, q: torch.Tensor) -> Prefix:
        """The prefix in head space `(1, H, L, D)`, the heads taken from the queries `q` `(B, H, N, D)`."""
        return Prefix(prefix_heads(self.prompt[0].unsqueeze(0), q), prefix_heads(self.prompt[1].unsqueeze(0), q))

    def checkpoint_config(self) -> dict[str, Any]:
        """What [`save_prompts`][norga.checkpoint.save_prompts] records and `load_prompts` compares."""
        _, length, dim = self.prompt.shape
        return {"kind": "PrefixPrompt", "length": int(length), "dim": int(dim)}

    def extra_repr(self) -> str:
        _, length, dim = self.prompt.shape
        return f"length={length}, dim={dim}"
