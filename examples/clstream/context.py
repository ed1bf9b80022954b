"""The frozen trunk shared by every method: the tokens after the frozen first blocks, computed once, and the
pre-trained features and task-identity predictions.

With `prompt_at="last"` the prompts sit on the last blocks, so the tokens entering the first prompted-or-trained
block depend on the image only: they are computed once per image by the frozen backbone and reused by every
method and epoch. With `prompt_at="first"` the whole backbone runs on images.
"""

from __future__ import annotations

import dataclasses

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from tqdm import tqdm

from norga import cl

from .classifier import task_identity_heads
from .config import Config
from .streams import ImageSet, Stream


class Inputs:
    """What the methods read for a split: cached tokens after the frozen blocks, or images."""

    def __init__(self, data: ImageSet, tokens: Tensor | None, cfg: Config) -> None:
        self.data, self.tokens, self.cfg = data, tokens, cfg

    def __len__(self) -> int:
        return len(self.data)

    def get(self, idx: Tensor, train: bool, gen: torch.Generator | None = None) -> Tensor:
        """Inputs of samples `idx`: their cached tokens, or their images (flipped at random by `gen` in training)."""
        if self.tokens is not None:
            return self.tokens[idx]
        return self.data.batch(idx, self.cfg.img_size, flip=gen if train else None)


def freeze(model: nn.Module) -> None:
    """Turns off the gradient of every parameter of `model`."""
    for p in model.parameters():
        p.requires_grad_(False)


def start_block(model: VisionTransformer, cfg: Config) -> int:
    """Index of the first block the methods run (the blocks before it are cached)."""
    return 0 if cfg.prompt_at == "first" else len(model.blocks) + cfg.trainable_from


def embed(model: VisionTransformer, images: Tensor, upto: int) -> Tensor:
    """Tokens after patch embedding and blocks `[0, upto)` (timm `VisionTransformer`)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for blk in model.blocks[:upto]:
        x = blk(x)
    return x


def features(model: VisionTransformer, inputs: Tensor, start: int) -> Tensor:
    """Pre-logits features: `inputs` are images (`start == 0`) or tokens after block `start - 1`."""
    x = embed(model, inputs, 0) if start == 0 else inputs
    for blk in model.blocks[start:]:
        x = blk(x)
    x = model.norm(x)
    return model.forward_head(x, pre_logits=True)


@torch.no_grad()
def cache_tokens(model: VisionTransformer, data: ImageSet, upto: int, cfg: Config, desc: str) -> Tensor:
    """Tokens after blocks `[0, upto)` for every image of `data` (frozen backbone, eval mode)."""
    model.eval()
    batches = torch.arange(len(data)).split(cfg.eval_batch)
    bar = tqdm(batches, desc=desc, disable=not cfg.progress, leave=False)
    return torch.cat([embed(model, data.batch(idx, cfg.img_size), upto) for idx in bar])


@torch.no_grad()
def pretrained_features(model: VisionTransformer, inputs: Inputs, start: int, cfg: Config, desc: str) -> Tensor:
    """Pre-logits features of the frozen backbone for every sample of `inputs`."""
    model.eval()
    batches = torch.arange(len(inputs)).split(cfg.eval_batch)
    bar = tqdm(batches, desc=desc, disable=not cfg.progress, leave=False)
    return torch.cat([features(model, inputs.get(idx, train=False), start) for idx in bar])


@dataclasses.dataclass
class Context:
    """Everything a method needs: the stream, the backbone and the shared precomputed pieces."""

    stream: Stream
    backbone: VisionTransformer  # frozen, eval mode; methods deep-copy it
    cfg: Config
    start: int  # first block the methods run
    train_in: Inputs
    test_in: Inputs
    train_feats: Tensor  # frozen pre-trained features (TII, linear probe)
    test_feats: Tensor
    task_of_class: Tensor
    tii_class: list[Tensor]  # after task t: class predicted for every test sample by the TII head (seen classes)


def build_context(stream: Stream, backbone: VisionTransformer, cfg: Config) -> Context:
    """Freezes the backbone and precomputes the cached tokens, the pre-trained features of both splits and the
    task-identity predictions."""
    backbone.eval()
    freeze(backbone)
    start = start_block(backbone, cfg)
    train_tok: Tensor | None = None
    test_tok: Tensor | None = None
    if start:
        train_tok = cache_tokens(backbone, stream.train, start, cfg, f"caching blocks 0-{start - 1} (train)")
        test_tok = cache_tokens(backbone, stream.test, start, cfg, f"caching blocks 0-{start - 1} (test)")
    train_in, test_in = Inputs(stream.train, train_tok, cfg), Inputs(stream.test, test_tok, cfg)
    train_feats = pretrained_features(backbone, train_in, start, cfg, "pre-trained features (train)")
    test_feats = pretrained_features(backbone, test_in, start, cfg, "pre-trained features (test)")
    return Context(
        stream,
        backbone,
        cfg,
        start,
        train_in,
        test_in,
        train_feats,
        test_feats,
        cl.task_of_class(stream.splits, stream.num_classes),
        task_identity_heads(stream, train_feats, test_feats, cfg),
    )
