"""Migration from the authors' NoRGa / HiDe-Prompt / SMoPE checkpoints (norga.migrate).

The authors' tensors are built here in their layout, each element encoding its own index, so a
permutation error cannot pass; expected results come from the index formula or from the authors'
attention equation (``NoRGa_Attention``: ``s + act(s * act_scale[0]) * act_scale[1]``).
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from tolerance import assert_within, norga_gate_err, prefix_layer_tol, unit_roundoff

import norga
from norga.migrate import (
    act_scale_to_gates,
    authors_state_dict,
    e_prompt_to_pool,
    load_norga_checkpoint,
    load_smope_checkpoint,
    smope_experts,
)

H, D, DIM = 4, 16, 64


def backbone(depth: int = 3, num_classes: int = 7):
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=num_classes,
        img_size=32,
        patch_size=8,
        depth=depth,
        embed_dim=DIM,
        num_heads=H,
    ).eval()


def coded_e_prompt(layers: int, pool: int, length: int, heads: int = H, head_dim: int = D) -> torch.Tensor:
    """e_prompt.prompt (layers, 2, pool, L, H, D) whose element [i, kv, t, l, h, d] encodes its index."""
    i, kv, t, l, h, d = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float64) for n in (layers, 2, pool, length, heads, head_dim)), indexing="ij"
    )
    return code(i, kv, t, l, h, d)


def code(i, kv, t, l, h, d):
    return (((((i * 2 + kv) * 10 + t) * 10 + l) * 10 + h) * 100 + d) / 1e5


def test_e_prompt_to_pool_follows_the_index_formula():
    layers, pool, length = 3, 4, 5
    src = coded_e_prompt(layers, pool, length, heads=2, head_dim=3)
    out = e_prompt_to_pool(src)
    assert out.shape == (pool, layers, 2, length, 2 * 3)
    t, i, kv, l, c = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float64) for n in (pool, layers, 2, length, 6)), indexing="ij"
    )
    expected = code(i, kv, t, l, torch.div(c, 3, rounding_mode="floor"), c % 3)  # flat column c = h * D + d
    assert torch.equal(out, expected)
    assert out.data_ptr() != src.data_ptr()


@pytest.mark.parametrize("shape", [(3, 2, 4, 5, 6), (3, 3, 4, 5, 2, 3), (2, 4, 5, 2, 3, 1, 1)])
def test_e_prompt_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"must have shape \(layers, 2, pool, length, num_heads, head_dim\)"):
        e_prompt_to_pool(torch.zeros(shape))


def test_e_prompt_bad_types():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        e_prompt_to_pool([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        e_prompt_to_pool(torch.zeros(1, 2, 1, 1, 1, 1, dtype=torch.long))


def test_act_scale_index_0_is_tau_and_1_is_alpha():
    act_scale = torch.tensor([[0.3, 1.7], [2.5, -0.4], [1.1, 0.6]]).view(3, 2, 1, 1)
    gates = act_scale_to_gates(act_scale, "tanh")
    s = torch.linspace(-4, 4, 101)
    for i, gate in enumerate(gates):
        tau, alpha = float(act_scale[i, 0]), float(act_scale[i, 1])
        assert float(gate.tau.detach()) == tau and float(gate.alpha.detach()) == alpha  # float32 -> float -> float32
        authors = s + torch.tanh(s * act_scale[i, 0]) * act_scale[i, 1]  # NoRGa_Attention.forward, (1, 101)
        # two float32 evaluations of s + alpha tanh(tau s), each within norga_gate_err of the exact value
        assert_within(gate(s), authors[0], 2 * norga_gate_err(s, "tanh", alpha, tau, torch.float32))
        assert isinstance(gate.alpha, torch.nn.Parameter)
    frozen = act_scale_to_gates(act_scale, "sigmoid", learnable=False)
    assert not isinstance(frozen[0].alpha, torch.nn.Parameter)


def test_act_scale_errors():
    with pytest.raises(ValueError, match=r"act_scale must have shape \(layers, 2, 1, 1\)"):
        act_scale_to_gates(torch.ones(3, 3, 1, 1), "tanh")
    with pytest.raises(ValueError, match=r"act_scale must have shape \(layers, 2, 1, 1\)"):
        act_scale_to_gates(torch.ones(3, 2, 2, 1), "tanh")
    with pytest.raises(ValueError, match="non-finite"):
        act_scale_to_gates(torch.tensor([float("nan"), 1.0]).view(1, 2, 1, 1), "tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        act_scale_to_gates(torch.ones(1, 2, 1, 1), "swish")


def authors_attention(attn, x, key_prefix, value_prefix, act_scale=None, act=torch.tanh):
    """NoRGa_Attention / HiDe-Prompt PreT_Attention for one sample, from the authors' equations.

    x: (1, N, C); key_prefix, value_prefix: (L, H, D) in the checkpoint layout.
    """
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
    kp = key_prefix.permute(1, 0, 2).unsqueeze(0)  # (1, H, L, D)
    vp = value_prefix.permute(1, 0, 2).unsqueeze(0)
    scale = (C // H) ** -0.5
    prompt_attn = (q @ kp.transpose(-2, -1)) * scale
    if act_scale is not None:
        prompt_attn = prompt_attn + act(prompt_attn * act_scale[0]) * act_scale[1]
    scores = torch.cat([prompt_attn, (q @ k.transpose(-2, -1)) * scale], dim=-1).softmax(dim=-1)
    out = (scores @ torch.cat([vp, v], dim=2)).transpose(1, 2).reshape(B, N, C)
    return attn.proj(out)


def _norga_ckpt(tasks=3, layers=2, length=4, act_scale=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    model = {
        "e_prompt.prompt": torch.rand(layers, 2, tasks, length, H, D, generator=g) * 2 - 1,
        "head.weight": torch.randn(7, DIM, generator=g),
        "head.bias": torch.randn(7, generator=g),
        "blocks.0.attn.qkv.weight": torch.randn(3 * DIM, DIM, generator=g),  # backbone keys are ignored
    }
    if act_scale:
        # distinct tau (index 0) and alpha (index 1) per layer: swapping them changes the output
        model["e_prompt.act_scale"] = torch.tensor([[0.5, 2.0], [1.5, 0.7]])[:layers].view(layers, 2, 1, 1)
    return {"model": model, "epoch": 4}


@pytest.mark.parametrize("norga_ckpt", [True, False], ids=["norga", "hide-prompt"])
def test_loaded_layers_match_the_authors_attention(norga_ckpt):
    ckpt = _norga_ckpt(act_scale=norga_ckpt)
    state = ckpt["model"]
    model = backbone()
    qkv_before = model.blocks[0].attn.qkv.weight.clone()
    load_norga_checkpoint(model, ckpt, activation="tanh" if norga_ckpt else None, layers=[0, 1])
    assert torch.equal(model.blocks[0].attn.qkv.weight, qkv_before)  # the backbone is not touched
    assert torch.equal(model.head.weight, state["head.weight"]) and torch.equal(model.head.bias, state["head.bias"])
    assert [layer.index for layer in norga.patch.patched_layers(model)] == [0, 1]
    x = torch.randn(3, 17, DIM, generator=torch.Generator().manual_seed(5))
    tasks = torch.tensor([2, 0, 1])
    with torch.no_grad(), norga.use_task(model, tasks):
        for i, block in enumerate(model.blocks[:2]):
            got = block.attn(x)
            for b, t in enumerate(tasks.tolist()):
                key, value = state["e_prompt.prompt"][i, 0, t], state["e_prompt.prompt"][i, 1, t]
                act_scale = state["e_prompt.act_scale"][i] if norga_ckpt else None
                want = authors_attention(block.attn, x[b : b + 1], key, value, act_scale)
                # two float32 evaluations of the layer (norga's and the authors'), each within the bound
                gate = (
                    {}
                    if act_scale is None
                    else {"act": "tanh", "alpha": float(act_scale[1]), "tau": float(act_scale[0])}
                )
                pk, pv = (p.permute(1, 0, 2).unsqueeze(0) for p in (key, value))  # (1, H, L, D)
                bound = prefix_layer_tol(block.attn, x[b : b + 1], pk, pv, **gate)
                torch.testing.assert_close(got[b : b + 1], want, rtol=0, atol=2 * bound)
    for layer in norga.patch.patched_layers(model):
        assert (layer.module.prefix_gate is not None) == norga_ckpt


def test_checkpoint_containers_and_paths(tmp_path):
    ckpt = _norga_ckpt()
    flat = {"module." + k: v for k, v in ckpt["model"].items()}  # saved from a DDP wrapper
    assert set(authors_state_dict(flat)) == set(ckpt["model"])
    assert set(authors_state_dict({"state_dict": ckpt["model"]})) == set(ckpt["model"])
    path = tmp_path / "task2_checkpoint.pth"
    torch.save(ckpt, path)
    model = load_norga_checkpoint(backbone(), path, activation="tanh", layers=[0, 1])
    assert torch.equal(model.prompt_pool.prompts, e_prompt_to_pool(ckpt["model"]["e_prompt.prompt"]))
    pickled = tmp_path / "with_args.pth"
    torch.save({**ckpt, "args": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(ValueError, match="weights_only=False"):
        authors_state_dict(pickled)
    with pytest.raises(FileNotFoundError):
        authors_state_dict(tmp_path / "nope.pth")


def test_norga_checkpoint_errors():
    with pytest.raises(ValueError, match="pass activation= the --gate_act"):
        load_norga_checkpoint(backbone(), _norga_ckpt(), layers=[0, 1])
    with pytest.raises(ValueError, match="has no e_prompt.act_scale"):
        load_norga_checkpoint(backbone(), _norga_ckpt(act_scale=False), activation="tanh", layers=[0, 1])
    with pytest.raises(ValueError, match=r"prompts for 2 layers but layers=\[0, 1, 2, 3, 4\] names 5"):
        load_norga_checkpoint(backbone(depth=5), _norga_ckpt(), activation="tanh")
    with pytest.raises(ValueError, match="no 'e_prompt.prompt' key"):
        load_norga_checkpoint(backbone(), {"model": {"head.weight": torch.zeros(7, DIM)}}, activation="tanh")
    wrong_heads = _norga_ckpt()
    wrong_heads["model"]["e_prompt.prompt"] = torch.zeros(2, 2, 3, 4, 8, 8)
    with pytest.raises(ValueError, match="has 8 heads of width 8, but layer 0 .* has 4 heads of width 16"):
        load_norga_checkpoint(backbone(), wrong_heads, activation="tanh", layers=[0, 1])
    with pytest.raises(ValueError, match=r"create the model with num_classes=7"):
        load_norga_checkpoint(backbone(num_classes=10), _norga_ckpt(), activation="tanh", layers=[0, 1])
    model = load_norga_checkpoint(
        backbone(num_classes=10), _norga_ckpt(), activation="tanh", layers=[0, 1], include_head=False
    )
    assert model.prompt_pool.num_tasks == 3


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: m.update({"head.bias": torch.zeros(1)}), r"head.bias has shape \(1,\), the model's head \(7,\)"),
        (lambda m: m.pop("head.bias"), "has no bias, the model's head has one: the head would load only in part"),
        (lambda m: m.update({"head.weight": torch.zeros(7, DIM, dtype=torch.long)}), "head.weight"),
    ],
    ids=["bias-shape", "no-bias", "integer-weight"],
)
def test_a_head_that_would_load_in_part_changes_nothing(edit, fragment):
    ckpt = _norga_ckpt()
    edit(ckpt["model"])
    model = backbone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=fragment):
        load_norga_checkpoint(model, ckpt, activation="tanh", layers=[0, 1])
    assert not hasattr(model, "prompt_pool") and not norga.patch.patched_layers(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------- SMoPE
def smope_code(e, j, h, d, kv):
    return 1000.0 * e + 100.0 * j + 10.0 * h + d / 100.0 + 0.5 * kv


def smope_state(layers=(0, 1), experts=6, prefix="prompt."):
    state = {}
    for e in layers:
        for j in range(experts):
            for h in range(H):
                for kv, name in enumerate(("pk", "pv")):
                    state[f"{prefix}e_{name}_{e}_{j}_{h}"] = smope_code(
                        e, j, h, torch.arange(D, dtype=torch.float64), kv
                    ).view(1, D)
    g = torch.Generator().manual_seed(3)
    state["last.weight"] = torch.randn(7, DIM, generator=g, dtype=torch.float64)
    state["last.bias"] = torch.randn(7, generator=g, dtype=torch.float64)
    return state


def test_smope_experts_follow_the_index_formula():
    state = smope_state()
    keys, values = smope_experts(state, 1)
    assert keys.shape == values.shape == (H, 6, D)
    h, j, d = torch.meshgrid(torch.arange(H), torch.arange(6), torch.arange(D), indexing="ij")
    assert torch.equal(keys, smope_code(1, j.double(), h.double(), d.double(), 0))
    assert torch.equal(values, smope_code(1, j.double(), h.double(), d.double(), 1))


def test_load_smope_checkpoint():
    state = smope_state(layers=(0, 1))
    model = load_smope_checkpoint(backbone(), {"model": state}, layers=[1, 2], top_k=2, noise_eps=0.3)
    smopes = norga.prompts.smope_layers(model)
    assert [layer.index for layer in norga.patch.patched_layers(model)] == [1, 2]
    assert len(smopes) == 2
    h, j, d = (t.double() for t in torch.meshgrid(torch.arange(H), torch.arange(6), torch.arange(D), indexing="ij"))
    for e, m in enumerate(smopes):
        assert m.num_experts == 6 and m.top_k == 2 and m.noise_eps == 0.3
        # the float64 codes stored in float32: one rounding, at most u of each value
        keys, values = smope_code(e, j, h, d, 0), smope_code(e, j, h, d, 1)
        assert_within(m.keys, keys, unit_roundoff(torch.float32) * keys.abs())
        assert_within(m.values, values, unit_roundoff(torch.float32) * values.abs())
        assert m.usage.sum() == 0 and not bool(m.has_snapshot)
    assert torch.equal(model.head.weight, state["last.weight"].float())  # the same rounding to float32
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_smope_errors():
    state = smope_state()
    del state["prompt.e_pv_0_3_2"]
    with pytest.raises(ValueError, match=r"missing \['prompt.e_pv_0_3_2'\]"):
        smope_experts(state, 0)
    with pytest.raises(ValueError, match="no SMoPE expert parameters e_pk_5_"):
        smope_experts(smope_state(), 5)
    mixed = {**smope_state(prefix="prompt."), **smope_state(prefix="other.")}
    with pytest.raises(ValueError, match="several prefixes"):
        smope_experts(mixed, 0)
    keys, _ = smope_experts(mixed, 0, prefix="other.")
    assert keys.shape == (H, 6, D)
    bad = smope_state()
    bad["prompt.e_pk_0_0_0"] = torch.zeros(2, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"each expert must be a \(1, head_dim\) vector"):
        smope_experts(bad, 0)
    with pytest.raises(ValueError, match="not an SMoPE checkpoint"):
        load_smope_checkpoint(backbone(), {"head.weight": torch.zeros(7, DIM)})
    with pytest.raises(ValueError, match=r"SMoPE experts for 2 layers but layers=\[0, 1, 2, 3, 4, 5\]"):
        load_smope_checkpoint(backbone(depth=6), smope_state())


# ------------------------------------------------------------------------------- the CODA-Prompt codebase
def coda_state(method: str, layers=(0, 1, 2, 3, 4), pool: int = 6, length: int = 4, g_layers=(0, 1)):
    """`ViTZoo.state_dict()` of the authors' codebase: each prompt element encodes its (kind, layer, index)."""
    kinds = {"l2p": ("e_p", "e_k"), "vq": ("e_p", "e_k"), "coda": ("e_p", "e_k", "e_a"), "dual": ("e_p", "e_k")}
    state = {"feat.cls_token": torch.zeros(1, 1, DIM)}
    e_layers = (2, 3, 4) if method == "dual" else layers
    for c, kind in enumerate(kinds[method]):
        for layer in e_layers:
            shape = (pool, length, DIM) if kind == "e_p" else (pool, DIM)
            state[f"prompt.{kind}_{layer}"] = torch.arange(math.prod(shape), dtype=torch.float32).reshape(
                shape
            ) / 1e4 + (10 * c + layer)
    if method == "dual":
        for layer in g_layers:
            state[f"prompt.g_p_{layer}"] = torch.full((2, DIM), 100.0 + layer)
    g = torch.Generator().manual_seed(4)
    state["last.weight"] = torch.randn(7, DIM, generator=g)
    state["last.bias"] = torch.randn(7, generator=g)
    return state


@pytest.mark.parametrize("method", ["l2p", "dual", "coda", "vq"])
def test_load_coda_checkpoint_places_every_tensor(method):
    state = coda_state(method)
    model = backbone(depth=5)
    rng = torch.random.get_rng_state()
    norga.migrate.load_coda_checkpoint(model, {**state}, method, num_tasks=3, task=1)
    assert torch.equal(torch.random.get_rng_state(), rng)  # building the module drew nothing from the user's RNG
    pool = model.prompt_pool
    names = {
        "e_p": "e_prompts" if method == "dual" else "prompts",
        "e_k": "e_keys" if method == "dual" else "keys",
        "e_a": "attention",
        "g_p": "g_prompts",
    }
    for key, value in state.items():
        kind, _, layer = key.removeprefix("prompt.").rpartition("_")
        if kind not in names:
            continue
        layers = pool.g_layers if kind == "g_p" else (pool.e_layers if method == "dual" else pool.layers)
        assert torch.equal(getattr(pool, names[kind])[layers.index(int(layer))], value), key
    assert torch.equal(model.head.weight, state["last.weight"]) and torch.equal(model.head.bias, state["last.bias"])
    assert pool.task == 1 and [lay.index for lay in norga.patch.patched_layers(model)] == [0, 1, 2, 3, 4]
    if method == "coda":
        assert pool.started == 2
        before = pool.keys.detach().clone()
        norga.set_task(model, 1)  # task 1's components are in the file: not drawn again
        assert torch.equal(pool.keys, before)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))


def test_load_coda_checkpoint_shallow_l2p_and_options(tmp_path):
    state = coda_state("l2p", layers=(0,))
    path = tmp_path / "task_1class.pth"
    torch.save(state, path)
    model = norga.migrate.load_coda_checkpoint(backbone(), path, "l2p", num_tasks=2, top_k=3, pull="own")
    assert model.prompt_pool.layers == (0,) and model.prompt_pool.top_k == 3 and model.prompt_pool.pull == "own"
    coda = norga.migrate.load_coda_checkpoint(backbone(depth=5), coda_state("coda"), "coda", num_tasks=3, ortho_mu=0.1)
    assert coda.prompt_pool.ortho_mu == 0.1
    vq = norga.migrate.load_coda_checkpoint(backbone(depth=5), coda_state("vq"), "vq", num_tasks=3, temperature=2.0)
    assert vq.prompt_pool.temperature == 2.0


@pytest.mark.parametrize(
    "build, exc, fragment",
    [
        (
            lambda: (coda_state("coda"), "l2p", {}),
            ValueError,
            r"method='l2p' expects the tensors \['e_p', 'e_k'\] per layer, the checkpoint has \['e_a', 'e_k', 'e_p'\] "
            r"\(a checkpoint of method='coda'\?\)",
        ),
        (lambda: (coda_state("l2p"), "l2p", {"ortho_mu": 0.1}), TypeError, r"takes the options \['pull', 'top_k'\]"),
        (lambda: (coda_state("l2p"), "lp2", {}), ValueError, "method must be one of"),
        (
            lambda: ({"head.weight": torch.zeros(7, DIM)}, "l2p", {}),
            ValueError,
            "not a CODA-Prompt codebase checkpoint",
        ),
        (
            lambda: ({**coda_state("l2p"), "prompt.e_k_3": torch.zeros(5, DIM)}, "l2p", {}),
            ValueError,
            "differ in pool size|share one shape",
        ),
        (
            lambda: ({k: v for k, v in coda_state("vq").items() if k != "prompt.e_k_4"}, "vq", {}),
            ValueError,
            "on different layers",
        ),
        (lambda: (coda_state("dual"), "dual", {"task": 9}), ValueError, "task 9 has no E-prompt|task must be in"),
    ],
)
def test_load_coda_checkpoint_errors_change_nothing(build, exc, fragment):
    state, method, options = build()
    model = backbone(depth=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=fragment):
        norga.migrate.load_coda_checkpoint(model, state, method, num_tasks=3, **options)
    assert not hasattr(model, "prompt_pool") and not norga.patch.patched_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_coda_checkpoint_refuses_another_width():
    with pytest.raises(ValueError, match="has dim=64 but layer 0"):
        norga.migrate.load_coda_checkpoint(
            timm_model(embed_dim=32), coda_state("vq"), "vq", num_tasks=3, include_head=False
        )


def timm_model(embed_dim: int):
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=5,
        embed_dim=embed_dim,
        num_heads=4,
        num_classes=7,
    )
