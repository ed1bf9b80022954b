"""The training budget and protocol shared by every method, and the presets of the command line."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Config:
    """Training budget and protocol, shared by every method."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.01
    finetune_lr: float = 1e-4
    clip: float = 1.0
    prompt_length: int = 5
    prompt_momentum: float = 0.01  # the NoRGa / HiDe-Prompt authors' default, for every pool method
    contrastive_reg: float = 0.1  # their --reg: weight of norga.cl.contrastive_regularization (pool methods)
    pool_layers: int = 5
    smope_layers: int = 6
    smope_experts: int = 25
    smope_top_k: int = 5
    smope_eps: float = 0.4
    # SMoPE's experts are shared by every task: at the pool methods' lr 0.01 they drift so far over 8 tasks that
    # earlier classes collapse; at 1e-3 (experts and head) they keep them (docs/results.md).
    smope_lr: float = 1e-3
    # the CODA-Prompt codebase trains L2P++, DualPrompt, CODA-P (and the SMoPE repository VQ-Prompt) with Adam
    # at lr 1e-3 (configs/cifar-100_prompt.yaml); their keys and components are shared by every task
    query_lr: float = 1e-3
    router_mu: float = 1e-5  # the SMoPE authors' CIFAR-100 script: 1e-5 for both losses
    proto_mu: float = 1e-5
    prompt_at: str = "last"  # "last": cache the frozen first blocks; "first": paper placement, no cache
    img_size: int = 56
    seed: int = 0
    eval_batch: int = 128
    progress: bool = True
    lda_shrinkage: float = 0.1  # ridge of the shared covariance of the Gaussian class statistics, x its mean variance

    @property
    def trainable_from(self) -> int:
        """Index of the first block a method may change (0 with `prompt_at="first"`, else negative)."""
        return 0 if self.prompt_at == "first" else -max(self.pool_layers, self.smope_layers)

    def prompted_blocks(self, depth: int, count: int) -> list[int]:
        """The `count` blocks that get prompts in a ViT of `depth` blocks: the first ones or the last ones."""
        return list(range(count)) if self.prompt_at == "first" else list(range(depth - count, depth))


def make_config(
    dataset: str,
    *,
    quick: bool,
    seed: int,
    progress: bool,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    smope_lr: float | None = None,
    query_lr: float | None = None,
    img_size: int | None = None,
    prompt_at: str | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> tuple[Config, dict[str, int]]:
    """The budget of a run: the preset of `dataset` (and `quick`), overridden by the options that are not None.

    The offline stream trains 2 epochs (`quick`: 4 tasks of 40 training images per class) or 3 (8 tasks of 150
    per class) at 56 px with the prompts on the last blocks. The paper protocols follow the authors' settings:
    Adam, batch 128, 50 epochs, lr 0.03 scaled by batch / 256, 224 px, prompts on the first blocks.

    Returns:
        The config and the keyword arguments of the stream (`clstream.streams.build_stream`'s `data`).
    """
    if dataset == "offline":
        preset: dict[str, Any] = dict(epochs=2 if quick else 3, batch_size=32, lr=0.01, img_size=56, prompt_at="last")
        data = (
            dict(tasks_per_domain=1, train_per_class=40, test_per_class=25)
            if quick
            else dict(tasks_per_domain=2, train_per_class=150, test_per_class=100)
        )
    else:
        preset = dict(
            epochs=50,
            batch_size=128,
            lr=0.03 * 128 / 256,
            img_size=224,
            prompt_at="first",
            prompt_length=5 if dataset == "cifar100" else 20,
        )
        data = {}
    overrides = dict(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        smope_lr=smope_lr,
        query_lr=query_lr,
        img_size=img_size,
        prompt_at=prompt_at,
    )
    preset.update({key: value for key, value in overrides.items() if value is not None})
    data_overrides = dict(train_per_class=train_per_class, test_per_class=test_per_class)
    data.update({key: value for key, value in data_overrides.items() if value is not None})
    if dataset != "offline" and batch_size is not None and lr is None:
        preset["lr"] = 0.03 * batch_size / 256  # the authors' linear scaling rule
    return Config(seed=seed, progress=progress, **preset), data
