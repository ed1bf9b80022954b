"""Class-incremental streams: images with global labels, and the classes of each task.

`offline_stream` builds the main job's 4-domain stream from the sources of `clstream.sources`; `paper_stream`
reads a paper protocol (CIFAR-100, ImageNet-R, CUB-200) from its usual local layout.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from norga import cl

from . import sources
from .images import stratified_split, to_vit_tensor

DATASETS = ("offline", "cifar100", "imagenet-r", "cub")


@dataclasses.dataclass
class ImageSet:
    """Images of one split: uint8 tensor `(N, H, W[, 3])` in memory, or file paths read on demand."""

    images: Tensor | None
    paths: list[str] | None
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Tensor) -> ImageSet:
        """The samples at indices `idx`."""
        idx = idx.long()
        return ImageSet(
            None if self.images is None else self.images[idx],
            None if self.paths is None else [self.paths[i] for i in idx.tolist()],
            self.labels[idx],
        )

    def batch(self, idx: Tensor, size: int, flip: torch.Generator | None = None) -> Tensor:
        """Normalised float images `(B, 3, size, size)`; random horizontal flips if `flip` is given."""
        if self.images is not None:
            raw = self.images[idx.long()]
        else:
            assert self.paths is not None  # an ImageSet holds images or paths
            raw = torch.from_numpy(np.stack([_read_image(self.paths[i], size) for i in idx.tolist()]))
        x = to_vit_tensor(raw, size)
        if flip is not None:
            mask = torch.rand(x.shape[0], generator=flip) < 0.5
            x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
        return x


def _read_image(path: str, size: int) -> np.ndarray:
    """An image file as a uint8 RGB array `(size, size, 3)`."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


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
        """Number of classes over all tasks."""
        return len(self.class_names)

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.splits)

    def seen_classes(self, task: int) -> list[int]:
        """The classes of tasks `0..task`, in task order."""
        return [c for split in self.splits[: task + 1] for c in split]


def task_indices(labels: Tensor, classes: Sequence[int]) -> Tensor:
    """Indices of the samples whose label is one of `classes`, in increasing order."""
    return torch.isin(labels, torch.as_tensor(classes)).nonzero().flatten()


def per_class_subsample(labels: Tensor, per_class: int | None, generator: torch.Generator) -> Tensor:
    """Seeded indices of at most `per_class` samples of every label (all of them if None)."""
    keep = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        keep.append(idx if per_class is None else idx[:per_class])
    return torch.cat(keep).sort().values


def offline_stream(
    cache_dir: Path, *, tasks_per_domain: int, train_per_class: int | None, test_per_class: int | None, seed: int
) -> Stream:
    """The 4-domain stream (Fashion-MNIST, Animal-MNIST, letters, digits), 40 classes.

    Every domain's classes are shuffled (seeded) and cut into `tasks_per_domain` tasks; the task order is
    a seeded permutation of all domain parts.

    Raises:
        DataSourceError: If a data source cannot be found or fetched (a `SetupError`).
    """
    paths = sources.ensure_sources(cache_dir / "data")
    loaded = sources.load_all_sources(paths, seed=seed)
    g = torch.Generator().manual_seed(seed)
    train_imgs, train_lab, test_imgs, test_lab, names, parts = [], [], [], [], [], []
    offset = 0
    for source, (tr, te) in loaded.items():
        k = len(tr.class_names)
        if k % tasks_per_domain:
            raise ValueError(f"{source} has {k} classes, not divisible into {tasks_per_domain} tasks")
        itr = per_class_subsample(tr.labels, train_per_class, g)
        ite = per_class_subsample(te.labels, test_per_class, g)
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
    """CIFAR-100 from the python pickles (`root` is `cifar-100-python/` or its parent).

    Raises:
        FileNotFoundError: If `train`/`test`/`meta` are missing.
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
    """Image paths, labels and class names of a `root/<class>/<image>` folder tree."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                paths.append(str(f))
                labels.append(c)
    return paths, labels, classes


def load_imagenet_r(root: Path, seed: int, test_fraction: float = 0.2) -> tuple[ImageSet, ImageSet, list[str]]:
    """ImageNet-R from `imagenet-r/<wnid>/*.jpg` with a seeded stratified 80/20 split (no official one).

    Raises:
        FileNotFoundError: If there is no class folder.
    """
    base = root / "imagenet-r" if (root / "imagenet-r").is_dir() else root
    if not base.is_dir():
        raise FileNotFoundError(f"ImageNet-R folder {base} not found")
    paths, labels, classes = _folder_classes(base)
    if not classes or not paths:
        raise FileNotFoundError(f"no class folders with images in {base} (expected imagenet-r/<wnid>/*.jpg)")
    tr, te = stratified_split(np.asarray(labels), test_fraction, seed)
    y = torch.tensor(labels, dtype=torch.long)
    full = ImageSet(None, paths, y)
    return full.subset(torch.from_numpy(tr)), full.subset(torch.from_numpy(te)), classes


def load_cub(root: Path) -> tuple[ImageSet, ImageSet, list[str]]:
    """CUB-200-2011 from its official files (`images.txt`, `image_class_labels.txt`,
    `train_test_split.txt`, `images/`); `root` is `CUB_200_2011/` or its parent.

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
    """A paper protocol: the dataset's classes in a seeded order, cut into `num_tasks` equal tasks."""
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


def build_stream(
    dataset: str, *, cache_dir: Path, data_root: Path | None, seed: int, num_tasks: int, data: Mapping[str, int]
) -> Stream:
    """The stream of `dataset`: the offline one, or a paper protocol read from `data_root`.

    Args:
        dataset: One of `DATASETS`.
        cache_dir: Cache of the offline sources (their files go to `cache_dir/data`).
        data_root: Root of the local dataset files (paper protocols).
        seed: Seed of class order, task order and subsamples.
        num_tasks: Tasks of a paper protocol.
        data: Keyword arguments of `offline_stream`; for a paper protocol only `train_per_class` and
            `test_per_class`, which subsample its splits.

    Raises:
        SetupError: If a data source of the offline stream cannot be found or fetched.
        FileNotFoundError: If a file of a paper protocol is missing.
    """
    if dataset == "offline":
        return offline_stream(cache_dir, seed=seed, **data)
    if data_root is None:
        raise ValueError(f"dataset {dataset!r} needs data_root, got None")
    stream = paper_stream(dataset, data_root, seed, num_tasks)
    if "train_per_class" in data or "test_per_class" in data:
        g = torch.Generator().manual_seed(seed)
        stream.train = stream.train.subset(per_class_subsample(stream.train.labels, data.get("train_per_class"), g))
        stream.test = stream.test.subset(per_class_subsample(stream.test.labels, data.get("test_per_class"), g))
    return stream
