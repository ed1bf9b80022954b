"""notMNIST-style letters A-J rendered with Pillow from system fonts, train and test fonts disjoint.

The fonts come from Debian's `fonts-noto-core` and `fonts-urw-base35` (`clstream.sources` installs them).
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageSplit, make_split

logger = logging.getLogger(__name__)

LETTER_CLASSES = list("ABCDEFGHIJ")
# Font files whose A-J are not letters (dingbats, Greek symbol encodings) or that are symbol fonts.
SYMBOL_FONT_PATTERN = re.compile(r"symbol|dingbat|D050000L|music|emoji", re.IGNORECASE)
FONT_SUFFIXES = (".ttf", ".otf")


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
    """Crop to the ink, fit the longest side to `box` pixels, centre in `out` x `out`."""
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
    """Fonts (`.ttf`/`.otf`) under `font_dirs` that draw every letter.

    A font is dropped when its file name matches `exclude` (symbol/dingbat
    fonts, which map A-J to other shapes), when a letter renders empty or
    identical to the font's `.notdef` box, or (with `dedupe`) when its
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
    """Family of a font file: the file stem up to the first `-` (`NotoSans-Bold` -> `NotoSans`)."""
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
    `max_rotation` degrees, scaled so its longest side spans a size drawn from
    `box_range` (in a `size` x `size` frame) and shifted by up to
    `max_shift` pixels from the centre. The jitter depends only on `seed`,
    the font's file name and the sample index, so it does not change when other
    fonts are added or removed.

    Args:
        font_path: A `.ttf`/`.otf` file.
        letters: Characters to draw.
        samples_per_letter: Jittered copies per letter (>= 1).
        size: Output side in pixels.
        seed: Jitter seed.
        max_rotation: Largest rotation in degrees.
        box_range: Range of the longest glyph side, in pixels of the output.
        max_shift: Largest shift of the centre, in pixels.

    Returns:
        uint8 array `(len(letters), samples_per_letter, size, size)`, white ink on black.

    Raises:
        ValueError: If `samples_per_letter` < 1 or a letter renders empty.
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
        font_dirs: Directories searched by `find_letter_fonts` (ignored if `fonts` is given).
        letters: The classes, one character each.
        samples_per_letter: Jittered samples per (font, letter).
        size: Image side.
        test_fraction: Fraction of the groups (families or fonts) held out for testing.
        seed: Seed of the font split and of the jitter.
        split_by: `"family"` (all styles of a family on one side: no
            NimbusSans-Bold in train with NimbusSans-Regular in test) or `"font"`.
        fonts: Explicit font files, instead of searching `font_dirs`.

    Returns:
        `(train, test)`; labels index `letters`.

    Raises:
        ValueError: If fewer than two groups of fonts are usable, or `split_by` is unknown.
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
        out.append(make_split(np.concatenate(imgs), np.concatenate(labs), list(letters), "letters"))
    return out[0], out[1]
