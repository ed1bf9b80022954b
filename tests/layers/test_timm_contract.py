"""timm's model contract on patched models: what timm's own model tests check, for every supported family.

Every family of ``tests/test_patch.py``'s ``FAMILY_MODELS`` (tiny models, ``pretrained=False``) in three modes:

* ``plain``: ``norga.patch_vit(model, layers=[first global layer])``, no prompt. It must *be* timm's model:
  compared with the unpatched model by ``torch.equal``.
* ``pool``: a ``norga.PrefixPool`` (3 tasks, length 4) on every global-attention layer with a NoRGa ``tanh``
  gate, task 1 set with ``norga.set_task``.
* ``smope``: ``norga.smope_factory(num_experts=4, top_k=2)`` on every global-attention layer.
* ``dualprompt`` (the fx checks only): ``norga.prompts.DualPrompt``, a ``QueryPrompt`` whose query pass (a forward
  pre-hook on ``patch_embed``) is traced into the graph: G-prompts on the global layers but the last, E-prompts on
  the last.

Checks: forward, backward, ``torch.fx``, timm's fx feature extraction (and timm's own fx forward and fx
TorchScript tests), ``reset_classifier``, ``features_only``, ``forward_intermediates``, gradient checkpointing,
``torch.export`` and TorchScript. The reference is the unpatched timm model where norga must change nothing, the
eager model bit for bit for fx (whose graph calls the eager attention function), and the eager model for other
transformations (checkpointing, export), within the rounding bounds of :func:`_bound`. SAM (``samvit``) prompts
its global blocks only.
"""

from __future__ import annotations

import collections
import copy
import functools
import math
import warnings

import pytest
import reference as ref
import timm
import torch
from test_patch import FAMILY_MODELS, _model
from timm.models import FeatureGraphNet, create_feature_extractor, get_graph_node_names
from tolerance import assert_within, attention_tol, gate_args, tol
from torch import nn
from torchvision.models import feature_extraction
from versions import needs

import norga

MODES = ("plain", "pool", "smope")
CASES = [(key, mode) for key in FAMILY_MODELS for mode in MODES]
# One model per timm attention class and per code path inside it (eva: fused and unfused qkv). FAMILY_MODELS' other
# keys (qk-norm, deit3, dinov2 registers, clip, relpos_mlp) change timm's code around attention, not norga's.
CLASS_MODELS = ("vit", "vit_rope", "eva02_fused_qkv", "eva02_unfused_qkv", "beit", "relpos", "sam")
# The checks that trace, recompute or script (0.5-3 s each): every family without a prompt and with the pool,
# SMoPE (the same prefix path, with logits) on one model per attention class, marked slow.
HEAVY_CASES = [(key, mode) for key in FAMILY_MODELS for mode in ("plain", "pool")] + [
    pytest.param(key, "smope", marks=pytest.mark.slow) for key in CLASS_MODELS
]
# the fx checks add a QueryPrompt method, on one model per attention class (the others marked slow)
FX_CASES = HEAVY_CASES + [
    (key, "dualprompt") if key in CLASS_MODELS else pytest.param(key, "dualprompt", marks=pytest.mark.slow)
    for key in FAMILY_MODELS
]
BATCH = 2
NUM_TASKS, TASK, PREFIX_LENGTH = 3, 1, 4  # the pool: task 1 of 3 is active, 4 prefix rows per layer
EXPERTS, TOP_K = 4, 2
# torch.export takes 3-6 s a model: vit, and SAM (global + windowed blocks; the family torch.fx cannot trace)
EXPORT_FAMILIES = ("vit", "sam")
# a prompt moves the output by more than this many rounding bounds: the bounds cannot hide what a check must see
EFFECT_MARGIN = 10.0
JIT_DEPRECATED = "ignore:`torch.jit.script` is deprecated:FutureWarning"

pytestmark = pytest.mark.filterwarnings(JIT_DEPRECATED)


# ------------------------------------------------------------------------------------------------ models


def _wake(model: nn.Module) -> None:
    """Give timm's near-zero initialisations O(1) values, so that attention (and the prompts) reach the output.

    timm starts LayerScale at ``init_values`` (1e-6 in deit3/relpos, 1e-5 in dinov2 and the rope ViT, 0.1 in
    BEiT; relpos ``rpn`` puts it into its post-norm weights) and scales some heads by 1e-3 (eva, beit): with
    those, a prompt moves the logits by less than 1e-5 and a wrong prompt could not fail a check. Every parameter
    that is a constant ``c`` with ``0 < |c| < 0.5`` gets U(0.5, 1); the head gets N(0, 1 / in_features).
    """
    with torch.no_grad():
        for p in model.parameters():
            c = p.detach().flatten()[0]
            if p.numel() > 1 and 0 < abs(float(c)) < 0.5 and bool((p == c).all()):
                p.uniform_(0.5, 1.0)
        head = _classifier(model)
        if head is not None:
            head.weight.normal_(0.0, head.in_features**-0.5)


def _classifier(model: nn.Module) -> nn.Linear | None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head = getattr(head, "fc", head)  # SAM: a ClassifierHead
    return head if isinstance(head, nn.Linear) else None


@functools.lru_cache(maxsize=None)
def _reference(key: str) -> "tuple[nn.Module, int]":
    """The unpatched timm model of ``key`` (built once and shared: use it for forwards under ``torch.no_grad``, copy
    it for anything else) and its input size."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, size = _model(key)
        _wake(model)
    return model, size


@functools.lru_cache(maxsize=None)
def _reference_nodes(key: str) -> "tuple[str, ...]":
    """The eval-mode node names timm's fx feature extraction sees in the unpatched model (traced once)."""
    return tuple(get_graph_node_names(copy.deepcopy(_reference(key)[0]))[1])


def _input(size: int) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(2))


def _width(module: nn.Module) -> int:
    """An attention layer's width ``num_heads * head_dim``: the width of a prompt vector."""
    qkv = getattr(module, "qkv", None)
    return qkv.out_features // 3 if qkv is not None else module.q_proj.out_features


def _global_layers(model: nn.Module) -> list:
    return [layer for layer in norga.patch.attention_layers(model) if not layer.windowed]


def _patch(model: nn.Module, mode: str) -> nn.Module:
    """Patch ``model`` (a timm model or a features_only wrapper) in ``mode``; prompts drawn from a fixed seed."""
    layers = _global_layers(model)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        if mode == "plain":
            norga.patch_vit(model, layers=[layers[0].index])
        elif mode == "pool":
            pool = norga.PrefixPool(NUM_TASKS, len(layers), PREFIX_LENGTH, _width(layers[0].module))
            norga.patch_vit(model, gate="tanh", layers="all", prompt=pool)
            norga.set_task(model, TASK)
        elif mode == "smope":
            norga.patch_vit(model, layers="all", prompt=norga.smope_factory(num_experts=EXPERTS, top_k=TOP_K))
        else:
            inner = getattr(model, "model", model)  # a features_only wrapper
            index = [layer.index for layer in layers]
            dual = norga.prompts.DualPrompt(
                NUM_TASKS,
                _width(layers[0].module),
                pool_size=NUM_TASKS,
                e_length=PREFIX_LENGTH,
                g_length=PREFIX_LENGTH,
                g_layers=index[:-1],
                e_layers=index[-1:],
                key_dim=inner.num_features,
            )
            norga.patch_vit(model, layers=None, prompt=dual)
            norga.set_task(model, TASK)
    assert norga.patch.patched_layers(model)
    return model


def _case(key: str, mode: str) -> "tuple[nn.Module, nn.Module, torch.Tensor]":
    """``(unpatched timm model, patched model, input)``, both in eval mode with the same weights. The unpatched
    model is the shared one of :func:`_reference`: only for forwards under ``torch.no_grad`` (copy it to train)."""
    reference, size = _reference(key)
    return reference, _patch(copy.deepcopy(reference), mode), _input(size)


def _train_all(model: nn.Module) -> nn.Module:
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient is a fixed random direction (a plain sum cancels across classes)."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    return (out * w).sum()


def _grads(model: nn.Module, run, x: torch.Tensor, uses: dict | None = None) -> "tuple[torch.Tensor, dict]":
    """``run(x)`` and the gradients of :func:`_loss` on it, by parameter name. The dropout RNG is reseeded
    (the relpos models drop out inside their relative position MLP). A dict ``uses`` gets, by parameter name, the
    number of gradient contributions summed into each parameter (edges into its node of the autograd graph)."""
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        out = run(x)
    loss = _loss(out)
    if uses is not None:
        edges: collections.Counter = collections.Counter()
        done, todo = set(), [loss.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is None or fn in done:
                continue
            done.add(fn)
            for nxt, _ in fn.next_functions:
                if hasattr(nxt, "variable"):  # AccumulateGrad: the parameter
                    edges[id(nxt.variable)] += 1
                else:
                    todo.append(nxt)
        uses.update({n: edges[id(p)] for n, p in model.named_parameters()})
    loss.backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _block_outputs(model: nn.Module, run, x: torch.Tensor) -> "tuple[torch.Tensor, list]":
    """``run(x)`` with forward hooks on ``model.blocks``: ``(result, [output of each block])``."""
    seen: list = []
    handles = [b.register_forward_hook(lambda m, a, out: seen.append(out)) for b in model.blocks]
    try:
        with torch.no_grad():
            result = run(x)
    finally:
        for h in handles:
            h.remove()
    return result, seen


def _nchw(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A block output as timm's ``forward_intermediates`` returns it: ``(B, C, H, W)``, prefix tokens dropped."""
    if tokens.dim() == 4:  # SAM: (B, H, W, C)
        return tokens.permute(0, 3, 1, 2)
    grid = model.patch_embed.grid_size
    return tokens[:, getattr(model, "num_prefix_tokens", 0) :].reshape(tokens.shape[0], *grid, -1).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------ bounds


def _roundings(model: nn.Module, backward: bool = False) -> int:
    """``n`` of ``gamma_n``: the roundings on the longest chain of dependent float32 operations to one output.

    Over-counted by summing over *every* module (parallel branches, e.g. the relative-position MLP, too), each
    with its accumulation length (tests/tolerance.py: a sum or dot product of ``n`` terms is ``gamma_n``):

    * ``Linear``: ``in_features + 1`` (dot product, bias); ``Conv2d``: ``in_channels / groups * kh * kw + 1``;
    * a norm over ``C``: ``2 C + 5`` (mean, variance, rsqrt, scale, shift);
    * an attention layer (tolerance.py's ``attention_tol`` at scores of order 1): ``2 (D + 3)`` (the score, twice
      in the weights) ``+ 3 (N + L) + 88`` (softmax sum, weighted sum, the fused kernel's 20-ulp ``exp``), plus
      ``N + D`` for SMoPE's routing (mean over the ``N`` queries, ``D``-term score) and 8 for a NoRGa gate.

    With ``backward``, also each operation's transposed sums: ``Linear`` ``out_features`` (input gradient) and
    ``B N`` (weight gradient over the batch's tokens), a norm ``2 C + B N``, a convolution ``out_channels * kh * kw
    + B N``, attention ``2 D + 3 (N + L) + 88``.
    """
    inner = getattr(model, "model", model)  # a features_only wrapper
    tokens = math.prod(inner.patch_embed.grid_size) + getattr(inner, "num_prefix_tokens", 0)
    rows = BATCH * tokens
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            n += m.in_features + 1 + (m.out_features + rows if backward else 0)
        elif isinstance(m, nn.Conv2d):
            area = math.prod(m.kernel_size)
            n += m.in_channels // m.groups * area + 1 + (m.out_channels * area + rows if backward else 0)
        elif hasattr(m, "normalized_shape"):
            c = math.prod(m.normalized_shape)
            n += 2 * c + 5 + (2 * c + rows if backward else 0)
    for layer in norga.patch.attention_layers(model):
        d = _width(layer.module) // layer.module.num_heads
        n += 2 * (d + 3) + 3 * (tokens + PREFIX_LENGTH) + 88 + tokens + d + 8
        if backward:
            n += 2 * d + 3 * (tokens + PREFIX_LENGTH) + 88
    return n


def _bound(model: nn.Module, expected: torch.Tensor, backward: bool = False) -> float:
    """Bound on ``|a - b|`` for two float32 evaluations of ``model`` that differ only in how they round (another
    backend for the prefix block, a traced or exported graph, a recomputed forward).

    First order in ``u`` and worst case over the signs: each evaluation is within ``gamma_n M`` of the exact
    value, ``n`` from :func:`_roundings` and ``M = max |expected|`` (per parameter tensor for gradients), so the
    two are within ``2 gamma_n M``. It assumes that the randomly initialised network passes relative errors on
    with gain at most one (layer norms keep activations of order one; no cancellation to far below ``M``).
    For vit-tiny ``n`` is about 6000 (``gamma_n`` ~ 4e-4); the differences seen are ~1e-7 of ``M``.
    """
    return 2 * tol(torch.float32, _roundings(model, backward), float(expected.detach().abs().max()))


def _assert_prompts_act(out: torch.Tensor, unpatched: torch.Tensor, bound: float, what: str) -> None:
    """The prompts change ``out`` by far more than ``bound``: a bound this size cannot hide a prompt error."""
    effect = float((out - unpatched).abs().max())
    assert effect > EFFECT_MARGIN * bound, (
        f"{what}: the prompts move the output by {effect:.3g} only (bound {bound:.3g})"
    )


def _prompted_attention(model: nn.Module, run, x: torch.Tensor) -> dict:
    """``run(x)`` (the model, or a graph traced from it) recording the first prompted layer's ``q``, ``k`` (after
    qk-norm), the ``qkv`` output and the attention output (the projection's input), through hooks on submodules
    that a traced graph calls as modules too. For timm's ``Attention`` (``PrefixMoEAttention``) layers."""
    attn = norga.patch.patched_layers(model)[0].module
    seen: dict = {}

    def keep(name):
        return lambda m, a, out: seen.__setitem__(name, out)

    handles = [
        attn.qkv.register_forward_hook(keep("qkv")),
        attn.q_norm.register_forward_hook(keep("q")),
        attn.k_norm.register_forward_hook(keep("k")),
        attn.proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0])),
    ]
    try:
        with torch.no_grad():
            run(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _assert_prompted_attention(model: nn.Module, seen: dict, mode: str, what: str) -> None:
    """The recorded attention output equals the float64 equations (tests/reference.py) on the recorded ``q, k, v``
    and the layer's prefix, within tolerance.py's ``attention_tol``."""
    attn = norga.patch.patched_layers(model)[0].module
    q, k = seen["q"], seen["k"]
    v = seen["qkv"].unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)[2]
    logits, gate = None, {}
    if mode == "pool":  # task TASK's key and value of the pool's first layer, and the layer's NoRGa gate
        pk, pv = (ref.heads(t, attn.num_heads).expand(BATCH, -1, -1, -1) for t in model.prompt_pool.prompts[TASK, 0])
        gate = gate_args(attn.prefix_gate)
    else:  # the experts SMoPE selects for these queries, with their logits
        with torch.no_grad():
            pk, pv, logits, _ = attn.prompt(q)
    want = ref.prefix_attention(
        q, k, v, pk, pv, scale=attn.scale, gate=(lambda s: ref.norga_gate(s, **gate)) if gate else None, logits=logits
    )
    bound = attention_tol(q, k, v, pk, pv, scale=attn.scale, logits=logits, **gate)
    assert_within(seen["o"], want.transpose(1, 2).flatten(2), bound, what)


def timm_fx_model(model: nn.Module) -> torch.fx.GraphModule:
    """The graph of ``model`` as timm's fx tests build it (their ``_create_fx_model``): torchvision's feature
    extraction with timm's leaf modules and functions (its tracer also handles samvit), returning the last node of
    the training and of the evaluation graph (their output: ``{name: output}``)."""
    tracer_kwargs = dict(
        leaf_modules=timm.models.get_notrace_modules(),
        autowrap_functions=timm.models.get_notrace_functions(),
        param_shapes_constant=True,
    )
    with warnings.catch_warnings():  # prompts whose training forward differs (SMoPE, DualPrompt) give other nodes
        warnings.filterwarnings("ignore", "The nodes obtained by tracing the model in train mode are different")
        train_nodes, eval_nodes = feature_extraction.get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
        return feature_extraction.create_feature_extractor(
            model, train_return_nodes=train_nodes[-1:], eval_return_nodes=eval_nodes[-1:], tracer_kwargs=tracer_kwargs
        )


def _nodes(gm: torch.fx.GraphModule) -> list:
    return [(n.op, n.target) for n in gm.graph.nodes]


# ------------------------------------------------------------------------------------------------ 1. forward


@pytest.mark.parametrize("key,mode", CASES)
def test_forward(key, mode):
    reference, model, x = _case(key, mode)
    with torch.no_grad():
        out, want = model(x), reference(x)
    assert out.shape == (BATCH, reference.num_classes) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    if mode == "plain":
        assert torch.equal(out, want), "patched without a prompt, the model is not timm's any more"
    else:
        _assert_prompts_act(out, want, _bound(model, want), f"{key}/{mode}")


# ------------------------------------------------------------------------------------------------ 2. backward


@pytest.mark.parametrize("key,mode", CASES)
def test_backward(key, mode):
    reference, model, x = _case(key, mode)
    out, grads = _grads(_train_all(model), model, x)
    assert grads, "no parameters"
    for name, g in grads.items():
        assert g is not None, f"{name} got no gradient"
        assert torch.isfinite(g).all(), f"{name} has a non-finite gradient"
    norga_names = set(grads) - set(dict(reference.named_parameters()))
    layers = norga.patch.patched_layers(model)
    if mode == "plain":  # no new parameter, and exactly timm's gradients
        assert not norga_names
        reference = _train_all(copy.deepcopy(reference))
        _, want = _grads(reference, reference, x)
        for name, g in want.items():
            assert torch.equal(grads[name], g), name
    elif mode == "pool":
        gates = {f"{layer.name}.prefix_gate.{p}" for layer in layers for p in ("alpha", "tau")}
        assert norga_names == gates | {"prompt_pool.prompts"}
        for name in gates:
            assert grads[name].abs() > 0, f"{name}: zero gradient, the gate is not in the graph"
        # (task, layer, key|value, L, dim): one forward uses task 1 only, so tasks 0 and 2 get exact zeros (the pool
        # is one Parameter, so their gradient is zero rather than None); task 1 moves every layer's key and value
        g = grads["prompt_pool.prompts"]
        inactive = [t for t in range(NUM_TASKS) if t != TASK]
        assert torch.equal(g[inactive], torch.zeros_like(g[inactive])), "an inactive task's prompts got a gradient"
        assert (g[TASK].abs().amax(dim=(-2, -1)) > 0).all(), "a layer's key or value of the active task got no gradient"
    else:
        expected = {f"{layer.name}.prompt.{p}" for layer in layers for p in ("keys", "values")}
        assert norga_names == expected
        for name in expected:  # (H, E, D): only the selected experts move, at least top_k of them per head
            moved = (grads[name].abs().amax(dim=-1) > 0).sum(dim=-1)
            assert (moved >= TOP_K).all(), f"{name}: experts with a gradient per head {moved.tolist()}"


# ------------------------------------------------------------------------------------------------ 3. torch.fx


@pytest.mark.parametrize("key,mode", FX_CASES)
def test_fx_symbolic_trace(key, mode):
    reference, model, x = _case(key, mode)
    if key == "sam":  # timm's own samvit branches on tensor values: patching must not change how tracing fails
        with pytest.raises(Exception) as timm_error:
            torch.fx.symbolic_trace(reference)
        with pytest.raises(type(timm_error.value)):
            torch.fx.symbolic_trace(model)
        return
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        traced, eager = gm(x), model(x)
    # the graph calls the eager attention function (backend selection included): the same bits
    assert torch.equal(traced, eager), "the traced graph differs from the eager model"
    if mode == "plain":
        assert _nodes(gm) == _nodes(torch.fx.symbolic_trace(reference)), "the patched layer changed the graph"
    else:
        assert ("call_function", norga.layers.base.attend) in _nodes(gm), "the prompted attention was traced through"
        with torch.no_grad():
            _assert_prompts_act(traced, reference(x), _bound(model, eager), f"{key}/{mode} fx")
        first = norga.patch.patched_layers(model)[0].module
        if mode != "dualprompt" and type(first) is norga.PrefixMoEAttention and isinstance(first.q_norm, nn.Identity):
            # _bound is loose (worst case over the whole network); the first prompted layer, which gets the same
            # q, k, v in both, is held to the float64 equations within the attention's own bound, traced and eager
            # (timm's qk-norm LayerNorm is traced through, not called as a module: no hook sees q there)
            for run, name in ((model, "eager"), (gm, "traced")):
                _assert_prompted_attention(model, _prompted_attention(model, run, x), mode, f"{key}/{mode} {name}")
    # backward through the GraphModule reaches every parameter (it shares them with the model), as eager does
    for p in model.parameters():
        p.requires_grad_(True)
    _, want = _grads(model, model, x)
    _, got = _grads(model, gm, x)
    assert got.keys() == want.keys()
    for name, g in want.items():  # the same autograd graph as eager: the same gradients, bit for bit
        if g is None:  # in evaluation only DualPrompt's keys get none (their pull loss is a training forward's)
            assert mode == "dualprompt" and name.endswith("e_keys") and got[name] is None, name
        else:
            assert torch.isfinite(g).all(), f"{key}/{mode}: {name} has a non-finite gradient"
            assert torch.equal(got[name], g), f"{key}/{mode} fx: gradient of {name}"


# ------------------------------------------------------------------------------------------------ 4. fx features


@pytest.mark.parametrize("key,mode", HEAVY_CASES)
def test_fx_feature_extraction(key, mode):
    """timm's fx feature extraction (its own tracer, which also handles samvit) on a patched model gives the
    blocks' outputs of the eager model, bit for bit."""
    _, model, x = _case(key, mode)
    nodes = _reference_nodes(key)
    if mode == "plain":
        assert get_graph_node_names(model)[1] == list(nodes), "the patched layer changed the graph"
    depth = len(model.blocks)
    # the last node inside block i is its output (the same name with prompts: the blocks' code is timm's)
    return_nodes = {[n for n in nodes if n.startswith(f"blocks.{i}.")][-1]: f"block{i}" for i in range(depth)}
    extractor = create_feature_extractor(model, return_nodes=return_nodes)
    _, want = _block_outputs(model, model, x)
    with torch.no_grad():
        extracted = extractor(x)
        features = [extracted[f"block{i}"] for i in range(depth)]
        if mode == "pool":  # timm's wrapper of the same extraction (traced again: once is enough)
            features += FeatureGraphNet(model, out_indices=tuple(range(depth)))(x)
    assert list(extracted) == [f"block{i}" for i in range(depth)]
    assert len(features) == depth * (2 if mode == "pool" else 1)
    for i in range(depth):
        for got in features[i::depth]:
            assert torch.equal(got, want[i]), f"{key}/{mode} block {i}"
    first = norga.patch.patched_layers(model)[0].module
    if mode != "plain" and type(first) is norga.PrefixMoEAttention and isinstance(first.q_norm, nn.Identity):
        seen = _prompted_attention(model, extractor, x)  # the extractor's prompted attention: the equations
        _assert_prompted_attention(model, seen, mode, f"{key}/{mode} feature extractor")


@pytest.mark.parametrize("key,mode", FX_CASES)
def test_timm_fx_forward_and_torchscript(key, mode):
    """timm's own ``test_model_forward_fx`` and ``test_model_forward_fx_torchscript`` on a patched model: the
    output node of timm's fx feature extraction (torchvision's, with timm's leaf modules and functions, both
    modes traced) is the eager output bit for bit (``torch.all(fx == eager)``); ``torch.jit.script`` of that graph
    raises norga's TorchScript message with prompts, and without them scripts timm's own graph."""
    reference, model, x = _case(key, mode)
    fx_model = timm_fx_model(model)
    with torch.no_grad():
        eager = model(x)
        (traced,) = fx_model(x).values()
    assert torch.all(traced == eager), f"{key}/{mode}: timm's fx model differs from the eager model"
    if mode == "plain":
        scripted = torch.jit.script(fx_model)
        with torch.no_grad():
            (got,) = scripted(x).values()
            assert torch.equal(got, reference(x)), "the scripted graph of a patched model without prompts is not timm's"
        return
    with torch.no_grad():
        _assert_prompts_act(traced, reference(x), _bound(model, eager), f"{key}/{mode} timm fx")
    with pytest.raises(NotImplementedError, match="norga: TorchScript is not supported") as error:
        torch.jit.script(fx_model)
    assert "torch.export" in str(error.value) and "torch.compile" in str(error.value)


# ------------------------------------------------------------------------------------------------ 5. reset_classifier


@pytest.mark.parametrize("key,mode", CASES)
def test_reset_classifier(key, mode):
    reference, model, x = _case(key, mode)
    added = {k: v.clone() for k, v in model.state_dict().items() if k not in reference.state_dict()}
    assert bool(added) == (mode != "plain")
    layers = [(layer.name, layer.module) for layer in norga.patch.patched_layers(model)]
    pool = getattr(model, "prompt_pool", None)
    with torch.no_grad():
        features = model.forward_features(x)
    model.reset_classifier(7)
    assert _classifier(model).out_features == 7
    with torch.no_grad():
        out = model(x)
        assert torch.equal(model.forward_features(x), features)  # the prompts still act as before
    assert out.shape == (BATCH, 7) and torch.isfinite(out).all()
    assert [(layer.name, layer.module) for layer in norga.patch.patched_layers(model)] == layers
    assert getattr(model, "prompt_pool", None) is pool
    state = model.state_dict()
    for k, v in added.items():
        assert torch.equal(state[k], v), k


# ------------------------------------------------------------------------------------------------ 6. features_only


@pytest.mark.parametrize("key,mode", CASES)
def test_features_only(key, mode):
    """``timm.create_model(..., features_only=True)`` (a ``FeatureGetterNet``) can be patched directly: the same
    feature maps as the unpatched wrapper with no prompt, the patched full model's with prompts."""
    name, kw = FAMILY_MODELS[key]
    full, size = _reference(key)
    depth = len(full.blocks)
    x = _input(size)
    wrapper = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(range(depth)), **kw)
    missing, _ = wrapper.model.load_state_dict(full.state_dict(), strict=False)  # the wrapper drops the head
    assert not missing
    for m in wrapper.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    wrapper.eval()
    unpatched = copy.deepcopy(wrapper)
    _patch(wrapper, mode)
    with torch.no_grad():
        got, want = wrapper(x), unpatched(x)
    assert len(got) == depth
    if mode == "plain":
        for g, w in zip(got, want):
            assert torch.equal(g, w), "patched without a prompt, the wrapper's features are not timm's"
        return
    patched_full = _patch(copy.deepcopy(full), mode)  # the same prompts (the same seed)
    with torch.no_grad():
        direct = patched_full.forward_intermediates(x, indices=list(range(depth)), intermediates_only=True)
    for g, d in zip(got, direct):
        assert torch.equal(g, d), "the patched wrapper's features differ from the patched model's intermediates"
    _assert_prompts_act(got[-1], want[-1], _bound(wrapper, want[-1]), f"{key}/{mode} features_only")


# ------------------------------------------------------------------------------------------------ 7. intermediates


@pytest.mark.parametrize("key,mode", CASES)
def test_forward_intermediates(key, mode):
    reference, model, x = _case(key, mode)
    features, blocks = _block_outputs(model, model.forward_features, x)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    assert torch.equal(final, features), "forward_intermediates' final features are not forward_features'"
    assert len(intermediates) == len(blocks)
    for i, (got, block) in enumerate(zip(intermediates, blocks)):
        assert torch.equal(got, _nchw(model, block)), f"intermediate {i}"
    # the last block's output through the final norm is forward_features' (SAM: the neck's) output
    last = features if features.dim() == 4 else _nchw(model, features)
    assert torch.equal(normed[-1], last), "the normed last intermediate is not forward_features' output"
    if mode == "plain":
        with torch.no_grad():
            want_final, want = reference.forward_intermediates(x)
        assert torch.equal(final, want_final), "final features differ from timm's"
        for i, (got, w) in enumerate(zip(intermediates, want)):
            assert torch.equal(got, w), f"intermediate {i} differs from timm's"


# ------------------------------------------------------------------------------------------------ 8. checkpointing


@pytest.mark.parametrize("key,mode", HEAVY_CASES)
def test_grad_checkpointing(key, mode):
    _, model, x = _case(key, mode)
    _train_all(model)
    calls = []  # pre-hooks: a recomputation stops early, after the last tensor it needs, so forward hooks miss it
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, a: calls.append(m))
    uses: dict = {}
    out, want = _grads(model, model, x, uses)
    assert len(calls) == len(model.blocks)
    calls.clear()
    model.set_grad_checkpointing(True)
    got_out, got = _grads(model, model, x)
    assert len(calls) == 2 * len(model.blocks), "the blocks were not recomputed in the backward"
    assert torch.equal(got_out, out), "checkpointing changed the forward"
    # The backward recomputes that forward with the same kernels on the same inputs and runs the same backward
    # nodes; only the order in which the k contributions to a parameter's gradient are summed may change:
    # |difference| <= 2 gamma_{k-1} sum_j |contribution_j|, taken as 2 gamma_{k-1} k max|grad| (no cancellation
    # among the k contributions). k = 1 (most parameters) must give the same bits.
    for name, g in got.items():
        assert g is not None and torch.isfinite(g).all(), name
        k = uses[name]
        assert k >= 1, f"{name} is not in the autograd graph"
        bound = 2 * tol(torch.float32, k - 1, k * float(want[name].abs().max())) if k > 1 else 0.0
        assert_within(g, want[name], bound, f"{key}/{mode} checkpointing: gradient of {name} ({k} contributions)")


# ------------------------------------------------------------------------------------------------ 9. torch.export


@pytest.mark.slow
@pytest.mark.parametrize("key", EXPORT_FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_torch_export(key, mode):
    reference, model, x = _case(key, mode)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        eager = model(x)
        no_grad = program.module()(x)
    got = program.module()(x)  # called as a module is, with autograd on (the model is in eval mode)
    bound = _bound(model, eager)
    assert_within(no_grad, eager, bound, f"{key}/{mode} export, no_grad")
    assert_within(got, eager, bound, f"{key}/{mode} export")
    if mode != "plain":
        with torch.no_grad():
            _assert_prompts_act(got, reference(x), bound, f"{key}/{mode} export")


# ------------------------------------------------------------------------------------------------ 10. TorchScript


@pytest.mark.parametrize("key,mode", CASES)
def test_torchscript_refused(key, mode):
    _, model, _ = _case(key, mode)
    with pytest.raises(NotImplementedError, match="TorchScript is not supported") as error:
        torch.jit.script(model)
    assert "torch.export" in str(error.value) and "torch.compile" in str(error.value)


# scripting takes 0.5-3 s a model: one model per attention class after unpatching the pool (the most norga adds:
# the pool on the model, gates and prompts on the layers), and vit after each mode
@pytest.mark.parametrize("key,mode", [(key, "pool") for key in CLASS_MODELS] + [("vit", "plain"), ("vit", "smope")])
def test_torchscript_after_unpatch(key, mode):
    reference, model, x = _case(key, mode)
    with pytest.raises(NotImplementedError, match="TorchScript is not supported"):
        torch.jit.script(model)
    norga.unpatch_vit(model)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.equal(scripted(x), reference(x)), "the scripted unpatched model differs from timm's"


# Before torch 2.9 torch.fx cannot trace timm's own models (timm's is_causal reaches SDPA as a Proxy): the fx
# checks need that release (tests/versions.py), the others run on every supported torch.
for _fx_test in (test_fx_symbolic_trace, test_fx_feature_extraction, test_timm_fx_forward_and_torchscript):
    needs("fx")(_fx_test)
