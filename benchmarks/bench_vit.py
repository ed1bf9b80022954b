"""End-to-end benchmark: a NoRGa-patched ``vit_base_patch16_224`` against the unpatched model.

The patched model has a :class:`norga.PrefixPool` (10 tasks, length 20) on blocks 0-4 with a NoRGa tanh
gate; both models have random weights (``pretrained=False``). Measured, each interleaved (round-robin)
in one process, medians and ratios:

``infer``
    ``model(x)`` under ``no_grad`` in eval mode, batch ``--batch``; the patched model gets one task id per
    sample (test-time, per-sample prompts). The unpatched model runs twice in each round; the second, a
    control, gives the run's noise (``control``: its ratio to the first).
``train``
    One optimizer step (Adam) with the backbone frozen: prompts, gates and head trainable in the patched
    model, the head in the unpatched one (``--train-batch``); training task 3 for every sample.
``compile``
    ``torch.compile(patched, fullgraph=True)`` (inductor) against the eager patched model, inference.
    The compile time (first call) is reported separately.

Examples (run from the repository root)::

    python benchmarks/bench_vit.py --out results_vit.json
    python benchmarks/bench_vit.py --batch 4 --repeats 3 --no-compile
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import norga
from benchmarks.common import format_table, interleaved, machine_info, median_ms, write_json


def build(model_name: str, length: int, layers: int, backend: str, device: torch.device):
    """The unpatched model and a patched deep copy (same weights), both on ``device``."""
    import timm

    torch.manual_seed(0)
    plain = timm.create_model(model_name, pretrained=False, num_classes=100).to(device)
    patched = copy.deepcopy(plain)
    dim = plain.embed_dim
    pool = norga.PrefixPool(num_tasks=10, num_layers=layers, length=length, dim=dim)
    norga.patch_vit(patched, gate=norga.NoRGaGate("tanh"), prompt=pool, layers=range(layers), backend=backend)
    return plain, patched.to(device)


def freeze_backbone(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """Leave trainable only the head, the prompt pool and the prefix gates; return those parameters."""
    trainable = []
    for name, p in model.named_parameters():
        keep = name.startswith("head.") or name.startswith("prompt_pool.") or ".prefix_gate." in name
        p.requires_grad_(keep)
        if keep:
            trainable.append(p)
    return trainable


def _ms(times: Dict[str, List[float]]) -> Dict[str, List[float]]:
    return {k: [round(1e3 * x, 3) for x in v] for k, v in times.items()}


def main(argv: List[str] | None = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=16, help="inference batch (default 16)")
    p.add_argument("--train-batch", type=int, default=16, help="training batch (default 16)")
    p.add_argument("--length", type=int, default=20, help="prefix length (default 20)")
    p.add_argument("--layers", type=int, default=5, help="prompted blocks 0..layers-1 (default 5)")
    p.add_argument("--backend", default="auto", choices=list(norga.functional.BACKENDS))
    p.add_argument("--repeats", type=int, default=7, help="timed inference rounds (default 7)")
    p.add_argument("--train-repeats", type=int, default=4, help="timed training rounds (default 4)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time; cpu: process CPU time (robust on a shared machine with --threads 1)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plain, patched = build(args.model, args.length, args.layers, args.backend, device)
    gen = torch.Generator().manual_seed(0)
    results: Dict[str, object] = {
        "machine": machine_info(device),
        "args": vars(args),
        "threads": torch.get_num_threads(),
    }
    rows = []

    # inference --------------------------------------------------------------------------------------
    plain.eval()
    patched.eval()
    x = torch.randn(args.batch, 3, 224, 224, generator=gen).to(device)
    tasks = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    norga.set_task(patched, tasks)

    def infer(m):
        def run():
            with torch.no_grad():
                return m(x)

        return run

    # unpatched_again: the unpatched model once more in each round, a control whose ratio is the run's noise
    runs = {"unpatched": infer(plain), "patched": infer(patched), "unpatched_again": infer(plain)}
    t = interleaved(runs, args.repeats, args.warmup, device, args.clock)
    med = {k: median_ms(v) for k, v in t.items()}
    results["infer"] = {
        "median_ms": med,
        "ratio": med["patched"] / med["unpatched"],
        "control": med["unpatched_again"] / med["unpatched"],
        "batch": args.batch,
        "samples_ms": _ms(t),
    }
    rows.append(["infer", "unpatched", args.batch, f"{med['unpatched']:.1f}", "1.00"])
    rows.append(["infer", "patched", args.batch, f"{med['patched']:.1f}", f"{med['patched'] / med['unpatched']:.3f}"])
    rows.append(
        [
            "infer",
            "unpatched (control)",
            args.batch,
            f"{med['unpatched_again']:.1f}",
            f"{results['infer']['control']:.3f}",
        ]
    )
    print(format_table(rows, ["measure", "model", "batch", "median ms", "ratio"]), flush=True)

    # compile ----------------------------------------------------------------------------------------
    if not args.no_compile:
        compiled = torch.compile(patched, fullgraph=True)
        norga.set_task(compiled, tasks)
        t0 = time.perf_counter()
        with torch.no_grad():
            got = compiled(x)
            want = patched(x)
        compile_s = time.perf_counter() - t0
        err = (got - want).abs().max().item()
        runs = {"eager": infer(patched), "compiled": infer(compiled)}
        t = interleaved(runs, args.repeats, args.warmup, device, args.clock)
        med = {k: median_ms(v) for k, v in t.items()}
        results["compile"] = {
            "median_ms": med,
            "ratio": med["compiled"] / med["eager"],
            "first_call_s": compile_s,
            "max_abs_diff": err,
            "batch": args.batch,
            "samples_ms": _ms(t),
        }
        rows.append(["compile", "patched eager", args.batch, f"{med['eager']:.1f}", "1.00"])
        rows.append(
            [
                "compile",
                "patched compiled",
                args.batch,
                f"{med['compiled']:.1f}",
                f"{med['compiled'] / med['eager']:.3f}",
            ]
        )
        print(f"compile: first call {compile_s:.1f} s, max |compiled - eager| = {err:.2e}", flush=True)

    # training step ----------------------------------------------------------------------------------
    if not args.no_train:
        xt = torch.randn(args.train_batch, 3, 224, 224, generator=gen).to(device)
        yt = torch.randint(0, 100, (args.train_batch,), generator=gen).to(device)
        norga.set_task(patched, 3)
        steps = {}
        for name, m in (("unpatched", plain), ("patched", patched)):
            m.train()
            params = freeze_backbone(m)
            opt = torch.optim.Adam(params, lr=1e-3)

            def step(m=m, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(m(xt), yt)
                loss.backward()
                opt.step()
                return loss

            steps[name] = step
            results.setdefault("trainable_params", {})[name] = sum(p.numel() for p in params)
        t = interleaved(steps, args.train_repeats, args.warmup, device, args.clock)
        med = {k: median_ms(v) for k, v in t.items()}
        results["train"] = {
            "median_ms": med,
            "ratio": med["patched"] / med["unpatched"],
            "batch": args.train_batch,
            "samples_ms": _ms(t),
        }
        rows.append(["train", "unpatched (head only)", args.train_batch, f"{med['unpatched']:.1f}", "1.00"])
        rows.append(
            [
                "train",
                "patched (prompts+gates+head)",
                args.train_batch,
                f"{med['patched']:.1f}",
                f"{med['patched'] / med['unpatched']:.3f}",
            ]
        )

    print(format_table(rows, ["measure", "model", "batch", "median ms", "ratio"]), flush=True)
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
