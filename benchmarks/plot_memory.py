"""Plot peak allocated memory against sequence length from ``bench_attention.py --memory`` results.

One line per contender, the peak MiB held by tensors allocated in one call and alive at once (see
``benchmarks.common.peak_allocated_bytes``) against ``N`` (log-log), for one ``(B, L, mode)``; a line of slope 2 is
memory that grows as ``N²`` (the explicit scores of ``naive``), slope 1 as ``N`` (fused kernels). Also
prints each contender's slope between its two largest ``N`` (where fixed overheads matter least).

Example (run from the repository root)::

    python benchmarks/bench_attention.py --B 1 --N 197 577 1025 2049 4096 --L 20 --mode fwd --memory \\
        --repeats 3 --contenders naive merge floor timm --out mem.json
    python benchmarks/plot_memory.py mem.json --out docs/img/memory_cpu.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import format_table


def series(rows: List[Dict[str, object]], b: int, length: int, mode: str) -> Dict[str, List[Tuple[int, float]]]:
    """``{contender: [(N, peak MiB), ...]}`` sorted by ``N``, for rows of that batch, length and mode."""
    out: Dict[str, List[Tuple[int, float]]] = {}
    for r in rows:
        if r["B"] == b and r["L"] == length and r["mode"] == mode and r.get("peak_mib") is not None:
            out.setdefault(str(r["contender"]), []).append((int(r["N"]), float(r["peak_mib"])))  # type: ignore[arg-type]
    return {name: sorted(points) for name, points in out.items()}


def slope(points: List[Tuple[int, float]]) -> float:
    """The log-log slope between the last two points (2: memory grows as N², 1: as N)."""
    (n0, m0), (n1, m1) = points[-2], points[-1]
    if n1 == n0 or m0 <= 0 or m1 <= 0:
        return float("nan")
    return math.log(m1 / m0) / math.log(n1 / n0)


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON files written by bench_attention.py --memory --out")
    p.add_argument("--B", type=int, default=None, help="batch to plot (default: the first in the results)")
    p.add_argument("--L", type=int, default=None, help="prefix length to plot (default: the first)")
    p.add_argument("--mode", default=None, choices=["fwd", "fwdbwd"], help="default: the first")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    rows: List[Dict[str, object]] = []
    machine = {}
    for path in args.results:
        with open(path) as fh:
            payload = json.load(fh)
        rows.extend(payload["results"])
        machine = payload.get("machine", machine)
    rows = [r for r in rows if r.get("peak_mib") is not None]
    if not rows:
        raise SystemExit("no peak memory in these results: run bench_attention.py with --memory")
    b = args.B if args.B is not None else int(rows[0]["B"])  # type: ignore[arg-type]
    length = args.L if args.L is not None else int(rows[0]["L"])  # type: ignore[arg-type]
    mode = args.mode or str(rows[0]["mode"])
    data = series(rows, b, length, mode)
    if not data:
        raise SystemExit(f"no rows with B={b}, L={length}, mode={mode} in {args.results}")

    table = [[name, " ".join(f"{m:.1f}" for _, m in pts), f"{slope(pts):.2f}"] for name, pts in data.items()]
    ns = sorted({n for pts in data.values() for n, _ in pts})
    print(f"peak MiB at N = {ns} (B={b}, L={length}, {mode})")
    print(format_table(table, ["contender", "peak MiB", "log-log slope"]))

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in data.items():
        ax.plot([n for n, _ in pts], [m for _, m in pts], marker="o", label=f"{name} (slope {slope(pts):.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("tokens N")
    ax.set_ylabel("peak allocated memory of one call (MiB)")
    device = machine.get("gpu") or machine.get("cpu_model") or "cpu"
    ax.set_title(f"Gated prefix attention, B={b}, L={length}, {mode}, {device}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
