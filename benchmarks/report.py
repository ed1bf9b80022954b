"""Markdown tables from ``bench_attention.py`` JSON results, in the layout of ``docs/benchmarks.md``.

One row per ``(B, N, L, mode)``: the median milliseconds of every contender, then ``auto``'s (or
``--norga``'s) ratio to ``floor`` and to ``naive``; with ``--memory``, a second table of peak MiB.

Example (run from the repository root)::

    python benchmarks/report.py results_attention.json
    python benchmarks/report.py grid.json grid64.json --memory
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Column order; contenders missing from a run get "-".
ORDER = ("naive", "math", "merge", "sdpa", "flex", "auto", "floor", "timm")

Key = Tuple[int, int, int, str]


def collect(rows: List[Dict[str, object]], field: str) -> Dict[Key, Dict[str, float]]:
    """``{(B, N, L, mode): {contender: value of field}}``, in the order the shapes were run."""
    out: Dict[Key, Dict[str, float]] = {}
    for r in rows:
        key = (int(r["B"]), int(r["N"]), int(r["L"]), str(r["mode"]))  # type: ignore[call-overload]
        if r.get(field) is not None:
            out.setdefault(key, {})[str(r["contender"])] = float(r[field])  # type: ignore[arg-type]
    return out


def markdown(table: Dict[Key, Dict[str, float]], unit: str, norga: str, ratios: bool) -> str:
    names = [c for c in ORDER if any(c in row for row in table.values())]
    header = ["B", "N", "L", "mode"] + [f"{c} {unit}" for c in names]
    if ratios:
        header += [f"{norga}/floor", f"{norga}/naive"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (b, n, length, mode), row in table.items():
        cells = [str(b), str(n), str(length), mode] + [f"{row[c]:.1f}" if c in row else "-" for c in names]
        if ratios:
            for base in ("floor", "naive"):
                ok = norga in row and base in row
                cells.append(f"{row[norga] / row[base]:.2f}" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON files written by bench_attention.py --out")
    p.add_argument("--norga", default="auto", help="the contender whose ratios are reported (default auto)")
    p.add_argument("--memory", action="store_true", help="also print the peak-memory table")
    args = p.parse_args(argv)
    rows: List[Dict[str, object]] = []
    for path in args.results:
        with open(path) as fh:
            rows.extend(json.load(fh)["results"])
    print(markdown(collect(rows, "median_ms"), "ms", args.norga, ratios=True))
    if args.memory:
        print()
        print(markdown(collect(rows, "peak_mib"), "MiB", args.norga, ratios=False))


if __name__ == "__main__":
    main()
