"""Images in memory: the `ImageSplit` every source returns, seeded splits, and ViT input tensors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ImageSplit(NamedTuple):
    """Images of one split of one source.

    Attributes:
        images: uint8 tensor `(N, H, W)` (grayscale) or `(N, H, W, 3)`.
        labels: int64 tensor `(N,)` in `0..len(class_names)-1`.
        class_names: Name of each label.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


def make_split(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], what: str) -> ImageSplit:
    """Checks numpy images and labels and wraps them as an `ImageSplit`; `what` names them in errors.

    Raises:
        TypeError: If the images are not uint8 or the labels not integers.
        ValueError: On a wrong shape, a count mismatch or a label outside `0..len(class_names)-1`.
    """
    if images.dtype != np.uint8:
        raise TypeError(f"{what}: images must be uint8, found {images.dtype}")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ValueError(f"{what}: images must be (N, H, W) or (N, H, W, 3), found shape {images.shape}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{what}: expected {images.shape[0]} labels in a 1-D array, found shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{what}: labels must be integers, found {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"{what}: labels must lie in 0..{len(class_names) - 1}, found {labels.min()}..{labels.max()}")
    return ImageSplit(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels.astype(np.int64)),
        list(class_names),
    )


# --------------------------------------------------------------------------- #
# Splitting
# --------------------------------------------------------------------------- #
def stratified_split(
    labels: np.ndarray | torch.Tensor, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of sample indices.

    Each class contributes `round(n_c * test_fraction)` samples to the test
    side (at least one, and at least one left for training, when it has two or more).

    Args:
        labels: 1-D integer labels.
        test_fraction: Fraction of each class for testing, in (0, 1).
        seed: Seed of the shuffle; the same seed gives the same split.

    Returns:
        `(train_indices, test_indices)`, sorted int64 arrays, disjoint, covering all samples.

    Raises:
        ValueError: If `test_fraction` is not in (0, 1) or `labels` is not 1-D.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, found shape {y.shape}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def train_test_split(split: ImageSplit, test_fraction: float = 0.2, seed: int = 0) -> tuple[ImageSplit, ImageSplit]:
    """Split an `ImageSplit` with `stratified_split`.

    Args:
        split: Images to split.
        test_fraction: Fraction of each class for testing.
        seed: Seed of the split.

    Returns:
        `(train, test)`.
    """
    tr, te = stratified_split(split.labels, test_fraction, seed)
    tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
    return (
        ImageSplit(split.images[tr_t], split.labels[tr_t], list(split.class_names)),
        ImageSplit(split.images[te_t], split.labels[te_t], list(split.class_names)),
    )


def drop_duplicate_images(split: ImageSplit) -> tuple[ImageSplit, int]:
    """Remove exact duplicate images (keeping the first), so a random split cannot leak them.

    Args:
        split: Images to deduplicate.

    Returns:
        The deduplicated split (original order kept) and the number of images dropped.
    """
    arr = split.images.numpy()
    seen: set[bytes] = set()
    keep: list[int] = []
    for i in range(arr.shape[0]):
        key = hashlib.blake2b(arr[i].tobytes(), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    idx = torch.as_tensor(keep, dtype=torch.long)
    return ImageSplit(split.images[idx], split.labels[idx], list(split.class_names)), arr.shape[0] - len(keep)


# --------------------------------------------------------------------------- #
# ViT input
# --------------------------------------------------------------------------- #
def to_vit_tensor(
    images: torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Turn a batch of uint8 images into normalised float ViT input.

    Args:
        images: uint8 `(N, H, W)` (grayscale, replicated to 3 channels) or `(N, H, W, 3)`.
        size: Output side; bilinear resize (antialiased when shrinking).
        mean: Per-channel mean, on the 0-1 scale.
        std: Per-channel standard deviation, on the 0-1 scale.

    Returns:
        float32 `(N, 3, size, size)`.

    Raises:
        TypeError: If `images` is not a uint8 tensor.
        ValueError: If its shape is not one of the above.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(
            f"images must be a uint8 torch.Tensor, found {type(images).__name__} {getattr(images, 'dtype', '')}"
        )
    if images.ndim == 3:
        x = images.unsqueeze(1).expand(-1, 3, -1, -1)
    elif images.ndim == 4 and images.shape[-1] == 3:
        x = images.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), found shape {tuple(images.shape)}")
    x = x.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        shrink = size < max(x.shape[-2:])
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


class ViTImageDataset(Dataset):
    """uint8 images served as normalised `3 x size x size` float tensors.

    Conversion happens on demand; `get_batch`, `batches` and
    DataLoader batching (through `__getitems__`) resize a whole batch with one
    `interpolate` call.

    Args:
        images: uint8 `(N, H, W)` or `(N, H, W, 3)`.
        labels: int64 `(N,)`.
        size: Output side.
        label_offset: Added to every label (to place a source in a global
            class-incremental label space).
        mean: Per-channel mean.
        std: Per-channel std.

    Raises:
        TypeError: If `images` is not a uint8 tensor or `labels` not a 1-D int64 tensor.
        ValueError: If their lengths differ or `size` < 1.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        size: int = 224,
        label_offset: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise TypeError(f"images must be a uint8 torch.Tensor, found {getattr(images, 'dtype', type(images))}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
            raise TypeError(f"labels must be a 1-D int64 torch.Tensor, found {getattr(labels, 'dtype', type(labels))}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.images, self.labels = images, labels + label_offset
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = to_vit_tensor(self.images[index].unsqueeze(0), self.size, self.mean, self.std)
        return x[0], int(self.labels[index])

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `(B, 3, size, size)` and labels `(B,)` for `indices`, converted in one go."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return to_vit_tensor(self.images[idx], self.size, self.mean, self.std), self.labels[idx]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        x, y = self.get_batch(indices)
        return list(zip(x.unbind(0), y.tolist()))

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over `(images, labels)` batches without a DataLoader.

        Args:
            batch_size: Samples per batch.
            shuffle: Shuffle with a generator seeded by `seed`.
            seed: Shuffle seed.
            drop_last: Drop a final incomplete batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield self.get_batch(order[start : start + batch_size])
