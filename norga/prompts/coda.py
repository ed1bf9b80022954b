"""`CODAPrompt`: prompt components weighted by query attention (the authors' `CodaPrompt`, CODA-Prompt)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_real
from .query import QueryPrompt, check_even, split_prompt, uniform_

__all__ = ["CODAPrompt", "gram_schmidt_", "ortho_penalty"]


def ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    """`mean((t t^T - I)^2)` for `t` `(M, n)`: the authors' orthogonality penalty."""
    return ((t @ t.t() - torch.eye(t.shape[0], device=t.device, dtype=t.dtype)) ** 2).mean()


@torch.no_grad()
def gram_schmidt_(v: torch.Tensor, start: int, stop: int) -> None:
    """Draw rows `[start, stop)` of `v` `(M, ...)` anew, orthogonal to the rows before them, in place.

    The authors' `gram_schmidt`: for each new row `k` a vector `r ~ N(0, I)` (`torch.randn`, in row order, from
    the global generator) less its projections `(r . u_j) / (u_j . u_j) u_j` on every earlier row `u_j` (the
    kept rows `< start` as they are, and the new rows before `k`, not yet normalised), then every new row
    normalised; rows from `stop` on become 0.

    Raises:
        ValueError: an earlier row is 0 (`u . u < 1e-8`): nothing is orthogonal to project on (the authors' code
            loops for ever there); `v` is unchanged.
    """
    flat = v.reshape(v.shape[0], -1)
    norms = (flat[:start] * flat[:start]).sum(dim=1)
    if bool((norms < 1e-8).any()):
        bad = int((norms < 1e-8).nonzero()[0, 0])
        raise ValueError(f"Gram-Schmidt: component {bad} is zero (squared norm < 1e-8); nothing to project on")
    out = torch.zeros_like(flat)
    out[:start] = flat[:start]
    for k in range(start, stop):
        r = torch.randn(flat.shape[1], dtype=flat.dtype, device=flat.device)
        u = out[:k]
        coef = (u @ r) / (u * u).sum(dim=1)  # (k,)
        out[k] = r - coef @ u
    out[start:stop] /= out[start:stop].norm(dim=1, keepdim=True)
    flat.copy_(out)


class CODAPrompt(QueryPrompt):
    """CODA-Prompt: per layer, components `P_m` with keys `K_m` and attention vectors `A_m`, split over tasks.

    Task `t` owns components `[t * M / T, (t + 1) * M / T)`. With `f = (t + 1) * M / T` for the active task `t`, a
    sample's prompt is `sum_{m < f} alpha_m P_m`, `alpha_m = cos(query * A_m, K_m)` (the query masked by the
    attention vector, then both normalised); its first half of the length is the prefix key, the second the
    value. In training the components of earlier tasks are detached and, with `ortho_mu > 0`, the auxiliary
    loss of each layer is `ortho_mu * (pen(K) + pen(A) + pen(P))` over the `f` components
    ([`ortho_penalty`][norga.prompts.coda.ortho_penalty]). Task 0's components are drawn by Gram-Schmidt when the
    module is built, and those of task `t` when `set_task` first makes `t` active (the authors'
    `process_task_count`), orthogonal to the earlier ones; later components stay 0 until their task starts.

    Args:
        num_tasks: `T`.
        dim: Width of the prompted layers.
        pool_size: Components per layer `M` (`prompt_param[0]`: 100); at least `num_tasks`.
        length: Prompt length (`prompt_param[1]`: 8), even.
        ortho_mu: Weight of the orthogonality penalty (`prompt_param[2]`: 0.0 in the authors' current scripts for
            CIFAR-100 and ImageNet-R; 0.1 in their first release for CIFAR-100).
        layers: Prompted layers (the authors' blocks 0-4).
        key_dim: Width of the query (default `dim`).

    Attributes:
        prompts: `(layers, M, length, dim)`.
        keys: `(layers, M, key_dim)`.
        attention: `(layers, M, key_dim)`.
        started: Number of tasks whose components have been drawn.
    """

    def __init__(
        self,
        num_tasks: int,
        dim: int,
        *,
        pool_size: int = 100,
        length: int = 8,
        ortho_mu: float = 0.0,
        layers: Sequence[int] = (0, 1, 2, 3, 4),
        key_dim: int | None = None,
    ) -> None:
        super().__init__(num_tasks, layers, dim, key_dim)
        self.pool_size = check_int("pool_size", pool_size, 1)
        if pool_size < num_tasks:
            raise ValueError(f"pool_size must be >= num_tasks (a component per task), got {pool_size} < {num_tasks}")
        self.length = check_even("length", length)
        self.ortho_mu = check_real("ortho_mu", ortho_mu, minimum=0.0)
        n = len(self.layers)
        self.prompts = nn.Parameter(torch.empty(n, pool_size, length, dim))
        self.keys = nn.Parameter(torch.empty(n, pool_size, self.key_dim))
        self.attention = nn.Parameter(torch.empty(n, pool_size, self.key_dim))
        for i in range(n):  # the authors' order: per layer, U[0, 1) fills of P, K, A, then their Gram-Schmidt
            group = (self.prompts[i], self.keys[i], self.attention[i])
            uniform_(*group)
            for t in group:
                gram_schmidt_(t, 0, self.per_task)
        self.started = 1

    @property
    def per_task(self) -> int:
        """Components per task, `M // T` (the authors' `pt`)."""
        return self.pool_size // self.num_tasks

    def start_task(self, task: int) -> None:
        """Draw the components of every task from `started` to `task` (each once), as the authors do at a task
        start: per layer, Gram-Schmidt of K, A, P against the earlier components."""
        for t in range(self.started, task + 1):
            s, f = t * self.per_task, (t + 1) * self.per_task
            for i in range(len(self.layers)):
                for p in (self.keys[i], self.attention[i], self.prompts[i]):
                    gram_schmidt_(p, s, f)
        self.started = max(self.started, task + 1)

    def layer_prefix(self, slot: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`sum_m alpha_m P_m` of each sample, split: `(B, length / 2, dim)` each."""
        s, f = self.task * self.per_task, (self.task + 1) * self.per_task
        k, a, p = self.keys[slot, :f], self.attention[slot, :f], self.prompts[slot, :f]
        if self.training and s > 0:  # earlier tasks' components are detached
            k, a, p = (torch.cat((t[:s].detach(), t[s:])) for t in (k, a, p))
        masked = F.normalize(query.unsqueeze(1) * a, dim=2)  # (B, f, key_dim)
        alpha = (masked * F.normalize(k, dim=1)).sum(dim=2)  # (B, f)
        prompt = torch.einsum("bk,kld->bld", alpha, p)  # (B, length, dim)
        loss = None
        if self.training and self.ortho_mu > 0:
            loss = self.ortho_mu * (ortho_penalty(k) + ortho_penalty(a) + ortho_penalty(p.flatten(1)))
        key, value = split_prompt(prompt)
        return key, value, loss

    def training_state(self) -> dict[str, Any]:
        """The active task and `started` (which tasks' components have been drawn)."""
        return {**super().training_state(), "started": int(self.started)}

    def check_training_state(self, state: Any) -> None:
        """Raise if `state` does not fit; nothing changes."""
        super().check_training_state(state)
        check_int("started", state["started"], 1)
        if state["started"] > self.num_tasks:
            raise ValueError(f"started must be in [1, {self.num_tasks}], got {state['started']}")

    def load_training_state(self, state: Any) -> None:
        """Restore what `training_state` returned (checked first)."""
        super().load_training_state(state)
        self.started = int(state["started"])

    def checkpoint_config(self) -> dict[str, Any]:
        """What [`save_prompts`][norga.checkpoint.save_prompts] records and `load_prompts` compares."""
        return {
            **super().checkpoint_config(),
            "pool_size": self.pool_size,
            "length": self.length,
            "ortho_mu": self.ortho_mu,
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool_size={self.pool_size}, length={self.length}, ortho_mu={self.ortho_mu:g}"
