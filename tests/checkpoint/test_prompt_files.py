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
    assert meta["pool"] == {
        "kind": "PrefixPool",
        "num_tasks": 3,
        "num_layers": 2,
        "length": 4,
        "dim": 64,
        "momentum": 0.0,
    }
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


# ------------------------------------------------------------------------ damaged files load nothing at all
def _rewritten(path, tmp_path, edit):
    """A copy of the prompt file at `path` with its tensors edited by `edit(tensors)` and its metadata kept."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    _, header = _safetensors_header(path)
    edit(tensors)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, str(out), metadata=header["__metadata__"])
    return out


@pytest.mark.parametrize(
    "case, edit, fragment",
    [
        (
            "a listed tensor is missing",
            lambda t: t.pop("prompt_pool.prompts"),
            "prompt_pool.prompts: listed in the metadata but the file holds no such tensor",
        ),
        (
            "a tensor of another shape",
            lambda t: t.update({"head.bias": torch.zeros(1)}),
            r"head.bias: stored as float32 \(1,\), but the metadata gives float32 \(7,\)",
        ),
        (
            "a tensor of another dtype",
            lambda t: t.update({"head.bias": torch.zeros(7, dtype=torch.int64)}),
            r"head.bias: stored as int64 \(7,\), but the metadata gives float32 \(7,\)",
        ),
        (
            "an unlisted tensor",
            lambda t: t.update({"blocks.5.attn.extra": torch.zeros(2)}),
            "blocks.5.attn.extra: the file holds this tensor but its metadata does not list it",
        ),
    ],
    ids=lambda c: c if isinstance(c, str) and " " in c else "",
)
def test_a_damaged_file_raises_naming_the_key_and_changes_nothing(tmp_path, case, edit, fragment):
    path = _rewritten(_saved(tmp_path, pool_model(1), include_head=True), tmp_path, edit)
    model = pool_model(2)
    before = _unchanged(model)
    for strict in (True, False):
        with pytest.raises(ValueError, match=fragment):
            load_prompts(model, path, strict=strict)
        _assert_unchanged(model, before)


def test_a_tensor_whose_dtype_cannot_be_cast_is_refused(tmp_path):
    path = _saved(tmp_path, smope_model(1))
    model = smope_model(2)
    for layer in norga.prompts.smope_layers(model):
        layer.frequent = layer.frequent.float()  # a model whose flags are not bool: the file's bools do not cast
    before = _unchanged(model)
    with pytest.raises(
        ValueError,
        match=r"blocks.0.attn.prompt.frequent: dtype bool in the file cannot be loaded into "
        r"float32",
    ):
        load_prompts(model, path)
    _assert_unchanged(model, before)


def test_floating_tensors_are_cast_to_the_model_dtype(tmp_path):
    path = _saved(tmp_path, pool_model(1))
    model = pool_model(2).double()
    load_prompts(model, path)
    assert model.prompt_pool.prompts.dtype == torch.float64
    assert torch.equal(model.prompt_pool.prompts, pool_model(1).prompt_pool.prompts.double())


# ------------------------------------------------------------------------ settings are recorded and compared
def momentum_model(momentum: float):
    model = backbone()
    norga.patch_vit(model, prompt=norga.PrefixPool(3, 2, 4, 64, momentum=momentum), layers=[0, 1])
    return model


def test_pool_momentum_is_recorded_refused_under_strict_and_warned_otherwise(tmp_path):
    path = _saved(tmp_path, momentum_model(0.1))
    assert read_prompt_metadata(path)["pool"]["momentum"] == 0.1
    model = momentum_model(0.0)
    before = _unchanged(model)
    with pytest.raises(ValueError, match="prompt pool: momentum 0.1 in the file, 0.0 in this model"):
        load_prompts(model, path)
    _assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="prompt pool: momentum 0.1 in the file, 0.0 in this model"):
        load_prompts(model, path, strict=False)
    assert torch.equal(model.prompt_pool.prompts, momentum_model(0.1).prompt_pool.prompts)
    assert model.prompt_pool.momentum == 0.0  # a setting is the model's own; only tensors load


def test_a_smope_setting_mismatch_is_a_warning_without_strict(tmp_path):
    path = _saved(tmp_path, smope_model(1, top_k=2))
    model = smope_model(2, top_k=3)
    with pytest.warns(UserWarning, match="SMoPE differs: top_k=2 in the file, 3 in this model"):
        load_prompts(model, path, strict=False)
    assert torch.equal(model.blocks[0].attn.prompt.keys, smope_model(1).blocks[0].attn.prompt.keys)


def test_another_kind_of_prompt_is_an_error_in_both_modes(tmp_path):
    path = _saved(tmp_path, pool_model(1, activation=None))
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"gate None in the file, \{'kind': 'NoRGaGate'"):
            load_prompts(pool_model(2), path, strict=strict)


# ------------------------------------------------------------------------ frozen tasks follow a load
def test_train_only_before_load_protects_the_loaded_prompts(tmp_path):
    trained = pool_model(1)
    path = _saved(tmp_path, trained)
    model = pool_model(2)
    model.prompt_pool.train_only(2)  # before the load: the snapshot would be of the random initialisation
    load_prompts(model, path)
    optimizer = torch.optim.SGD([model.prompt_pool.prompts], lr=0.1, weight_decay=0.5)
    model.prompt_pool.protect(optimizer)
    norga.set_task(model, 2)
    model.train()
    model(_x()).sum().backward()
    optimizer.step()
    # tasks 0 and 1 are frozen: exactly the loaded values (weight decay moved them, protect put them back)
    assert torch.equal(model.prompt_pool.prompts[:2], trained.prompt_pool.prompts[:2])
    assert not torch.equal(model.prompt_pool.prompts[2], trained.prompt_pool.prompts[2])


# ------------------------------------------------------------------------ every option is recorded
# For each norga module with a checkpoint_config: how to build it, and another value for every option of its
# __init__. Options that only initialise tensors (the tensors are in the file) or that are other modules (they
# record themselves) are listed apart. A new option, or a new prompt type, fails here until it is recorded.
def _pool(**kw):
    return norga.PrefixPool(**{"num_tasks": 2, "num_layers": 1, "length": 4, "dim": 8, **kw})


OPTIONS = {
    norga.PrefixPrompt: (
        lambda **kw: norga.PrefixPrompt(**{"length": 4, "dim": 8, **kw}),
        {"length": 5, "dim": 16},
        {"init"},
    ),
    norga.PrefixPool: (_pool, {"num_tasks": 3, "num_layers": 2, "length": 5, "dim": 16, "momentum": 0.1}, {"init"}),
    norga.prompts.PoolPrompt: (
        lambda **kw: norga.prompts.PoolPrompt(_pool(num_layers=2), **{"index": 0, **kw}),
        {"index": 1},
        {"pool"},
    ),
    norga.SMoPE: (
        lambda **kw: norga.SMoPE(**{"dim": 8, "num_heads": 2, "num_experts": 4, "top_k": 2, **kw}),
        {
            "dim": 16,
            "num_heads": 4,
            "num_experts": 5,
            "top_k": 3,
            "noise_eps": 0.3,
            "scale": 0.25,
            "gate": "tanh",
            "router_weight": 0.1,
            "prototype_weight": 0.2,
        },
        set(),
    ),
    norga.NoRGaGate: (
        lambda **kw: norga.NoRGaGate(**kw),
        {"activation": "sigmoid", "learnable": False},
        {"alpha", "tau"},
    ),
    norga.prompts.L2P: (
        lambda **kw: norga.prompts.L2P(**{"num_tasks": 2, "dim": 8, "pool_size": 4, "top_k": 2, **kw}),
        {
            "num_tasks": 3,
            "dim": 16,
            "pool_size": 5,
            "length": 6,
            "top_k": 3,
            "layers": (0,),
            "key_dim": 4,
            "pull": "own",
        },
        set(),
    ),
    norga.prompts.DualPrompt: (
        lambda **kw: norga.prompts.DualPrompt(**{"num_tasks": 2, "dim": 8, **kw}),
        {
            "num_tasks": 3,
            "dim": 16,
            "pool_size": 5,
            "e_length": 6,
            "g_length": 4,
            "g_layers": (0,),
            "e_layers": (1, 2),
            "key_dim": 4,
        },
        set(),
    ),
    norga.prompts.CODAPrompt: (
        lambda **kw: norga.prompts.CODAPrompt(**{"num_tasks": 2, "dim": 8, "pool_size": 4, **kw}),
        {"num_tasks": 3, "dim": 16, "pool_size": 6, "length": 6, "ortho_mu": 0.1, "layers": (0, 1), "key_dim": 4},
        set(),
    ),
    norga.prompts.VQPrompt: (
        lambda **kw: norga.prompts.VQPrompt(**{"num_tasks": 2, "dim": 8, **kw}),
        {
            "num_tasks": 3,
            "dim": 16,
            "pool_size": 5,
            "length": 6,
            "temperature": 0.5,
            "vq_coef": 0.3,
            "commit_coef": 0.2,
            "layers": (0, 1),
            "key_dim": 4,
        },
        set(),
    ),
    norga.prompts.QueryLayerPrompt: (
        lambda **kw: norga.prompts.QueryLayerPrompt(norga.prompts.VQPrompt(2, 8), **{"slot": 0, **kw}),
        {"slot": 1},
        {"owner"},
    ),
}


def _recorded_types():
    import inspect

    found = set()
    for mod in (norga.prompts, norga.gates):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if (
                inspect.isclass(obj)
                and issubclass(obj, torch.nn.Module)
                and hasattr(obj, "checkpoint_config")
                and not inspect.isabstract(obj)
                and obj is not norga.prompts.QueryPrompt  # the base class: its subclasses are listed
            ):
                found.add(obj)
    return found


def test_every_prompt_type_is_in_the_options_table():
    assert _recorded_types() == set(OPTIONS), "add the new prompt type to OPTIONS with every option"


@pytest.mark.parametrize("cls", list(OPTIONS), ids=lambda c: c.__name__)
def test_every_option_is_recorded_in_the_checkpoint_config(cls):
    import inspect

    build, alternatives, apart = OPTIONS[cls]
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert params == set(alternatives) | apart, (
        f"{cls.__name__}: options not in the table: {params - set(alternatives) - apart}"
    )
    base = build().checkpoint_config()
    json.dumps(base)  # it goes into the file's JSON header
    for option, value in alternatives.items():
        assert build(**{option: value}).checkpoint_config() != base, f"{cls.__name__}.{option} is not recorded"


# ------------------------------------------------------------------------ the query prompt methods
QUERY_METHODS = {
    "l2p": lambda: norga.prompts.L2P(3, 64, pool_size=6, length=4, top_k=2, layers=(0, 1)),
    "dual": lambda: norga.prompts.DualPrompt(3, 64, pool_size=3, e_length=4, g_length=2, g_layers=(0,), e_layers=(1,)),
    "coda": lambda: norga.prompts.CODAPrompt(3, 64, pool_size=6, length=4, layers=(0, 1)),
    "vq": lambda: norga.prompts.VQPrompt(3, 64, pool_size=4, length=4, layers=(0, 1)),
}


def query_model(name: str, seed: int):
    model = backbone()
    torch.manual_seed(seed)
    norga.patch_vit(model, prompt=QUERY_METHODS[name]())
    norga.set_task(model, 1)
    return model


@pytest.mark.parametrize("name", list(QUERY_METHODS))
def test_query_methods_roundtrip(tmp_path, name):
    a = query_model(name, 1)
    path = _saved(tmp_path, a, include_head=True)
    assert read_prompt_metadata(path)["pool"]["kind"] == type(a.prompt_pool).__name__
    b = query_model(name, 2)
    with torch.no_grad():
        assert not torch.equal(a(_x()), b(_x()))
        load_prompts(b, path)
        assert torch.equal(a(_x()), b(_x()))
    other = backbone()
    norga.patch_vit(other, prompt=norga.prompts.L2P(3, 64, pool_size=5, length=4, top_k=2, layers=(0, 1)))
    if name != "l2p":
        with pytest.raises(ValueError, match=r"prompt pool: \{'kind'"):
            load_prompts(other, path)
