"""L2P++, DualPrompt, CODA-Prompt and VQ-Prompt against the authors' code (tests/reference_prompts.py, float64).

Per layer: norga's float32 prefix and auxiliary loss against the reference's from the same parameters and query,
within bounds from rounding-error analysis (below); the selections must be identical, which the tests make
meaningful by checking first that the reference's margins exceed twice the selection scores' error bound.
Gradients: norga in float64 against the reference's float64 autograd. Initialisation: the same random draws as
the authors' construction, in their order.

Bounds (float32, unit roundoff u, gamma_n = n u / (1 - n u)):

* a cosine of unit-normalised vectors of d components: normalising each costs a sum of d squares, a square root
  and a division (relative gamma_d / 2 + 2u per component), the dot product gamma_d of sum |a_i b_i| <= 1:
  ``cos_err(d) = 2 gamma_d + 4u``;
* CODA's weights ``alpha_m = normalize(x * A_m) . normalize(K_m)``: the product adds u per component:
  ``2 gamma_d + 5u``; the prompt ``sum_m alpha_m P_m`` adds ``gamma_f sum_m |alpha_m P_m|``;
* VQ's scores ``z_m = x . normalize(K_m)``: ``(gamma_d + gamma_d / 2 + 2u) sum_i |x_i k_i|``; the softmax's
  weights then have relative error ``2 max|dz| / T + (M + 8) u`` (exp 2 ulp, the sum of M terms, the
  division); the soft prompt ``sum_m alpha_m P_m`` adds ``gamma_M``;
* gathers (L2P, DualPrompt) are exact.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import reference_prompts as ref
import timm
import torch
from tolerance import assert_within, gamma, unit_roundoff
from versions import needs

import norga
from norga.prompts import L2P, CODAPrompt, DualPrompt, VQPrompt

U = unit_roundoff(torch.float32)
F32 = torch.float32
DIM, HEADS, B = 64, 4, 5


def vit(depth: int = 5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=depth,
        embed_dim=DIM,
        num_heads=HEADS,
        num_classes=6,
    ).eval()


def query(seed: int = 1, batch: int = B) -> torch.Tensor:
    return torch.randn(batch, DIM, generator=torch.Generator().manual_seed(seed))


def cos_err(d: int) -> float:
    return 2 * gamma(F32, d) + 4 * U


def assert_separated(scores: torch.Tensor, k: int, err: float | torch.Tensor) -> None:
    """The top `k + 1` of each row of the float64 `scores`, sorted, are more than `2 err` apart: a float32
    evaluation within `err` of them selects (and orders) the same top `k`."""
    top = scores.topk(min(k + 1, scores.shape[1]), dim=1).values
    gaps = top[:, :-1] - top[:, 1:]
    assert bool((gaps > 2 * torch.as_tensor(err)).all()), "test data too close to a tie; pick another seed"


def _sum_err(terms: torch.Tensor, per_term_err: float) -> float:
    """A float32 sum of `terms` (each with error `per_term_err`, plus one rounding): its error bound."""
    return terms.numel() * per_term_err + (U + gamma(F32, terms.numel())) * float(terms.abs().sum())


# --------------------------------------------------------------------------------------------------- L2P
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("pull", ["cross", "own"])
def test_l2p_layer_matches_the_authors(train, pull):
    torch.manual_seed(3)
    m = L2P(3, DIM, pool_size=8, length=6, top_k=3, layers=(0, 1), pull=pull).train(train)
    x = query()
    for slot in range(2):
        K, p = m.keys[slot].detach(), m.prompts[slot].detach()
        ek, ev, loss, idx = ref.l2p_layer(x, K, p, 3, train, pull)
        cos64 = ref.cosines(x, K)
        assert_separated(cos64, 3, cos_err(DIM))
        key, value, got_loss = m.layer_prefix(slot, x)
        assert torch.equal(key.double(), ek) and torch.equal(value.double(), ev)  # a gather: exact
        if train:
            terms = 1.0 - (cos64[:, idx] if pull == "cross" else cos64.gather(1, idx))
            assert_within(got_loss, loss, _sum_err(terms, cos_err(DIM)))
        else:
            assert got_loss is None


def test_l2p_prefix_length_and_per_sample_selection():
    m = L2P(2, DIM, pool_size=8, length=6, top_k=3, layers=(0,)).eval()
    x = query()
    key, value, _ = m.layer_prefix(0, x)
    assert key.shape == value.shape == (B, 3 * 3, DIM)
    for b in range(B):  # a sample alone gets what it gets in the batch: no batch vote
        kb, vb, _ = m.layer_prefix(0, x[b : b + 1])
        assert torch.equal(kb[0], key[b]) and torch.equal(vb[0], value[b])


# --------------------------------------------------------------------------------------------- DualPrompt
@pytest.mark.parametrize("train", [False, True])
def test_dualprompt_layers_match_the_authors(train):
    torch.manual_seed(4)
    m = DualPrompt(4, DIM, pool_size=4, e_length=6, g_length=4, g_layers=(0, 1), e_layers=(2, 3, 4)).train(train)
    m.set_task(2)
    x = query()
    for slot, layer in enumerate(m.layers):
        key, value, loss = m.layer_prefix(slot, x)
        if layer in m.g_layers:
            gk, gv = ref.dual_g_layer(x, m.g_prompts[m.g_layers.index(layer)].detach())
            assert torch.equal(key.double(), gk) and torch.equal(value.double(), gv) and loss is None
            continue
        i = m.e_layers.index(layer)
        K, p = m.e_keys[i].detach(), m.e_prompts[i].detach()
        ek, ev, ref_loss, _ = ref.dual_e_layer(x, K, p, train, 2)
        if not train:
            assert_separated(ref.cosines(x, K), 1, cos_err(DIM))
        assert torch.equal(key.double(), ek) and torch.equal(value.double(), ev)
        if train:
            terms = 1.0 - ref.cosines(x, K)[:, 2]
            assert_within(loss, ref_loss, _sum_err(terms, cos_err(DIM)))
        else:
            assert loss is None


def test_dualprompt_overlapping_layers_concatenate_e_then_g():
    m = DualPrompt(2, DIM, pool_size=2, e_length=4, g_length=2, g_layers=(0,), e_layers=(0, 1)).eval()
    x = query()
    key, value, _ = m.layer_prefix(0, x)
    ek, ev, _, _ = ref.dual_e_layer(x, m.e_keys[0].detach(), m.e_prompts[0].detach(), False, 0)
    gk, gv = ref.dual_g_layer(x, m.g_prompts[0].detach())
    assert torch.equal(key.double(), torch.cat([ek, gk], 1)) and torch.equal(value.double(), torch.cat([ev, gv], 1))


def test_dualprompt_task_rules():
    m = DualPrompt(5, DIM, pool_size=3)
    with pytest.raises(ValueError, match="task 3 has no E-prompt"):
        m.set_task(3)
    with pytest.raises(TypeError, match="takes one task id"):
        m.set_task(torch.tensor([0, 1]))
    assert m.task == 0


# ------------------------------------------------------------------------------------------------ CODA
def _coda_bound(x: torch.Tensor, K, A, P, f: int) -> torch.Tensor:
    """Elementwise bound on the float32 CODA prompt `sum_{m<f} alpha_m P_m` (module docstring)."""
    e_alpha = 2 * gamma(F32, K.shape[1]) + 5 * U
    aq = ref.normalize(x.double().unsqueeze(1) * A.double()[:f], 2)
    a = torch.einsum("bkd,kd->bk", aq, ref.normalize(K.double()[:f], 1)).abs()  # |alpha|
    Pa = P.double()[:f].abs()
    return e_alpha * Pa.sum(0) + gamma(F32, f) * torch.einsum("bk,kld->bld", a, Pa)


def _penalty_bound(t: torch.Tensor) -> float:
    """Bound on the float32 `mean((t t^T - I)^2)`: each Gram entry gamma_n of its absolute terms, the
    subtraction and square one rounding each, the mean of M^2 terms gamma_{M^2}."""
    t = t.double()
    E = t @ t.T - torch.eye(t.shape[0], dtype=torch.float64)
    delta = gamma(F32, t.shape[1]) * (t.abs() @ t.abs().T) + U * E.abs()
    return float((2 * E.abs() * delta + delta**2 + U * E**2).mean()) + gamma(F32, E.numel()) * float((E**2).mean())


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("task", [0, 2])
def test_coda_layer_matches_the_authors(train, task):
    torch.manual_seed(5)
    m = CODAPrompt(3, DIM, pool_size=6, length=4, ortho_mu=0.1, layers=(0, 1)).train(train)
    m.set_task(task)
    x = query()
    f = (task + 1) * 2
    for slot in range(2):
        K, A, P = (t[slot].detach() for t in (m.keys, m.attention, m.prompts))
        ek, ev, loss, _ = ref.coda_layer(x, K, A, P, task, 3, train, 0.1)
        key, value, got = m.layer_prefix(slot, x)
        bound = _coda_bound(x, K, A, P, f)
        assert_within(key, ek, bound[:, :2])
        assert_within(value, ev, bound[:, 2:])
        if train:
            pens = [ref.ortho_penalty(t[:f].reshape(f, -1)) for t in (K, A, P)]
            b = 0.1 * sum(_penalty_bound(t[:f].reshape(f, -1)) for t in (K, A, P)) + 4 * U * float(loss.detach())
            assert sum(pens) > 0 and got is not None
            assert_within(got, loss, b)
        else:
            assert got is None


def test_coda_gram_schmidt_draws_as_the_authors_do():
    """In float64 (the same normal draws on both sides: `torch.randn` in component order, as `randn_like`), the
    first task's components at construction and a later task's at its start. The bound is first order: each
    new component is a draw less at most f projections, each a dot product of n terms (gamma_n of its absolute
    terms) scaled and subtracted, then normalised (gamma_n + 2u); the errors of earlier new components enter
    each projection once, so the bound grows with the index: (k + 1) (3 gamma_n + gamma_f) sum_j |c_j u_j|."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(11)
        m = CODAPrompt(3, 8, pool_size=6, length=2, layers=(0,))
        torch.manual_seed(11)  # the authors' construction: U[0, 1) fills of P, K, A, then Gram-Schmidt of each
        p, k, a = torch.empty(6, 2, 8).uniform_(), torch.empty(6, 8).uniform_(), torch.empty(6, 8).uniform_()
        expected = [ref.gram_schmidt(t, 0, 6, 3) for t in (p, k, a)]
        trained = [t.detach().clone() for t in (m.prompts[0], m.keys[0], m.attention[0])]
        with torch.no_grad():  # "training" moves task 0's components before task 1 starts
            for t in (m.prompts, m.keys, m.attention):
                t[0, :2] += 0.3 * torch.randn_like(t[0, :2])
        moved = [t.detach().clone() for t in (m.keys[0], m.attention[0], m.prompts[0])]
        state = torch.random.get_rng_state()
        m.set_task(1)
        torch.random.set_rng_state(state)
        later = [ref.gram_schmidt(t, 1, 6, 3) for t in moved]  # the authors' order at a task start: K, A, P
    finally:
        torch.set_default_dtype(default)
    u64 = unit_roundoff(torch.float64)
    for got, exp in zip(trained + [m.keys[0], m.attention[0], m.prompts[0]], expected + later):
        flat = exp.reshape(6, -1)
        n = flat.shape[1]
        bound = 7 * (3 * gamma(torch.float64, n) + gamma(torch.float64, 6)) * float(flat.abs().sum(0).max()) * 8
        assert_within(got.detach().reshape(6, -1), flat, bound + 4 * u64)
    assert torch.equal(m.prompts[0, 4:], torch.zeros_like(m.prompts[0, 4:]))  # task 2's: not drawn yet
    started = m.started
    m.set_task(1)  # drawn once: a task that starts again keeps its trained components
    assert m.started == started == 2


def test_coda_detaches_earlier_components_in_training():
    m = CODAPrompt(3, DIM, pool_size=6, length=4, ortho_mu=0.1, layers=(0,)).train()
    m.set_task(1)
    key, value, loss = m.layer_prefix(0, query())
    (key.sum() + value.sum() + loss).backward()
    for t in (m.keys, m.attention, m.prompts):
        g = t.grad[0]
        assert bool((g[:2] == 0).all()) and bool((g[4:] == 0).all())  # task 0's detached, task 2's unused
        assert bool((g[2:4] != 0).any())
    m.eval()  # evaluation: every component up to the task's, nothing detached (no autograd needed)
    key, value, loss = m.layer_prefix(0, query())
    assert loss is None


def test_coda_zero_component_is_an_error_not_a_loop():
    m = CODAPrompt(2, 8, pool_size=4, length=2, layers=(0,))
    with torch.no_grad():
        m.keys[0, 0] = 0.0
    before = m.keys.detach().clone()
    with pytest.raises(ValueError, match="component 0 is zero"):
        m.set_task(1)
    assert torch.equal(m.keys, before)


# --------------------------------------------------------------------------------------------------- VQ
@pytest.mark.parametrize("train", [False, True])
def test_vq_layer_matches_the_authors(train):
    torch.manual_seed(6)
    m = VQPrompt(3, DIM, pool_size=5, length=4, temperature=0.5, layers=(0, 1)).train(train)
    x = query()
    for slot in range(2):
        K, P = m.keys[slot].detach(), m.prompts[slot].detach()
        ek, ev, loss, (idx, dist, soft) = ref.vq_layer(x, K, P, 0.5, train)
        # the soft prompt's error (module docstring), then the distances' and the selection's margin
        kn = ref.normalize(K, 1)
        dz = (gamma(F32, DIM) * 1.5 + 2 * U) * (x.double().abs() @ kn.abs().T) + U * (x.double() @ kn.T).abs() / 0.5
        alpha = torch.softmax((x.double() @ kn.T) / 0.5, dim=1)
        rho = 2 * dz.max(dim=1, keepdim=True).values / 0.5 + (5 + 8) * U
        e_soft = torch.einsum("bk,kld->bld", alpha * (rho + gamma(F32, 5)), P.double().abs())
        diff = (soft.unsqueeze(1) - P.double()).abs()
        e_dist = (2 * diff * e_soft.unsqueeze(1)).sum((-1, -2)) + (gamma(F32, 2 * DIM * 2) + 2 * U) * dist
        assert_separated(-dist, 1, e_dist.max())
        key, value, got = m.layer_prefix(slot, x)
        hard = P.double()[idx]
        bound = U * ((hard - soft).abs() + e_soft + hard.abs()) * (1 + 4 * U)
        assert_within(key, ek, bound[:, :2])
        assert_within(value, ev, bound[:, 2:])
        if train:
            n = soft.numel()
            e_mse = float((2 * (soft - hard).abs() * e_soft).sum()) / n + (gamma(F32, n) + 2 * U) * float(
                ((soft - hard) ** 2).mean()
            )
            assert_within(got, loss, 0.5 * e_mse + 3 * U * float(loss.detach()))
        else:
            assert got is None


def test_vq_straight_through_gradient_reaches_the_keys():
    m = VQPrompt(2, DIM, pool_size=5, length=4, layers=(0,)).train()
    key, value, loss = m.layer_prefix(0, query())
    (key.sum() + value.sum()).backward()
    assert bool((m.keys.grad != 0).any())  # through alpha: the soft prompt's gradient, straight through


# ------------------------------------------------------------------------------------- gradients (float64)
def _ref_layer(m, slot, x, train):
    layer = m.layers[slot]
    if isinstance(m, L2P):
        return ref.l2p_layer(x, m.keys[slot], m.prompts[slot], m.top_k, train, m.pull)[:3]
    if isinstance(m, DualPrompt):
        i = m.e_layers.index(layer)
        return ref.dual_e_layer(x, m.e_keys[i], m.e_prompts[i], train, m.task)[:3]
    if isinstance(m, CODAPrompt):
        return ref.coda_layer(
            x, m.keys[slot], m.attention[slot], m.prompts[slot], m.task, m.num_tasks, train, m.ortho_mu
        )[:3]
    return ref.vq_layer(x, m.keys[slot], m.prompts[slot], m.temperature, train, m.vq_coef, m.commit_coef)[:3]


METHODS = {
    "l2p": lambda: L2P(3, 16, pool_size=6, length=4, top_k=2, layers=(0,)),
    "dual": lambda: DualPrompt(3, 16, pool_size=3, e_length=4, g_length=2, g_layers=(), e_layers=(0,)),
    "coda": lambda: CODAPrompt(3, 16, pool_size=6, length=4, ortho_mu=0.1, layers=(0,)),
    "vq": lambda: VQPrompt(3, 16, pool_size=5, length=4, temperature=0.7, layers=(0,)),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_gradients_match_the_authors_in_float64(name):
    """Gradients of `sum(w_k * key) + sum(w_v * value) + loss` with respect to every parameter, norga in float64
    against the reference's autograd: a normwise first-order bound, each gradient element being at most
    n = B * M * length * dim products through at most 12 operations: 12 gamma_n max|g|."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(8)
        m = METHODS[name]().train()
        m.set_task(1)
        x = torch.randn(4, 16)
        key, value, loss = m.layer_prefix(0, x)
        wk, wv = torch.randn(key.shape), torch.randn(value.shape)
        (wk * key).sum().add((wv * value).sum()).add(loss).backward()
        ref_m = copy.deepcopy(m)
        ref_m.zero_grad()
        ek, ev, ref_loss = _ref_layer(ref_m, 0, x, True)
        (wk * ek).sum().add((wv * ev).sum()).add(ref_loss).backward()
    finally:
        torch.set_default_dtype(default)
    n = 4 * 6 * 4 * 16
    for (pname, p), (_, r) in zip(m.named_parameters(), ref_m.named_parameters()):
        if p.numel() == 0:  # DualPrompt without G-layers
            continue
        assert r.grad is not None, pname
        bound = 12 * gamma(torch.float64, n) * float(r.grad.abs().max())
        assert_within(p.grad, r.grad, bound, pname)


# ------------------------------------------------------------------------------------------ initialisation
def test_initialisation_draws_as_the_authors_construct():
    """The same U[0, 1) draws in the authors' order: per layer the prompts then the keys (DualPrompt: the
    G-prompts first)."""
    torch.manual_seed(9)
    m = L2P(2, 16, pool_size=4, length=4, top_k=2, layers=(0, 1))
    torch.manual_seed(9)
    for i in range(2):
        assert torch.equal(m.prompts[i], torch.empty(4, 4, 16).uniform_())
        assert torch.equal(m.keys[i], torch.empty(4, 16).uniform_())
    torch.manual_seed(9)
    d = DualPrompt(2, 16, pool_size=2, e_length=4, g_length=2, g_layers=(0, 1), e_layers=(2, 3))
    torch.manual_seed(9)
    for i in range(2):
        assert torch.equal(d.g_prompts[i], torch.empty(2, 16).uniform_())
    for i in range(2):
        assert torch.equal(d.e_prompts[i], torch.empty(2, 4, 16).uniform_())
        assert torch.equal(d.e_keys[i], torch.empty(2, 16).uniform_())
    torch.manual_seed(9)
    v = VQPrompt(2, 16, pool_size=4, length=4, layers=(0,))
    torch.manual_seed(9)
    assert torch.equal(v.prompts[0], torch.empty(4, 4, 16).uniform_())
    assert torch.equal(v.keys[0], torch.empty(4, 16).uniform_())


def test_authors_defaults():
    l2p, dual, coda, vq = L2P(10, 768), DualPrompt(10, 768), CODAPrompt(10, 768), VQPrompt(10, 768)
    assert (l2p.pool_size, l2p.length, l2p.top_k, l2p.layers) == (30, 20, 5, (0, 1, 2, 3, 4))
    assert (dual.pool_size, dual.e_length, dual.g_length, dual.g_layers, dual.e_layers) == (
        10,
        20,
        6,
        (0, 1),
        (2, 3, 4),
    )
    assert (coda.pool_size, coda.length, coda.ortho_mu, coda.layers) == (100, 8, 0.0, (0, 1, 2, 3, 4))
    assert (vq.pool_size, vq.length, vq.temperature, vq.vq_coef, vq.commit_coef) == (10, 8, 1.0, 0.4, 0.1)


@pytest.mark.parametrize(
    "build, exc, fragment",
    [
        (lambda: L2P(2, 16, length=5), ValueError, "length must be even"),
        (lambda: L2P(2, 16, pool_size=3, top_k=4), ValueError, "top_k must be <= pool_size"),
        (lambda: L2P(2, 16, pull="mean"), ValueError, "pull must be one of"),
        (lambda: L2P(2, 16, layers=(0, 0)), ValueError, "layers has duplicates"),
        (lambda: L2P(2, 16, layers="0"), TypeError, "layers must be a sequence"),
        (lambda: DualPrompt(2, 16, e_layers=()), ValueError, "e_layers must name at least one layer"),
        (lambda: CODAPrompt(4, 16, pool_size=3), ValueError, "pool_size must be >= num_tasks"),
        (lambda: CODAPrompt(2, 16, ortho_mu=-1.0), ValueError, "ortho_mu must be in"),
        (lambda: VQPrompt(2, 16, temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda: VQPrompt(2.5, 16), TypeError, "num_tasks must be an int"),  # type: ignore[arg-type]
    ],
)
def test_options_are_checked(build, exc, fragment):
    with pytest.raises(exc, match=fragment):
        build()


# ------------------------------------------------------------------------------------------- in a model
def patched(method, depth: int = 5, seed: int = 0):
    model = vit(depth)
    torch.manual_seed(seed + 100)
    norga.patch_vit(model, prompt=method)
    return model


def test_the_query_is_the_unprompted_models_feature():
    model = patched(DualPrompt(3, DIM))
    plain = vit()
    x = torch.randn(3, 3, 32, 32)
    seen = []
    hook = model.blocks[0].attn.prompt.register_forward_pre_hook(lambda m, a: seen.append(model.prompt_pool._query))
    with torch.no_grad():
        model(x)
        expected = plain.forward_head(plain.forward_features(x), pre_logits=True)
    hook.remove()
    assert seen[0] is None and torch.equal(seen[1], expected)  # the query pass (no query yet), then the prompted one
    assert model.prompt_pool._query is None  # not kept after the model's forward
    with torch.no_grad():
        assert torch.equal(norga.prompts.compute_query(model, x), expected)  # the same float32 computation


BUILDERS = {
    "l2p": lambda: L2P(3, DIM, pool_size=6, length=4, top_k=2),
    "dual": lambda: DualPrompt(3, DIM, pool_size=3, e_length=4, g_length=2),
    "coda": lambda: CODAPrompt(3, DIM, pool_size=6, length=4, ortho_mu=0.1),
    "vq": lambda: VQPrompt(3, DIM, pool_size=4, length=4),
}


def _reference_prefix(pool, layer: int, q: torch.Tensor):
    if isinstance(pool, DualPrompt) and layer in pool.g_layers and layer not in pool.e_layers:
        return ref.dual_g_layer(q, pool.g_prompts[pool.g_layers.index(layer)])
    return _ref_layer(pool, pool.layers.index(layer), q, False)[:2]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_each_layer_gets_the_prefix_of_the_query(name):
    """In a model, each prompted attention layer gets exactly the module's prefix for the query of the unprompted
    model (same float32 computations: bit for bit); the other layers get none. With the layer tests above
    (prefix against the authors' code) and the attention tests (attention over a given prefix), this is the
    authors' ViTZoo.forward."""
    model = patched(BUILDERS[name]())
    norga.set_task(model, 1)
    x = torch.randn(3, 3, 32, 32)
    seen = {}

    def record(index: int):
        def hook(mod, args, out) -> None:
            if out is not None:  # None: the query pass
                seen[index] = out

        return hook

    hooks = [
        layer.module.prompt.register_forward_hook(record(layer.index)) for layer in norga.patch.patched_layers(model)
    ]
    with torch.no_grad():
        model(x)
        q = norga.prompts.compute_query(model, x)
    for h in hooks:
        h.remove()
    pool = model.prompt_pool
    assert sorted(seen) == list(pool.layers)
    for layer, prefix in seen.items():
        key, value, _ = pool.layer_prefix(pool.layers.index(layer), q)
        assert torch.equal(prefix.key, attn_heads(key)) and torch.equal(prefix.value, attn_heads(value))


def attn_heads(t: torch.Tensor) -> torch.Tensor:
    return t.unflatten(-1, (HEADS, -1)).transpose(1, 2)


@pytest.mark.parametrize("name", ["l2p", "dual"])
def test_model_forward_matches_the_authors_model(name):
    """The patched model against the authors' ViTZoo.forward written with the unpatched timm model in float64:
    the query from a forward without prompts, each prompted layer's prefix from the reference, the attention over
    [prefix; tokens] from the reference equations (tests/reference.py). The selections are the same (the float64
    cosines' margins exceed twice the float32 query's effect on them plus their own rounding), the prefixes are
    gathers, so the float32 logits are within network_tol of the exact ones."""
    import reference as attn_ref
    from tolerance import network_tol

    model = patched(BUILDERS[name]())
    norga.set_task(model, 1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model(x)
        q32 = norga.prompts.compute_query(model, x)
    plain = vit().double()
    pool = model.prompt_pool
    with torch.no_grad():
        q = plain.forward_head(plain.forward_features(x.double()), pre_logits=True)
    dq = float(((q32.double() - q).norm(dim=1) / q.norm(dim=1)).max())
    keys = pool.keys if name == "l2p" else pool.e_keys
    for k in keys.detach():
        assert_separated(ref.cosines(q, k), pool.top_k if name == "l2p" else 1, 2 * dq + cos_err(DIM))
    prefixes = iter(
        (attn_ref.heads(ek.double(), HEADS), attn_ref.heads(ev.double(), HEADS)) if i in pool.layers else None
        for i in range(len(plain.blocks))
        for ek, ev in [_reference_prefix(pool, i, q) if i in pool.layers else (None, None)]
    )

    def sdpa(qh, kh, vh, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        p = next(prefixes)
        if p is None:
            p = (qh.new_zeros(qh.shape[0], HEADS, 0, qh.shape[-1]),) * 2
        return attn_ref.prefix_attention(qh, kh, vh, p[0], p[1], scale=qh.shape[-1] ** -0.5)

    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        with torch.no_grad():
            expected = plain(x.double())
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert_within(got, expected, network_tol(model, x))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_prompt_losses_are_the_authors_prompt_loss(name):
    """In float64 (the query pass has no prompt, so it is float64 throughout): the sum over the layers of the
    reference's losses; at most 200 roundings of the total."""
    model = patched(BUILDERS[name]()).double().train()
    norga.set_task(model, 1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model(x)
    got = norga.prompt_losses(model)
    pool = model.prompt_pool
    q = norga.prompts.compute_query(model, x)
    expected = sum(
        _ref_layer(pool, s, q, True)[2]
        for s, layer in enumerate(pool.layers)
        if not (name == "dual" and layer in pool.g_layers)
    )
    assert_within(got, expected, 200 * unit_roundoff(torch.float64) * float(abs(expected.detach())))
    model.eval()
    model(x)
    assert float(norga.prompt_losses(model)) == 0.0  # 0 outside training


def test_prompt_losses_weights_smope_as_the_authors():
    model = vit(depth=2)
    norga.patch_vit(
        model,
        prompt=norga.smope_factory(num_experts=4, top_k=2, router_weight=0.3, prototype_weight=0.7),
        layers=[0, 1],
    )
    model.train()
    x = torch.randn(2, 3, 32, 32)
    with norga.count_usage(model):
        model(x)
    norga.end_task(model)
    model(x)
    router, proto = (t.detach() for t in norga.smope_losses(model))
    assert float(proto) > 0 and float(router) > 0
    assert_within(norga.prompt_losses(model), 0.3 * router + 0.7 * proto, 4 * U * float(0.3 * router + 0.7 * proto))


def test_use_query_skips_the_query_pass_and_gives_the_same_outputs():
    model = patched(L2P(3, DIM, pool_size=6, length=4, top_k=2))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        q = norga.prompts.compute_query(model, x)
    calls = []
    handle = model.blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), norga.use_query(model, q):
        got = model(x)
    handle.remove()
    assert torch.equal(got, expected)
    assert len(calls) == 1  # the last block ran once: no query pass
    with pytest.raises(ValueError, match=r"query must have shape \(B, 64\)"), norga.use_query(model, q[:, :3]):
        pass
    with pytest.raises(ValueError, match="3 queries were given but the batch has 2"), norga.use_query(model, q):
        model(x[:2])
    with pytest.raises(ValueError, match="the model has no norga QueryPrompt"):
        with norga.use_query(vit(), q):
            pass


@pytest.mark.parametrize("name", ["l2p", "coda"])
def test_batch_invariance_in_the_model(name):
    method = L2P(3, DIM, pool_size=6, length=4, top_k=2) if name == "l2p" else CODAPrompt(3, DIM, pool_size=6)
    model = patched(method)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        batched = model(x)
        for b in range(4):  # other batch sizes may take other kernels: within float32 noise of the logits
            alone = model(x[b : b + 1])
            assert_within(alone[0], batched[b], 1e3 * U * float(batched.abs().max()))


@needs("fx_query")
def test_fx_compile_deepcopy_and_pickle():
    model = patched(DualPrompt(3, DIM, pool_size=3, e_length=4, g_length=2))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        traced = torch.fx.symbolic_trace(model)
        assert torch.equal(traced(x), expected)  # the graph calls the eager attention function
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert_within(compiled(x), expected, 1e3 * U * float(expected.abs().max()))
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(copied(x), expected)
            assert copied.prompt_pool._model[0] is copied  # the copy's query pass runs on the copy
    torch._dynamo.reset()


def test_patch_and_unpatch():
    model = vit()
    method = CODAPrompt(3, DIM, pool_size=6)
    with pytest.raises(ValueError, match=r"prompts layers \[0, 1, 2, 3, 4\] but patch_vit would patch \[0, 1\]"):
        norga.patch_vit(model, prompt=method, layers=[0, 1])
    with pytest.raises(ValueError, match="has dim=32"):
        norga.patch_vit(model, prompt=CODAPrompt(3, 32, pool_size=6))
    norga.patch_vit(model, prompt=method)
    with pytest.raises(ValueError, match="already attached"):
        norga.patch_vit(vit(), prompt=method)
    norga.unpatch_vit(model)
    assert not hasattr(model, "prompt_pool") and not model.patch_embed._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(torch.zeros(1, 3, 32, 32)), vit()(torch.zeros(1, 3, 32, 32)))


def test_compiled_training_forward_gives_the_losses_and_gradients():
    """torch.compile(fullgraph=True) of a training forward: the query pass, the detached components and the loss
    recorded for prompt_losses all traced; the same loss and gradients as eager, to float32 noise (aot_eager runs
    the same operations)."""

    def run(compiled: bool):
        torch.manual_seed(0)
        model = patched(CODAPrompt(3, DIM, pool_size=6, length=4, ortho_mu=0.1))
        norga.set_task(model, 1)
        model.train()
        fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        out = fn(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        loss = out.square().mean() + 1e3 * norga.prompt_losses(model)
        loss.backward()
        return loss.detach(), model.prompt_pool.keys.grad, model.prompt_pool.prompts.grad

    eager, compiled = run(False), run(True)
    torch._dynamo.reset()
    for a, b in zip(compiled, eager):
        assert_within(a, b, 1e3 * U * float(b.abs().max()))
    assert bool((eager[1][:, 2:4] != 0).any()) and bool((eager[1][:, :2] == 0).all())


# ------------------------------------------------------------------------------------------ hand-checkable
def test_hand_checkable_selections_and_losses():
    """Keys along the axes and queries of known directions: every selection, prefix and loss is written out."""
    eye = torch.eye(4)
    l2p = L2P(1, 4, pool_size=4, length=2, top_k=2, layers=(0,), key_dim=4).train()
    dual = DualPrompt(2, 4, pool_size=2, e_length=2, g_length=2, g_layers=(), e_layers=(0,), key_dim=4)
    with torch.no_grad():
        l2p.keys[0] = eye
        l2p.prompts[0] = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 4)  # prompt m is all m
        dual.e_keys[0] = eye[:2]
        dual.e_prompts[0] = torch.arange(2.0).view(2, 1, 1).expand(2, 2, 4)
    q = torch.tensor([[0.0, 3.0, 0.0, 4.0], [4.0, 0.0, 3.0, 0.0]])  # cosines: [0, .6, 0, .8] and [.8, 0, .6, 0]
    key, value, loss = l2p.layer_prefix(0, q)
    assert key[:, :, 0].tolist() == [[3.0, 1.0], [0.0, 2.0]] and torch.equal(value, key)  # the top 2, in order
    # the authors' cross pull: sum over samples b and every sample's picks j of (1 - cos[b, j]):
    # sample 0 against picks {3, 1, 0, 2}: 0.2 + 0.4 + 1 + 1; sample 1 against them: 1 + 1 + 0.2 + 0.4
    assert_within(loss, torch.tensor(5.2), 8 * (cos_err(4) + 2 * U) * 5.2)
    dual.eval()
    key, value, loss = dual.layer_prefix(0, q)
    assert key[:, 0, 0].tolist() == [1.0, 0.0] and loss is None  # sample 0 -> E-prompt 1 (.6), sample 1 -> 0 (.8)
    dual.train()
    dual.set_task(0)
    key, _, loss = dual.layer_prefix(0, q)
    assert key[:, 0, 0].tolist() == [0.0, 0.0]  # training: the task's own E-prompt for every sample
    assert_within(loss, torch.tensor(1.2), 4 * (cos_err(4) + 2 * U))  # sum_b (1 - cos[b, task 0]) = 1 + 0.2


def test_hand_checkable_coda_and_vq():
    coda = CODAPrompt(1, 4, pool_size=2, length=2, layers=(0,), key_dim=4).eval()
    with torch.no_grad():
        coda.keys[0] = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
        coda.attention[0] = torch.ones(2, 4)
        coda.prompts[0] = torch.stack([torch.full((2, 4), 2.0), torch.full((2, 4), 10.0)])
    q = torch.tensor([[3.0, 4.0, 0.0, 0.0]])  # alpha = (0.6, 0.8): prompt 0.6 * 2 + 0.8 * 10 = 9.2
    key, value, _ = coda.layer_prefix(0, q)
    assert_within(key, torch.full((1, 1, 4), 9.2), 4 * U * 9.2)
    vq = VQPrompt(1, 4, pool_size=2, length=2, temperature=1.0, layers=(0,), key_dim=4).train()
    with torch.no_grad():
        vq.keys[0] = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
        vq.prompts[0] = torch.stack([torch.zeros(2, 4), torch.ones(2, 4)])
    q = torch.tensor([[2.0, 0.0, 0.0, 0.0]])  # alpha = softmax(2, 0): soft prompt = 0.1192 -> nearest is prompt 0
    key, value, loss = vq.layer_prefix(0, q)
    assert torch.equal(key, torch.zeros(1, 1, 4)) and torch.equal(value, torch.zeros(1, 1, 4))
    a1 = float(torch.softmax(torch.tensor([2.0, 0.0]), 0)[1])
    assert_within(loss, torch.tensor(0.5 * a1**2), 16 * U * a1**2)  # (0.4 + 0.1) * mse(soft, 0)
