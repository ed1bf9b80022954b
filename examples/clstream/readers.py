"""Readers of the downloaded or installed files: Fashion-MNIST (IDX), Animal-MNIST (pickles in a wheel) and
scikit-learn's digits. Each returns `ImageSplit`s; `clstream.sources` fetches the files.
"""

from __future__ import annotations

import gzip
import importlib
import io
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .images import ImageSplit, drop_duplicate_images, make_split

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Label order of animal-mnist 0.4 (alphabetical, as its README lists them; checked by eye).
ANIMAL_MNIST_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGITS_CLASSES = [str(i) for i in range(10)]

# Where Debian's dataset-fashion-mnist puts the IDX files, and their names (each may also end in .gz).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Members of the animal-mnist 0.4 wheel that hold the images and the labels (gzip-pickled numpy arrays).
ANIMAL_MNIST_DATA = "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"
ANIMAL_MNIST_LABELS = "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz"


# --------------------------------------------------------------------------- #
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------- #
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or plain.

    The header is two zero bytes, a type code (0x08 ubyte, 0x09 byte,
    0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of
    dimensions, then each dimension as a big-endian uint32; big-endian data
    follows.

    Args:
        path: The file; compression is detected from its first bytes, not its name.

    Returns:
        The array, in native byte order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the header or the data size is not valid IDX.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"IDX file {str(p)!r} does not exist")
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{str(p)!r} looks gzip-compressed but cannot be decompressed: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{str(p)!r} is not an IDX file: expected two zero bytes, found {raw[:4]!r}")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{str(p)!r}: unknown IDX type code 0x{code:02x}, expected one of {sorted(_IDX_DTYPES)}")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{str(p)!r}: truncated IDX header ({ndim} dimensions, {len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{str(p)!r}: header says shape {dims} of {dtype} ({expected} bytes), found {len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_path(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {str(root)!r}")


def load_fashion_mnist(root: str | os.PathLike = FASHION_MNIST_DIR) -> tuple[ImageSplit, ImageSplit]:
    """Load Fashion-MNIST with its official split.

    Args:
        root: Directory with `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
            `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]`
            (Debian's `dataset-fashion-mnist` puts them in `/usr/share/datasets/fashion-mnist`).

    Returns:
        `(train, test)`: 60,000 and 10,000 images of 28x28 for the real data.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: If a file is not valid IDX or images and labels disagree.
    """
    r = Path(root)
    out = []
    for part in ("train", "test"):
        images = read_idx(_idx_path(r, FASHION_MNIST_FILES[f"{part}_images"]))
        labels = read_idx(_idx_path(r, FASHION_MNIST_FILES[f"{part}_labels"]))
        if images.ndim != 3:
            raise ValueError(f"Fashion-MNIST {part} images must be (N, H, W), found {images.shape}")
        out.append(make_split(images, labels, FASHION_MNIST_CLASSES, f"Fashion-MNIST {part}"))
    return out[0], out[1]


# --------------------------------------------------------------------------- #
# Animal-MNIST (gzip-pickled numpy arrays in a wheel)
# --------------------------------------------------------------------------- #
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays: any other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are expected")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]
        return getattr(importlib.import_module(module), name)


def _load_pickled_array(data: bytes, what: str) -> np.ndarray:
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        obj = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"{what} is not a gzip-pickled numpy array: {exc}") from exc
    if not isinstance(obj, np.ndarray):
        raise ValueError(f"{what} holds a {type(obj).__name__}, expected a numpy array")
    return obj


def load_animal_mnist(source: str | os.PathLike, *, drop_duplicates: bool = True) -> ImageSplit:
    """Load all of Animal-MNIST (no official split: use `train_test_split`).

    Args:
        source: The `animal_mnist-0.4-py3-none-any.whl` file (read in place, not
            installed), or a directory containing `animal_data_version_3.gz` and
            `animal_label_version_3.gz` (directly or under
            `animal_mnist/data/Animal_MNIST/`).
        drop_duplicates: Remove exact duplicate images (the 0.4 data has 284 of
            its 10,000 images twice, always with the same label), so that random
            splits cannot put a copy on each side.

    Returns:
        28x28 grayscale silhouettes of `ANIMAL_MNIST_CLASSES`.

    Raises:
        FileNotFoundError: If the wheel/directory or a data file is missing.
        ValueError: If the files are not the expected arrays.
    """
    src = Path(source)
    if src.is_file():
        if not zipfile.is_zipfile(src):
            raise ValueError(f"{str(src)!r} is neither a directory nor a wheel (zip) file")
        with zipfile.ZipFile(src) as zf:
            names = set(zf.namelist())
            for member in (ANIMAL_MNIST_DATA, ANIMAL_MNIST_LABELS):
                if member not in names:
                    raise FileNotFoundError(f"wheel {str(src)!r} has no member {member!r}")
            data_raw, label_raw = zf.read(ANIMAL_MNIST_DATA), zf.read(ANIMAL_MNIST_LABELS)
        what = f"{src.name}:"
    elif src.is_dir():
        files = []
        for member in (ANIMAL_MNIST_DATA, ANIMAL_MNIST_LABELS):
            base = Path(member).name
            cands = [src / base, src / member]
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                raise FileNotFoundError(f"Animal-MNIST file {base!r} not found in {str(src)!r}")
            files.append(hit)
        data_raw, label_raw = files[0].read_bytes(), files[1].read_bytes()
        what = f"{src}/"
    else:
        raise FileNotFoundError(f"Animal-MNIST source {str(src)!r} does not exist")
    images = _load_pickled_array(data_raw, what + Path(ANIMAL_MNIST_DATA).name)
    labels = _load_pickled_array(label_raw, what + Path(ANIMAL_MNIST_LABELS).name)
    if images.ndim != 3:
        raise ValueError(f"Animal-MNIST images must be (N, H, W), found {images.shape}")
    split = make_split(images, labels, ANIMAL_MNIST_CLASSES, "Animal-MNIST")
    if drop_duplicates:
        split, dropped = drop_duplicate_images(split)
        logger.info("Animal-MNIST: dropped %d exact duplicate images, %d left", dropped, len(split.labels))
    return split


# --------------------------------------------------------------------------- #
# scikit-learn digits
# --------------------------------------------------------------------------- #
def load_sklearn_digits(size: int = 28) -> ImageSplit:
    """scikit-learn's bundled 8x8 digits (1,797 images), rescaled to uint8 and resized.

    Values 0-16 become 0-255; images are resized to `size` x `size` with
    bilinear interpolation. No official split: use `train_test_split`.

    Args:
        size: Output side.

    Returns:
        All digits with labels 0-9.

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits source needs scikit-learn: `pip install scikit-learn`") from exc
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()
    return make_split(images, bunch.target, DIGITS_CLASSES, "digits")
