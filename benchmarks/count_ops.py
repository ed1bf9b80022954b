"""How many operators one call of a layer contender dispatches: a count, not a time, so it repeats exactly.

Every ATen operator that reaches the dispatcher during one call (after a warm-up call) is counted with a
``TorchDispatchMode``, by name, for ``fwd`` (under ``no_grad``) and ``fwdbwd`` (forward and backward, the
backward's operators included), inputs and ending as in ``bench_attention.py``. ``views`` are operators that only
make a view (``OpOverload.is_view``); the others allocate or compute. On a machine whose other cores are busy, each
operator that runs in parallel waits for them, so the count of the others is what that case pays for.

    python benchmarks/count_ops.py --contenders merge naive floor --out ops.json
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Any, Dict, List

from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_attention import runner  # noqa: E402
from benchmarks.common import contenders, format_table, make_gate, make_inputs, write_json  # noqa: E402


class _Count(TorchDispatchMode):
    """Counts every operator dispatched inside it, by overload name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[Any] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def count(run) -> Dict[str, object]:
    """``{"total", "not_views", "ops": {name: count}}`` of one ``run()``."""
    with _Count() as mode:
        run()
    not_views = sum(n for op, n in mode.ops.items() if not op.is_view)
    return {"total": sum(mode.ops.values()), "not_views": not_views, "ops": {str(op): n for op, n in mode.ops.items()}}


def main(argv: List[str] | None = None) -> List[Dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--N", type=int, default=197)
    p.add_argument("--L", type=int, default=20)
    p.add_argument("--mode", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--contenders", nargs="+", default=["naive", "merge", "floor", "timm"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows: List[Dict[str, object]] = []
    for mode in args.mode:
        fns = contenders("cpu", mode)
        inputs = make_inputs(args.B, args.N, args.L, requires_grad=mode == "fwdbwd")
        gate = make_gate()
        for name in args.contenders:
            run = runner(name, fns[name], inputs, gate, mode)
            run()  # warm-up: first-call work (lazy initialisation) is not the layer's
            rows.append({"B": args.B, "N": args.N, "L": args.L, "mode": mode, "contender": name, **count(run)})
    print(format_table([[r["mode"], r["contender"], r["total"], r["not_views"]] for r in rows],
                       ["mode", "contender", "operators", "not views"]))  # fmt: skip
    write_json(args.out, {"args": vars(args), "results": rows})
    return rows


if __name__ == "__main__":
    main()
