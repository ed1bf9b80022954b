"""Distributed training of patched models: 2 CPU processes, gloo.

One spawn (module fixture) runs every scenario; each rank writes what it observed to a file and the
tests compare the ranks here. Scenarios:

* DDP + PrefixPool + NoRGa gates (no ``find_unused_parameters``; inactive tasks' prompts present);
* DDP + CODA-Prompt (the query pass inside the forward; detached and unused components; the auxiliary loss);
* DDP + SMoPE, counting passes on the unwrapped model and :func:`norga.distributed.sync_smope_usage`;
* FSDP2 ``fully_shard`` + PrefixPool + NoRGa gates (scalar gate parameters ignored by FSDP and reduced
  with :func:`norga.distributed.all_reduce_grads`).
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
from tolerance import tol
from versions import LIFTED, has, needs

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=5,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=64,
        num_heads=4,
    )


def _data(rank: int, step: int, batch: int = 4):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g)


def _pool_model():
    import norga

    model = _tiny()
    norga.patch_vit(model, gate=norga.NoRGaGate("tanh"), prompt=norga.PrefixPool(3, 2, 4, 64), layers=[0, 1])
    with torch.no_grad():  # distinct gate values per layer, so a mixed-up gradient would show
        for i, layer in enumerate(norga.patch.patched_layers(model)):
            layer.module.prefix_gate.alpha.fill_(0.5 + i)
            layer.module.prefix_gate.tau.fill_(1.5 - 0.25 * i)
    for name, p in model.named_parameters():  # freeze the backbone as prompt-based CL does
        p.requires_grad_(name.startswith(("prompt_pool", "head")) or "prefix_gate" in name)
    norga.set_task(model, 1)  # tasks 0 and 2 are inactive: their prompt rows get zero gradients
    return model


def _norga_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None and ("prompt" in name or "prefix_gate" in name):
            g = p.grad
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _params(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def _ddp_steps(model, rank: int, loss_fn) -> dict:
    """DDP (no find_unused_parameters) over `model`: the local and the synced gradients of the first batch, then
    `STEPS` SGD steps; `loss_fn(ddp, x, y)` is the loss."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model)
    start = _params(model)
    x, y = _data(rank, 0)
    with ddp.no_sync():  # local gradients, no all-reduce
        loss_fn(ddp, x, y).backward()
    local = _norga_grads(model)
    model.zero_grad(set_to_none=True)
    loss_fn(ddp, x, y).backward()
    synced = _norga_grads(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    for step in range(1, STEPS):
        opt.zero_grad(set_to_none=True)
        x, y = _data(rank, step)
        loss_fn(ddp, x, y).backward()
        opt.step()
    return {"local": local, "synced": synced, "start": start, "final": _params(model)}


def _scenario_ddp_pool(rank: int, outdir: str) -> dict:
    import torch.nn.functional as F

    return _ddp_steps(_pool_model(), rank, lambda ddp, x, y: F.cross_entropy(ddp(x), y))


def _scenario_ddp_smope(rank: int, outdir: str) -> dict:
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import norga
    from norga.distributed import sync_smope_usage

    model = _tiny()
    norga.patch_vit(model, prompt=norga.smope_factory(num_experts=6, top_k=2, noise_eps=0.4), layers=[0, 1])
    for name, p in model.named_parameters():
        p.requires_grad_(".prompt." in name or name.startswith("head"))
    layers = norga.prompts.smope_layers(model)
    counted = [torch.zeros_like(m.usage) for m in layers]  # independent count: top-K of the raw routing scores

    def hook(i):
        def record(module, args, out):
            if module.counting:
                q = args[0].double()
                keys = module.keys.detach().double()
                s = torch.einsum("bhd,hed->bhe", q.mean(dim=2), keys)
                top = s.topk(module.top_k, dim=-1).indices
                counted[i] += F.one_hot(top, module.num_experts).sum(dim=(0, 2)).to(counted[i].dtype)
                # SMoPE's float32 scores pick the same top-K on any CPU: the K-th and (K+1)-th scores are further
                # apart than two scores' float32 errors (a mean of N queries and a D-term dot product)
                err = tol(torch.float32, q.shape[2] + q.shape[3] + 2) * torch.einsum(
                    "bhd,hed->bhe", q.abs().mean(dim=2), keys.abs()
                )
                kth = s.topk(module.top_k + 1, dim=-1).values
                assert (kth[..., -2] - kth[..., -1] > 2 * err.amax(-1)).all(), "a near tie: the top-K is not determined"

        return record

    for i, m in enumerate(layers):
        m.register_forward_hook(hook(i))
    ddp = DDP(model)  # DDP's default buffer synchronisation: training does not change usage
    sync_smope_usage(ddp)  # baseline: the zero counts every rank shares
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)

    def train(first_step: int) -> None:
        for step in range(first_step, first_step + STEPS):
            opt.zero_grad(set_to_none=True)
            x, y = _data(rank, step)
            loss = F.cross_entropy(ddp(x), y)
            router, proto = norga.smope_losses(model)
            (loss + 1e-3 * router + 1e-3 * proto).backward()
            opt.step()

    def count(first_step: int) -> None:  # the authors' counting pass, each rank over its own training data
        with norga.count_usage(model):
            for step in range(first_step, first_step + STEPS):
                model(_data(rank, step)[0])

    out: dict = {}
    try:
        with norga.count_usage(ddp):
            pass
        out["ddp_count_error"] = None
    except ValueError as e:
        out["ddp_count_error"] = str(e)
    train(0)
    out["usage_after_training"] = [m.usage.clone() for m in layers]
    count(0)
    out["usage_before_sync_1"] = [m.usage.clone() for m in layers]
    out["counted_1"] = [c.clone() for c in counted]
    sync_smope_usage(ddp)
    out["usage_after_sync_1"] = [m.usage.clone() for m in layers]
    norga.end_task(model)
    out["frequent"] = [m.frequent.clone() for m in layers]
    out["snapshot"] = [m.key_snapshot.clone() for m in layers]
    train(10)  # second task: adaptive noise is on, counts accumulate on top of the synced ones
    count(10)
    out["counted_2"] = [c.clone() for c in counted]
    sync_smope_usage(ddp)
    out["usage_after_sync_2"] = [m.usage.clone() for m in layers]
    out["final"] = _params(model)

    # A model whose ranks disagree and that has no baseline: a clear error, on every rank.
    other = torch.nn.Sequential(norga.SMoPE(8, 2, num_experts=3, top_k=1))
    other[0].usage.fill_(float(rank))
    try:
        sync_smope_usage(other)
        out["mismatch_error"] = None
    except ValueError as e:
        out["mismatch_error"] = str(e)
    return out


def _scenario_fsdp2_pool(rank: int, outdir: str) -> dict:
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from norga.distributed import all_reduce_grads, scalar_parameters

    model = _pool_model()
    gates = scalar_parameters(model)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, ignored_params=set(gates))
    fully_shard(model, mesh=mesh, ignored_params=set(gates))
    out: dict = {"sharded": type(model.prompt_pool.prompts).__name__, "gates": len(gates)}
    out["local_pool_shape"] = tuple(model.prompt_pool.prompts.to_local().shape)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        x, y = _data(rank, step)
        F.cross_entropy(model(x), y).backward()
        if step == 0:
            out["gate_local"] = [g.grad.clone() for g in gates]
        all_reduce_grads(gates)
        if step == 0:
            out["gate_synced"] = [g.grad.clone() for g in gates]
            out["pool_grad"] = _norga_grads(model)["prompt_pool.prompts"]
        opt.step()
    out["final"] = _params(model)
    from norga.checkpoint import save_prompts

    out["saved"] = os.path.join(outdir, f"fsdp_prompts_rank{rank}.safetensors")
    save_prompts(model, out["saved"])  # gathers the sharded pool (a collective: every rank calls it)
    return out


def _scenario_fsdp2_smope(rank: int, outdir: str) -> dict:
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import norga
    from norga.distributed import sync_smope_usage

    model = _tiny()
    norga.patch_vit(model, prompt=norga.smope_factory(num_experts=6, top_k=2, noise_eps=0.4), layers=[0, 1])
    for name, p in model.named_parameters():
        p.requires_grad_(".prompt." in name or name.startswith("head"))
    layers = norga.prompts.smope_layers(model)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    out: dict = {"sharded": type(layers[0].keys).__name__, "local_keys_shape": tuple(layers[0].keys.to_local().shape)}
    sync_smope_usage(model)  # baseline
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)

    def train(first_step: int) -> None:
        for step in range(first_step, first_step + STEPS):
            opt.zero_grad(set_to_none=True)
            x, y = _data(rank, step)
            loss = F.cross_entropy(model(x), y)
            router, proto = norga.smope_losses(model)  # the prototype loss gathers the sharded keys
            (loss + 1e-3 * router + 1e-1 * proto).backward()
            opt.step()

    def count(first_step: int) -> None:
        with norga.count_usage(model):
            for step in range(first_step, first_step + STEPS):
                model(_data(rank, step)[0])

    train(0)
    count(0)
    sync_smope_usage(model)
    norga.end_task(model)  # snapshots the full (gathered) keys on every rank
    out["snapshot"] = [m.key_snapshot.clone() for m in layers]
    out["keys_at_end"] = [m.keys.full_tensor().detach().clone() for m in layers]
    out["proto_at_snapshot"] = float(norga.smope_losses(model)[1])
    train(10)
    count(10)
    sync_smope_usage(model)
    out["usage"] = [m.usage.clone() for m in layers]
    out["frequent"] = [m.frequent.clone() for m in layers]
    out["final"] = _params(model)
    return out


def _scenario_ddp_coda(rank: int, outdir: str) -> dict:
    """DDP over a CODA-Prompt model in its second task: the query pass inside each forward, earlier components
    detached, later ones unused, the orthogonality penalty in the loss; no find_unused_parameters."""
    import torch.nn.functional as F

    import norga

    model = _tiny()
    torch.manual_seed(5)
    norga.patch_vit(model, prompt=norga.prompts.CODAPrompt(3, 64, pool_size=6, length=4, ortho_mu=0.1, layers=(0, 1)))
    norga.set_task(model, 1)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("prompt_pool", "head")))
    model.train()
    return _ddp_steps(model, rank, lambda ddp, x, y: F.cross_entropy(ddp(x), y) + norga.prompt_losses(model))


SCENARIOS = {
    "ddp_pool": _scenario_ddp_pool,
    "ddp_coda": _scenario_ddp_coda,
    "ddp_smope": _scenario_ddp_smope,
    "fsdp2_pool": _scenario_fsdp2_pool,
    "fsdp2_smope": _scenario_fsdp2_smope,
}
if not (has("fsdp2") or LIFTED):  # their tests skip (tests/versions.py)
    del SCENARIOS["fsdp2_pool"], SCENARIOS["fsdp2_smope"]


def _worker(rank: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    try:
        for name, fn in SCENARIOS.items():
            try:
                results[name] = fn(rank, outdir)
            except Exception:  # noqa: BLE001 - any failure is reported by the test of that scenario
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    outdir = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _get(ranks: list[dict], scenario: str) -> list[dict]:
    out = [r[scenario] for r in ranks]
    for r, o in enumerate(out):
        assert "error" not in o, f"rank {r} failed in {scenario}:\n{o['error']}"
    return out


def test_ddp_gradients_are_the_mean_of_local_gradients(ranks):
    r0, r1 = _get(ranks, "ddp_pool")
    assert set(r0["synced"]) == {
        "prompt_pool.prompts",
        "blocks.0.attn.prefix_gate.alpha",
        "blocks.0.attn.prefix_gate.tau",
        "blocks.1.attn.prefix_gate.alpha",
        "blocks.1.attn.prefix_gate.tau",
    }
    for name in r0["synced"]:
        # different data per rank: the local gradients differ ...
        assert not torch.equal(r0["local"][name], r1["local"][name]), name
        expected = (r0["local"][name] + r1["local"][name]) / 2
        # ... and DDP's are their mean, identical on both ranks. Bit for bit: the synced pass makes the local
        # pass's operations on the same values, and with two ranks the all-reduce is one addition per element
        # (the same whichever rank adds) and dividing by 2, before or after it, is exact.
        assert torch.equal(r0["synced"][name], expected), name
        assert torch.equal(r0["synced"][name], r1["synced"][name]), name
    pool = r0["synced"]["prompt_pool.prompts"]
    assert torch.count_nonzero(pool[1]) > 0
    assert torch.count_nonzero(pool[0]) == 0 and torch.count_nonzero(pool[2]) == 0  # inactive tasks


def test_ddp_ranks_end_with_identical_parameters(ranks):
    r0, r1 = _get(ranks, "ddp_pool")
    assert set(r0["final"]) == set(r1["final"])
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), name
    assert not torch.equal(r0["final"]["prompt_pool.prompts"], r0["start"]["prompt_pool.prompts"])
    assert not torch.equal(
        r0["final"]["blocks.0.attn.prefix_gate.alpha"], r0["start"]["blocks.0.attn.prefix_gate.alpha"]
    )


def test_ddp_coda_gradients_are_the_mean_and_ranks_agree(ranks):
    r0, r1 = _get(ranks, "ddp_coda")
    assert {"prompt_pool.keys", "prompt_pool.attention", "prompt_pool.prompts"} <= set(r0["synced"])
    for name in r0["synced"]:  # bit for bit, as for the pool above
        assert not torch.equal(r0["local"][name], r1["local"][name]), name
        assert torch.equal(r0["synced"][name], (r0["local"][name] + r1["local"][name]) / 2), name
    keys = r0["synced"]["prompt_pool.keys"]
    assert torch.count_nonzero(keys[:, :2]) == 0 and torch.count_nonzero(keys[:, 4:]) == 0  # detached, unused
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), name


def test_ddp_smope_parameters_identical(ranks):
    r0, r1 = _get(ranks, "ddp_smope")
    names = [n for n in r0["final"] if n.endswith((".prompt.keys", ".prompt.values"))]
    assert len(names) == 4
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), name


def test_smope_usage_is_reduced_across_ranks(ranks):
    r0, r1 = _get(ranks, "ddp_smope")
    for i in range(2):
        # each rank counted only its own samples, and the ranks saw different data
        assert torch.equal(r0["usage_before_sync_1"][i], r0["counted_1"][i])
        assert torch.equal(r1["usage_before_sync_1"][i], r1["counted_1"][i])
        assert not torch.equal(r0["counted_1"][i], r1["counted_1"][i])
        total = r0["counted_1"][i] + r1["counted_1"][i]
        assert torch.equal(r0["usage_after_sync_1"][i], total)
        assert torch.equal(r1["usage_after_sync_1"][i], total)
        assert not r0["usage_after_training"][i].any()  # training steps do not count
        # every sample of the counting passes counted once: B * steps * ranks * K per head
        assert torch.equal(total.sum(dim=-1), torch.full((4,), 4.0 * STEPS * 2 * 2))
        # end_task on identical counts and keys: identical frequent experts and snapshots
        assert torch.equal(r0["frequent"][i], r1["frequent"][i])
        assert torch.equal(r0["snapshot"][i], r1["snapshot"][i])
        # second sync adds the second task's counts of both ranks to the common total, once
        total2 = r0["counted_2"][i] + r1["counted_2"][i]
        assert torch.equal(r0["usage_after_sync_2"][i], total2)
        assert torch.equal(r1["usage_after_sync_2"][i], total2)


def test_count_usage_refuses_the_ddp_wrapper(ranks):
    for r in _get(ranks, "ddp_smope"):
        assert r["ddp_count_error"] is not None and "ddp.module" in r["ddp_count_error"]


def test_sync_smope_usage_refuses_disagreeing_ranks_without_baseline(ranks):
    r0, r1 = _get(ranks, "ddp_smope")
    for r in (r0, r1):
        assert r["mismatch_error"] is not None
        assert "Call sync_smope_usage(model) once before training" in r["mismatch_error"]


@needs("fsdp2")
def test_fsdp2_shards_the_pool_and_keeps_ranks_identical(ranks):
    r0, r1 = _get(ranks, "fsdp2_pool")
    assert r0["sharded"] == "DTensor"
    assert r0["local_pool_shape"][0] + r1["local_pool_shape"][0] == 3  # 3 tasks split over 2 ranks
    assert r0["gates"] == 4
    for a, b, s0, s1 in zip(r0["gate_local"], r1["gate_local"], r0["gate_synced"], r1["gate_synced"]):
        assert not torch.equal(a, b)
        assert torch.equal(s0, (a + b) / 2)  # one addition per element and an exact halving (see the DDP test)
        assert torch.equal(s0, s1)
    assert torch.equal(r0["pool_grad"], r1["pool_grad"])
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), name


@needs("fsdp2")
def test_fsdp2_matches_ddp(ranks):
    """Same model, data and optimizer: FSDP2 and DDP end at the same parameters, bit for bit. With two ranks
    every reduction (all-reduce or reduce-scatter) is one addition per element and the averaging an exact
    halving; the all-gathered parameters are exact copies, so every step makes the same operations on the
    same values (the SGD update runs the same kernel on a shard as on the whole tensor)."""
    ddp, _ = _get(ranks, "ddp_pool")
    fsdp, _ = _get(ranks, "fsdp2_pool")
    for name in ddp["final"]:
        assert torch.equal(fsdp["final"][name], ddp["final"][name]), name


@needs("fsdp2")
def test_fsdp2_prompts_save_full_tensors(ranks):
    from safetensors.torch import load_file

    for r in _get(ranks, "fsdp2_pool"):
        saved = load_file(r["saved"])
        assert saved["prompt_pool.prompts"].shape == (3, 2, 2, 4, 64)
        for name, t in saved.items():
            assert torch.equal(t, r["final"][name]), name


@needs("fsdp2")
def test_fsdp2_smope_trains_with_sharded_experts(ranks):
    r0, r1 = _get(ranks, "fsdp2_smope")
    assert r0["sharded"] == "DTensor"
    assert r0["local_keys_shape"][0] + r1["local_keys_shape"][0] == 4  # 4 heads split over 2 ranks
    for s0, s1, k in zip(r0["snapshot"], r1["snapshot"], r0["keys_at_end"]):
        assert s0.shape == (4, 6, 16)
        assert torch.equal(s0, s1) and torch.equal(s0, k)  # the full keys, on every rank
    assert r0["proto_at_snapshot"] > 0 and r0["proto_at_snapshot"] == r1["proto_at_snapshot"]
    for u0, u1 in zip(r0["usage"], r1["usage"]):
        assert torch.equal(u0, u1)
        assert u0.sum() == 2 * WORLD * STEPS * 4 * 4 * 2  # 2 tasks x ranks x steps x batch x heads x top_k
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), name
