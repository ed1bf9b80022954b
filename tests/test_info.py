"""The self-check (``python -m norga.info``) on CPU: it runs every backend against its float64 reference, reports
versions, timings and every configuration, exits 0 when all agree and 1 on a mismatch. Its reference is checked
against ``tests/reference.py``."""

import json
import subprocess
import sys

import reference as ref
import torch
from tolerance import attention_tol

import norga.info.check as check
from norga.functional import available_backends
from norga.info import main, self_check
from norga.info.bounds import reference


def test_self_check_cli_runs_every_backend_on_cpu(tmp_path):
    out = tmp_path / "info.json"
    args = ["--device", "cpu", "--quick", "--repeats", "1", "--dtypes", "float32", "--json", str(out)]
    res = subprocess.run([sys.executable, "-m", "norga.info", *args], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    checks = 2 * len(available_backends("cpu"))  # with and without a token bias: 8 where flex is available
    for word in ("norga=", "torch=", "timm=", "device=cpu", f"{checks} of {checks} checks passed"):
        assert word in res.stdout
    payload = json.loads(out.read_text())
    assert payload["versions"]["torch"] == torch.__version__
    rows = payload["results"]
    assert {(r["backend"], r["bias"]) for r in rows} == {(b, x) for b in available_backends("cpu") for x in (0, 1)}
    for r in rows:
        assert r["ok"] and 0 <= r["worst"] <= 1 and r["fwd_ms"] > 0 and r["floor_fwdbwd_ms"] > 0
        assert r["gradients"] == (r["backend"] != "flex")  # PyTorch has no CPU FlexAttention backward
        assert (r["fwdbwd_ms"] is None) == (r["backend"] == "flex")


def test_self_check_low_precision_and_gradients():
    results = self_check("cpu", backends=["math", "merge", "sdpa"], dtypes=["bfloat16", "float16"], timing=False)
    assert len(results) == 12
    assert all(r.ok and r.gradients and r.worst_of for r in results), [r for r in results if not r.ok]


def test_self_check_reports_a_mismatch_and_an_error(monkeypatch, capsys):
    """A backend whose output is off by 1e-3 fails its bound, one that raises is reported; the exit status is 1."""
    run = check.prefix_attention

    def wrong(q, k, v, prefix, *, backend, **kw):
        if backend == "sdpa":
            raise RuntimeError("no kernel")
        out = run(q, k, v, prefix, backend=backend, **kw)
        return out + 1e-3 if backend == "merge" else out

    monkeypatch.setattr(check, "prefix_attention", wrong)
    assert main(["--device", "cpu", "--backends", "math", "merge", "sdpa", "--dtypes", "float32", "--no-timing"]) == 1
    printed = capsys.readouterr().out
    assert printed.count("| ok |") == 2 and printed.count("MISMATCH") == 2
    assert printed.count("ERROR RuntimeError: no kernel") == 2 and "2 of 6 checks passed; FAILED" in printed


def test_self_check_reference_is_the_equations():
    """The library's float64 reference against the test suite's (tests/reference.py), which it must equal to
    float64 rounding: both sum the same terms."""
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(2, 3, 4, 8, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    alpha, tau = torch.tensor(0.8, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    got = reference(q, k, v, pk, pv, alpha, tau, bias, 8**-0.5)
    want = ref.prefix_attention(
        q,
        k,
        v,
        pk,
        pv,
        scale=8**-0.5,
        gate=lambda s: ref.norga_gate(s, "tanh", 0.8, 1.3),
        bias=bias.expand(2, -1, -1, -1),
    )
    # two float64 evaluations of the same equations, each within tolerance.attention_tol in float64
    args = {"act": "tanh", "alpha": 0.8, "tau": 1.3, "bias": bias.expand(2, -1, -1, -1), "dtype": torch.float64}
    torch.testing.assert_close(got, want, rtol=0, atol=2 * attention_tol(q, k, v, pk, pv, scale=8**-0.5, **args))


def test_versions_and_timing_on_cuda_name_the_gpu(monkeypatch):
    """On CUDA the versions name the GPU, its compute capability and CUDA's version, and the timer synchronises the
    device around each call (CUDA's functions stubbed: no GPU here)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    info = check.versions("cuda")
    assert info["gpu"] == "a GPU" and info["capability"] == "9.0" and info["cuda"] == torch.version.cuda
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    calls = []
    assert check._median_ms(lambda: calls.append(1), torch.device("cuda"), 3) >= 0
    assert len(calls) == 4 and len(synced) == 6  # a warm-up, then 3 timed calls between two synchronisations


def test_bounds_grow_with_tf32_and_the_input_dtype():
    """TF32's operand rounding and a lower input dtype can only widen the bounds, everywhere."""
    from norga.info.bounds import error_bounds

    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(2, 3, 4, 8, dtype=torch.float64) for _ in range(2))
    args = (q, k, v, pk, pv, 0.8, 1.3, torch.randn(1, 3, 9, 9, dtype=torch.float64), 8**-0.5, torch.randn_like(q))
    base = error_bounds(*args, io_unit=0.0, tf32=False)
    for wider in (error_bounds(*args, io_unit=0.0, tf32=True), error_bounds(*args, io_unit=2.0**-8, tf32=False)):
        for name, bound in base.items():
            assert (wider[name] > bound).all(), name
