"""`DualPrompt`: a shared G-prompt on the first layers and keyed E-prompts on the next (the authors' `DualPrompt`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_int
from .query import QueryPrompt, check_even, check_layers, cosine, keyed_prompts, split_prompt, uniform_

__all__ = ["DualPrompt"]


class DualPrompt(QueryPrompt):
    """DualPrompt: a G-prompt shared by every sample, and per-task E-prompts chosen by their keys.

    - On each layer of `g_layers`, one prompt `g_prompts` `(g_length, dim)` for every sample.
    - On each layer of `e_layers`, `e_keys` `(M, key_dim)` and `e_prompts` `(M, e_length, dim)`. In evaluation each
      sample takes the E-prompt whose key has the largest cosine with its query (top-1). In training it takes the
      E-prompt of the active task (the authors' `task_id_bootstrap`), and the auxiliary loss of each E-layer is the
      pull `sum_b (1 - cos[b, task])` of that task's key towards the queries (detached), weight 1.
    - A layer in both lists gets the E-prefix followed by the G-prefix, as the authors concatenate them.

    Args:
        num_tasks: Number of tasks; the training task must be `< pool_size`.
        dim: Width of the prompted layers.
        pool_size: E-prompts per layer `M` (the authors' `prompt_param[0]`, the number of tasks: 10 for CIFAR-100).
        e_length: E-prompt length (`prompt_param[1]`: 20), even.
        g_length: G-prompt length (`prompt_param[2]`: 6), even.
        g_layers: Layers of the G-prompt (the authors' blocks 0-1).
        e_layers: Layers of the E-prompts (the authors' blocks 2-4).
        key_dim: Width of the query (default `dim`).

    Attributes:
        g_prompts: `(len(g_layers), g_length, dim)`, U[0, 1) as the authors initialise them.
        e_prompts: `(len(e_layers), M, e_length, dim)`, U[0, 1).
        e_keys: `(len(e_layers), M, key_dim)`, U[0, 1).
    """

    def __init__(
        self,
        num_tasks: int,
        dim: int,
        *,
        pool_size: int = 10,
        e_length: int = 20,
        g_length: int = 6,
        g_layers: Sequence[int] = (0, 1),
        e_layers: Sequence[int] = (2, 3, 4),
        key_dim: int | None = None,
    ) -> None:
        g, e = check_layers("g_layers", g_layers), check_layers("e_layers", e_layers)
        if not e:
            raise ValueError("e_layers must name at least one layer")
        super().__init__(num_tasks, sorted(set(g) | set(e)), dim, key_dim)
        self.g_layers, self.e_layers = g, e
        self.pool_size = check_int("pool_size", pool_size, 1)
        self.e_length = check_even("e_length", e_length)
        self.g_length = check_even("g_length", g_length)
        self.g_prompts = nn.Parameter(torch.empty(len(g), g_length, dim))
        uniform_(*self.g_prompts)  # the authors' order: the G-prompts, then each E-layer's prompts and keys
        self.e_prompts, self.e_keys = keyed_prompts(len(e), pool_size, e_length, dim, self.key_dim)

    def check_task(self, task: object) -> int:
        """A task id, which in training selects the E-prompt: also `< pool_size`."""
        t = super().check_task(task)
        if t >= self.pool_size:
            raise ValueError(f"DualPrompt: task {t} has no E-prompt (pool_size={self.pool_size}); give pool_size > {t}")
        return t

    def layer_prefix(self, slot: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The E-prefix (`e_length / 2` tokens) and/or the G-prefix (`g_length / 2`) of layer `slot`."""
        layer = self.layers[slot]
        keys, values, loss = [], [], None
        if layer in self.e_layers:
            i = self.e_layers.index(layer)
            cos = cosine(query, self.e_keys[i])  # (B, M)
            if self.training:
                p = self.e_prompts[i, self.task].expand(query.shape[0], -1, -1)
                loss = (1.0 - cos[:, self.task]).sum()
            else:
                p = self.e_prompts[i][cos.topk(1, dim=1).indices[:, 0]]  # top-1 per sample
            k, v = split_prompt(p)
            keys.append(k)
            values.append(v)
        if layer in self.g_layers:
            k, v = split_prompt(self.g_prompts[self.g_layers.index(layer)].expand(query.shape[0], -1, -1))
            keys.append(k)
            values.append(v)
        if len(keys) == 1:
            return keys[0], values[0], loss
        return torch.cat(keys, dim=1), torch.cat(values, dim=1), loss

    def checkpoint_config(self) -> dict[str, Any]:
        """What [`save_prompts`][norga.checkpoint.save_prompts] records and `load_prompts` compares."""
        return {
            **super().checkpoint_config(),
            "pool_size": self.pool_size,
            "e_length": self.e_length,
            "g_length": self.g_length,
            "g_layers": list(self.g_layers),
            "e_layers": list(self.e_layers),
        }

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, pool_size={self.pool_size}, e_length={self.e_length}, g_length={self.g_length}, "
            f"g_layers={list(self.g_layers)}, e_layers={list(self.e_layers)}"
        )
