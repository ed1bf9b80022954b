"""SMoPE layer benchmark: norga's vectorised SMoPE against the authors' own layer, a per-task pool and no prompt.

One ViT-B attention layer (dim 768, 12 heads, N=197 tokens) with a prompt, every contender interleaved
(round-robin) in one process, medians and ratios within the run:

``norga_smope``
    :class:`norga.PrefixMoEAttention` with a :class:`norga.SMoPE` prompt (``E=25`` experts per head, top
    ``K=5``): experts are one ``(H, E, D)`` tensor per layer, routing is one ``bmm`` + ``topk`` + ``index_select``,
    attention is norga's fused prefix attention.
``norga_smope_again``
    The same layer called a second time in each round: a control, whose ratio to ``norga_smope`` is the run's
    noise.
``authors`` (with ``--authors PATH``)
    The authors' layer from their code at ``PATH`` (:mod:`benchmarks.authors_smope`): their ``OnePrompt`` for
    block 0 (``e_p_length = 2 E``, ``topk = K``) and their ``Attention``, called as their ``VisionTransformer``
    calls them. Before timing, their experts and projections are copied into ``norga_smope``; both must select
    the same experts, and each stage of each (``qkv``, attention, projection) must be within the rounding bound of
    ``tests/tolerance.py`` of the float64 SMoPE equations of what it got, in evaluation and in training mode
    (:func:`check_same`).
``pool``
    A per-task prompt pool (:class:`norga.PrefixPool`, 10 tasks) of equal prefix length ``L = K = 5`` through the
    same norga layer: what task-specific prompts cost at the same attention width.
``none``
    The same layer with no prompt (timm's attention).

Modes: ``fwd``, evaluation mode under ``no_grad``; ``fwdbwd``, training mode, forward and backward of a fixed
output gradient, with gradients for the input and the prompt (experts, pool) and the projections frozen, as in
prompt tuning. Parameter counts are for a ViT-B prompted as the papers do (SMoPE on blocks 0-5; task pools on
blocks 0-4 over 10 tasks).

    python benchmarks/bench_smope.py --authors /path/to/SMoPE --out smope.json
    python benchmarks/bench_smope.py --device cuda --B 64 --backend merge --out smope_cuda.json
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import norga  # noqa: E402
from benchmarks.authors_smope import AuthorsSMoPELayer, load_authors  # noqa: E402
from benchmarks.common import CLOCKS, format_table, interleaved, machine_info, median_ms, write_json  # noqa: E402
from norga.functional import split_qkv  # noqa: E402

DIM, HEADS = 768, 12
MODES = ("fwd", "fwdbwd")


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts(num_experts: int, top_k: int, tasks: int = 10) -> Dict[str, int]:
    smope = count(norga.SMoPE(DIM, HEADS, num_experts, top_k)) * 6
    return {
        "smope_vit_b_blocks_0_5": smope,
        f"pool_L{top_k}_{tasks}_tasks_blocks_0_4": count(norga.PrefixPool(tasks, 5, top_k, DIM)),
        f"pool_L20_{tasks}_tasks_blocks_0_4": count(norga.PrefixPool(tasks, 5, 20, DIM)),
        "authors_parameter_objects_per_layer": 2 * HEADS * num_experts,
        "norga_smope_parameter_objects_per_layer": 2,
    }


def check_same(authors: AuthorsSMoPELayer, layer: norga.PrefixMoEAttention, x: torch.Tensor) -> float:
    """Raise unless both layers select the same experts for ``x`` and each stage of each layer is within the
    rounding bound of ``tests/tolerance.py`` of the float64 equations of what that stage got, in evaluation mode
    without autograd and in training mode with it; return the largest difference of the two outputs.

    The stages (``capture_stages``): the ``qkv`` linear (``linear_err``); the attention, against the float64 SMoPE
    attention (``reference.prefix_attention`` with the row-constant logits ``scale * mean_n(q_n) . key`` of the
    selected experts) of the layer's own float32 ``q, k, v``, within ``attention_tol`` with the logits' error
    ``routing_err``; the projection (``linear_err``). Bounding each stage from what it got keeps the bounds tight
    (one bound through all three stages would carry the worst case of the ``qkv`` rounding through the attention
    and the projection, far above what a wrong scale or a wrong expert changes).
    """
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import reference as ref
    from tolerance import assert_within, attention_tol, capture_stages, linear_err, routing_err, routing_logits

    smope = layer.prompt
    assert isinstance(smope, norga.SMoPE)
    scale = (DIM // HEADS) ** -0.5

    def stages(name: str, module: nn.Module, run: Callable[[], torch.Tensor], key, value) -> torch.Tensor:
        out, seen = capture_stages(module, run)
        for stage, got, inp in (("qkv", seen["qkv_out"], seen["qkv_in"]), ("proj", out, seen["proj_in"])):
            lin = getattr(module, stage)
            want = inp.detach().double() @ lin.weight.detach().double().T + lin.bias.detach().double()
            assert_within(got, want, linear_err(inp, lin.weight, lin.bias), f"{name}: {stage}")
        q, k, v = split_qkv(seen["qkv_out"].detach(), HEADS)
        logits = routing_logits(q, key, smope.scale)
        o = ref.prefix_attention(q, k, v, key, value, scale=scale, logits=logits)
        err = routing_err(q, key, smope.scale).unsqueeze(2)
        bound = attention_tol(q, k, v, key, value, scale=scale, logits=logits, logits_err=err)
        assert_within(seen["proj_in"], o.transpose(1, 2).flatten(2), bound, f"{name}: attention")
        return out.detach()

    worst = 0.0
    for training in (False, True):
        layer.train(training)
        authors.train(training)
        with torch.set_grad_enabled(training):
            prefix = smope(split_qkv(layer.qkv(x), HEADS)[0])
            mine, their_choice = prefix.indices.sort(dim=-1).values, authors.selected(x)
            if not torch.equal(mine, their_choice):
                bad = int((mine != their_choice).any(dim=-1).sum())
                raise RuntimeError(
                    f"norga's SMoPE and the authors' layer select other experts for {bad} (sample, head)"
                )
            key, value = prefix.key.detach(), prefix.value.detach()
            ours = stages(f"norga's SMoPE (training={training})", layer, lambda: layer(x), key, value)
            theirs = stages(f"the authors' layer (training={training})", authors.attn, lambda: authors(x), key, value)
        worst = max(worst, float((theirs - ours).abs().max()))
    return worst


def runner(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], torch.Tensor]:
    """One call of ``module`` in ``mode``: ``fwd`` in evaluation mode without autograd; ``fwdbwd`` in training
    mode, forward and backward of a fixed gradient (the input and the trainable parameters get gradients)."""
    if mode == "fwd":

        def run():
            module.eval()
            with torch.no_grad():
                return module(x)

        return run
    x = x.detach().requires_grad_(True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
    params = [p for p in module.parameters() if p.requires_grad]

    def run():
        module.train()
        x.grad = None
        for p in params:
            p.grad = None
        out = module(x)
        out.backward(grad)
        return out

    return run


def freeze_projections(*layers: nn.Module) -> None:
    """Freeze every ``qkv`` and ``proj`` weight (a frozen backbone; prompts and pools stay trainable)."""
    for layer in layers:
        for name, p in layer.named_parameters():
            parts = name.split(".")
            if len(parts) > 1 and parts[-2] in ("qkv", "proj"):
                p.requires_grad_(False)


def build(args: argparse.Namespace, device: torch.device) -> Dict[str, nn.Module]:
    """The contenders' layers (module docstring), norga's with the authors' weights where given."""
    smope = norga.SMoPE(DIM, HEADS, args.experts, args.top_k)
    layer = norga.PrefixMoEAttention(DIM, HEADS, qkv_bias=True, prompt=smope, backend=args.backend)
    layers: Dict[str, nn.Module] = {"norga_smope": layer}
    if args.authors:
        authors = AuthorsSMoPELayer(*load_authors(args.authors), DIM, HEADS, args.experts, args.top_k)
        authors.copy_into(layer)
        layers["authors"] = authors
    pool = norga.PrefixPool(10, 1, args.top_k, DIM)
    pool.set_task(3)
    pooled = norga.PrefixMoEAttention(DIM, HEADS, qkv_bias=True, prompt=pool.layer(0), backend=args.backend)
    pooled.load_state_dict(layer.state_dict(), strict=False)
    plain = norga.PrefixMoEAttention(DIM, HEADS, qkv_bias=True, backend=args.backend)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("prompt.")})
    layers.update(pool=pooled, none=plain)
    freeze_projections(*layers.values())
    return {name: m.to(device) for name, m in layers.items()}


def main(argv: List[str] | None = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--N", type=int, default=197)
    ap.add_argument("--experts", type=int, default=25)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--clock", default="wall", choices=CLOCKS, help="wall: elapsed time; cpu: process CPU time")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto", choices=list(norga.functional.BACKENDS), help="norga's layers")
    ap.add_argument("--authors", default=None, metavar="PATH", help="a checkout of the authors' SMoPE code")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    layers = build(args, device)
    base = "authors" if args.authors else "none"
    rows, table, checks = [], [], []
    for b in args.B:
        x = torch.randn(b, args.N, DIM, generator=torch.Generator().manual_seed(b)).to(device)
        if args.authors:
            checks.append({"B": b, "max_abs_diff": check_same(layers["authors"], layers["norga_smope"], x)})
        for mode in args.mode:
            runs = {name: runner(m, x, mode) for name, m in layers.items()}
            runs = {"norga_smope": runs["norga_smope"], "norga_smope_again": runs["norga_smope"], **runs}
            times = interleaved(runs, args.repeats, warmup=args.warmup, device=device, clock=args.clock)
            med = {k: median_ms(v) for k, v in times.items()}
            for name, ms in med.items():
                rows.append(
                    {
                        "B": b,
                        "N": args.N,
                        "mode": mode,
                        "contender": name,
                        "median_ms": ms,
                        "min_ms": 1e3 * min(times[name]),
                        f"vs_{base}": ms / med[base],
                        "vs_none": ms / med["none"],
                        "repeats": args.repeats,
                        "clock": args.clock,
                        "threads": torch.get_num_threads(),
                    }
                )
                table.append([b, args.N, mode, name, f"{ms:.2f}", f"{ms / med[base]:.2f}", f"{ms / med['none']:.2f}"])
    print(format_table(table, ["B", "N", "mode", "contender", "median ms", f"vs {base}", "vs none"]))
    counts = param_counts(args.experts, args.top_k)
    print(format_table([[k, v] for k, v in counts.items()], ["parameters", "count"]))
    payload = {
        "machine": machine_info(device),
        "args": vars(args),
        "experts": args.experts,
        "top_k": args.top_k,
        "checks": checks,
        "results": rows,
        "params": counts,
    }
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
