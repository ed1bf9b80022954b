"""`VQPrompt`: a soft-weighted prompt quantised to its nearest pool prompt (the authors' `VQPrompt`, VQ-Prompt)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .._checks import check_int, check_real
from .query import QueryPrompt, check_even, keyed_prompts, split_prompt

__all__ = ["VQPrompt"]


class VQPrompt(QueryPrompt):
    """VQ-Prompt: `alpha = softmax(query . normalize(K) / temperature)`, `p_a = sum_m alpha_m P_m`, quantised.

    Per prompted layer, `keys` `(M, key_dim)` and `prompts` `(M, length, dim)`. Each sample's soft prompt `p_a`
    is replaced, in the forward, by the pool prompt `q` nearest to it in squared distance, with the
    straight-through estimator `p_a + (q - p_a).detach()`, so the gradient reaches the keys through `alpha`.
    The query is not normalised (as in the authors' code). In training the auxiliary loss of each layer is
    `vq_coef * mse(p_a, sg(q)) + commit_coef * mse(q, sg(p_a))`.

    Args:
        num_tasks: Number of tasks (VQ-Prompt does not use task ids; `set_task` only checks the range).
        dim: Width of the prompted layers.
        pool_size: Prompts per layer `M` (the authors' `prompt_param[0]`: 10).
        length: Prompt length (`prompt_param[1]`: 8), even.
        temperature: Softmax temperature (`prompt_param[2]`: 1).
        vq_coef: Weight of `mse(p_a, sg(q))` (the authors' 0.4).
        commit_coef: Weight of `mse(q, sg(p_a))` (the authors' 0.1).
        layers: Prompted layers (the authors' blocks 0-4).
        key_dim: Width of the query (default `dim`).

    Attributes:
        keys: `(layers, M, key_dim)`, U[0, 1) as the authors initialise them.
        prompts: `(layers, M, length, dim)`, U[0, 1).
    """

    def __init__(
        self,
        num_tasks: int,
        dim: int,
        *,
        pool_size: int = 10,
        length: int = 8,
        temperature: float = 1.0,
        vq_coef: float = 0.4,
        commit_coef: float = 0.1,
        layers: Sequence[int] = (0, 1, 2, 3, 4),
        key_dim: int | None = None,
    ) -> None:
        super().__init__(num_tasks, layers, dim, key_dim)
        self.pool_size = check_int("pool_size", pool_size, 1)
        self.length = check_even("length", length)
        self.temperature = check_real("temperature", temperature, positive=True)
        self.vq_coef = check_real("vq_coef", vq_coef, minimum=0.0)
        self.commit_coef = check_real("commit_coef", commit_coef, minimum=0.0)
        self.prompts, self.keys = keyed_prompts(len(self.layers), pool_size, length, dim, self.key_dim)

    def layer_prefix(self, slot: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The quantised prompt of each sample, split: `(B, length / 2, dim)` each."""
        p = self.prompts[slot]  # (M, length, dim)
        alpha = torch.softmax((query @ F.normalize(self.keys[slot], dim=1).t()) / self.temperature, dim=1)
        soft = torch.einsum("bk,kld->bld", alpha, p)  # (B, length, dim)
        nearest = (soft.unsqueeze(1) - p).pow(2).sum(-1).sum(-1).argmin(dim=1)  # (B,): squared distance, as theirs
        hard = p.index_select(0, nearest)
        prompt = soft + (hard - soft).detach()
        loss = None
        if self.training:
            loss = self.vq_coef * F.mse_loss(soft, hard.detach()) + self.commit_coef * F.mse_loss(hard, soft.detach())
        key, value = split_prompt(prompt)
        return key, value, loss

    def checkpoint_config(self) -> dict[str, Any]:
        """What [`save_prompts`][norga.checkpoint.save_prompts] records and `load_prompts` compares."""
        return {
            **super().checkpoint_config(),
            "pool_size": self.pool_size,
            "length": self.length,
            "temperature": self.temperature,
            "vq_coef": self.vq_coef,
            "commit_coef": self.commit_coef,
        }

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, pool_size={self.pool_size}, length={self.length}, "
            f"temperature={self.temperature:g}"
        )
