"""Instruction counts of the `merge` backend's CPU fast paths under callgrind, a measure timing noise cannot move.

The same contenders as `benchmarks/bench_fastpaths.py` (`epilogue`, `no-inplace`, `batched`; inference, one
layer), called in turn (`--calls` rounds) per batch size in one child process run under `valgrind --tool=callgrind`.
Every call is followed by `os.getppid()`, and `--dump-before=getppid` makes callgrind write the counts since the
previous dump, so each call gets its own counts, free of the import and the warm-up (those run with instrumentation
off, so the simulated caches start empty at the first counted call). Counted in user space, one thread:

- `Ir`: instructions executed (valgrind's CPU has AVX2, not AVX-512, so the libraries take their AVX2 kernels);
- `LLm`: simulated misses of a last-level cache of `--ll-kib` (default 2 MiB, 16-way, 64-byte lines: a core's
  private L2, the last level a single thread owns), read and write: the memory traffic of the extra passes;
- `est`: callgrind's cycle estimate `Ir + 10 · L1m + 100 · LLm` (the formula of KCachegrind).

Counts are repeatable for the same binary, inputs and environment, whatever else the machine is doing; the two
calls of each contender show it. Ratios are to `epilogue`. A fast path stays if the simpler code costs at least
3 % more at the target shapes (docs/benchmarks.md, "Fast paths").

    python benchmarks/count_fastpaths.py --out counts.json     # B = 16; needs valgrind

Slow: valgrind runs the import, the warm-up and the counted calls tens of times slower than the CPU does; the run
times seen are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.bench_fastpaths import contenders  # noqa: E402
from benchmarks.common import child_env, format_table, machine_info, make_gate, make_inputs, write_json  # noqa: E402

NAMES = ("epilogue", "no-inplace", "batched")
CHILD_ENV = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _child(args: argparse.Namespace) -> None:
    """Inside valgrind: warm up, then each contender `--calls` times in turn, a dump marker after each call."""
    torch.set_num_threads(1)
    q, k, v, pk, pv = make_inputs(args.b, args.N, args.L, heads=args.heads, head_dim=args.head_dim)
    fns = contenders(q, k, v, pk, pv, make_gate())
    with torch.no_grad():
        for name in NAMES:  # warm-up: allocator pools, lazy initialisation, kernel dispatch caches
            fns[name]()
        # valgrind started with instrumentation off (the import and warm-up run ~20x faster); switch it on
        subprocess.run(["callgrind_control", "--instr=on", str(os.getpid())], check=True, stdout=subprocess.DEVNULL)
        os.getppid()  # dump 1: what ran between switching on and here
        for _ in range(args.calls):
            for name in NAMES:
                fns[name]()
                os.getppid()  # dump: this call


def _totals(path: str) -> Dict[str, int]:
    events: List[str] = []
    with open(path) as fh:
        for line in fh:
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("totals:"):
                return dict(zip(events, map(int, line.split()[1:])))
    raise RuntimeError(f"{path}: no totals line")


def _measure(args: argparse.Namespace, b: int) -> Dict[str, List[Dict[str, int]]]:
    """Run one child under callgrind; per contender, the counts of each of its calls."""
    ll = args.ll_kib * 1024
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        cmd = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-before=getppid",
            f"--callgrind-out-file={out}", "--cache-sim=yes", "--I1=32768,8,64", "--D1=49152,12,64",
            f"--LL={ll},16,64", sys.executable, os.path.abspath(__file__), "--child", "--b", str(b),
            "--N", str(args.N), "--L", str(args.L), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
            "--calls", str(args.calls),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        parts = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        calls = [_totals(p) for p in parts[1 : 1 + args.calls * len(NAMES)]]  # part 1: switch-on to first call
    if len(calls) != args.calls * len(NAMES):
        raise RuntimeError(f"expected {args.calls * len(NAMES)} dumps after the warm-up, got {len(calls)}")
    counts: Dict[str, List[Dict[str, int]]] = {name: [] for name in NAMES}
    for i, c in enumerate(calls):
        l1m = c["I1mr"] + c["D1mr"] + c["D1mw"]
        llm = c["ILmr"] + c["DLmr"] + c["DLmw"]
        counts[NAMES[i % len(NAMES)]].append(
            {"Ir": c["Ir"], "L1m": l1m, "LLm": llm, "est": c["Ir"] + 10 * l1m + 100 * llm}
        )
    return counts


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """Count every contender at each batch size; returns one row per batch size and contender (also `--out`)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, nargs="+", default=[16])
    p.add_argument("--N", type=int, default=197)
    p.add_argument("--L", type=int, default=20)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ll-kib", type=int, default=2048, help="simulated last-level cache size (KiB)")
    p.add_argument("--calls", type=int, default=2, help="calls of each contender, in turn (counted separately)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--b", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return []
    if shutil.which("valgrind") is None:
        raise SystemExit("count_fastpaths: needs valgrind (Debian: apt install valgrind)")
    torch.set_num_threads(1)  # as in the child, so that machine_info reports the thread count counted
    # compile the imports natively first: under valgrind, compiling them from source takes most of the run
    subprocess.run([sys.executable, "-c", "import benchmarks.bench_fastpaths"], check=True, env=CHILD_ENV, cwd=ROOT)

    rows, results = [], []
    for b in args.B:
        counts = _measure(args, b)
        base = counts["epilogue"][0]
        for name in NAMES:
            first, *again = counts[name]
            ratios = {key: first[key] / base[key] for key in ("Ir", "LLm", "est")}
            again_ir = " ".join(f"{c['Ir'] / 1e6:.1f}" for c in again)
            rows.append(
                [str(b), name, f"{first['Ir'] / 1e6:.1f}", again_ir, f"{first['LLm'] / 1e3:.0f}",
                 f"{first['est'] / 1e6:.1f}", *(f"{ratios[key]:.3f}" for key in ("Ir", "LLm", "est"))]
            )  # fmt: skip
            results.append(
                {"B": b, "N": args.N, "L": args.L, "contender": name, "calls": counts[name], "ratio": ratios}
            )
        print(format_table(rows, ["B", "contender", "Ir (M)", "again", "LLm (k)", "est (M)", "Ir /", "LLm /", "est /"]))
    write_json(args.out, {"machine": machine_info(), "args": vars(args), "results": results})
    return results


if __name__ == "__main__":
    main()
