"""Is each CPU fast path of the `merge` backend worth keeping? Inference (no autograd), one layer.

The `merge` backend's inference path (`norga.functional.merge.merge_attention_no_grad`) differs from the
plain form by its epilogue and by the gate protocol's in-place fast path. Each contender removes one of them;
the ratios are to `epilogue` (everything on):

- `epilogue`: `prefix_attention(..., backend="merge")` under `torch.no_grad()`: per-sample prefix scores from
  the strided `q` into one working buffer, the gate applied in place through the gate protocol's `inplace_`.
- `no-inplace`: the same with a gate that does not offer `inplace_` (a plain function calling the same
  `NoRGaGate`): the scores are built and gated on the whole `(B, H, N, L)` block first.
- `epilogue-again`: `epilogue` once more, as a control: two identical computations, so its ratio shows the
  timing noise of the run.
- `batched`: the autograd path's forward (`merge_attention`) run under `torch.no_grad()`: the simplest code that
  computes the same result.
- `per-sample`: `epilogue` with its one batched prefix-score GEMM (`_scaled_prefix_rows`, which first copies the
  strided `q`) replaced by one GEMM per sample reading the strided rows as they are (the library before this was
  measured): no copy, but `B` small operations instead of one.

A fast path stays in the library if it is at least 3 % faster than the simpler code at the target shapes
(docs/benchmarks.md). Interleaved rounds in an order rotated between rounds, medians; `--clock cpu` with `--threads
1` measures work on a shared machine. `--isolated ROUNDS` runs every contender in a process of its own instead
(`--repeats` calls each, after warm-up; rounds of one process per contender, in rotated order; the median over
rounds of each process's median), so that no contender inherits another's allocator and cache state.
`benchmarks/count_fastpaths.py` counts instructions and simulated cache misses instead of time.

    python benchmarks/bench_fastpaths.py --threads 1 --clock cpu --repeats 40 --out fastpaths.json
    python benchmarks/bench_fastpaths.py --threads 1 --clock cpu --repeats 40 --isolated 5 --out isolated.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import norga.functional.merge as merge_module  # noqa: E402
from benchmarks.common import (  # noqa: E402
    CLOCKS,
    LAYOUTS,
    child_env,
    contended,
    format_table,
    interleaved,
    machine_info,
    make_gate,
    make_inputs,
    median_ms,
    rotated,
    write_json,
)
from norga.functional import Prefix, prefix_attention, prefix_scores  # noqa: E402


def contenders(q, k, v, pk, pv, gate) -> Dict[str, Callable[[], torch.Tensor]]:
    scale = q.shape[-1] ** -0.5
    prefix = Prefix(pk, pv)

    def epilogue() -> torch.Tensor:
        return prefix_attention(q, k, v, prefix, gate=gate, backend="merge")

    def no_inplace() -> torch.Tensor:
        return prefix_attention(q, k, v, prefix, gate=lambda s: gate(s), backend="merge")

    def batched() -> torch.Tensor:
        return merge_module.merge_attention(q, k, v, prefix_scores(q, pk, scale, gate), pv, None, scale)

    def per_sample() -> torch.Tensor:
        batched_rows = merge_module._scaled_prefix_rows
        merge_module._scaled_prefix_rows = _per_sample_rows
        try:
            return epilogue()
        finally:
            merge_module._scaled_prefix_rows = batched_rows

    return {
        "epilogue": epilogue,
        "no-inplace": no_inplace,
        "epilogue-again": epilogue,
        "batched": batched,
        "per-sample": per_sample,
    }


def _per_sample_rows(q: torch.Tensor, pk: torch.Tensor, scale: float, buf: torch.Tensor) -> None:
    """`merge_module._scaled_prefix_rows` as one GEMM per sample on its strided `q` (no copy of `q`)."""
    length = pk.shape[-2]
    pk_pad = q.new_zeros((pk.shape[0], pk.shape[1], length + 1, pk.shape[-1]), dtype=torch.float32)
    torch.mul(pk.float(), scale, out=pk_pad[:, :, :length])
    for i in range(q.shape[0]):
        torch.matmul(pk_pad[i if pk.shape[0] > 1 else 0], q[i].float().transpose(-2, -1), out=buf[i])


def _isolated(args: argparse.Namespace, b: int, names: Sequence[str]) -> Dict[str, List[float]]:
    """Per contender, the median (seconds) of each of its processes: `args.isolated` rounds, rotated order."""
    medians: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(args.isolated):
        for name in rotated(names, r):
            cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--B", str(b), "--N", str(args.N),
                   "--L", str(args.L), "--clock", args.clock, "--layout", args.layout, "--repeats", str(args.repeats),
                   "--heads", str(args.heads), "--head-dim", str(args.head_dim)]  # fmt: skip
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, check=True, env=child_env(), capture_output=True, text=True)
            medians[name].append(json.loads(done.stdout.splitlines()[-1])["median_s"])
    return medians


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """Run the comparison; returns one row per batch size and contender (also written to `--out`)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, nargs="+", default=[16, 64])
    p.add_argument("--N", type=int, default=197)
    p.add_argument("--L", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=CLOCKS, default="wall")
    p.add_argument("--layout", choices=LAYOUTS, default="qkv")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=None)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--contend", type=int, default=0, metavar="P", help="time beside P busy processes (default 0)")
    p.add_argument("--isolated", type=int, default=0, metavar="ROUNDS", help="one process per contender and round")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # an --isolated child: time this contender
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gate = make_gate()
    rows, results = [], []
    for b in args.B:
        q, k, v, pk, pv = make_inputs(b, args.N, args.L, heads=args.heads, head_dim=args.head_dim, layout=args.layout)
        fns = contenders(q, k, v, pk, pv, gate)
        with torch.no_grad():
            if args.only is not None:
                samples = interleaved({args.only: fns[args.only]}, args.repeats, clock=args.clock)[args.only]
                print(json.dumps({"median_s": statistics.median(samples)}))
                return []
            ref = fns["batched"]()
            for name, fn in fns.items():  # every contender computes the same attention
                torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-5, msg=name)
            with contended(args.contend):
                if args.isolated:
                    times = _isolated(args, b, list(fns))
                else:
                    times = interleaved(fns, args.repeats, clock=args.clock, rotate=True)
        base = median_ms(times["epilogue"])
        for name, samples in times.items():
            ms = median_ms(samples)
            rows.append([str(b), name, f"{ms:.2f}", f"{ms / base:.3f}"])
            samples_ms = [1e3 * t for t in samples]  # per call, or per process with --isolated
            results.append(
                {"B": b, "N": args.N, "L": args.L, "contender": name, "median_ms": ms, "ratio": ms / base,
                 "samples_ms": samples_ms}
            )  # fmt: skip
    print(format_table(rows, ["B", "contender", "median ms", "/ epilogue"]))
    write_json(args.out, {"machine": machine_info(), "args": vars(args), "results": results})
    return results


if __name__ == "__main__":
    main()
