"""Prompt-only checkpoints: norga.checkpoint.save_prompts / load_prompts."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

import norga
from norga.checkpoint import load_prompts, prompt_state_dict, read_prompt_metadata, save_prompts

NAME = "vit_tiny_patch16_224"


def backbone(name: str = NAME, seed: int = 0, depth: int = 3):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        name, pretrained=False, num_classes=7, img_size=32, patch_size=8, depth=depth, embed_dim=64, num_heads=4
    )
    return model.eval()


def pool_model(seed: int, *, layers=(0, 1), length: int = 4, tasks: int = 3, activation="sigmoid", name=NAME):
    model = backbone(name)
    torch.manual_seed(seed)  # prompts, gates and head differ between seeds; the backbone does not
    gate = None if activation is None else norga.NoRGaGate(activation)
    norga.patch_vit(model, gate=gate, prompt=norga.PrefixPool(tasks, len(layers), length, 64), layers=list(layers))
    with torch.no_grad():
        for layer in norga.patch.patched_layers(model):
            if layer.module.prefix_gate is not None:
                layer.module.prefix_gate.alpha.uniform_(0.2, 2.0)
                layer.module.prefix_gate.tau.uniform_(0.2, 2.0)
        model.head.weight.normal_()
        model.head.bias.normal_()
    return model


def smope_model(seed: int, top_k: int = 2):
    model = backbone()
    torch.manual_seed(seed)
    norga.patch_vit(model, prompt=norga.smope_factory(num_experts=6, top_k=top_k), layers=[0, 1])
    return model


def _x(batch: int = 5):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def test_roundtrip_pool_gates_head_gives_identical_outputs(tmp_path):
    path = tmp_path / "p.safetensors"
    a = pool_model(1)
    save_prompts(a, path, include_head=True)
    b = pool_model(2)
    tasks = torch.tensor([0, 2, 1, 1, 0])
    with norga.use_task(a, tasks), norga.use_task(b, tasks), torch.no_grad():
        ya = a(_x())
        assert not torch.equal(ya, b(_x()))  # a different init differs: the equality after loading means something
        params_before = {n: p for n, p in b.named_parameters()}
        result = load_prompts(b, path)
        yb = b(_x())
    assert torch.equal(ya, yb)
    assert "prompt_pool.prompts" in result.loaded_keys and "head.weight" in result.loaded_keys
    assert result.missing_keys == [] and result.unexpected_keys == []
    for n, p in b.named_parameters():  # copied in place: an optimizer built before still holds them
        assert p is params_before[n]
    for n, t in prompt_state_dict(a, include_head=True).items():
        assert torch.equal(t, b.state_dict()[n]), n


def test_without_head_the_head_is_not_stored_or_changed(tmp_path):
    path = tmp_path / "p.safetensors"
    a = pool_model(1)
    save_prompts(a, path)
    b = pool_model(2)
    head = b.head.weight.clone()
    load_prompts(b, path)
    assert torch.equal(b.head.weight, head)
    assert torch.equal(b.prompt_pool.prompts, a.prompt_pool.prompts)
    assert read_prompt_metadata(path)["head"] is None


def _safetensors_header(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def test_file_holds_no_backbone_weights(tmp_path):
    path = tmp_path / "p.safetensors"
    a = pool_model(1)
    save_prompts(a, path, include_head=True)
    n, header = _safetensors_header(path)
    keys = {k for k in header if k != "__metadata__"}
    expected = {
        "prompt_pool.prompts",
        "blocks.0.attn.prefix_gate.alpha",
        "blocks.0.attn.prefix_gate.tau",
        "blocks.1.attn.prefix_gate.alpha",
        "blocks.1.attn.prefix_gate.tau",
        "head.weight",
        "head.bias",
    }
    assert keys == expected
    data = sum(a.state_dict()[k].numel() * a.state_dict()[k].element_size() for k in expected)
    assert os.path.getsize(path) == 8 + n + data  # nothing else in the file
    backbone_bytes = sum(t.numel() * t.element_size() for k, t in a.state_dict().items() if k not in expected)
    assert data < backbone_bytes / 10


def test_metadata(tmp_path):
    path = tmp_path / "p.safetensors"
    a = pool_model(1, activation="tanh")
    save_prompts(a, path)
    meta = read_prompt_metadata(path)
    assert meta["norga_version"] == norga.__version__
    assert meta["model_name"] == NAME
    assert [layer["index"] for layer in meta["layers"]] == [0, 1]
    assert [layer["name"] for layer in meta["layers"]] == ["blocks.0.attn", "blocks.1.attn"]
    assert meta["layers"][0]["class"] == "PrefixMoEAttention"
    assert meta["layers"][1]["gate"] == {"kind": "NoRGaGate", "activation": "tanh", "learnable": True}
    assert meta["layers"][1]["prompt"] == {"kind": "PoolPrompt", "pool_layer": 1}
    assert meta["pool"] == {"num_tasks": 3, "num_layers": 2, "length": 4, "dim": 64}
    assert meta["tensors"]["prompt_pool.prompts"] == {"shape": [3, 2, 2, 4, 64], "dtype": "float32"}
    save_prompts(a, path, model_name="my-backbone")
    assert read_prompt_metadata(path)["model_name"] == "my-backbone"


def test_smope_roundtrip_with_buffers(tmp_path):
    path = tmp_path / "s.safetensors"
    a = smope_model(1)
    with norga.count_usage(a):
        a(_x(6))
    norga.end_task(a)
    a(_x(3))
    a.eval()
    layers_a = norga.prompts.smope_layers(a)
    assert layers_a[0].usage.sum() > 0 and bool(layers_a[0].has_snapshot)
    save_prompts(a, path)
    b = smope_model(2).eval()
    with torch.no_grad():
        assert not torch.equal(a(_x()), b(_x()))
        load_prompts(b, path)
        assert torch.equal(a(_x()), b(_x()))
    for ma, mb in zip(layers_a, norga.prompts.smope_layers(b)):
        for name in ("keys", "values", "usage", "frequent", "key_snapshot", "has_snapshot"):
            assert torch.equal(getattr(ma, name), getattr(mb, name)), name
    meta = read_prompt_metadata(path)["layers"][0]["prompt"]
    assert meta["kind"] == "SMoPE" and meta["num_experts"] == 6 and meta["top_k"] == 2 and meta["dense"] is False


def test_per_layer_prefix_prompts_roundtrip(tmp_path):
    path = tmp_path / "p.safetensors"

    def make(seed):
        m = backbone()
        torch.manual_seed(seed)
        norga.patch_vit(m, gate="gelu", layers=[1, 2], prompt=lambda i, attn: norga.PrefixPrompt(length=3, dim=64))
        return m

    a, b = make(1), make(2)
    save_prompts(a, path)
    load_prompts(b, path)
    with torch.no_grad():
        assert torch.equal(a(_x()), b(_x()))
    assert read_prompt_metadata(path)["layers"][0]["prompt"] == {"kind": "PrefixPrompt", "length": 3, "dim": 64}


# ----------------------------------------------------------------------------------------------- mismatches
def _saved(tmp_path, model, **kw):
    path = tmp_path / "p.safetensors"
    save_prompts(model, path, **kw)
    return path


def _unchanged(model):
    return {k: v.clone() for k, v in prompt_state_dict(model, include_head=True).items()}


def _assert_unchanged(model, before):
    for k, v in prompt_state_dict(model, include_head=True).items():
        assert torch.equal(v, before[k]), k


def test_other_model_strict_error_and_non_strict_warning(tmp_path):
    path = _saved(tmp_path, pool_model(1))
    other = pool_model(2, name="vit_small_patch16_224")  # same shapes, another timm architecture
    before = _unchanged(other)
    with pytest.raises(
        ValueError,
        match=r"another model: the file was saved from 'vit_tiny_patch16_224', this model is 'vit_small_patch16_224'",
    ):
        load_prompts(other, path)
    _assert_unchanged(other, before)
    with pytest.warns(UserWarning, match="another model"):
        load_prompts(other, path, strict=False)
    assert torch.equal(other.prompt_pool.prompts, pool_model(1).prompt_pool.prompts)


def test_other_layers(tmp_path):
    path = _saved(tmp_path, pool_model(1, layers=(0, 1)))
    other = pool_model(2, layers=(0, 2))
    with pytest.raises(ValueError) as e:
        load_prompts(other, path)
    msg = str(e.value)
    assert "other layers: the file has prompts for layers [0, 1], this model has layers [0, 2] patched" in msg
    assert "missing keys" in msg and "blocks.2.attn.prefix_gate.alpha" in msg
    assert "unexpected keys" in msg and "blocks.1.attn.prefix_gate.alpha" in msg


def test_other_prompt_length(tmp_path):
    path = _saved(tmp_path, pool_model(1, length=4))
    other = pool_model(2, length=5)
    before = _unchanged(other)
    with pytest.raises(ValueError) as e:
        load_prompts(other, path)
    assert "prompt pool: prompt length 4 in the file, 5 in this model" in str(e.value)
    assert "prompt_pool.prompts: shape (3, 2, 2, 4, 64) in the file, (3, 2, 2, 5, 64) in this model" in str(e.value)
    _assert_unchanged(other, before)
    # a shape mismatch is never loaded, strict or not
    with pytest.raises(ValueError, match="prompt length 4 in the file, 5 in this model"):
        load_prompts(other, path, strict=False)


def test_other_number_of_tasks(tmp_path):
    path = _saved(tmp_path, pool_model(1, tasks=3))
    with pytest.raises(ValueError, match="number of tasks 3 in the file, 4 in this model"):
        load_prompts(pool_model(2, tasks=4), path)


def test_other_gate_activation_and_no_gate(tmp_path):
    path = _saved(tmp_path, pool_model(1, activation="tanh"))
    with pytest.raises(
        ValueError,
        match=(
            r"layer 0 \(blocks.0.attn\): gate NoRGaGate differs: "
            r"activation='tanh' in the file, 'sigmoid' in this model"
        ),
    ):
        load_prompts(pool_model(2, activation="sigmoid"), path)
    with pytest.raises(ValueError, match=r"gate \{'kind': 'NoRGaGate'.*\} in the file, None in this model"):
        load_prompts(pool_model(2, activation=None), path)


def test_other_smope_top_k(tmp_path):
    path = _saved(tmp_path, smope_model(1, top_k=2))
    with pytest.raises(ValueError, match="SMoPE differs: top_k=2 in the file, 3 in this model"):
        load_prompts(smope_model(2, top_k=3), path)


def test_smope_dense_flag_is_checked(tmp_path):
    path = _saved(tmp_path, smope_model(1))
    other = smope_model(2)
    norga.set_dense(other, True)
    with pytest.raises(ValueError, match="dense=False in the file, True in this model"):
        load_prompts(other, path)


def test_head_in_file_but_model_has_another_head_shape(tmp_path):
    path = _saved(tmp_path, pool_model(1), include_head=True)
    other = pool_model(2)
    other.reset_classifier(3)
    with pytest.raises(ValueError, match=r"head.weight: shape \(7, 64\) in the file, \(3, 64\) in this model"):
        load_prompts(other, path)


def test_not_a_norga_file(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a norga prompt checkpoint"):
        load_prompts(pool_model(1), plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        read_prompt_metadata(garbage)
    with pytest.raises(FileNotFoundError):
        read_prompt_metadata(tmp_path / "missing.safetensors")


def test_unpatched_model_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no norga-patched attention layer"):
        save_prompts(backbone(), tmp_path / "x.safetensors")
    path = _saved(tmp_path, pool_model(1))
    with pytest.raises(ValueError, match="no norga-patched attention layer"):
        load_prompts(backbone(), path)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        save_prompts(pool_model(1), 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="strict must be a bool"):
        load_prompts(pool_model(1), path, strict="yes")  # type: ignore[arg-type]
    no_head = pool_model(1)
    no_head.reset_classifier(0)
    with pytest.raises(ValueError, match="include_head=True but VisionTransformer has no classifier"):
        save_prompts(no_head, tmp_path / "y.safetensors", include_head=True)


def test_wrapped_model_saves_unwrapped_keys(tmp_path):
    class Wrapper(torch.nn.Module):  # what torch.compile's OptimizedModule looks like to unwrap_model
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    a = pool_model(1)
    path = _saved(tmp_path, Wrapper(a))
    assert "prompt_pool.prompts" in read_prompt_metadata(path)["tensors"]
    b = pool_model(2)
    load_prompts(Wrapper(b), path)
    assert torch.equal(a.prompt_pool.prompts, b.prompt_pool.prompts)
