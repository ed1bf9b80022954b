"""``torch.fx`` on patched models and on ``prefix_attention``: the graph calls the eager attention function, so it
computes what eager computes, bit for bit, whatever the backend, the task ids or the mode; TorchScript of such a
graph raises norga's message. The per-family checks are in ``test_timm_contract.py``."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from test_timm_contract import BATCH, _case, _grads, _train_all
from torch import nn
from versions import needs

import norga
from norga.functional import dispatch

# (the layers' backend, their fused_attn, the backend that must run): with fused_attn off a layer runs "math"
BACKENDS = [
    ("auto", True, "merge"),  # auto on CPU without dropout
    ("merge", True, "merge"),
    ("sdpa", True, "sdpa"),
    ("math", True, "math"),
    pytest.param("flex", True, "flex", marks=[pytest.mark.slow, needs("flex")]),  # compiles FlexAttention (about 10 s)
    ("auto", False, "math"),
]
JIT_DEPRECATED = "ignore:`torch.jit.script` is deprecated:FutureWarning"


def _layers(model: nn.Module) -> list:
    return [layer.module for layer in norga.patch.patched_layers(model)]


@needs("fx")  # traces timm's models
@pytest.mark.parametrize("mode", ["pool", "smope"])
@pytest.mark.parametrize("backend,fused,runs", BACKENDS)
def test_the_graph_selects_and_runs_the_eager_backend(monkeypatch, mode, backend, fused, runs):
    """The graph's attention nodes select their backend at run time, as eager does (a spy on `select_backend`
    sees the same choices), and give the same bits, with and without autograd (merge: two different paths)."""
    _, model, x = _case("vit", mode)
    for layer in _layers(model):
        layer.backend, layer.fused_attn = backend, fused
    gm = torch.fx.symbolic_trace(model)
    chosen: list = []
    select = dispatch.select_backend
    monkeypatch.setattr(dispatch, "select_backend", lambda *a, **kw: chosen.append(select(*a, **kw)) or chosen[-1])
    for grad in [False] if backend == "flex" else [False, True]:  # no CPU FlexAttention backward
        with torch.set_grad_enabled(grad):
            eager = model(x)
            calls = len(chosen)
            traced = gm(x)
        assert calls == len(_layers(model)), "eager did not select a backend in every prompted layer"
        assert chosen[:calls] == chosen[calls:] == [runs] * calls, f"eager then traced selected {chosen}"
        assert torch.equal(traced, eager), f"{backend} (fused_attn={fused}, grad={grad}): the graph differs"
        chosen.clear()


@needs("fx")  # traces timm's models
@pytest.mark.parametrize("key", ["vit", "beit", "eva02_fused_qkv"])
def test_per_sample_task_ids_are_constants_of_the_graph(key):
    _, model, x = _case(key, "pool")
    norga.set_task(model, torch.tensor([2, 0]))  # BATCH = 2 samples, each its own task
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        eager = model(x)
        assert torch.equal(gm(x), eager)
        norga.set_task(model, torch.tensor([0, 1]))  # the model follows new ids; the graph keeps the traced ones
        assert not torch.equal(model(x), eager)
        assert torch.equal(gm(x), eager)


@needs("fx")  # traces timm's models
@pytest.mark.parametrize("mode", ["pool", "smope", "dualprompt"])
def test_a_graph_traced_in_training_equals_eager_training(mode):
    """Traced in training mode (SMoPE's noisy routing, DualPrompt's task E-prompt) with attention dropout, which
    makes `auto` pick `sdpa`: the same dropout draws from the same seed, the same outputs and gradients."""
    _, model, x = _case("vit", mode)
    _train_all(model)
    for layer in _layers(model):
        layer.attn_drop.p = 0.25
    gm = torch.fx.symbolic_trace(model)
    out, want = _grads(model, model, x)  # both reseed the RNG
    traced, got = _grads(model, gm, x)
    assert torch.equal(traced, out), "the training graph's forward differs from eager's"
    assert got.keys() == want.keys()
    for name, g in want.items():
        if g is None:  # DualPrompt's keys: only their pull loss (prompt_losses, an eager forward's) reaches them
            assert mode == "dualprompt" and name.endswith("e_keys") and got[name] is None, name
        else:
            assert torch.equal(got[name], g), f"gradient of {name}"
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(5)
        assert not torch.equal(gm(x), traced), "another seed gives the same output: no dropout in the graph"


@needs("fx")  # traces timm's models
def test_copies_and_a_second_trace_keep_the_attention_node():
    """`copy.deepcopy` and pickling a GraphModule (which traces its code again), and tracing the graph again (as
    fx passes do): still one node calling `attend` per prompted layer, still the eager bits."""
    _, model, x = _case("vit", "smope")
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        eager = model(x)
    for copied in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm)), torch.fx.symbolic_trace(gm)):
        nodes = [n for n in copied.graph.nodes if n.op == "call_function" and n.target is norga.layers.base.attend]
        assert len(nodes) == len(_layers(model))
        with torch.no_grad():
            assert torch.equal(copied(x), eager)


class _Custom(nn.Module):
    """A user's module around `prefix_attention`: a learnable prefix, SMoPE-like logits and a bias as inputs."""

    def __init__(self, gate: object) -> None:
        super().__init__()
        self.gate = gate
        self.key = nn.Parameter(torch.randn(5, 32))
        self.value = nn.Parameter(torch.randn(5, 32))

    def forward(self, q, k, v, logits, bias):
        prefix = norga.Prefix(self.key, self.value, logits)
        return norga.prefix_attention(q, k, v, prefix, gate=self.gate, attn_bias=bias)


def _custom_inputs() -> tuple:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, 4, 7, 8, generator=g) for _ in range(3))
    return q, k, v, torch.randn(BATCH, 4, 1, 5, generator=g), torch.randn(BATCH, 4, 7, 7, generator=g)


@pytest.mark.parametrize("gate", ["tanh", "module"])
@pytest.mark.filterwarnings(JIT_DEPRECATED)
@pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level:UserWarning")
def test_prefix_attention_is_one_node_of_a_users_graph(gate):
    model = _Custom(norga.NoRGaGate("tanh", alpha=0.5) if gate == "module" else gate)
    gm = torch.fx.symbolic_trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is norga.prefix_attention]
    assert len(calls) == 1 and calls[0].kwargs["gate"] is not None
    inputs = _custom_inputs()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert torch.equal(gm(*inputs), model(*inputs)), f"grad={grad}"
    # a NoRGaGate module refuses first; a name leaves prefix_attention itself to refuse
    what = "NoRGaGate" if gate == "module" else "norga.functional.dispatch.prefix_attention"
    with pytest.raises(NotImplementedError, match=f"norga: TorchScript is not supported \\({what} cannot be scripted"):
        torch.jit.script(gm)


def test_a_gate_that_a_graph_cannot_hold_is_a_type_error():
    with pytest.raises(TypeError, match="torch.fx records prefix_attention as one graph node.*function"):
        torch.fx.symbolic_trace(_Custom(lambda s: 2.0 * s))
