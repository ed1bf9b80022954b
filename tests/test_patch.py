import copy

import pytest
import reference as ref
import timm
import torch
import torch.nn.functional as F
from tolerance import (
    attention_tol,
    gate_args,
    network_tol,
    prefix_layer_grad_tol,
    prefix_layer_tol,
    projection_tol,
    unit_roundoff,
)
from versions import needs

import norga
import norga.layers.base
from norga import NoRGaGate, PrefixPool, patch_vit, unpatch_vit
from norga.layers import FAMILIES
from norga.patch import attention_layers

# One small model per supported family (and the common variants), never pretrained.
FAMILY_MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, depth=2)),
    "vit_qknorm": ("vit_tiny_patch16_224", dict(img_size=32, depth=2, qk_norm=True)),
    "deit3": ("deit3_small_patch16_224", dict(img_size=32, depth=2)),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2)),
    "clip": ("vit_base_patch16_clip_224", dict(img_size=32, depth=2, embed_dim=64, num_heads=4)),
    "vit_rope": ("vit_small_patch16_rope_224", dict(img_size=32, depth=2)),
    "eva02_fused_qkv": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, qkv_fused=True)),
    "eva02_unfused_qkv": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, qkv_fused=False)),
    "beit": ("beit_base_patch16_224", dict(img_size=32, depth=2, embed_dim=64, num_heads=4)),
    "relpos": ("vit_relpos_small_patch16_224", dict(img_size=32, depth=2)),
    "relpos_mlp": ("vit_relpos_medium_patch16_rpn_224", dict(img_size=32, depth=2)),
    "sam": (
        "samvit_base_patch16",
        dict(img_size=64, depth=2, embed_dim=64, num_heads=4, global_attn_indexes=[1], window_size=2),
    ),
}


def _model(key, **extra):
    name, kw = FAMILY_MODELS[key]
    model = timm.create_model(name, pretrained=False, num_classes=5, **kw, **extra).eval()
    with torch.no_grad():  # timm zero-initialises some biases/tables; randomise so every term matters
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n or "rel_pos" in n or n.endswith("bias"):
                p.normal_(0, 0.2)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    return model, kw["img_size"]


@pytest.mark.parametrize("key", list(FAMILY_MODELS))
def test_patched_without_prompt_equals_unpatched(key):
    model, size = _model(key)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    patch_vit(model, layers="all")
    assert norga.patch.patched_layers(model), "nothing was patched"
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())  # the same weights, not copies
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # no prompt: timm's own forward, the same operations, bit for bit
    for m in model.modules():  # fused_attn behaviour kept
        if hasattr(m, "fused_attn"):
            assert m.fused_attn


class _ReferenceSDPA:
    """Stands in for F.scaled_dot_product_attention inside the *unpatched* timm model.

    Call ``c`` of attention (module order) gets prefix ``prefixes[c]`` ((B, H, L, D) key and value, or None)
    and is computed with the reference equations. This captures exactly the q, k, v and bias timm computes.
    """

    def __init__(self, prefixes, batch, gate):
        self.prefixes, self.batch, self.gate, self.calls = prefixes, batch, gate, 0
        self.seen = []  # per call: q, k, v, bias, pk, pv, scale as the reference got them

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        assert dropout_p == 0.0 and not is_causal
        prefix = self.prefixes[self.calls]
        self.calls += 1
        flat = q.dim() == 3  # SAM: (B*H, N, D)
        if flat:
            q, k, v = (t.reshape(self.batch, -1, *t.shape[1:]) for t in (q, k, v))
        B, H, N, D = q.shape
        bias = None
        if attn_mask is not None:
            bias = attn_mask.reshape(B, H, N, N) if flat else attn_mask.expand(B, H, N, N)
        if prefix is None:
            pk = pv = q.new_zeros(B, H, 0, D)
        else:
            pk, pv = prefix
        scale = D**-0.5 if scale is None else scale
        self.seen.append((q, k, v, bias, pk, pv, scale))
        out = ref.prefix_attention(
            q, k, v, pk, pv, scale=scale, gate=self.gate if prefix is not None else None, bias=bias
        ).to(q.dtype)
        return out.reshape(B * H, N, -1) if flat else out


def _record_calls(model, names):
    """Forward hooks recording each named module's call: ``[(name, args, kwargs, output), ...]`` in call order,
    and the hook handles."""
    calls = []
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, a, kw, out, n=name: calls.append((n, a, kw, out)), with_kwargs=True
        )
        for name in names
    ]
    return calls, handles


def _proj_inputs(model, names):
    """Forward pre-hooks keeping the latest input of each named attention module's ``proj``."""
    seen = {}
    handles = [
        model.get_submodule(name).proj.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0]))
        for name in names
    ]
    return seen, handles


@pytest.mark.parametrize("key", list(FAMILY_MODELS))
@pytest.mark.parametrize("act", [None, "sigmoid"])
def test_prompted_family_matches_reference(key, act, monkeypatch):
    """Each attention layer of the prompted model against timm's own layer on the same input, with timm's
    SDPA replaced by the float64 prefix-attention equations: the same q, k, v and bias (timm's code on
    both sides), so the layers differ by the attention (norga's float32 within attention_tol, the
    reference's float64 rounded to float32) carried through the shared projection (projection_tol). Layer
    by layer, since through a whole float32 network the worst-case bound says little."""
    model, size = _model(key)
    reference_model = copy.deepcopy(model)
    found = attention_layers(model)
    eligible = [layer.index for layer in found if not layer.windowed]
    width = norga.layers.attention_width(found[0].module)
    heads = found[0].module.num_heads
    pool = PrefixPool(num_tasks=3, num_layers=len(eligible), length=4, dim=width)
    gate = NoRGaGate(act, alpha=0.9, tau=1.3) if act else None
    patch_vit(model, gate=gate, layers="all", prompt=pool)
    tasks = torch.tensor([2, 0])
    norga.set_task(model, tasks)
    x = torch.randn(2, 3, size, size)
    names = [layer.name for layer in found]
    calls, handles = _record_calls(model, names)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert [c[0] for c in calls] == names

    prefixes, j = [], 0
    for layer in found:
        if layer.windowed:
            prefixes.append(None)
            continue
        kv = pool.prompts.detach()[tasks, j]  # (B, 2, L, width)
        prefixes.append((ref.heads(kv[:, 0], heads), ref.heads(kv[:, 1], heads)))
        j += 1
    ref_gate = (lambda s: ref.norga_gate(s, act, 0.9, 1.3)) if act else None
    fake = _ReferenceSDPA(prefixes, batch=2, gate=ref_gate)
    monkeypatch.setattr(F, "scaled_dot_product_attention", fake)
    o_in, handles = _proj_inputs(reference_model, names)
    for c, (name, args, kwargs, out) in enumerate(calls):
        with torch.no_grad():
            expected = reference_model.get_submodule(name)(*args, **kwargs)
        q, k, v, bias, pk, pv, scale = fake.seen[c]
        gated = {"act": act, "alpha": 0.9, "tau": 1.3} if act and prefixes[c] is not None else {}
        o = o_in[name]
        # norga's float32 attention, and the reference's float64 one rounded to float32
        o_err = attention_tol(q, k, v, pk, pv, scale=scale, bias=bias, **gated) + unit_roundoff(o.dtype) * float(
            o.abs().max()
        )
        bound = projection_tol(reference_model.get_submodule(name).proj, o, o_err)
        torch.testing.assert_close(out, expected, rtol=0, atol=bound, msg=lambda m, n=name: f"{n}: {m}")
    for h in handles:
        h.remove()
    assert fake.calls == len(found)


def test_per_sample_tasks_are_batch_invariant_and_route_gradients():
    """Each patched layer gives sample b, alone with its task (a one-sample tensor or an int), what it gives
    it in the batch: two float32 evaluations of the layer on the same input (other shapes may take other
    kernels), each within prefix_layer_tol."""
    model, size = _model("vit")
    pool = PrefixPool(num_tasks=4, num_layers=2, length=3, dim=192)
    patch_vit(model, gate=NoRGaGate("tanh"), prompt=pool)  # default layers: 0-4, this model has 2
    x = torch.randn(4, 3, size, size)
    tasks = torch.tensor([3, 0, 3, 1])
    layers = norga.patch.patched_layers(model)
    calls, handles = _record_calls(model, [layer.name for layer in layers])
    with torch.no_grad(), norga.use_task(model, tasks):
        model(x)
    for h in handles:
        h.remove()
    assert pool.task == 0  # restored
    heads = layers[0].module.num_heads
    for j, (name, args, _, batched) in enumerate(calls):
        attn = model.get_submodule(name)
        for b in range(4):
            xb = args[0][b : b + 1]
            pk, pv = (ref.heads(t, heads) for t in pool.prompts.detach()[tasks[b], j].unsqueeze(1))
            bound = 2 * prefix_layer_tol(attn, xb, pk, pv, act="tanh")
            for task in (tasks[b : b + 1], int(tasks[b])):
                with torch.no_grad(), norga.use_task(model, task):
                    torch.testing.assert_close(attn(xb), batched[b : b + 1], rtol=0, atol=bound)
    model.train()
    norga.set_task(model, tasks)
    model(x).sum().backward()
    used = pool.prompts.grad.abs().sum(dim=(1, 2, 3, 4)) > 0
    assert used.tolist() == [True, True, False, True]


def test_default_layers_and_selection():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=7)
    patch_vit(model)
    assert [layer.index for layer in norga.patch.patched_layers(model)] == [0, 1, 2, 3, 4]
    unpatch_vit(model)
    patch_vit(model, layers=[6, 2])
    assert [layer.name for layer in norga.patch.patched_layers(model)] == ["blocks.2.attn", "blocks.6.attn"]
    with pytest.raises(ValueError, match="already patched"):
        patch_vit(model)


def test_layer_errors():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    with pytest.raises(ValueError, match=r"layer index 5 is out of range: the model has 2 attention layers"):
        patch_vit(model, layers=[5])
    with pytest.raises(ValueError, match=r"PrefixPool has num_layers=3 but 2 layers are patched"):
        patch_vit(model, layers="all", prompt=PrefixPool(2, 3, 4, 192))
    with pytest.raises(ValueError, match=r"PrefixPool has dim=64 but layer 0 .* has width 192"):
        patch_vit(model, layers=[0], prompt=PrefixPool(2, 1, 4, 64))
    sam, _ = _model("sam")
    with pytest.raises(
        ValueError, match=r"layer 0 \(blocks.0.attn\) uses windowed attention.*global-attention layers: \[1\]"
    ):
        patch_vit(sam, layers=[0])


@pytest.mark.parametrize(
    "name,kw",
    [
        ("resnet18", {}),
        (
            "swin_tiny_patch4_window7_224",
            dict(img_size=64, window_size=2, embed_dim=32, depths=(1, 1), num_heads=(1, 2)),
        ),
    ],
)
def test_unsupported_models_raise(name, kw):
    model = timm.create_model(name, pretrained=False, **kw)
    with pytest.raises(
        ValueError, match=r"no supported global attention found in .*Searched for timm.layers.attention.Attention"
    ):
        patch_vit(model)


def test_unpatch_restores_timm_modules():
    model, size = _model("eva02_unfused_qkv")
    classes = [type(layer.module) for layer in attention_layers(model)]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    keys = list(model.state_dict())
    patch_vit(model, gate="gelu", layers="all", prompt=PrefixPool(2, 2, 3, 192))
    assert hasattr(model, "prompt_pool")
    unpatch_vit(model)
    assert [type(layer.module) for layer in attention_layers(model)] == classes
    assert all(type(layer.module) in FAMILIES for layer in attention_layers(model))
    assert not hasattr(model, "prompt_pool") and list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no norga-patched attention layer"):
        unpatch_vit(model)


def test_patched_state_dict_round_trip():
    a, size = _model("vit")
    b = copy.deepcopy(a)
    patch_vit(a, gate=NoRGaGate("sigmoid", alpha=0.3), layers="all", prompt=PrefixPool(3, 2, 4, 192))
    patch_vit(b, gate=NoRGaGate("sigmoid"), layers="all", prompt=PrefixPool(3, 2, 4, 192))
    sd = a.state_dict()
    assert "prompt_pool.prompts" in sd and "blocks.1.attn.prefix_gate.alpha" in sd
    b.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, size, size)
    norga.set_task(a, torch.tensor([1, 2]))
    norga.set_task(b, torch.tensor([1, 2]))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_set_task_errors():
    model, _ = _model("vit")
    with pytest.raises(ValueError, match="has no norga.PrefixPool"):
        norga.set_task(model, 0)
    patch_vit(model, layers="all", prompt=PrefixPool(3, 2, 4, 192))
    with pytest.raises(ValueError, match=r"task must be in \[0, 3\), got 3"):
        norga.set_task(model, 3)
    with pytest.raises(ValueError, match=r"task ids must be in \[0, 3\), got values in \[0, 7\]"):
        norga.set_task(model, torch.tensor([0, 7]))
    with pytest.raises(TypeError, match=r"integer tensor, got dtype torch.float32"):
        norga.set_task(model, torch.tensor([0.0]))
    norga.set_task(model, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="3 task ids were set but the batch has 2 samples"):
        model(torch.randn(2, 3, 32, 32))


@pytest.mark.slow
def test_torch_compile_fullgraph_per_sample_tasks():
    model, size = _model("vit")
    pool = PrefixPool(4, 2, 3, 192)
    patch_vit(model, gate=NoRGaGate("sigmoid"), layers="all", prompt=pool)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 3, size, size)
    for tasks in (torch.tensor([0, 3, 1]), torch.tensor([2, 2, 0])):
        norga.set_task(compiled, tasks)  # reaches the pool through the compile wrapper
        with torch.no_grad():
            got = compiled(x)
            eager = model(x)
        # two float32 evaluations of the whole network, each within tolerance.network_tol of the exact logits
        torch.testing.assert_close(got, eager, rtol=0, atol=2 * float(network_tol(model, x).max()))


@pytest.mark.slow
@pytest.mark.parametrize("grad", [False, True])
def test_torch_compile_fullgraph_dynamic_batch(grad):
    """``dynamic=True`` traces the attention scale as a symbolic float and the batch as a symbolic size:
    the patched model still compiles in one graph and matches eager for several batch sizes. With ``grad``
    the backward is compiled too, checked on one patched layer, whose gradient's error has a bound (through
    a whole network's backward the worst case says little). Backend ``aot_eager``: Dynamo's one graph and
    AOTAutograd's joint forward-backward graph, which is what norga controls; Inductor's code generation
    runs in test_torch_compile_fullgraph_per_sample_tasks (each compilation is about a minute on a cold
    cache)."""
    model, size = _model("vit")
    patch_vit(model, gate=NoRGaGate("tanh"), layers="all", prompt=PrefixPool(4, 2, 3, 192))
    norga.set_task(model, 1)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (2, 5):
        x = torch.randn(batch, 3, size, size)
        with torch.set_grad_enabled(grad):
            got, eager = compiled(x), model(x)
        # two float32 evaluations of the whole network, each within tolerance.network_tol of the exact logits
        torch.testing.assert_close(got, eager, rtol=0, atol=2 * float(network_tol(model, x).max()))
    if not grad:
        return
    prompts = model.prompt_pool.prompts
    attn = norga.patch.patched_layers(model)[0].module
    compiled_attn = torch.compile(attn, fullgraph=True, dynamic=True, backend="aot_eager")
    pk, pv = (ref.heads(t, attn.num_heads).unsqueeze(0) for t in prompts.detach()[1, 0])
    for batch in (2, 5):
        x, w = torch.randn(batch, 5, 192), torch.randn(batch, 5, 192)
        (g,) = torch.autograd.grad((compiled_attn(x) * w).sum(), prompts)
        (e,) = torch.autograd.grad((attn(x) * w).sum(), prompts)
        assert torch.isfinite(g).all() and g[1, 0].abs().amin() > 0
        unused = torch.ones_like(g, dtype=torch.bool)
        unused[1, 0] = False
        assert not g[unused].any()  # only task 1's prompt of this layer is used
        # two float32 evaluations, each within prefix_layer_grad_tol; task 1's prompt is shared by the batch
        # (an int task): its gradient sums the samples'
        gb = prefix_layer_grad_tol(attn, x, pk.expand(batch, -1, -1, -1), pv.expand(batch, -1, -1, -1), w, act="tanh")
        torch.testing.assert_close(g[1, 0, 0], e[1, 0, 0], rtol=0, atol=2 * gb["pk_batch"])
        torch.testing.assert_close(g[1, 0, 1], e[1, 0, 1], rtol=0, atol=2 * gb["pv_batch"])


@needs("flex")
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.filterwarnings("error:flex_attention called without torch.compile")
@pytest.mark.parametrize("key", ["vit", "beit"])
def test_flex_backend_in_a_patched_model(key, monkeypatch):
    """backend='flex' (inference on CPU) gives, layer by layer, what the readable math backend gives on the
    same input, with a relative position bias too (beit): the same q, k, v, two float32 attentions, each
    within attention_tol, through the shared projection (projection_tol)."""
    model, size = _model(key)
    found = attention_layers(model)
    eligible = [layer.index for layer in found if not layer.windowed]
    pool = PrefixPool(3, len(eligible), 4, norga.layers.attention_width(found[0].module))
    patch_vit(model, gate=NoRGaGate("gelu"), layers="all", prompt=pool, backend="flex")
    norga.set_task(model, torch.tensor([2, 0]))
    x = torch.randn(2, 3, size, size)
    names = [layer.name for layer in norga.patch.patched_layers(model)]
    calls, handles = _record_calls(model, names)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    seen = []
    real = norga.layers.base.prefix_attention

    def spy(q, k, v, prefix, **kw):
        seen.append((q, k, v, prefix, kw))
        return real(q, k, v, prefix, **kw)

    monkeypatch.setattr(norga.layers.base, "prefix_attention", spy)
    o_in, handles = _proj_inputs(model, names)
    for name in names:
        model.get_submodule(name).backend = "math"
    for name, args, kwargs, got in calls:
        with torch.no_grad():
            want = model.get_submodule(name)(*args, **kwargs)
        q, k, v, prefix, kw = seen[-1]
        shape = (q.shape[0], -1, -1, -1)
        pk, pv = prefix.key.expand(*shape), prefix.value.expand(*shape)
        o_err = 2 * attention_tol(q, k, v, pk, pv, scale=kw["scale"], bias=kw["attn_bias"], **gate_args(kw["gate"]))
        bound = projection_tol(model.get_submodule(name).proj, o_in[name], o_err)
        torch.testing.assert_close(got, want, rtol=0, atol=bound, msg=lambda m, n=name: f"{n}: {m}")
    for h in handles:
        h.remove()
