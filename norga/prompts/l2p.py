"""`L2P`: L2P++ in prefix form (the authors' `L2P`, a `DualPrompt` without G-prompt, in `models/zoo.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._checks import check_int
from .query import QueryPrompt, check_even, cosine, keyed_prompts, split_prompt

__all__ = ["L2P", "L2P_DEEP_LAYERS", "PULL_LOSSES"]

L2P_DEEP_LAYERS: tuple[int, ...] = (0, 1, 2, 3, 4)
"""Deep L2P++ prompts blocks 0-4 (the authors' `prompt_param[2] > 0`); shallow L2P++ is `layers=(0,)`."""
#: How the key pull loss pairs queries and keys: `"cross"` as the authors' code, `"own"` per sample.
PULL_LOSSES = ("cross", "own")


def pull_loss(cos: torch.Tensor, idx: torch.Tensor, kind: str) -> torch.Tensor:
    """The key pull loss for cosines `cos` `(B, M)` and selected keys `idx` `(B, K)`.

    `"cross"` is the authors' `(1 - cos_sim[:, k_idx]).sum()`: that indexing is `(B, B, K)`, so every sample's
    cosine with every sample's selected keys is summed; `"own"` sums each sample's own, `(1 - cos[b, idx[b]])`.
    """
    if kind == "cross":
        return (1.0 - cos[:, idx]).sum()
    return (1.0 - cos.gather(1, idx)).sum()


class L2P(QueryPrompt):
    """L2P++: a pool of keyed prompts per layer, the top `K` by cosine with the query, concatenated.

    Per prompted layer, `keys` `(M, key_dim)` and `prompts` `(M, length, dim)` (each prompt's first half of the
    length is the prefix key, the second the value). Each sample takes the `top_k` prompts whose keys have the
    largest cosine with its query, in training and evaluation alike, and their halves concatenated are its
    prefix: `top_k * length / 2` prefix tokens. In training the key pull loss `sum (1 - cos)` over the selected
    keys (the query detached) is the auxiliary loss of each layer, weight 1, as the authors add it.

    Args:
        num_tasks: Number of tasks (L2P does not use task ids; `set_task` only checks the range).
        dim: Width of the prompted layers.
        pool_size: Prompts per layer `M` (the authors' `prompt_param[0]`; CIFAR-100 and ImageNet-R: 30).
        length: Prompt length (`prompt_param[1]`: 20), even.
        top_k: Prompts per sample (the authors' 5).
        layers: Prompted layers: [`L2P_DEEP_LAYERS`][norga.prompts.L2P_DEEP_LAYERS] (blocks 0-4, deep L2P++, the
            authors' `prompt_param[2] > 0`) or `(0,)` (shallow).
        key_dim: Width of the query (default `dim`).
        pull: `"cross"` (the authors' code: every sample's cosine with every sample's selected keys) or `"own"`
            (each sample's own selected keys); see `docs/fidelity.md`.

    Attributes:
        keys: `(layers, M, key_dim)`, U[0, 1) as the authors initialise them.
        prompts: `(layers, M, length, dim)`, U[0, 1).
    """

    def __init__(
        self,
        num_tasks: int,
        dim: int,
        *,
        pool_size: int = 30,
        length: int = 20,
        top_k: int = 5,
        layers: Sequence[int] = L2P_DEEP_LAYERS,
        key_dim: int | None = None,
        pull: str = "cross",
    ) -> None:
        super().__init__(num_tasks, layers, dim, key_dim)
        self.pool_size = check_int("pool_size", pool_size, 1)
        self.length = check_even("length", length)
        self.top_k = check_int("top_k", top_k, 1)
        if top_k > pool_size:
            raise ValueError(f"top_k must be <= pool_size, got top_k={top_k} and pool_size={pool_size}")
        if pull not in PULL_LOSSES:
            raise ValueError(f"pull must be one of {PULL_LOSSES}, got {pull!r}")
        self.pull = pull
        self.prompts, self.keys = keyed_prompts(len(self.layers), pool_size, length, dim, self.key_dim)

    def layer_prefix(self, slot: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The `top_k` prompts of each sample, their halves concatenated: `(B, top_k * length / 2, dim)` each."""
        cos = cosine(query, self.keys[slot])  # (B, M)
        idx = cos.topk(self.top_k, dim=1).indices  # (B, K)
        key, value = split_prompt(self.prompts[slot][idx])  # (B, K, length / 2, dim)
        loss = pull_loss(cos, idx, self.pull) if self.training else None
        return key.flatten(1, 2), value.flatten(1, 2), loss

    def checkpoint_config(self) -> dict[str, Any]:
        """What [`save_prompts`][norga.checkpoint.save_prompts] records and `load_prompts` compares."""
        return {
            **super().checkpoint_config(),
            "pool_size": self.pool_size,
            "length": self.length,
            "top_k": self.top_k,
            "pull": self.pull,
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool_size={self.pool_size}, length={self.length}, top_k={self.top_k}"
