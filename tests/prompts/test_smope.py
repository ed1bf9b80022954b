"""SMoPE: routing, row-constant logits, adaptive noise, usage, losses, state, batch invariance, errors.

References are written here from NOTES ("SMoPE as the authors ran it"), one sample and head at a time
in float64, without calling norga's routing.
"""

import copy
import io
import math
import pickle

import pytest
import reference as ref
import timm
import torch
import torch.nn.functional as F
from tolerance import (
    assert_within,
    network_tol,
    prefix_layer_tol,
    prototype_loss_tol,
    router_loss_tol,
    routing_err,
    tol,
)

import norga
from norga import NoRGaGate, PrefixMoEAttention, SMoPE

DIM, HEADS, E, K = 32, 4, 10, 3
HD = DIM // HEADS


def _route_ref(q, keys, frequent=None, eps=0.0):
    """Per (b, h): s_j = mean_n(q_n) . key_j; noisy = s - eps * (max s - min s) * frequent_j; top-K of noisy."""
    B, H = q.shape[:2]
    sel, s_all = [], torch.empty(B, H, keys.shape[1], dtype=torch.float64)
    for b in range(B):
        row = []
        for h in range(H):
            qm = q[b, h].double().sum(0) / q.shape[2]
            s = torch.stack([(qm * keys[h, j].double()).sum() for j in range(keys.shape[1])])
            s_all[b, h] = s
            noisy = s.clone()
            if frequent is not None:
                noisy = s - eps * (s.max() - s.min()) * frequent[h].double()
            order = sorted(range(len(s)), key=lambda j: -noisy[j].item())
            row.append(order[:K])
        sel.append(row)
    return sel, s_all


def _smope(**kw):
    torch.manual_seed(0)
    return SMoPE(DIM, HEADS, num_experts=E, top_k=K, **kw)


def test_parameters_are_one_tensor_each():
    m = _smope()
    assert [n for n, _ in m.named_parameters()] == ["keys", "values"]
    assert m.keys.shape == m.values.shape == (HEADS, E, HD)
    assert 0 <= float(m.keys.detach().min()) and float(m.keys.detach().max()) < 1  # U[0, 1)
    assert {n for n, _ in m.named_buffers()} == {"usage", "frequent", "key_snapshot", "has_snapshot"}


def test_routing_matches_top_k_reference():
    m = _smope().eval()
    q = torch.randn(5, HEADS, 7, HD)
    p = m(q)
    sel, s = _route_ref(q, m.keys.detach())
    assert p.indices.shape == (5, HEADS, K)
    for b in range(5):
        for h in range(HEADS):
            assert sorted(p.indices[b, h].tolist()) == sorted(sel[b][h])
            assert torch.equal(p.key[b, h], m.keys[h, p.indices[b, h]])  # a gather: exact
            assert torch.equal(p.value[b, h], m.values[h, p.indices[b, h]])
    assert p.logits.shape == (5, HEADS, 1, K)
    # float32 routing logits against the float64 reference: tolerance.routing_err (mean of N, dot of D terms)
    bound = routing_err(q, m.keys, m.scale).gather(-1, p.indices)
    assert_within(p.logits[:, :, 0], m.scale * s.gather(-1, p.indices), bound)


@pytest.mark.parametrize("gate", [None, "tanh", "sigmoid"])
@pytest.mark.parametrize("fused", [True, False])
def test_attention_output_matches_row_constant_reference(gate, fused):
    torch.manual_seed(1)
    smope = SMoPE(DIM, HEADS, num_experts=E, top_k=K, gate=NoRGaGate(gate, alpha=0.7, tau=1.3) if gate else None)
    layer = PrefixMoEAttention(DIM, num_heads=HEADS, qkv_bias=True, prompt=smope).eval()
    layer.fused_attn = fused
    x = torch.randn(3, 6, DIM)
    out = layer(x)

    qkv = x.double() @ layer.qkv.weight.double().T + layer.qkv.bias.double()
    q, k, v = (ref.heads(qkv[..., i * DIM : (i + 1) * DIM], HEADS) for i in range(3))
    sel, s = _route_ref(q, smope.keys.detach())
    idx = torch.tensor(sel)  # (B, H, K)
    hh = torch.arange(HEADS).view(1, -1, 1)
    pk, pv = smope.keys.detach()[hh, idx].double(), smope.values.detach()[hh, idx].double()
    logits = (smope.scale * s.gather(-1, idx)).unsqueeze(2)  # one value for every query row
    if gate:
        logits = ref.norga_gate(logits, gate, 0.7, 1.3)
    o = ref.prefix_attention(q, k, v, pk, pv, scale=HD**-0.5, logits=logits)
    o = torch.cat([o[:, h] for h in range(HEADS)], dim=-1)
    expected = o @ layer.proj.weight.double().T + layer.proj.bias.double()
    # the float32 layer (qkv, routing logits, gated attention, projection) within tolerance.prefix_layer_tol
    bound = prefix_layer_tol(
        layer, x, pk, pv, **({"act": gate, "alpha": 0.7, "tau": 1.3} if gate else {}), routing_scale=smope.scale
    )
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=bound)


def test_noise_moves_training_selection_and_not_evaluation():
    m = _smope(noise_eps=1.0)
    q = torch.randn(6, HEADS, 5, HD)
    m.eval()
    clean = m(q).indices
    m.frequent.zero_()
    for b in range(6):  # mark this batch's clean selections frequent
        for h in range(HEADS):
            m.frequent[h, clean[b, h]] = True
    m.has_snapshot.fill_(True)
    assert torch.equal(m(q).indices, clean)  # evaluation: deterministic, no noise
    m.train()
    noisy = m(q)
    sel, s = _route_ref(q, m.keys.detach(), m.frequent, eps=1.0)
    for b in range(6):
        for h in range(HEADS):
            assert sorted(noisy.indices[b, h].tolist()) == sorted(sel[b][h])
            if (~m.frequent[h]).sum() >= K:  # eps=1: a frequent expert falls below every other one
                assert not m.frequent[h, noisy.indices[b, h]].any()
    # the noise changes the selection, never the attention logit
    expected = m.scale * s.gather(-1, noisy.indices)
    assert_within(noisy.logits[:, :, 0], expected, routing_err(q, m.keys, m.scale).gather(-1, noisy.indices))
    assert not torch.equal(noisy.indices.sort(-1).values, clean.sort(-1).values)


def _eval_route_ref(q, keys, usage):
    """The authors' evaluation routing: an expert with count 0 scores s - 2 * (max s - min s), per (b, h)."""
    _, s = _route_ref(q, keys)
    sel = []
    for b in range(q.shape[0]):
        row = []
        for h in range(q.shape[1]):
            penalty = [2.0 if usage[h, j] == 0 else 0.0 for j in range(keys.shape[1])]
            spread = s[b, h].max() - s[b, h].min()
            routed = [s[b, h, j] - penalty[j] * spread for j in range(keys.shape[1])]
            row.append(sorted(range(len(routed)), key=lambda j: -routed[j].item())[:K])
        sel.append(row)
    return sel


def test_evaluation_excludes_never_used_experts():
    m = _smope().eval()
    q = torch.randn(6, HEADS, 5, HD)
    clean = m(q).indices
    # all counts 0: nothing changes
    assert torch.equal(m(q).indices, clean)
    # head 0: only experts 0..K (K + 1 of them) used; head 1: two used, so K - 2 never-used experts fill in;
    # head 2: every expert used; head 3: no counts at all
    m.usage[0, : K + 1] = torch.arange(1.0, K + 2)
    m.usage[1, :2] = 5.0
    m.usage[2] = 1.0
    got = m(q).indices
    sel = _eval_route_ref(q, m.keys.detach(), m.usage)
    for b in range(6):
        for h in range(HEADS):
            assert sorted(got[b, h].tolist()) == sorted(sel[b][h])
        assert set(got[b, 0].tolist()) <= set(range(K + 1))  # only used experts
        assert {0, 1} <= set(got[b, 1].tolist())  # the used ones first, then the best never-used ones
        assert torch.equal(got[b, 2].sort().values, clean[b, 2].sort().values)
        assert torch.equal(got[b, 3].sort().values, clean[b, 3].sort().values)
    assert not torch.equal(got[:, 0].sort(-1).values, clean[:, 0].sort(-1).values)  # the rule did something
    m.train()  # training routes with the adaptive noise only, whatever the counts
    sel_train, _ = _route_ref(q, m.keys.detach(), m.frequent, eps=m.noise_eps)
    assert [[sorted(r) for r in row] for row in m(q).indices.tolist()] == [
        [sorted(r) for r in row] for row in sel_train
    ]


def test_training_forwards_do_not_count():
    m = _smope().train()
    m(torch.randn(4, HEADS, 5, HD))
    m.eval()
    m(torch.randn(4, HEADS, 5, HD))
    assert m.usage.sum() == 0


def test_count_usage_counts_noise_free_top_k_in_evaluation_mode():
    model = torch.nn.Sequential(_smope())
    m = model[0]
    model.train()
    m.usage[:, :2] = 1.0  # counts from an earlier task: the evaluation rule now changes the selection
    start = m.usage.clone()
    expected = start.clone()
    batches = [torch.randn(4, HEADS, 5, HD) for _ in range(3)]
    with norga.count_usage(model):
        assert not m.training and not torch.is_grad_enabled()
        for q in batches:
            before = m.usage.clone()
            p = m(q)
            # the selection of this batch used the counts of the earlier batches only
            sel = _eval_route_ref(q, m.keys.detach(), before)
            assert [[sorted(r) for r in row] for row in p.indices.tolist()] == [[sorted(r) for r in row] for row in sel]
            raw, _ = _route_ref(q, m.keys.detach())  # what is counted: the top-K of the raw scores
            for b in range(q.shape[0]):
                for h in range(HEADS):
                    for j in raw[b][h]:
                        expected[h, j] += 1
            torch.testing.assert_close(m.usage, expected, rtol=0, atol=0)
    assert m.training and not m.counting and torch.is_grad_enabled()  # restored
    assert float(m.usage.sum() - start.sum()) == 3 * 4 * HEADS * K
    m(batches[0])
    torch.testing.assert_close(m.usage, expected, rtol=0, atol=0)  # outside the block: no counting


def test_count_usage_restores_modes_on_error_and_needs_smope():
    model = torch.nn.Sequential(_smope(), torch.nn.Dropout()).train()
    model[1].eval()
    with pytest.raises(RuntimeError, match="boom"):
        with norga.count_usage(model):
            raise RuntimeError("boom")
    assert model.training and model[0].training and not model[1].training and not model[0].counting
    with pytest.raises(ValueError, match="no norga.SMoPE"):
        with norga.count_usage(torch.nn.Linear(2, 2)):
            pass


def test_end_task_marks_frequent_experts_and_snapshots_keys():
    m = _smope()
    usage = torch.tensor([[4.0, 0, 2, 6, 0, 0, 1, 0, 0, 3]] * HEADS)
    usage[1] = 0  # a head that never routed marks nothing
    m.usage.copy_(usage)
    m.end_task()
    nonzero = usage[0][usage[0] > 0]
    expected = (usage[0] >= nonzero.mean()) & (usage[0] > 0)  # mean of non-zero counts = 16/5
    assert torch.equal(m.frequent[0], expected)
    assert expected.tolist() == [True, False, False, True, False, False, False, False, False, False]
    assert not m.frequent[1].any()
    assert torch.equal(m.key_snapshot, m.keys.detach()) and bool(m.has_snapshot)


def test_frequent_flags_are_sticky():
    m = _smope()
    m.usage[0] = torch.tensor([4.0, 0, 2, 6, 0, 0, 1, 0, 0, 3])
    m.end_task()  # mean 16/5: experts 0 and 3
    m.usage[0] += torch.tensor([0.0, 20, 0, 0, 0, 0, 0, 0, 0, 0])  # the next task counts expert 1 a lot
    m.end_task()  # mean 36/6 = 6: experts 1 and 3 by count; expert 0 (4 < 6) stays flagged
    assert m.frequent[0].nonzero().flatten().tolist() == [0, 1, 3]


def _router_loss_ref(s, idx, eps):
    """Theirs: mean_b sum_h sum_{i in idx} CE(s + eps * (1 - mask) * (max s - min s), i), float64 loops."""
    B, H, E_ = s.shape
    total = 0.0
    for b in range(B):
        for h in range(H):
            spread = s[b, h].max() - s[b, h].min()
            z = torch.stack([s[b, h, j] + (0.0 if j in idx[b][h] else eps * spread) for j in range(E_)])
            for i in idx[b][h]:
                total += torch.logsumexp(z, 0) - z[i]
    return total / B


def test_router_loss_matches_reference_and_has_gradients():
    m = _smope(noise_eps=0.5).train()
    m.frequent[:, :3] = True
    q = torch.randn(4, HEADS, 5, HD)
    p = m(q)
    loss = m.router_loss()
    sel, s = _route_ref(q, m.keys.detach(), m.frequent, eps=0.5)  # the selection uses the noisy scores
    assert [[sorted(r) for r in row] for row in p.indices.tolist()] == [[sorted(r) for r in row] for row in sel]
    expected = _router_loss_ref(s, sel, 0.5)
    # float32 scores, margin, log-softmax and sums: tolerance.router_loss_tol
    bound = router_loss_tol(s, routing_err(q, m.keys, 1.0), torch.tensor(sel), 0.5)
    assert_within(loss, expected, bound)
    loss.backward()
    assert m.keys.grad is not None and m.keys.grad.abs().sum() > 0


def test_router_loss_margin_on_a_hand_checked_case():
    # one sample, one head, E = 3, K = 1, mean query (1, 0): s = (3, 1, 0), range 3, eps 0.5.
    m = SMoPE(2, 1, num_experts=3, top_k=1, noise_eps=0.5).train()
    with torch.no_grad():
        m.keys.copy_(torch.tensor([[[3.0, 0.0], [1.0, 0.0], [0.0, 0.0]]]))
    m(torch.tensor([[[[1.0, 0.0]]]]))
    # expert 0 selected; the others get + 0.5 * 3: z = (3, 2.5, 1.5), loss = log(e^3 + e^2.5 + e^1.5) - 3
    expected = math.log(math.exp(3) + math.exp(2.5) + math.exp(1.5)) - 3
    s = torch.tensor([[[3.0, 1.0, 0.0]]], dtype=torch.float64)  # exact in float32: no score error
    assert_within(m.router_loss(), torch.tensor(expected), router_loss_tol(s, 0.0, torch.tensor([[[0]]]), 0.5))
    # without the margin it would be log(e^3 + e^1 + 1) - 3, which is smaller
    assert expected > math.log(math.exp(3) + math.exp(1) + 1) - 3


def test_router_loss_of_an_empty_batch_is_zero():
    m = _smope().train()
    m(torch.randn(0, HEADS, 5, HD))
    loss = m.router_loss()
    assert loss.item() == 0.0 and math.isfinite(loss.item())


def test_router_loss_needs_a_sparse_training_forward():
    m = _smope()
    with pytest.raises(RuntimeError, match="sparse forward in training mode"):
        m.router_loss()
    m.eval()
    m(torch.randn(2, HEADS, 5, HD))
    with pytest.raises(RuntimeError, match="sparse forward in training mode"):
        m.router_loss()


def test_copies_after_a_training_forward_start_without_its_scores():
    """deepcopy (timm's EMA, a frozen teacher) and pickle work after a training forward; the copy has no router
    loss of its own (the scores belong to the original's autograd graph), the original keeps its own."""
    model = norga.patch_vit(_tiny_vit(depth=2), layers=[0, 1], prompt=norga.smope_factory(num_experts=4, top_k=2))
    model.train()
    model(torch.randn(2, 3, 32, 32))
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        for m, c in zip(norga.prompts.smope_layers(model), norga.prompts.smope_layers(copied)):
            assert torch.equal(c.keys, m.keys) and torch.equal(c.usage, m.usage)
            with pytest.raises(RuntimeError, match="sparse forward in training mode"):
                c.router_loss()
            assert m.router_loss().requires_grad


def _prototype_loss_ref(old, now, frequent, top_k):
    """Theirs, per head: sum_{i<K} mean over prototypes P (old keys of frequent experts) of
    CE(P . K_now^T, i-th of top-K(P . K_old^T)); summed over heads. float64 loops."""
    total = 0.0
    for h in range(old.shape[0]):
        protos = [j for j in range(old.shape[1]) if frequent[h, j]]
        if not protos:
            continue
        for i in range(top_k):
            ces = []
            for j in protos:
                logits = torch.stack([(old[h, j] * now[h, e]).sum() for e in range(old.shape[1])])
                sim_old = torch.stack([(old[h, j] * old[h, e]).sum() for e in range(old.shape[1])])
                target = sorted(range(old.shape[1]), key=lambda e: -sim_old[e].item())[i]
                ces.append(torch.logsumexp(logits, 0) - logits[target])
            total += sum(ces) / len(ces)
    return total


def test_prototype_loss():
    m = _smope()
    assert m.prototype_loss().item() == 0.0  # before any end_task
    m.usage[:, :4] = torch.tensor([5.0, 3.0, 1.0, 4.0])
    m.usage[2] = 0.0  # a head without frequent experts adds nothing
    m.end_task()
    at_snapshot = m.prototype_loss()
    old = m.key_snapshot.double()
    expected = _prototype_loss_ref(old, m.keys.detach().double(), m.frequent, K)
    # float32 dot products, log-softmax and sums: tolerance.prototype_loss_tol
    assert math.isfinite(at_snapshot.item())
    assert_within(at_snapshot, expected, prototype_loss_tol(old, m.keys.detach(), m.frequent, K))
    argmax_only = _prototype_loss_ref(old, m.keys.detach().double(), m.frequent, 1)
    assert at_snapshot.item() > float(argmax_only) * 1.5  # K targets, not only the argmax
    with torch.no_grad():
        m.keys.copy_(m.keys.flip(1) + 0.5 * torch.randn_like(m.keys))  # keys move away from the snapshot
    moved = m.prototype_loss()
    want = _prototype_loss_ref(old, m.keys.detach().double(), m.frequent, K)
    assert_within(moved, want, prototype_loss_tol(old, m.keys.detach(), m.frequent, K))
    moved.backward()
    assert m.keys.grad is not None and m.keys.grad.abs().sum() > 0


def test_training_phases():
    P = norga.prompts.Phase
    assert norga.prompts.training_phases(0, 10) == [P(True, 5), P(False, 10)]
    assert norga.prompts.training_phases(0, 3) == [P(True, 1), P(False, 3)]
    assert norga.prompts.training_phases(0, 1) == [P(False, 1)]  # int(1 / 2) = 0 dense epochs
    assert norga.prompts.training_phases(4, 10) == [P(False, 10)]
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        norga.prompts.training_phases(0, 0)
    with pytest.raises(TypeError, match="task must be an int"):
        norga.prompts.training_phases(0.0, 2)


def test_dense_warm_up_uses_every_expert():
    m = _smope().train()
    m.dense = True
    p = m(torch.randn(2, HEADS, 5, HD))
    assert p.key.shape == (2, HEADS, E, HD) and p.logits.shape == (2, HEADS, 1, E)
    assert torch.equal(p.indices[0, 0], torch.arange(E))
    assert m.usage.sum() == 0


def test_state_dict_round_trip():
    m = _smope().train()
    with norga.count_usage(m):
        for _ in range(2):
            m(torch.randn(4, HEADS, 5, HD))
    m.end_task()
    assert m.usage.sum() > 0 and m.frequent.any()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = SMoPE(DIM, HEADS, num_experts=E, top_k=K)
    other.load_state_dict(torch.load(buf, weights_only=True))
    for name in ("usage", "frequent", "key_snapshot", "has_snapshot", "keys", "values"):
        assert torch.equal(getattr(other, name), getattr(m, name)), name
    q = torch.randn(3, HEADS, 5, HD)
    other.train()
    assert torch.equal(other(q).indices, m(q).indices)  # the noise depends on restored state
    assert torch.equal(other.prototype_loss(), m.prototype_loss())  # the same computation on the same state


def _tiny_vit(depth=8):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth, num_classes=5
    )


def test_patch_vit_default_layers_and_model_helpers():
    model = norga.patch_vit(_tiny_vit(), prompt=norga.smope_factory(num_experts=6, top_k=2))
    assert [layer.index for layer in norga.patch.patched_layers(model)] == [0, 1, 2, 3, 4, 5]
    layers = norga.prompts.smope_layers(model)
    assert len(layers) == 6 and all(m.num_heads == 3 and m.dim == 192 and m.top_k == 2 for m in layers)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(m.keys.grad is not None and m.values.grad.abs().sum() > 0 for m in layers)
    router, proto = norga.smope_losses(model)
    assert proto.item() == 0.0
    losses = torch.stack([m.router_loss() for m in layers]).detach()
    # one sum of 6 float32 terms in another order: tolerance.tol(float32, 6, sum of |terms|)
    torch.testing.assert_close(
        router.detach(), losses.sum(), rtol=0, atol=2 * tol(torch.float32, 6, float(losses.abs().sum()))
    )
    with norga.count_usage(model):
        model(torch.randn(4, 3, 32, 32))
    assert model.training and all(m.usage.sum() == 4 * 3 * 2 for m in layers)  # B * H * K per layer
    norga.end_task(model)
    assert all(bool(m.has_snapshot) for m in layers)
    router, proto = norga.smope_losses(model)
    assert proto.item() > 0 and proto.requires_grad
    norga.set_dense(model, True)
    assert all(m.dense for m in layers)
    sd = model.state_dict()
    assert "blocks.0.attn.prompt.usage" in sd and "blocks.5.attn.prompt.key_snapshot" in sd


def test_patch_vit_smope_with_explicit_layers_and_gate():
    model = norga.patch_vit(_tiny_vit(), layers=[1, 3], prompt=norga.smope_factory(4, 2, gate=NoRGaGate("gelu")))
    layers = norga.prompts.smope_layers(model)
    assert [layer.index for layer in norga.patch.patched_layers(model)] == [1, 3]
    assert layers[0].gate is not layers[1].gate  # each layer its own alpha, tau


def test_batch_invariance_in_eval():
    model = norga.patch_vit(_tiny_vit(depth=6), prompt=norga.smope_factory(num_experts=8, top_k=3)).eval()
    x = torch.randn(5, 3, 32, 32)
    full = model(x)
    # two float32 evaluations of the whole network, each within tolerance.network_tol of the exact logits
    bound = 2 * network_tol(model, x)
    for i in range(5):
        assert_within(model(x[i : i + 1]), full[i : i + 1], bound[i : i + 1])
    assert_within(model(x.flip(0)), full.flip(0), bound.flip(0))


def test_helpers_need_smope():
    with pytest.raises(ValueError, match="no norga.SMoPE"):
        norga.smope_losses(_tiny_vit(depth=2))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"num_experts": 4, "top_k": 5}, ValueError, "top_k must be <= num_experts, got top_k=5 and num_experts=4"),
        ({"dim": 30}, ValueError, "divisible by num_heads, got dim=30 and num_heads=4"),
        ({"noise_eps": float("nan")}, ValueError, "noise_eps must be finite"),
        ({"top_k": 0}, ValueError, "top_k must be >= 1, got 0"),
        ({"num_experts": 2.5}, TypeError, "num_experts must be an int"),
    ],
)
def test_constructor_errors(kwargs, err, match):
    args = {"dim": DIM, "num_heads": HEADS, **kwargs}
    with pytest.raises(err, match=match):
        SMoPE(**args)
    if set(kwargs) <= {"num_experts", "top_k", "noise_eps"}:
        with pytest.raises(err, match=match):
            norga.smope_factory(**{"num_experts": 25, "top_k": 5, **kwargs})


@pytest.mark.parametrize("shape", [(2, HEADS, 5), (2, HEADS + 1, 5, HD), (2, HEADS, 5, HD + 1), (2, HEADS, 0, HD)])
def test_q_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"q must have shape \(B, H=4, N>=1, D=8\), got"):
        _smope()(torch.randn(shape))


def test_q_must_be_a_float_tensor():
    with pytest.raises(TypeError, match="q must be"):
        _smope()(torch.ones(2, HEADS, 5, HD, dtype=torch.long))
    with pytest.raises(TypeError, match="q must be a tensor"):
        _smope()([1, 2])


@pytest.mark.slow
def test_compiles_fullgraph():
    model = norga.patch_vit(_tiny_vit(depth=6), prompt=norga.smope_factory(num_experts=8, top_k=3))
    layers = norga.prompts.smope_layers(model)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)
    # aot_eager: Dynamo's one graph and AOTAutograd's functionalized graph (the usage count is a buffer mutation
    # inside it); Inductor's code generation is exercised by tests/test_patch.py
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    # two float32 evaluations of the whole network, each within tolerance.network_tol of the exact logits
    # (no dropout, and no noise before any expert is frequent: training mode computes what evaluation does)
    assert_within(out, eager, 2 * network_tol(model, x))
    assert F.mse_loss(out, torch.zeros_like(out)).isfinite()
    with norga.count_usage(model):
        model(x)
    usage = [m.usage.clone() for m in layers]
    with norga.count_usage(model):
        compiled(x)
    for before, m in zip(usage, layers):
        assert torch.equal(m.usage, 2 * before)  # the counting happens in the compiled graph too
