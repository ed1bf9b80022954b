"""Reading a ViT encoder out of an ONNX graph: the graph index, the naming schemes and the traced pieces.

How the graph is read (`clstream.convert` assembles the pieces into a timm state dict):

- Named initializers: cls token, patch-embedding conv, LayerNorm weights, layer-scale gammas, q/k/v/proj/fc
  biases, final norm.
- The q/k/v/proj/fc1/fc2 weight matrices are unnamed `MatMul` constants (`onnx::MatMul_*`, already transposed
  to `(in, out)` by constant folding). Each is identified by the named bias of the `Add` that consumes the
  `MatMul` output, and transposed to torch's `(out, in)`.
- The position embedding was constant-folded into two unnamed tensors, the class position `(1, 1, D)` and the
  patch grid `(1, N, D)`, joined by a `Concat`. The patch part is traced back through the
  `Reshape`/`Transpose`/`Cast`/`Resize` chain to its constant; the `Resize` is skipped, so the native grid is
  recovered unchanged.
- Head count and LayerNorm epsilon are read from the graph's shapes and constants where it reveals them.

Two naming schemes are understood: the Hugging Face DINOv2 names (any module prefix, e.g. `backbone.`) and
timm's own names (a timm DINOv2-style ViT exported with `torch.onnx.export`).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .sources import verify_sha256

if TYPE_CHECKING:  # typing only: onnx is imported when a graph is read
    import onnx

logger = logging.getLogger(__name__)


def import_onnx() -> Any:
    """The `onnx` module, or an ImportError that says how to install it."""
    try:
        import onnx  # noqa: F811
    except ImportError as exc:  # pragma: no cover - exercised via monkeypatch in tests
        raise ImportError(
            "reading ONNX files needs the 'onnx' package, which is not installed; install it with `pip install onnx`"
        ) from exc
    return onnx


def load_onnx_model(path: str | os.PathLike[str], expected_sha256: str | None) -> onnx.ModelProto:
    """Reads an ONNX file, after checking its sha256 when `expected_sha256` is given.

    Raises:
        ImportError: If the `onnx` package is missing.
        FileNotFoundError: If `path` does not exist.
        ValueError: On a checksum mismatch or a file that is not a readable ONNX model.
    """
    onnx = import_onnx()
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


class Graph:
    """Index over an ONNX graph: constants, producers and consumers of tensors."""

    def __init__(self, model: onnx.ModelProto) -> None:
        onnx = import_onnx()
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
        """Whether tensor `name` is an initializer or the output of a `Constant` node."""
        return name in self._const_protos

    def const(self, name: str) -> np.ndarray:
        """The value of constant tensor `name` (a cached copy)."""
        if name not in self._const_cache:
            arr = self._numpy_helper.to_array(self._const_protos[name])
            self._const_cache[name] = np.array(arr, copy=True)
        return self._const_cache[name]

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        """Attribute `name` of `node`, or `default` when the node does not set it."""
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

SCHEMES: dict[str, tuple[str, list[tuple[re.Pattern[str], str, str]]]] = {
    # scheme name -> (suffix of the cls-token initializer, rules)
    "huggingface-dinov2": ("embeddings.cls_token", _HF_RULES),
    "timm": ("cls_token", _TIMM_RULES),
}


def detect_scheme(g: Graph) -> tuple[str, str]:
    """Return (scheme name, module prefix) from the cls-token initializer name."""
    for scheme, (suffix, _) in SCHEMES.items():
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
def linear_weight_from_bias(g: Graph, bias_name: str) -> np.ndarray:
    """Find the torch-layout `(out, in)` weight of the Linear whose bias is `bias_name`."""
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


def _trace_to_const(g: Graph, name: str, allowed: tuple[str, ...]) -> tuple[str, list[Any]] | None:
    """Walk producers back from `name` through `allowed` ops (data input 0) to a constant."""
    chain: list[Any] = []
    while not g.is_const(name):
        node = g.producer.get(name)
        if node is None or node.op_type not in allowed:
            return None
        chain.append(node)
        name = node.input[0]
    return name, chain


def _replay_patch_chain(g: Graph, const_name: str, chain: list[Any], dim: int) -> np.ndarray:
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


def folded_pos_embed(g: Graph, dim: int) -> np.ndarray:
    """Find `Concat(cls_pos (1,1,D), patch_pos)` built from constants; return (1, 1+N, D)."""
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


def _shape_values(g: Graph, name: str) -> list[int | None]:
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


def infer_num_heads(g: Graph, qkv_bias_name: str, dim: int) -> int | None:
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


def layer_norm_eps(g: Graph, weight_name: str) -> float | None:
    """Best-effort epsilon of the LayerNorm that owns `weight_name`."""
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


def value_info_dims(value_info: Any) -> tuple[int | str, ...]:
    """Shape of a graph input or output: ints, and strings for symbolic dimensions."""
    return tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in value_info.type.tensor_type.shape.dim)
