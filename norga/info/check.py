"""The self-check: versions, and every backend on a device against the float64 reference, timed against the floor.

[`self_check`][norga.info.check.self_check] runs, for each backend available on the device
([`available_backends`][norga.functional.available_backends]), each dtype and with and without a token bias, one
gated prefix attention (tanh gate, per-head prefix) and its gradients for `q`, `k`, `v`, the prefix keys and values,
`alpha`, `tau` and the bias, and compares them elementwise with the float64 equations
([`reference`][norga.info.bounds.reference]) within bounds from rounding-error analysis
([`error_bounds`][norga.info.bounds.error_bounds]). Inputs are drawn in float32 and rounded to the dtype, so the
reference and the backend see the same values. `flex` on CPU runs forward only (PyTorch has no CPU FlexAttention
backward). Each configuration is then timed, forward and forward + backward, against the floor: SDPA over
`[prefix; tokens]` with no gate.

`main` is the command line (`python -m norga.info`), the one place where norga prints.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .._version import __version__
from ..functional import available_backends, prefix_attention
from ..gates import NoRGaGate
from .bounds import error_bounds, reference

__all__ = ["CheckResult", "main", "report", "self_check", "versions"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECK_SHAPE = {"B": 2, "H": 4, "N": 77, "D": 64, "L": 10}  # N = 77: not a multiple of a kernel's block
TIME_SHAPE = {"B": 16, "H": 12, "N": 197, "D": 64, "L": 20}  # ViT-B attention, a prefix of 20
ALPHA, TAU = 0.8, 1.3


@dataclass
class CheckResult:
    """One backend, dtype and bias on the device.

    Attributes:
        backend: The backend's name.
        dtype: The input dtype's name.
        bias: Whether a token bias (requiring grad) was given.
        worst: The largest `|error| / bound` over the output and every gradient (`<= 1` passes).
        worst_of: Which tensor gave `worst`.
        gradients: Whether gradients were checked (not for `flex` on CPU).
        ok: Whether every element was within its bound, and every value finite where the reference's is.
        error: The exception's message where the backend raised, else `""`.
        fwd_ms: Median forward time (no autograd), milliseconds, at the timing shape (`None` if not timed).
        fwdbwd_ms: Median forward + backward time, or `None`.
        floor_fwd_ms: The floor's forward time (SDPA over `[prefix; tokens]`, no gate, no bias) at the same shape
            and dtype.
        floor_fwdbwd_ms: The floor's forward + backward time.
        shape: The check's sizes `B`, `H`, `N`, `D`, `L`.
    """

    backend: str
    dtype: str
    bias: bool
    worst: float = 0.0
    worst_of: str = ""
    gradients: bool = True
    ok: bool = True
    error: str = ""
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    floor_fwd_ms: float | None = None
    floor_fwdbwd_ms: float | None = None
    shape: dict = field(default_factory=dict)


def versions(device: torch.device | str = "cpu") -> dict[str, Any]:
    """norga, torch, timm and Python versions, and the device (its name and compute capability on CUDA)."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "norga": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency
        info["timm"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device, bias: bool, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    b, h, n, d, length = (shape[key] for key in "BHNDL")

    def draw(*size: int, uniform: bool = False) -> torch.Tensor:
        x = torch.rand(*size, generator=gen) * 2 - 1 if uniform else torch.randn(*size, generator=gen)
        return x.to(dtype).to(device).requires_grad_(True)

    qkv = draw(b, n, 3, h, d)  # q, k, v as strided views of one tensor, as timm splits its qkv projection
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    gate = NoRGaGate("tanh", alpha=ALPHA, tau=TAU).to(device)
    return {
        "qkv": qkv, "q": q, "k": k, "v": v, "pk": draw(b, h, length, d, uniform=True),
        "pv": draw(b, h, length, d, uniform=True), "bias": draw(1, h, n, n) if bias else None, "gate": gate,
        "scale": d**-0.5,
    }  # fmt: skip


def _run(backend: str, x: dict[str, Any]) -> torch.Tensor:
    return prefix_attention(
        x["q"], x["k"], x["v"], (x["pk"], x["pv"]), gate=x["gate"], attn_bias=x["bias"], backend=backend
    )


def _compare(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> tuple[bool, float]:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite):
        return False, float("inf")
    ratio = ((got - want).abs() / bound.expand_as(want).clamp(min=1e-300))[finite]
    worst = float(ratio.max()) if ratio.numel() else 0.0
    return worst <= 1.0, worst


def _check(backend: str, dtype: torch.dtype, device: torch.device, bias: bool, shape: dict) -> CheckResult:
    name = next(key for key, value in DTYPES.items() if value is dtype)
    result = CheckResult(backend, name, bias, shape=dict(shape))
    x = _inputs(shape, dtype, device, bias, seed=0)
    result.gradients = not (backend == "flex" and device.type == "cpu")
    gen = torch.Generator().manual_seed(1)
    d_out = torch.randn(x["q"].shape, generator=gen).to(dtype).double()  # exact in dtype, as the backward sees it
    leaves = {"q": x["q"], "k": x["k"], "v": x["v"], "pk": x["pk"], "pv": x["pv"]}
    r = {key: t.detach().double().cpu().requires_grad_(True) for key, t in leaves.items()}
    r.update(alpha=torch.tensor(x["gate"].alpha.item(), dtype=torch.float64, requires_grad=True))
    r.update(tau=torch.tensor(x["gate"].tau.item(), dtype=torch.float64, requires_grad=True))
    r_bias = None if x["bias"] is None else x["bias"].detach().double().cpu().requires_grad_(True)
    want = reference(r["q"], r["k"], r["v"], r["pk"], r["pv"], r["alpha"], r["tau"], r_bias, x["scale"])
    io_unit = torch.finfo(dtype).eps / 2 if dtype != torch.float32 else 0.0
    bounds = error_bounds(
        r["q"], r["k"], r["v"], r["pk"], r["pv"], ALPHA, TAU, r_bias, x["scale"], d_out,
        io_unit=io_unit, tf32=device.type == "cuda" and dtype == torch.float32,
    )  # fmt: skip
    try:
        with torch.set_grad_enabled(result.gradients):
            out = _run(backend, x)
        checks = [("out", out, want)]
        if result.gradients:
            names = ["q", "k", "v", "pk", "pv", "alpha", "tau"] + (["bias"] if bias else [])
            mine = [x["q"], x["k"], x["v"], x["pk"], x["pv"], x["gate"].alpha, x["gate"].tau]
            theirs = [r[key] for key in names[:7]]
            if bias:
                mine, theirs = mine + [x["bias"]], theirs + [r_bias]
            got = torch.autograd.grad(out, mine, d_out.to(device, dtype))
            exp = torch.autograd.grad(want, theirs, d_out)
            checks += list(zip(names, got, exp))
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        result.ok, result.error, result.worst = False, f"{type(e).__name__}: {e}", float("inf")
        return result
    for what, mine_t, want_t in checks:
        ok, worst = _compare(mine_t, want_t, bounds[what])
        result.ok = result.ok and ok
        if worst >= result.worst:
            result.worst, result.worst_of = worst, what
    return result


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (and compilation, for flex)
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples)


def _time(result: CheckResult, device: torch.device, shape: dict, repeats: int) -> None:
    """Fill `result`'s timings at `shape` (median of `repeats` calls after one warm-up), and the floor's."""
    x = _inputs(shape, DTYPES[result.dtype], device, result.bias, seed=2)
    grad = torch.randn(x["q"].shape, generator=torch.Generator().manual_seed(3)).to(device, x["q"].dtype)

    def floor() -> torch.Tensor:
        keys, values = torch.cat([x["pk"], x["k"]], dim=-2), torch.cat([x["pv"], x["v"]], dim=-2)
        return F.scaled_dot_product_attention(x["q"], keys, values, scale=x["scale"])

    def forward(fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return fn()

        return run

    def train(fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(fn(), [x["qkv"], x["pk"], x["pv"]], grad)

    mine = lambda: _run(result.backend, x)  # noqa: E731
    result.fwd_ms, result.floor_fwd_ms = (
        _median_ms(forward(mine), device, repeats),
        _median_ms(forward(floor), device, repeats),
    )
    result.floor_fwdbwd_ms = _median_ms(train(floor), device, repeats)
    if result.gradients:
        result.fwdbwd_ms = _median_ms(train(mine), device, repeats)


def self_check(
    device: torch.device | str = "cpu",
    *,
    backends: Sequence[str] | None = None,
    dtypes: Sequence[str] = tuple(DTYPES),
    quick: bool = False,
    timing: bool = True,
    repeats: int = 10,
) -> list[CheckResult]:
    """Every backend on `device` against the float64 reference, each dtype, with and without a token bias.

    Args:
        device: Where to run.
        backends: Backend names (default: every one [`available_backends`][norga.functional.available_backends]
            lists for `device`).
        dtypes: Input dtypes by name (`"float32"`, `"bfloat16"`, `"float16"`).
        quick: Time at the (small) check shape instead of ViT-B's `B = 16, N = 197, H = 12, L = 20`.
        timing: Whether to time each configuration and the floor.
        repeats: Timed calls per configuration (their median is reported).

    Returns:
        One [`CheckResult`][norga.info.check.CheckResult] per backend, dtype and bias.

    Raises:
        ValueError: an unknown dtype name, or a backend not available on `device`.
    """
    device = torch.device(device)
    names = list(available_backends(device)) if backends is None else list(backends)
    unknown = [b for b in names if b not in available_backends(device)]
    if unknown:
        raise ValueError(f"backends {unknown} are not available on {device}; available: {available_backends(device)}")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtypes {bad}; expected some of {list(DTYPES)}")
    results = []
    for dtype in dtypes:
        for bias in (False, True):
            for backend in names:
                result = _check(backend, DTYPES[dtype], device, bias, CHECK_SHAPE)
                if timing and not result.error:
                    _time(result, device, CHECK_SHAPE if quick else TIME_SHAPE, repeats)
                results.append(result)
    return results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def report(info: dict[str, Any], results: list[CheckResult]) -> str:
    """The self-check as text: versions, then one table row per configuration."""
    lines = [" ".join(f"{key}={value}" for key, value in info.items()), ""]
    header = (
        "| backend | dtype | bias | worst error / bound | of | fwd ms | vs floor | fwd+bwd ms | vs floor | result |"
    )
    lines += [header, "|" + "---|" * 10]
    for r in results:
        verdict = "ok" if r.ok else ("ERROR " + r.error if r.error else "MISMATCH")
        grads = "" if r.gradients else " (forward only)"
        lines.append(
            f"| {r.backend} | {r.dtype} | {'yes' if r.bias else 'no'} | {r.worst:.3g}{grads} | {r.worst_of} | "
            f"{_ms(r.fwd_ms)} | {_ratio(r.fwd_ms, r.floor_fwd_ms)} | {_ms(r.fwdbwd_ms)} | "
            f"{_ratio(r.fwdbwd_ms, r.floor_fwdbwd_ms)} | {verdict} |"
        )
    failed = sum(not r.ok for r in results)
    lines += ["", f"{len(results) - failed} of {len(results)} checks passed" + ("" if not failed else "; FAILED")]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m norga.info`: print the versions and the self-check; exit status 1 on any mismatch."""
    p = argparse.ArgumentParser(prog="python -m norga.info", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="+", default=None, help="default: every backend available on the device")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--quick", action="store_true", help="time at the small check shape")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the versions and results here")
    args = p.parse_args(argv)
    info = versions(args.device)
    results = self_check(
        args.device, backends=args.backends, dtypes=args.dtypes, quick=args.quick, timing=not args.no_timing,
        repeats=args.repeats,
    )  # fmt: skip
    sys.stdout.write(report(info, results) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"versions": info, "results": [asdict(r) for r in results]}, fh, indent=2)
    return 0 if all(r.ok for r in results) else 1
