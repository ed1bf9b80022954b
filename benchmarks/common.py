"""Shared helpers for norga's benchmarks: contenders, inputs, interleaved timing and peak allocated memory.

Nothing here is timed in the unit tests; ``tests/test_bench_smoke.py`` only checks that the contenders
defined here agree with each other.

Contenders for one attention layer (``CONTENDERS``), all with the same signature
``fn(q, k, v, pk, pv, gate) -> out`` on ``q, k, v`` of shape ``(B, H, N, D)`` and a per-sample prefix
``pk, pv`` of shape ``(B, H, L, D)``:

``naive``
    The authors' algorithm: explicit ``q @ [pk; k]^T``, the gate on the ``L`` prefix columns, softmax over
    ``L + N`` columns, ``@ [pv; v]``.
``math``, ``merge``, ``sdpa``, ``flex``, ``auto``
    :func:`norga.functional.prefix_attention` with that backend (``flex`` only forward on CPU).
``floor``
    ``F.scaled_dot_product_attention`` over the concatenated ``[pk; k]`` keys with no gate: the cost of a
    prefix without NoRGa, the physical floor for a gated prefix.
``timm``
    ``F.scaled_dot_product_attention`` over the tokens with no prefix at all (what timm's layer costs).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Callable, Dict, Iterator, List, Optional, TypeVar

import torch
import torch.nn.functional as F

import norga
from norga.functional import available_backends, prefix_attention

Contender = Callable[..., torch.Tensor]
T = TypeVar("T")


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, gate) -> torch.Tensor:
    """The authors' gated prefix attention: explicit scores over ``[prefix; tokens]``, gate, softmax."""
    scale = q.shape[-1] ** -0.5
    length = pk.shape[-2]
    keys = torch.cat([pk, k], dim=-2)
    values = torch.cat([pv, v], dim=-2)
    attn = (q @ keys.transpose(-2, -1)) * scale  # as the authors' ViT fork writes it
    if gate is not None:
        attn = torch.cat([gate(attn[..., :length]), attn[..., length:]], dim=-1)
    attn = attn.softmax(dim=-1)
    return attn @ values


def floor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, gate) -> torch.Tensor:
    """SDPA over ``[prefix; tokens]`` with no gate (the cost of a linear-gate prefix)."""
    return F.scaled_dot_product_attention(q, torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2))


def timm_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, gate
) -> torch.Tensor:
    """SDPA over the tokens only: timm's attention with no prefix."""
    return F.scaled_dot_product_attention(q, k, v)


def _backend(name: str) -> Contender:
    def fn(q, k, v, pk, pv, gate):
        return prefix_attention(q, k, v, (pk, pv), gate=gate, backend=name)

    fn.__name__ = f"norga_{name}"
    return fn


def contenders(device: torch.device | str = "cpu", mode: str = "fwd") -> Dict[str, Contender]:
    """Every contender that can run on ``device`` in ``mode`` (``fwd`` or ``fwdbwd``), by name (norga
    backends as ``math``, ``merge``, ...). ``flex`` has no backward on CPU, so it is left out there."""
    out: Dict[str, Contender] = {"naive": naive}
    for name in available_backends(device):
        if name == "flex" and torch.device(device).type == "cpu" and mode == "fwdbwd":
            continue
        out[name] = _backend(name)
    out["auto"] = _backend("auto")
    out["floor"] = floor
    out["timm"] = timm_attention
    return out


#: Contenders that compute the gated prefix attention (``floor`` and ``timm`` compute something else).
GATED = ("naive", "math", "merge", "sdpa", "auto")


def make_inputs(
    batch: int,
    tokens: int,
    length: int,
    *,
    heads: int = 12,
    head_dim: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    seed: int = 0,
    layout: str = "qkv",
):
    """Random ``q, k, v`` ``(B, H, N, D)`` and a per-sample prefix ``pk, pv`` ``(B, H, L, D)``, U(-1, 1) like a pool.

    ``layout="qkv"``: ``q, k, v`` are strided views of one ``(B, N, 3, H, D)`` tensor, as timm's attention
    splits its fused ``qkv`` projection (what a patched layer really receives); with ``requires_grad`` the
    gradients flow to that one leaf. ``layout="contiguous"``: three contiguous ``(B, H, N, D)`` leaves.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    gen = torch.Generator().manual_seed(seed)

    def t(*shape, low=None):
        x = torch.randn(*shape, generator=gen) if low is None else torch.rand(*shape, generator=gen) * 2 - 1
        return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    if layout == "qkv":
        q, k, v = t(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = t(batch, heads, tokens, head_dim)
        k = t(batch, heads, tokens, head_dim)
        v = t(batch, heads, tokens, head_dim)
    pk = t(batch, heads, length, head_dim, low=-1)
    pv = t(batch, heads, length, head_dim, low=-1)
    return q, k, v, pk, pv


#: Input layouts of :func:`make_inputs`.
LAYOUTS = ("qkv", "contiguous")


def make_gate(device: torch.device | str = "cpu") -> torch.nn.Module:
    """NoRGa's tanh gate (learnable alpha, tau = 1)."""
    return norga.NoRGaGate("tanh").to(device)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCKS = ("wall", "cpu")


def rotated(items: Sequence[T], r: int) -> List[T]:
    """``items`` starting at index ``r mod len(items)``: round ``r``'s order when rounds rotate the contenders."""
    start = r % len(items) if items else 0
    return list(items[start:]) + list(items[:start])


def interleaved(
    fns: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    clock: str = "wall",
    rotate: bool = False,
) -> Dict[str, List[float]]:
    """Time every callable ``repeats`` times, round-robin (one call of each per round), after ``warmup`` rounds.

    Round-robin spreads load changes on a shared machine evenly over the contenders. ``rotate``: round ``r``
    starts at contender ``r mod len(fns)``, so each follows each other equally often (what one contender
    leaves in the allocator and the caches then weighs on all alike). ``clock="wall"``
    measures elapsed time; ``clock="cpu"`` the CPU time of this process (``time.process_time``), which on a
    machine shared with other jobs and with ``torch.set_num_threads(1)`` measures the work done rather than
    the time spent waiting for a core (with several threads it also counts spin-waiting). Returns seconds.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "cpu" and torch.device(device).type != "cpu":
        raise ValueError(f"clock='cpu' measures CPU work and is meaningless on device {device!r}; use 'wall'")
    now = time.perf_counter if clock == "wall" else time.process_time
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(repeats):
        for name, fn in rotated(order, r if rotate else 0):
            synchronize(device)
            t0 = now()
            fn()
            synchronize(device)
            times[name].append(now() - t0)
    return times


@contextlib.contextmanager
def contended(processes: int) -> Iterator[None]:
    """Run ``processes`` busy processes (``python -c 'while True: pass'``, not pinned) for the duration: a machine
    whose cores other jobs keep busy, reproducibly. Each is ended by its process id on leaving."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def child_env(**extra: str) -> Dict[str, str]:
    """The environment for a benchmark's child process: compiled imports kept in a cache between children.

    ``PYTHONPYCACHEPREFIX`` points at one directory under the system's temporary folder (and
    ``PYTHONDONTWRITEBYTECODE`` is dropped), so that only the first child compiles torch, timm and norga from
    source where the installation has no ``.pyc`` files. ``extra`` is added (thread counts, for example).
    """
    env = dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(tempfile.gettempdir(), "norga-bench-pycache"), **extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def median_ms(samples: Sequence[float]) -> float:
    return 1e3 * statistics.median(samples)


def machine_info(device: torch.device | str = "cpu") -> Dict[str, object]:
    """Machine, library versions and thread count, for the JSON results."""
    info: Dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def peak_allocated_bytes(run: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """The peak of the bytes allocated by tensors during ``run()`` and alive at once.

    On CPU, ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of the CPU
    allocator as a ``[memory]`` event with its size (negative for a free); the running sum of those events, in
    the order recorded, is the memory allocated since the call began and still alive, and its maximum is the
    peak (0 if the call allocates nothing). The profiler knows the size of a block only if it was allocated while a
    profiler ran: the free of a tensor made before, outside any profiler, is not counted, but that of one made
    under an earlier profiler is, and lowers the sum. Measure from a state in which the call frees nothing it did
    not allocate (``bench_attention.py`` drops the previous call's gradients first) and the result is the same
    either way. On CUDA,
    ``torch.cuda.max_memory_allocated`` above ``torch.cuda.memory_allocated`` before the call (there such a free
    does lower it). Either way it is live memory, the bytes of the tensors themselves, not what the allocator
    keeps from the operating system, and it repeats exactly where the call allocates the same tensors in the
    same order.
    """
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())  # stable: events of one instant keep their recorded order
    live = peak = 0
    for e in events:
        if e.device_type() == torch.profiler.DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def write_json(path: Optional[str], payload: Dict[str, object]) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(payload, fh, indent=2)
        print(f"wrote {path}")


def format_table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).rjust(w) for x, w in zip(r, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
