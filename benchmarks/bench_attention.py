"""Layer benchmark: gated prefix attention (NoRGa, tanh gate) against the naive algorithm and the SDPA floor.

For every shape ``(B, N, L)`` (ViT-B heads: 12 heads of 64) and mode (``fwd``: forward under ``no_grad``;
``fwdbwd``: forward and backward with gradients for ``q, k, v`` and the prefix), every contender of
:mod:`benchmarks.common` runs interleaved (round-robin) in one process; the table gives median
milliseconds and the ratios to ``floor`` and to ``naive``. ``--memory`` adds the peak allocated memory of
each contender's call after the timing (:func:`benchmarks.common.peak_allocated_bytes`: the bytes held by tensors
allocated in the call and alive at its peak; on CPU from ``torch.profiler``'s allocation events, on CUDA
``torch.cuda.max_memory_allocated``), measured twice (``peak_mib``, ``peak_mib_again``).

Examples (run from the repository root)::

    python benchmarks/bench_attention.py --quick --out results_attention_quick.json
    python benchmarks/bench_attention.py --B 16 --N 197 --L 20 --repeats 30 --memory
    python benchmarks/bench_attention.py --device cuda --dtype bfloat16 --B 16 64 --N 197 1025 4096
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (
    LAYOUTS,
    contended,
    contenders,
    format_table,
    interleaved,
    machine_info,
    make_gate,
    make_inputs,
    median_ms,
    peak_allocated_bytes,
    write_json,
)
from norga.functional import select_backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_B = [1, 16, 64]
DEFAULT_N = [197, 577, 1025]
DEFAULT_L = [5, 20, 40]
#: Contenders whose memory grows as B*H*N*(N+L): the scores (naive, math) or an additive mask (sdpa; and auto where
#: it is sdpa).
QUADRATIC = ("naive", "math", "sdpa")


def runner(name: str, fn, inputs, gate, mode: str):
    """A no-argument callable running ``fn`` once in ``mode`` (``fwd`` or ``fwdbwd``).

    Both modes end as timm's attention does, with ``out.transpose(1, 2).reshape(B, N, C)`` (free after a
    fused kernel, whose output is laid out ``(B, N, H, D)``), so the backward pass gets its gradient in the
    layout it has inside a model.
    """
    q, k, v, pk, pv = inputs
    b, h, n, d = q.shape

    def merged(out: torch.Tensor) -> torch.Tensor:
        return out.transpose(1, 2).reshape(b, n, h * d)

    if mode == "fwd":

        def run():
            with torch.no_grad():
                return merged(fn(q, k, v, pk, pv, gate))

        return run
    grad = torch.randn(b, n, h * d, generator=torch.Generator().manual_seed(1)).to(q)
    leaves = [t if t._base is None else t._base for t in (q, k, v, pk, pv)]  # the "qkv" layout's views share a leaf

    def run():
        for t in leaves:
            t.grad = None
        out = merged(fn(q, k, v, pk, pv, gate))
        out.backward(grad)
        return out

    return run


def clear_grads(inputs, gate) -> None:
    """Drop the gradients a ``fwdbwd`` runner left (on the leaves of ``inputs`` and the gate's parameters)."""
    for t in inputs:
        (t if t._base is None else t._base).grad = None
    if gate is not None:
        gate.zero_grad(set_to_none=True)


def peak_mib(run, inputs, gate, device) -> List[float]:
    """The peak allocated memory of ``run()`` (MiB, :func:`benchmarks.common.peak_allocated_bytes`), measured in
    two calls after an unmeasured one, each with no gradient alive before it, so that the call frees nothing it
    did not allocate: they agree exactly where the call allocates the same tensors in the same order. (The first
    profiled backward of a process allocates about 200 KB once, beside the call's tensors.)"""
    peaks = []
    for _ in range(3):
        clear_grads(inputs, gate)
        peaks.append(peak_allocated_bytes(run, device) / 2**20)
    return peaks[1:]


def bench_shape(
    b: int, n: int, length: int, mode: str, args: argparse.Namespace, drop: Sequence[str] = ()
) -> List[Dict[str, object]]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    fns = {k: v for k, v in contenders(device, mode).items() if k not in drop}
    if args.contenders:
        fns = {k: v for k, v in fns.items() if k in args.contenders}
    inputs = make_inputs(b, n, length, device=device, dtype=dtype, requires_grad=mode == "fwdbwd", layout=args.layout)
    gate = make_gate(device)
    runs = {name: runner(name, fn, inputs, gate, mode) for name, fn in fns.items()}
    with contended(args.contend):
        times = interleaved(runs, repeats=args.repeats, warmup=args.warmup, device=device, clock=args.clock)
    med = {name: median_ms(t) for name, t in times.items()}
    peaks: Dict[str, List[float]] = {}
    if args.memory:
        for name in fns:
            peaks[name] = peak_mib(runs[name], inputs, gate, device)
    rows = []
    for name in fns:
        rows.append(
            {
                "B": b,
                "N": n,
                "L": length,
                "mode": mode,
                "contender": name,
                "device": device.type,
                "dtype": args.dtype,
                "median_ms": med[name],
                "min_ms": 1e3 * min(times[name]),
                "vs_floor": med[name] / med["floor"] if "floor" in med else None,
                "vs_naive": med[name] / med["naive"] if "naive" in med else None,
                "peak_mib": peaks[name][0] if name in peaks else None,
                "peak_mib_again": peaks[name][1] if name in peaks else None,
                "repeats": args.repeats,
                "clock": args.clock,
                "threads": torch.get_num_threads(),
                "layout": args.layout,
                "contend": args.contend,
            }
        )
    return rows


def print_rows(rows: List[Dict[str, object]]) -> None:
    header = ["B", "N", "L", "mode", "contender", "median ms", "vs floor", "vs naive", "peak MiB"]
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    table = [
        [
            r["B"],
            r["N"],
            r["L"],
            r["mode"],
            r["contender"],
            f"{r['median_ms']:.3f}",
            fmt(r["vs_floor"]),
            fmt(r["vs_naive"]),
            "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}",
        ]
        for r in rows
    ]
    print(format_table(table, header), flush=True)


def main(argv: List[str] | None = None) -> List[Dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the target shape B=16, N=197, L=20")
    p.add_argument("--B", type=int, nargs="+", default=None, help=f"batch sizes (default {DEFAULT_B})")
    p.add_argument("--N", type=int, nargs="+", default=None, help=f"tokens (default {DEFAULT_N})")
    p.add_argument("--L", type=int, nargs="+", default=None, help=f"prefix lengths (default {DEFAULT_L})")
    p.add_argument("--mode", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--contenders", nargs="+", default=None, help="subset of contenders (default: all)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds per shape (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds per shape (default 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument(
        "--layout",
        default="qkv",
        choices=list(LAYOUTS),
        help="qkv: q, k, v as strided views of one (B, N, 3, H, D) tensor, as timm's attention splits its qkv "
        "projection (default); contiguous: three contiguous (B, H, N, D) tensors",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time; cpu: process CPU time (robust on a shared machine with --threads 1)",
    )
    p.add_argument(
        "--contend",
        type=int,
        default=0,
        metavar="P",
        help="time beside P busy processes (python -c 'while True: pass', not pinned), a loaded machine (default 0)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="also measure each contender's peak allocated memory (the bytes of the tensors allocated in one call "
        "and alive at its peak; torch.profiler on CPU, torch.cuda.max_memory_allocated on CUDA), twice",
    )
    p.add_argument(
        "--max-naive-gib",
        type=float,
        default=8.0,
        help="above this size (GiB) of the B*H*N*(N+L) fp32 score matrix, leave out the contenders that build "
        "it or a mask of its size (naive, math, sdpa) and time the rest (default 8)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.B, args.N, args.L = args.B or [16], args.N or [197], args.L or [20]
    bs, ns, ls = args.B or DEFAULT_B, args.N or DEFAULT_N, args.L or DEFAULT_L
    rows: List[Dict[str, object]] = []
    # off CPU `auto` is `sdpa`, whose mask is as large as the scores
    auto_is_sdpa = select_backend(torch.empty(1, 1, 1, 8, device=args.device), "auto") == "sdpa"
    quadratic = QUADRATIC + (("auto",) if auto_is_sdpa else ())
    for b in bs:
        for n in ns:
            for length in ls:
                gib = b * 12 * n * (n + length) * 4 / 2**30
                drop = quadratic if gib > args.max_naive_gib else ()
                if drop:
                    print(
                        f"B={b} N={n} L={length}: {gib:.1f} GiB score matrix > --max-naive-gib, without {drop}",
                        flush=True,
                    )
                for mode in args.mode:
                    new = bench_shape(b, n, length, mode, args, drop=drop)
                    print_rows(new)
                    rows.extend(new)
                # after every shape, so that a run stopped by a time limit keeps what it measured
                write_json(args.out, {"machine": machine_info(args.device), "args": vars(args), "results": rows})
    return rows


if __name__ == "__main__":
    main()
