"""Benchmark smoke test: tiny shapes, no timing. Every gated contender of ``benchmarks/`` (the naive
algorithm and each norga backend) must agree with the others, forward and backward; ``floor`` must agree
with them for the linear gate and ``timm`` for an empty prefix. A regression in a backend that the
benchmarks would otherwise time silently shows up here."""

import json
import os
import sys

import pytest
import torch
from tolerance import attention_grad_tol, attention_tol, gamma, gate_args
from versions import needs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_attention import main as bench_main
from benchmarks.common import GATED, LAYOUTS, contenders, make_gate, make_inputs

SHAPES = [(2, 7, 3), (1, 17, 5)]


def _grads(fn, gate, b, n, length, layout):
    q, k, v, pk, pv = make_inputs(b, n, length, heads=3, head_dim=8, requires_grad=True, seed=3, layout=layout)
    with torch.no_grad():  # the inference paths (merge has its own)
        out_ng = fn(q, k, v, pk, pv, gate)
    out = fn(q, k, v, pk, pv, gate)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    leaves = [q, k, v, pk, pv] + ([] if gate is None else list(gate.parameters()))
    return out_ng, out, torch.autograd.grad((out * w).sum(), leaves), (q, k, v, pk, pv, w)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("b, n, length", SHAPES)
@pytest.mark.parametrize("gated", [True, False])
def test_contenders_agree(b, n, length, gated, layout):
    fns = contenders("cpu")
    assert set(GATED) <= set(fns)
    names = list(GATED) + ([] if gated else ["floor"])
    results = {}
    for name in names:
        gate = make_gate() if gated else None
        results[name] = _grads(fns[name], gate, b, n, length, layout)
    _, out0, grads0, inputs = results["naive"]
    # every contender and naive are float32 evaluations of the same attention, each within the bounds of
    # tests/tolerance.py of the exact value: they differ by at most twice those
    q, k, v, pk, pv, w = inputs
    gate = gate_args(make_gate()) if gated else {}
    bound = 2 * attention_tol(q, k, v, pk, pv, scale=8**-0.5, **gate)
    gb = attention_grad_tol(q, k, v, pk, pv, w, scale=8**-0.5, **gate)
    grad_bounds = [2 * gb[leaf] for leaf in ["q", "k", "v", "pk", "pv"] + (["alpha", "tau"] if gated else [])]
    for name in names[1:]:
        out_ng, out, grads, _ = results[name]
        torch.testing.assert_close(out_ng, out0, rtol=0, atol=bound, msg=f"{name} vs naive (forward, no grad)")
        torch.testing.assert_close(out, out0, rtol=0, atol=bound, msg=f"{name} vs naive (forward)")
        for g, g0, gbound in zip(grads, grads0, grad_bounds):
            torch.testing.assert_close(g, g0, rtol=0, atol=gbound, msg=f"{name} vs naive (backward)")


def test_timm_contender_is_empty_prefix():
    fns = contenders("cpu")
    q, k, v, pk, pv = make_inputs(2, 9, 0, heads=3, head_dim=8)
    want = fns["naive"](q, k, v, pk, pv, make_gate())
    bound = 2 * attention_tol(q, k, v, scale=8**-0.5)  # two float32 evaluations of plain attention
    torch.testing.assert_close(fns["timm"](q, k, v, pk, pv, None), want, rtol=0, atol=bound)


def test_bench_attention_cli_runs(tmp_path):
    """The CLI times every contender but `flex` (its forward is checked by test_flex_contender_agrees_forward;
    each FlexAttention configuration is one Inductor compilation, about a minute on a cold cache)."""
    out = tmp_path / "r.json"
    names = [c for c in contenders("cpu", "fwd") if c != "flex"]
    args = ["--B", "1", "--N", "9", "--L", "3", "--repeats", "1", "--warmup", "0", "--contenders", *names]
    rows = bench_main([*args, "--out", str(out)])
    assert out.exists()
    got = {(r["mode"], r["contender"]) for r in rows}
    assert got == {(m, c) for m in ("fwd", "fwdbwd") for c in contenders("cpu", m) if c != "flex"}
    assert all(r["median_ms"] > 0 for r in rows)


@pytest.mark.usefixtures("fresh_dynamo")
@needs("flex")
@pytest.mark.filterwarnings("error:flex_attention called without torch.compile")
def test_flex_contender_agrees_forward():
    """``flex`` (forward only on CPU) computes what ``naive`` computes."""
    fns = contenders("cpu")
    gate = make_gate()
    q, k, v, pk, pv = make_inputs(2, 7, 3, heads=3, head_dim=8, seed=3)
    with torch.no_grad():
        got, want = fns["flex"](q, k, v, pk, pv, gate), fns["naive"](q, k, v, pk, pv, gate)
    bound = 2 * attention_tol(q, k, v, pk, pv, scale=8**-0.5, **gate_args(gate))  # two float32 evaluations
    torch.testing.assert_close(got, want, rtol=0, atol=bound)
    assert "flex" not in contenders("cpu", "fwdbwd")


def test_bench_attention_drops_quadratic_contenders_above_the_limit():
    """Above --max-naive-gib only the contenders that build the N x (N + L) scores or mask are left out."""
    rows = bench_main(["--B", "1", "--N", "9", "--L", "3", "--repeats", "1", "--warmup", "0", "--max-naive-gib", "0"])
    got = {(r["mode"], r["contender"]) for r in rows}
    want = {(m, c) for m in ("fwd", "fwdbwd") for c in contenders("cpu", m) if c not in ("naive", "math", "sdpa")}
    assert got == want and ("fwd", "merge") in got
    assert all(r["vs_naive"] is None and r["vs_floor"] is not None for r in rows)


def test_peak_allocated_bytes_counts_live_tensors():
    """The peak of the tensor bytes allocated in one call and alive at once, counted from the allocator's events:
    tensors of known sizes (float32, 4 bytes an element), one freed before the next is made. The free of a tensor
    made before the call is not seen (the profiler does not know that block's size)."""
    from benchmarks.common import peak_allocated_bytes

    def run():
        a = torch.empty(250_000)  # 1,000,000 bytes
        b = torch.empty(500_000)  # 2,000,000 bytes: 3,000,000 alive, the peak
        del a
        c = torch.empty(125_000)  # 500,000 bytes: 2,500,000 alive
        return b, c

    assert peak_allocated_bytes(run) == 3_000_000
    held = [torch.empty(1_000_000)]

    def free_then_allocate():
        held.pop()  # 4,000,000 bytes freed, not counted
        return torch.empty(250_000)  # 1,000,000 bytes

    assert peak_allocated_bytes(free_then_allocate) == 1_000_000
    assert peak_allocated_bytes(lambda: None) == 0


def test_bench_attention_memory_repeats_exactly():
    """`--memory` measures each contender's peak twice from the same state; the two are equal, and at least what is
    alive at the end of the call: the output (B * N * H * D float32) and, forward+backward, also the gradient of
    the (B, N, 3, H, D) tensor that q, k, v are views of (the previous call's gradients, dropped before each
    measured call, do not lower the count)."""
    args = ["--B", "2", "--N", "9", "--L", "3", "--repeats", "1", "--warmup", "0", "--memory"]
    rows = bench_main([*args, "--contenders", "naive", "merge", "floor"])
    assert {r["contender"] for r in rows} == {"naive", "merge", "floor"}
    out_bytes = 2 * 9 * 12 * 64 * 4
    for r in rows:
        assert r["peak_mib"] == r["peak_mib_again"], r
        assert r["peak_mib"] * 2**20 >= out_bytes * (4 if r["mode"] == "fwdbwd" else 1), r


def test_plot_memory_slopes_and_png(tmp_path, capsys):
    """The memory plot fits log-log slopes: 2 for memory that grows as N^2, 1 for N."""
    from benchmarks.plot_memory import main as plot_main
    from benchmarks.plot_memory import slope

    rows = [
        {"B": 1, "L": 20, "mode": "fwd", "contender": name, "N": n, "peak_mib": m}
        for n in (100, 200, 400)
        for name, m in (("naive", 3.0 * (n / 100) ** 2), ("merge", 5.0 * n / 100))
    ]
    path = tmp_path / "mem.json"
    path.write_text(json.dumps({"machine": {"cpu_model": "test"}, "results": rows}))
    png = tmp_path / "mem.png"
    plot_main([str(path), "--out", str(png)])
    assert png.stat().st_size > 0
    # log(16) / log(4) in float64: two logs (1 ulp each) and a division
    assert slope([(100, 3.0), (400, 48.0)]) == pytest.approx(2.0, rel=gamma(torch.float64, 5), abs=0)
    printed = capsys.readouterr().out
    assert "|     naive | 3.0 12.0 48.0 |          2.00 |" in printed
    assert "|     merge | 5.0 10.0 20.0 |          1.00 |" in printed


def test_report_tables_and_ratios(tmp_path, capsys):
    """report.py turns results into the docs' tables: one row per shape, ratios of auto to floor and naive."""
    from benchmarks.report import main as report_main

    rows = [
        {"B": 16, "N": 197, "L": 20, "mode": "fwd", "contender": c, "median_ms": ms, "peak_mib": mib}
        for c, ms, mib in (("naive", 80.0, 90.0), ("auto", 33.0, 16.0), ("floor", 30.0, 32.0))
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"results": rows}))
    report_main([str(path), "--memory"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| B | N | L | mode | naive ms | auto ms | floor ms | auto/floor | auto/naive |"
    assert lines[2] == "| 16 | 197 | 20 | fwd | 80.0 | 33.0 | 30.0 | 1.10 | 0.41 |"
    assert lines[-1] == "| 16 | 197 | 20 | fwd | 90.0 | 16.0 | 32.0 |"


def test_bench_fastpaths_cli_runs(tmp_path):
    """benchmarks/bench_fastpaths.py times the merge backend's inference with each fast path removed in turn;
    its contenders compute the same attention (checked inside the script) and the ratios are to `epilogue`."""
    from benchmarks.bench_fastpaths import main as fastpaths_main

    out = tmp_path / "f.json"
    rows = fastpaths_main(
        ["--B", "3", "--N", "9", "--L", "3", "--heads", "2", "--head-dim", "8", "--repeats", "1"] + ["--out", str(out)]
    )
    assert out.exists() and json.loads(out.read_text())["results"] == rows
    assert {r["contender"] for r in rows} == {"epilogue", "no-inplace", "epilogue-again", "batched", "per-sample"}
    assert next(r["ratio"] for r in rows if r["contender"] == "epilogue") == 1.0


def test_bench_fastpaths_isolated_child_times_one_contender(capsys):
    """`--only NAME` (a child of `--isolated`) times that contender alone and prints its median as JSON."""
    from benchmarks.bench_fastpaths import main as fastpaths_main

    argv = ["--B", "2", "--N", "5", "--L", "2", "--heads", "2", "--head-dim", "4", "--repeats", "3", "--clock", "cpu"]
    assert fastpaths_main(argv + ["--only", "batched"]) == []
    median = json.loads(capsys.readouterr().out.splitlines()[-1])["median_s"]
    assert isinstance(median, float) and median >= 0.0


def test_count_fastpaths_attributes_each_dump_to_its_call(monkeypatch, tmp_path):
    """count_fastpaths reads callgrind's dumps in part order: part 1 (the switch-on) is dropped and the rest go to
    the contenders in turn, round after round. valgrind is replaced by a writer of synthetic dumps."""
    import subprocess
    import types

    from benchmarks import count_fastpaths

    events = "Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw"

    def fake_run(cmd, **kwargs):
        if cmd[0] != "valgrind":  # the native pre-import
            return subprocess.CompletedProcess(cmd, 0)
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--callgrind-out-file="))
        calls = int(cmd[cmd.index("--calls") + 1])
        for part in range(1, 2 + calls * len(count_fastpaths.NAMES)):  # part p: Ir = p, one miss of each kind
            with open(f"{out}.{part}", "w") as fh:
                fh.write(f"part: {part}\nevents: {events}\nsummary: {part}\ntotals: {part} 0 0 1 1 1 1 1 1\n")
        return subprocess.CompletedProcess(cmd, 0)

    fake = types.SimpleNamespace(run=fake_run, DEVNULL=subprocess.DEVNULL)
    monkeypatch.setattr(count_fastpaths, "subprocess", fake)  # this module's view only: others keep subprocess
    monkeypatch.setattr(count_fastpaths, "shutil", types.SimpleNamespace(which=lambda name: "/usr/bin/" + name))
    rows = count_fastpaths.main(["--B", "4", "--calls", "2", "--out", str(tmp_path / "c.json")])
    irs = {r["contender"]: [c["Ir"] for c in r["calls"]] for r in rows}
    assert irs == {"epilogue": [2, 5], "no-inplace": [3, 6], "batched": [4, 7]}
    first = next(r for r in rows if r["contender"] == "batched")["calls"][0]
    assert (first["L1m"], first["LLm"], first["est"]) == (3, 3, 4 + 10 * 3 + 100 * 3)
    assert next(r for r in rows if r["contender"] == "no-inplace")["ratio"]["Ir"] == 3 / 2


def test_rotated_starts_each_round_one_contender_later():
    """Round r of a rotated order starts at contender r mod n (what `interleaved(rotate=True)` and
    `bench_fastpaths --isolated` run)."""
    from benchmarks.common import rotated

    assert [rotated("abc", r) for r in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert rotated([], 3) == []


def test_gpu_script_dry_run(tmp_path):
    """``benchmarks/gpu.sh --dry-run`` runs every step of the GPU run on the CPU at tiny sizes: the self-check, the
    GPU tests, the layer benchmarks in bf16 and fp32, SMoPE and the ViT, each recorded with its exit status."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--dry-run", str(tmp_path)], cwd=root, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + "".join((tmp_path / f).read_text()[-2000:] for f in os.listdir(tmp_path))
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    names = ["selfcheck", "test_gpu", "attention_bfloat16", "attention_float32"]
    names += ["smope_merge", "vit_merge", "smope_auto", "vit_auto"]
    assert [s[0] for s in steps] == names and all(s[1] == "0" for s in steps)
    info = json.loads((tmp_path / "selfcheck.json").read_text())
    assert info["results"] and all(r["ok"] for r in info["results"])
    for dtype in ("bfloat16", "float32"):
        rows = json.loads((tmp_path / f"attention_{dtype}.json").read_text())["results"]
        assert {r["contender"] for r in rows} == {"naive", "merge", "sdpa", "auto", "floor", "timm"}
        assert "merge/floor" in (tmp_path / f"tables_{dtype}.md").read_text()
    assert "passed" in (tmp_path / "test_gpu.log").read_text()
    vit = json.loads((tmp_path / "vit_merge.json").read_text())
    assert vit["args"]["backend"] == "merge" and vit["train"]["median_ms"]["patched"] > 0


def test_gpu_script_records_failures(tmp_path):
    """A step that fails is recorded with its exit status, the others still run, and the script exits 1."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHON="false")
    res = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", str(tmp_path)], cwd=root, env=env)
    assert res.returncode == 1
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert len(steps) == 8 and all(s[1] == "1" for s in steps)


# A stand-in for the authors' SMoPE package with their interface (models.zoo.OnePrompt: one (1, D) Parameter per
# layer, expert and head, e_pk_{layer}_{expert}_{head} / e_pv_..., forward(x_querry, l, x_block, train, task_id) ->
# ([Ek, Ev, eps_decay], loss, x_block); models.vit.Attention(dim, num_heads, qkv_bias) with qkv, proj and
# forward(x, prompt=, topk=, train=, reduce_query=) -> (out, (scores, routing scores))), written here from the
# SMoPE equations: route by the mean query, the top K experts' row-constant logits scale * mean(q) . key, one
# softmax over [logits, scale * q k^T]. SCALE_FACTOR 1 computes what norga's SMoPE computes; another value does not.
STAND_IN_ZOO = """
import torch
from torch import nn


class OnePrompt(nn.Module):
    def __init__(self, emb_d, n_tasks, prompt_param, key_dim=768, num_heads=12):
        super().__init__()
        self.num_experts, self.topk, self.num_heads = int(prompt_param[0]) // 2, int(prompt_param[1]), num_heads
        for layer in range(2):
            for e in range(self.num_experts):
                for h in range(num_heads):
                    setattr(self, f"e_pk_{layer}_{e}_{h}", nn.Parameter(torch.rand(1, key_dim // num_heads)))
                    setattr(self, f"e_pv_{layer}_{e}_{h}", nn.Parameter(torch.rand(1, key_dim // num_heads)))

    def forward(self, x_querry, l, x_block, train=False, task_id=None):
        def stack(kind):
            rows = [[getattr(self, f"e_{kind}_{l}_{e}_{h}")[0] for e in range(self.num_experts)]
                    for h in range(self.num_heads)]
            return torch.stack([torch.stack(r) for r in rows]).expand(x_block.shape[0], -1, -1, -1)

        return [stack("pk"), stack("pv"), torch.zeros(self.num_heads, self.num_experts)], 0.0, x_block
"""
STAND_IN_VIT = """
import torch
from torch import nn

SCALE_FACTOR = {factor}


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5 * SCALE_FACTOR
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=qkv_bias), nn.Linear(dim, dim)

    def forward(self, x, register_hook=False, prompt=None, topk=-1, train=False, reduce_query=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        ek, ev, _ = prompt
        score = q.mean(dim=2, keepdim=True) @ ek.transpose(-2, -1)  # (B, H, 1, E)
        idx = score.topk(topk, dim=-1).indices
        pv = torch.gather(ev, 2, idx.squeeze(2).unsqueeze(-1).expand(-1, -1, -1, ev.shape[-1]))
        logits = (score.gather(-1, idx) * self.scale).expand(-1, -1, N, -1)
        attn = torch.cat([logits, (q @ k.transpose(-2, -1)) * self.scale], dim=-1).softmax(dim=-1)
        out = (attn @ torch.cat([pv, v], dim=2)).transpose(1, 2).reshape(B, N, C)
        return self.proj(out), (score, score)
"""


def _stand_in(root, factor):
    pkg = root / "models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import vit, zoo\n")
    (pkg / "zoo.py").write_text(STAND_IN_ZOO)
    (pkg / "vit.py").write_text(STAND_IN_VIT.format(factor=factor))
    return str(root)


def test_bench_smope_times_the_authors_layer_after_checking_it(tmp_path):
    """`bench_smope.py --authors PATH` imports the authors' OnePrompt and Attention from PATH (here the stand-in),
    copies their experts and projections into norga's SMoPE, checks both select the same experts and that each
    stage of each is within tests/tolerance.py's bounds of the float64 equations (eval and training mode), then
    times every contender in both modes."""
    from benchmarks.bench_smope import main as smope_main

    args = ["--B", "2", "--N", "9", "--repeats", "1", "--warmup", "0", "--authors", _stand_in(tmp_path, 1)]
    payload = smope_main([*args, "--out", str(tmp_path / "s.json")])
    assert [c["B"] for c in payload["checks"]] == [2] and payload["checks"][0]["max_abs_diff"] > 0
    got = {(r["mode"], r["contender"]) for r in payload["results"]}
    names = ("norga_smope", "norga_smope_again", "authors", "pool", "none")
    assert got == {(m, c) for m in ("fwd", "fwdbwd") for c in names}
    assert all(r["vs_authors"] == 1.0 for r in payload["results"] if r["contender"] == "authors")


def test_bench_smope_refuses_an_authors_layer_that_computes_otherwise(tmp_path):
    """The check can fail: a stand-in whose scale is 1 % off is beyond the attention stage's rounding bound."""
    from benchmarks.bench_smope import main as smope_main

    with pytest.raises(AssertionError, match="the authors' layer .training=False.: attention"):
        smope_main(["--B", "2", "--N", "9", "--repeats", "1", "--authors", _stand_in(tmp_path, 1.01)])


def test_bench_smope_names_a_wrong_checkout(tmp_path):
    from benchmarks.bench_smope import main as smope_main

    with pytest.raises(FileNotFoundError, match="no models/__init__.py"):
        smope_main(["--B", "1", "--N", "4", "--repeats", "1", "--authors", str(tmp_path)])


def test_contended_runs_busy_processes_and_ends_them(monkeypatch):
    """`--contend P` times beside P busy processes: running inside the block, ended on leaving it."""
    import subprocess

    from benchmarks import common

    started, real_popen = [], subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(common.subprocess, "Popen", popen)
    with common.contended(2):
        assert len(started) == 2 and all(p.poll() is None for p in started)
    assert all(p.poll() is not None for p in started)
    with pytest.raises(KeyError), common.contended(1):
        raise KeyError("a failing benchmark")
    assert len(started) == 3 and started[-1].poll() is not None
