"""Benchmark smoke test: tiny shapes, no timing. Every gated contender of ``benchmarks/`` (the naive
algorithm and each norga backend) must agree with the others, forward and backward; ``floor`` must agree
with them for the linear gate and ``timm`` for an empty prefix. A regression in a backend that the
benchmarks would otherwise time silently shows up here."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_attention import main as bench_main
from benchmarks.common import GATED, contenders, make_gate, make_inputs

SHAPES = [(2, 7, 3), (1, 17, 5)]


def _grads(fn, gate, b, n, length):
    q, k, v, pk, pv = make_inputs(b, n, length, heads=3, head_dim=8, requires_grad=True, seed=3)
    out = fn(q, k, v, pk, pv, gate)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    leaves = [q, k, v, pk, pv] + ([] if gate is None else list(gate.parameters()))
    return out, torch.autograd.grad((out * w).sum(), leaves)


@pytest.mark.parametrize("b, n, length", SHAPES)
@pytest.mark.parametrize("gated", [True, False])
def test_contenders_agree(b, n, length, gated):
    fns = contenders("cpu")
    assert set(GATED) <= set(fns)
    names = list(GATED) + ([] if gated else ["floor"])
    results = {}
    for name in names:
        gate = make_gate() if gated else None
        results[name] = _grads(fns[name], gate, b, n, length)
    out0, grads0 = results["naive"]
    for name in names[1:]:
        out, grads = results[name]
        torch.testing.assert_close(out, out0, rtol=0, atol=2e-6, msg=f"{name} vs naive (forward)")
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(
                g, g0, rtol=0, atol=1e-5 * max(1.0, g0.abs().max().item()), msg=f"{name} vs naive (backward)"
            )


def test_timm_contender_is_empty_prefix():
    fns = contenders("cpu")
    q, k, v, pk, pv = make_inputs(2, 9, 0, heads=3, head_dim=8)
    want = fns["naive"](q, k, v, pk, pv, make_gate())
    torch.testing.assert_close(fns["timm"](q, k, v, pk, pv, None), want, rtol=0, atol=2e-6)


def test_bench_attention_cli_runs(tmp_path):
    out = tmp_path / "r.json"
    rows = bench_main(["--B", "1", "--N", "9", "--L", "3", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert out.exists()
    got = {(r["mode"], r["contender"]) for r in rows}
    assert got == {(m, c) for m in ("fwd", "fwdbwd") for c in contenders("cpu", m)}
    assert ("fwd", "flex") in got and ("fwdbwd", "flex") not in got  # no FlexAttention backward on CPU
    assert all(r["median_ms"] > 0 for r in rows)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.filterwarnings("error:flex_attention called without torch.compile")
def test_flex_contender_agrees_forward():
    """``flex`` (forward only on CPU) computes what ``naive`` computes."""
    fns = contenders("cpu")
    gate = make_gate()
    q, k, v, pk, pv = make_inputs(2, 7, 3, heads=3, head_dim=8, seed=3)
    with torch.no_grad():
        got, want = fns["flex"](q, k, v, pk, pv, gate), fns["naive"](q, k, v, pk, pv, gate)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert "flex" not in contenders("cpu", "fwdbwd")
