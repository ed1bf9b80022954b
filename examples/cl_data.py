"""Offline image sources for a multi-domain class-incremental stream (5-Datasets in spirit).

Every source is obtainable by package name only, with no download at training
time:

=================  ==========================================  ===============================
source             where it comes from                         split
=================  ==========================================  ===============================
Fashion-MNIST      Debian ``dataset-fashion-mnist`` (IDX files)  official 60k / 10k
Animal-MNIST       PyPI ``animal-mnist==0.4`` wheel, fetched     seeded stratified split
                   with ``pip download --no-deps`` and read
                   without installing it (it declares
                   tensorflow)
notMNIST-style     letters A-J rendered with Pillow from         seeded split by font family
letters            Debian ``fonts-noto-core`` and                (train and test fonts disjoint)
                   ``fonts-urw-base35``
digits             scikit-learn's bundled 8x8 digits,           seeded stratified split
                   rescaled to 28x28
=================  ==========================================  ===============================

Each loader returns :class:`ImageSplit` tuples ``(images, labels, class_names)``:
``images`` a uint8 tensor ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)``,
``labels`` an int64 tensor ``(N,)`` in ``0..len(class_names)-1``.
:class:`ViTImageDataset` turns them into ImageNet-normalised ``3 x S x S`` float
tensors, resizing whole batches at once with ``torch.nn.functional.interpolate``.

:func:`ensure_sources` is the set-up step: it installs the Debian packages (only
when running as root and the files are absent), downloads the Animal-MNIST wheel
into a cache directory, and raises :class:`DataSourceError` (saying which source,
which command failed and how to get it by hand) when something cannot be had.

Typical use::

    paths = ensure_sources("~/.cache/norga-data")
    sources = load_all_sources(paths, seed=0)
    train, test = sources["fashion_mnist"]
    ds = ViTImageDataset(train.images, train.labels, size=224)
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "ANIMAL_MNIST_CLASSES",
    "ANIMAL_MNIST_REQUIREMENT",
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LETTER_CLASSES",
    "SOURCES",
    "DataSourceError",
    "ImageSplit",
    "ViTImageDataset",
    "describe",
    "drop_duplicate_images",
    "ensure_sources",
    "find_letter_fonts",
    "font_family",
    "load_all_sources",
    "load_animal_mnist",
    "load_fashion_mnist",
    "load_font_letters",
    "load_sklearn_digits",
    "read_idx",
    "render_letters",
    "stratified_split",
    "to_vit_tensor",
    "train_test_split",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

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
#: Label order of animal-mnist 0.4 (alphabetical, as its README lists them; checked by eye).
ANIMAL_MNIST_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
LETTER_CLASSES = list("ABCDEFGHIJ")
DIGITS_CLASSES = [str(i) for i in range(10)]

#: Names of the sources, in the order :func:`load_all_sources` returns them.
SOURCES = ("fashion_mnist", "animal_mnist", "letters", "digits")

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FONT_PACKAGES = {
    "fonts_noto": ("fonts-noto-core", Path("/usr/share/fonts/truetype/noto")),
    "fonts_urw": ("fonts-urw-base35", Path("/usr/share/fonts/opentype/urw-base35")),
}
ANIMAL_MNIST_REQUIREMENT = "animal-mnist==0.4"
ANIMAL_MNIST_WHEEL = "animal_mnist-0.4-py3-none-any.whl"
ANIMAL_MNIST_WHEEL_SHA256 = "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce"
ANIMAL_MNIST_DATA = "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"
ANIMAL_MNIST_LABELS = "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz"

#: Font files whose A-J are not letters (dingbats, Greek symbol encodings) or that are symbol fonts.
SYMBOL_FONT_PATTERN = re.compile(r"symbol|dingbat|D050000L|music|emoji", re.IGNORECASE)
FONT_SUFFIXES = (".ttf", ".otf")

_COMMAND_TIMEOUT_S = 900


class DataSourceError(RuntimeError):
    """A data source could not be found or fetched.

    Attributes:
        source: Name of the source (e.g. ``"fashion_mnist"``).
        command: The command that failed, if any.
    """

    def __init__(self, source: str, message: str, *, command: Sequence[str] | None = None, manual: str = "") -> None:
        self.source = source
        self.command = list(command) if command is not None else None
        parts = [f"data source {source!r}: {message}"]
        if command is not None:
            parts.append(f"command: {' '.join(command)}")
        if manual:
            parts.append(f"to get it by hand: {manual}")
        super().__init__("\n  ".join(parts))


class ImageSplit(NamedTuple):
    """Images of one split of one source.

    Attributes:
        images: uint8 tensor ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)``.
        labels: int64 tensor ``(N,)`` in ``0..len(class_names)-1``.
        class_names: Name of each label.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


def _make_split(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], what: str) -> ImageSplit:
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

    Each class contributes ``round(n_c * test_fraction)`` samples to the test
    side (at least one, and at least one left for training, when it has two or more).

    Args:
        labels: 1-D integer labels.
        test_fraction: Fraction of each class for testing, in (0, 1).
        seed: Seed of the shuffle; the same seed gives the same split.

    Returns:
        ``(train_indices, test_indices)``, sorted int64 arrays, disjoint, covering all samples.

    Raises:
        ValueError: If ``test_fraction`` is not in (0, 1) or ``labels`` is not 1-D.
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
    """Split an :class:`ImageSplit` with :func:`stratified_split`.

    Args:
        split: Images to split.
        test_fraction: Fraction of each class for testing.
        seed: Seed of the split.

    Returns:
        ``(train, test)``.
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
        root: Directory with ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``
            (Debian's ``dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``).

    Returns:
        ``(train, test)``: 60,000 and 10,000 images of 28x28 for the real data.

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
        out.append(_make_split(images, labels, FASHION_MNIST_CLASSES, f"Fashion-MNIST {part}"))
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
    """Load all of Animal-MNIST (no official split: use :func:`train_test_split`).

    Args:
        source: The ``animal_mnist-0.4-py3-none-any.whl`` file (read in place, not
            installed), or a directory containing ``animal_data_version_3.gz`` and
            ``animal_label_version_3.gz`` (directly or under
            ``animal_mnist/data/Animal_MNIST/``).
        drop_duplicates: Remove exact duplicate images (the 0.4 data has 284 of
            its 10,000 images twice, always with the same label), so that random
            splits cannot put a copy on each side.

    Returns:
        28x28 grayscale silhouettes of :data:`ANIMAL_MNIST_CLASSES`.

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
    split = _make_split(images, labels, ANIMAL_MNIST_CLASSES, "Animal-MNIST")
    if drop_duplicates:
        split, dropped = drop_duplicate_images(split)
        logger.info("Animal-MNIST: dropped %d exact duplicate images, %d left", dropped, len(split.labels))
    return split


# --------------------------------------------------------------------------- #
# notMNIST-style letters rendered from fonts
# --------------------------------------------------------------------------- #
def _import_pil() -> Any:
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as exc:
        raise ImportError("rendering letters needs Pillow: `pip install Pillow`") from exc
    return Image, ImageDraw, ImageFont


def _render_raw(font: Any, text: str, canvas: int) -> np.ndarray:
    Image, ImageDraw, _ = _import_pil()
    img = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(img).text((canvas // 2, canvas // 2), text, fill=255, font=font, anchor="mm")
    return np.asarray(img)


def _normalised_glyph(raw: np.ndarray, box: int = 20, out: int = 28) -> np.ndarray:
    """Crop to the ink, fit the longest side to ``box`` pixels, centre in ``out`` x ``out``."""
    Image, _, _ = _import_pil()
    img = Image.fromarray(raw)
    bbox = img.getbbox()
    if bbox is None:
        return np.zeros((out, out), np.uint8)
    g = img.crop(bbox)
    scale = box / max(g.size)
    g = g.resize((max(1, round(g.size[0] * scale)), max(1, round(g.size[1] * scale))), Image.LANCZOS)
    canvas = Image.new("L", (out, out), 0)
    canvas.paste(g, ((out - g.size[0]) // 2, (out - g.size[1]) // 2))
    return np.asarray(canvas)


def find_letter_fonts(
    font_dirs: Sequence[str | os.PathLike],
    letters: Sequence[str] = LETTER_CLASSES,
    *,
    exclude: re.Pattern[str] | None = SYMBOL_FONT_PATTERN,
    dedupe: bool = True,
) -> list[Path]:
    """Fonts (``.ttf``/``.otf``) under ``font_dirs`` that draw every letter.

    A font is dropped when its file name matches ``exclude`` (symbol/dingbat
    fonts, which map A-J to other shapes), when a letter renders empty or
    identical to the font's ``.notdef`` box, or (with ``dedupe``) when its
    size-normalised letters are identical to an earlier font's (some Noto
    fonts carry a verbatim copy of Noto Sans' Latin letters).

    Args:
        font_dirs: Directories searched recursively.
        letters: Characters every font must have.
        exclude: Regex on the file name of fonts to skip, or None.
        dedupe: Drop fonts whose letters duplicate an earlier font's.

    Returns:
        Sorted font paths.

    Raises:
        FileNotFoundError: If a directory does not exist.
    """
    _, _, ImageFont = _import_pil()
    files: list[Path] = []
    for d in font_dirs:
        p = Path(d)
        if not p.is_dir():
            raise FileNotFoundError(f"font directory {str(p)!r} does not exist")
        files.extend(f for f in p.rglob("*") if f.suffix.lower() in FONT_SUFFIXES and f.is_file())
    kept: list[Path] = []
    signatures: list[np.ndarray] = []
    for f in sorted(set(files), key=lambda q: (q.name, str(q))):
        if exclude is not None and exclude.search(f.name):
            logger.debug("font %s: skipped (symbol font)", f.name)
            continue
        try:
            font = ImageFont.truetype(str(f), 64)
        except OSError as exc:
            logger.debug("font %s: skipped (cannot be opened: %s)", f.name, exc)
            continue
        notdefs = [_render_raw(font, probe, 128) for probe in ("\U0010fffd", "\u0378")]
        glyphs = [_render_raw(font, ch, 128) for ch in letters]
        if any(g.max() == 0 or any(np.array_equal(g, nd) for nd in notdefs) for g in glyphs):
            logger.debug("font %s: skipped (missing glyphs)", f.name)
            continue
        if dedupe:
            sig = np.stack([_normalised_glyph(g) for g in glyphs]).astype(np.int16)
            if any(np.abs(sig - s).mean() < 1.0 for s in signatures):
                logger.debug("font %s: skipped (duplicates an earlier font)", f.name)
                continue
            signatures.append(sig)
        kept.append(f)
    logger.info("letter fonts: %d usable of %d files", len(kept), len(files))
    return kept


def font_family(path: str | os.PathLike) -> str:
    """Family of a font file: the file stem up to the first ``-`` (``NotoSans-Bold`` -> ``NotoSans``)."""
    return Path(path).stem.split("-")[0]


def render_letters(
    font_path: str | os.PathLike,
    letters: Sequence[str] = LETTER_CLASSES,
    *,
    samples_per_letter: int = 20,
    size: int = 28,
    seed: int = 0,
    max_rotation: float = 10.0,
    box_range: tuple[float, float] = (16.0, 22.0),
    max_shift: int = 2,
) -> np.ndarray:
    """Render each letter of one font several times with small seeded jitter.

    Every sample is the glyph, cropped to its ink, rotated by up to
    ``max_rotation`` degrees, scaled so its longest side spans a size drawn from
    ``box_range`` (in a ``size`` x ``size`` frame) and shifted by up to
    ``max_shift`` pixels from the centre. The jitter depends only on ``seed``,
    the font's file name and the sample index, so it does not change when other
    fonts are added or removed.

    Args:
        font_path: A ``.ttf``/``.otf`` file.
        letters: Characters to draw.
        samples_per_letter: Jittered copies per letter (>= 1).
        size: Output side in pixels.
        seed: Jitter seed.
        max_rotation: Largest rotation in degrees.
        box_range: Range of the longest glyph side, in pixels of the output.
        max_shift: Largest shift of the centre, in pixels.

    Returns:
        uint8 array ``(len(letters), samples_per_letter, size, size)``, white ink on black.

    Raises:
        ValueError: If ``samples_per_letter`` < 1 or a letter renders empty.
        FileNotFoundError: If the font does not exist.
    """
    Image, _, ImageFont = _import_pil()
    if samples_per_letter < 1:
        raise ValueError(f"samples_per_letter must be >= 1, got {samples_per_letter}")
    p = Path(font_path)
    if not p.is_file():
        raise FileNotFoundError(f"font {str(p)!r} does not exist")
    font = ImageFont.truetype(str(p), 96)
    rng = np.random.default_rng([seed, zlib.crc32(p.name.encode())])
    out = np.zeros((len(letters), samples_per_letter, size, size), np.uint8)
    for li, ch in enumerate(letters):
        base = Image.fromarray(_render_raw(font, ch, 192))
        bbox = base.getbbox()
        if bbox is None:
            raise ValueError(f"font {p.name!r} renders {ch!r} empty")
        base = base.crop(bbox)
        for s in range(samples_per_letter):
            angle = rng.uniform(-max_rotation, max_rotation)
            box = rng.uniform(*box_range)
            dx, dy = rng.integers(-max_shift, max_shift + 1, size=2)
            g = base.rotate(angle, resample=Image.BICUBIC, expand=True)
            gb = g.getbbox()
            g = g.crop(gb) if gb is not None else g
            scale = box / max(g.size)
            g = g.resize((max(1, round(g.size[0] * scale)), max(1, round(g.size[1] * scale))), Image.LANCZOS)
            canvas = Image.new("L", (size, size), 0)
            canvas.paste(g, ((size - g.size[0]) // 2 + int(dx), (size - g.size[1]) // 2 + int(dy)))
            out[li, s] = np.asarray(canvas)
    return out


def load_font_letters(
    font_dirs: Sequence[str | os.PathLike],
    *,
    letters: Sequence[str] = LETTER_CLASSES,
    samples_per_letter: int = 20,
    size: int = 28,
    test_fraction: float = 0.2,
    seed: int = 0,
    split_by: str = "family",
    fonts: Sequence[str | os.PathLike] | None = None,
) -> tuple[ImageSplit, ImageSplit]:
    """notMNIST-style letters from system fonts, split so train and test fonts are disjoint.

    Args:
        font_dirs: Directories searched by :func:`find_letter_fonts` (ignored if ``fonts`` is given).
        letters: The classes, one character each.
        samples_per_letter: Jittered samples per (font, letter).
        size: Image side.
        test_fraction: Fraction of the groups (families or fonts) held out for testing.
        seed: Seed of the font split and of the jitter.
        split_by: ``"family"`` (all styles of a family on one side: no
            NimbusSans-Bold in train with NimbusSans-Regular in test) or ``"font"``.
        fonts: Explicit font files, instead of searching ``font_dirs``.

    Returns:
        ``(train, test)``; labels index ``letters``.

    Raises:
        ValueError: If fewer than two groups of fonts are usable, or ``split_by`` is unknown.
    """
    if split_by not in ("family", "font"):
        raise ValueError(f"split_by must be 'family' or 'font', got {split_by!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    paths = [Path(f) for f in fonts] if fonts is not None else find_letter_fonts(font_dirs, letters)
    key = font_family if split_by == "family" else (lambda q: Path(q).name)
    groups = sorted({key(f) for f in paths})
    if len(groups) < 2:
        raise ValueError(f"need at least two font {split_by} groups to split train/test, found {groups}")
    rng = np.random.default_rng(seed)
    order = [groups[i] for i in rng.permutation(len(groups))]
    n_test = min(max(1, int(round(len(groups) * test_fraction))), len(groups) - 1)
    test_groups = set(order[:n_test])
    parts: dict[bool, tuple[list[np.ndarray], list[np.ndarray]]] = {False: ([], []), True: ([], [])}
    for f in sorted(paths, key=lambda q: q.name):
        arr = render_letters(f, letters, samples_per_letter=samples_per_letter, size=size, seed=seed)
        imgs, labs = parts[key(f) in test_groups]
        imgs.append(arr.reshape(-1, size, size))
        labs.append(np.repeat(np.arange(len(letters)), samples_per_letter))
    logger.info("letters: %d test groups (split by %s): %s", len(test_groups), split_by, sorted(test_groups))
    out = []
    for is_test in (False, True):
        imgs, labs = parts[is_test]
        out.append(_make_split(np.concatenate(imgs), np.concatenate(labs), list(letters), "letters"))
    return out[0], out[1]


# --------------------------------------------------------------------------- #
# scikit-learn digits
# --------------------------------------------------------------------------- #
def load_sklearn_digits(size: int = 28) -> ImageSplit:
    """scikit-learn's bundled 8x8 digits (1,797 images), rescaled to uint8 and resized.

    Values 0-16 become 0-255; images are resized to ``size`` x ``size`` with
    bilinear interpolation. No official split: use :func:`train_test_split`.

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
    return _make_split(images, bunch.target, DIGITS_CLASSES, "digits")


# --------------------------------------------------------------------------- #
# Fetching
# --------------------------------------------------------------------------- #
def _run(source: str, cmd: Sequence[str], manual: str, env: Mapping[str, str] | None = None) -> str:
    """Run a command; any failure becomes a DataSourceError naming the source."""
    logger.info("%s: running %s", source, " ".join(cmd))
    try:
        done = subprocess.run(
            list(cmd),
            check=True,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT_S,
            env=None if env is None else {**os.environ, **env},
        )
    except subprocess.CalledProcessError as exc:
        tail = ((exc.stderr or "") + (exc.stdout or "")).strip().splitlines()[-5:]
        raise DataSourceError(
            source,
            f"command failed with exit status {exc.returncode}: {' | '.join(tail) or 'no output'}",
            command=cmd,
            manual=manual,
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise DataSourceError(
            source, f"command timed out after {exc.timeout:.0f} s", command=cmd, manual=manual
        ) from exc
    except OSError as exc:  # the program itself is missing
        raise DataSourceError(source, f"command could not be started: {exc}", command=cmd, manual=manual) from exc
    return done.stdout


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _apt_install(source: str, package: str, manual: str) -> None:
    if not _is_root():
        raise DataSourceError(
            source, f"Debian package {package!r} is not installed and this process is not root", manual=manual
        )
    if shutil.which("apt-get") is None:
        raise DataSourceError(source, "apt-get is not available on this system", manual=manual)
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", package]
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        _run(source, cmd, manual, env)
    except DataSourceError:
        logger.warning("%s: apt-get install failed; refreshing the package lists and retrying once", source)
        _run(source, ["apt-get", "update"], manual, env)
        _run(source, cmd, manual, env)


def _fashion_mnist_ready(root: Path) -> bool:
    return all(any((root / (stem + ext)).is_file() for ext in (".gz", "")) for stem in FASHION_MNIST_FILES.values())


def _fonts_ready(root: Path) -> bool:
    return root.is_dir() and any(f.suffix.lower() in FONT_SUFFIXES for f in root.rglob("*"))


def _ensure_debian(source: str, package: str, root: Path, ready: Any, allow_apt: bool) -> Path:
    manual = f"sudo apt-get install -y {package} (Debian/Ubuntu), then check that {root} has the files"
    if ready(root):
        return root
    if not allow_apt:
        raise DataSourceError(source, f"files not found in {root} and installing is disabled", manual=manual)
    _apt_install(source, package, manual)
    if not ready(root):
        raise DataSourceError(
            source,
            f"{package} was installed but {root} still lacks the expected files",
            command=["dpkg", "-L", package],
            manual=manual,
        )
    return root


def pip_download_command(requirement: str, target: Path) -> list[str]:
    """``pip download`` of one wheel, without its dependencies and without installing it."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(target)]


def _ensure_animal_wheel(cache_dir: Path, allow_pip: bool) -> Path:
    source = "animal_mnist"
    target_dir = cache_dir / "animal-mnist"
    wheel = target_dir / ANIMAL_MNIST_WHEEL
    cmd = pip_download_command(ANIMAL_MNIST_REQUIREMENT, target_dir)
    manual = (
        f"pip download --no-deps {ANIMAL_MNIST_REQUIREMENT} -d {target_dir} "
        f"(do not pip install it: it declares tensorflow)"
    )
    if not wheel.is_file():
        if not allow_pip:
            raise DataSourceError(source, f"{wheel} is missing and downloading is disabled", manual=manual)
        target_dir.mkdir(parents=True, exist_ok=True)
        _run(source, cmd, manual)
        if not wheel.is_file():
            raise DataSourceError(
                source, f"pip finished but {wheel.name} is not in {target_dir}", command=cmd, manual=manual
            )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != ANIMAL_MNIST_WHEEL_SHA256:
        raise DataSourceError(
            source,
            f"{wheel} has sha256 {digest}, expected {ANIMAL_MNIST_WHEEL_SHA256}; delete it and retry",
            manual=manual,
        )
    return wheel


def _ensure_sklearn() -> Path:
    try:
        import sklearn.datasets
    except ImportError as exc:
        raise DataSourceError(
            "digits", f"scikit-learn is not importable ({exc})", manual="pip install scikit-learn"
        ) from exc
    data = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    if not data.is_file():
        raise DataSourceError(
            "digits", f"scikit-learn has no bundled {data}", manual="pip install --force-reinstall scikit-learn"
        )
    return data


def ensure_sources(
    cache_dir: str | os.PathLike,
    *,
    sources: Sequence[str] = SOURCES,
    allow_apt: bool = True,
    allow_pip: bool = True,
) -> dict[str, Path]:
    """Make sure every data source is on disk, fetching what is missing.

    * ``fashion_mnist``: Debian ``dataset-fashion-mnist``; ``apt-get install`` is
      run only when the files are absent and the process is root (``apt-get update``
      and one retry if the first install fails).
    * ``animal_mnist``: ``pip download --no-deps animal-mnist==0.4`` into
      ``cache_dir/animal-mnist`` (never installed); the wheel's sha256 is checked.
    * ``letters``: Debian ``fonts-noto-core`` and ``fonts-urw-base35``, like Fashion-MNIST.
    * ``digits``: scikit-learn's bundled file (never installed here).

    Args:
        cache_dir: Directory for downloads (created if missing).
        sources: Which of :data:`SOURCES` to make sure of.
        allow_apt: Allow ``apt-get install``.
        allow_pip: Allow ``pip download``.

    Returns:
        Paths: ``fashion_mnist`` (IDX directory), ``animal_mnist`` (wheel),
        ``fonts_noto`` and ``fonts_urw`` (font directories), ``digits`` (bundled CSV).

    Raises:
        DataSourceError: If a source cannot be found or fetched; the message names
            the source, the failed command and how to get it by hand.
        ValueError: If ``sources`` names an unknown source.
    """
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown sources {unknown}; expected a subset of {list(SOURCES)}")
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if "fashion_mnist" in sources:
        paths["fashion_mnist"] = _ensure_debian(
            "fashion_mnist", FASHION_MNIST_PACKAGE, FASHION_MNIST_DIR, _fashion_mnist_ready, allow_apt
        )
    if "animal_mnist" in sources:
        paths["animal_mnist"] = _ensure_animal_wheel(cache, allow_pip)
    if "letters" in sources:
        for key, (package, root) in FONT_PACKAGES.items():
            paths[key] = _ensure_debian("letters", package, root, _fonts_ready, allow_apt)
    if "digits" in sources:
        paths["digits"] = _ensure_sklearn()
    return paths


def load_all_sources(
    paths: Mapping[str, Path],
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    samples_per_letter: int = 20,
) -> dict[str, tuple[ImageSplit, ImageSplit]]:
    """Load every source present in ``paths`` (as returned by :func:`ensure_sources`) as (train, test).

    Args:
        paths: Output of :func:`ensure_sources`.
        seed: Seed of the splits that are not official, and of the letter jitter.
        test_fraction: Test fraction of those splits.
        samples_per_letter: Jittered samples per (font, letter).

    Returns:
        Source name -> ``(train, test)``, in :data:`SOURCES` order.
    """
    out: dict[str, tuple[ImageSplit, ImageSplit]] = {}
    if "fashion_mnist" in paths:
        out["fashion_mnist"] = load_fashion_mnist(paths["fashion_mnist"])
    if "animal_mnist" in paths:
        out["animal_mnist"] = train_test_split(load_animal_mnist(paths["animal_mnist"]), test_fraction, seed)
    font_dirs = [paths[k] for k in FONT_PACKAGES if k in paths]
    if font_dirs:
        out["letters"] = load_font_letters(
            font_dirs, samples_per_letter=samples_per_letter, test_fraction=test_fraction, seed=seed
        )
    if "digits" in paths:
        out["digits"] = train_test_split(load_sklearn_digits(), test_fraction, seed)
    return out


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
        images: uint8 ``(N, H, W)`` (grayscale, replicated to 3 channels) or ``(N, H, W, 3)``.
        size: Output side; bilinear resize (antialiased when shrinking).
        mean: Per-channel mean, on the 0-1 scale.
        std: Per-channel standard deviation, on the 0-1 scale.

    Returns:
        float32 ``(N, 3, size, size)``.

    Raises:
        TypeError: If ``images`` is not a uint8 tensor.
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
    """uint8 images served as normalised ``3 x size x size`` float tensors.

    Conversion happens on demand; :meth:`get_batch`, :meth:`batches` and
    DataLoader batching (through ``__getitems__``) resize a whole batch with one
    ``interpolate`` call.

    Args:
        images: uint8 ``(N, H, W)`` or ``(N, H, W, 3)``.
        labels: int64 ``(N,)``.
        size: Output side.
        label_offset: Added to every label (to place a source in a global
            class-incremental label space).
        mean: Per-channel mean.
        std: Per-channel std.

    Raises:
        TypeError / ValueError: On wrong dtypes or mismatched lengths.
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
        """Images ``(B, 3, size, size)`` and labels ``(B,)`` for ``indices``, converted in one go."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return to_vit_tensor(self.images[idx], self.size, self.mean, self.std), self.labels[idx]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        x, y = self.get_batch(indices)
        return list(zip(x.unbind(0), y.tolist()))

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over ``(images, labels)`` batches without a DataLoader.

        Args:
            batch_size: Samples per batch.
            shuffle: Shuffle with a generator seeded by ``seed``.
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


def describe(split: ImageSplit) -> str:
    """One line: count, image shape and per-class counts."""
    counts = torch.bincount(split.labels, minlength=len(split.class_names)).tolist()
    return f"{len(split.labels)} images {tuple(split.images.shape[1:])}, per class {counts}"


if __name__ == "__main__":  # pragma: no cover - manual check
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cache_arg = sys.argv[1] if len(sys.argv) > 1 else str(Path.home() / ".cache" / "norga-data")
    found = ensure_sources(cache_arg)
    for name, p in found.items():
        logger.info("%s: %s", name, p)
    for name, (tr, te) in load_all_sources(found).items():
        logger.info("%s train: %s", name, describe(tr))
        logger.info("%s test:  %s", name, describe(te))
