"""SMoPE layer benchmark: norga's vectorised SMoPE against the authors' loop over per-expert Parameters.

Forward time of one ViT-B attention layer (dim 768, 12 heads, N=197 tokens) with a prompt, in eval mode:

``norga_smope``
    :class:`norga.PrefixMoEAttention` with a :class:`norga.SMoPE` prompt (``E=25`` experts per head, top
    ``K=5``): experts are one ``(H, E, D)`` tensor per layer, routing is one ``bmm`` + ``topk`` + ``index_select``,
    attention is norga's fused prefix attention.
``loop_ref``
    The authors' structure: one ``nn.Parameter`` per expert and head for keys and values (``2*H*E`` tiny
    Parameters per layer), stacked in Python on every forward, the same routing, then explicit
    ``q @ [pk; k]^T`` and softmax over ``K + N`` columns.
``pool``
    A per-task prompt pool (:class:`norga.PrefixPool`, 10 tasks) of equal prefix length ``L = K = 5``
    through the same norga layer: what task-specific prompts cost at the same attention width.
``none``
    The same layer with no prompt (timm's attention).

Contenders run interleaved (round-robin) in one process; medians and ratios against ``loop_ref`` are
printed and written as JSON. Parameter counts are for a ViT-B prompted as the papers do (SMoPE on blocks
0-5; task pools on blocks 0-4 over 10 tasks).

    python benchmarks/bench_smope.py --out smope.json
    python benchmarks/bench_smope.py --device cuda --B 64 --backend merge --out smope_cuda.json
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import norga  # noqa: E402
from benchmarks.common import format_table, interleaved, machine_info, median_ms, write_json  # noqa: E402

DIM, HEADS = 768, 12
HD = DIM // HEADS


class LoopSMoPEAttention(nn.Module):
    """Reference in the authors' style: per-expert Parameters looped over in Python each forward."""

    def __init__(self, attn: nn.Module, smope: norga.SMoPE) -> None:
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.scale, self.top_k = attn.scale, smope.top_k
        self.e_keys = nn.ParameterList(
            [nn.Parameter(smope.keys[h, j].detach().clone()) for h in range(HEADS) for j in range(smope.num_experts)]
        )
        self.e_values = nn.ParameterList(
            [nn.Parameter(smope.values[h, j].detach().clone()) for h in range(HEADS) for j in range(smope.num_experts)]
        )
        self.num_experts = smope.num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, HEADS, HD).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        E = self.num_experts
        keys = torch.stack([torch.stack([self.e_keys[h * E + j] for j in range(E)]) for h in range(HEADS)])
        values = torch.stack([torch.stack([self.e_values[h * E + j] for j in range(E)]) for h in range(HEADS)])
        s = (q.mean(2, keepdim=True) @ keys.transpose(-1, -2)).squeeze(2)
        idx = s.topk(self.top_k, dim=-1).indices
        heads = torch.arange(HEADS).view(1, -1, 1)
        pv = values[heads, idx]  # the keys enter only through the row-constant logits
        prompt_attn = (self.scale * s.gather(-1, idx)).unsqueeze(2).expand(B, HEADS, N, self.top_k)
        attn = torch.cat([prompt_attn, (q * self.scale) @ k.transpose(-2, -1)], dim=-1).softmax(dim=-1)
        out = attn @ torch.cat([pv, v], dim=2)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts(num_experts: int, top_k: int, tasks: int = 10) -> Dict[str, int]:
    smope = count(norga.SMoPE(DIM, HEADS, num_experts, top_k)) * 6
    return {
        "smope_vit_b_blocks_0_5": smope,
        f"pool_L{top_k}_{tasks}_tasks_blocks_0_4": count(norga.PrefixPool(tasks, 5, top_k, DIM)),
        f"pool_L20_{tasks}_tasks_blocks_0_4": count(norga.PrefixPool(tasks, 5, 20, DIM)),
        "loop_ref_parameter_objects_per_layer": 2 * HEADS * num_experts,
        "norga_smope_parameter_objects_per_layer": 2,
    }


def main(argv: List[str] | None = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--N", type=int, default=197)
    ap.add_argument("--experts", type=int, default=25)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto", choices=list(norga.functional.BACKENDS), help="norga's layers")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    device = torch.device(args.device)
    smope = norga.SMoPE(DIM, HEADS, args.experts, args.top_k)
    layer = norga.PrefixMoEAttention(DIM, HEADS, qkv_bias=True, prompt=smope, backend=args.backend).eval()
    loop = LoopSMoPEAttention(layer, smope).eval()
    pool = norga.PrefixPool(10, 1, args.top_k, DIM)
    pool.set_task(3)
    pooled = norga.PrefixMoEAttention(DIM, HEADS, qkv_bias=True, prompt=pool.layer(0), backend=args.backend).eval()
    pooled.load_state_dict(layer.state_dict(), strict=False)
    plain = norga.PrefixMoEAttention(DIM, HEADS, qkv_bias=True, backend=args.backend).eval()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("prompt.")})
    layer, loop, pooled, plain = (m.to(device) for m in (layer, loop, pooled, plain))

    rows, results = [], []
    with torch.inference_mode():
        for b in args.B:
            x = torch.randn(b, args.N, DIM, device=device)
            torch.testing.assert_close(layer(x), loop(x), rtol=1e-4, atol=1e-4)  # same computation
            fns = {
                "norga_smope": lambda x=x: layer(x),
                "loop_ref": lambda x=x: loop(x),
                "pool": lambda x=x: pooled(x),
                "none": lambda x=x: plain(x),
            }
            times = interleaved(fns, args.repeats, device=device)
            med = {k: median_ms(v) for k, v in times.items()}
            results.append({"B": b, "N": args.N, "median_ms": med})
            for name, ms in med.items():
                rows.append([b, args.N, name, f"{ms:.2f}", f"{ms / med['loop_ref']:.2f}", f"{ms / med['none']:.2f}"])
    print(format_table(rows, ["B", "N", "contender", "median ms", "vs loop_ref", "vs none"]))
    counts = param_counts(args.experts, args.top_k)
    print(format_table([[k, v] for k, v in counts.items()], ["parameters", "count"]))
    payload = {
        "machine": machine_info(device),
        "experts": args.experts,
        "top_k": args.top_k,
        "results": results,
        "params": counts,
    }
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
