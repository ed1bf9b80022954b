"""The short examples run end to end on a CPU: examples/train.py (every method, on its random stream) and
examples/demo.py. Nothing is downloaded: both build their models with `pretrained=False`."""

from __future__ import annotations

import sys

import demo
import pytest
import train


@pytest.mark.parametrize("method", ["prefix", "norga", "smope"])
def test_train_example_runs(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    accs = train.main(["--method", method, "--data", "random", "--epochs", "1", "--img-size", "32"])
    assert len(accs) == 2 and all(0.0 <= a <= 100.0 for a in accs)
    assert capsys.readouterr().out.startswith(f"{method}: accuracy per task")


def test_demo_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["demo.py", "--steps", "2", "--img-size", "32"])
    demo.main()
    out = capsys.readouterr().out
    assert "patched 5 layers" in out and "trained" in out and "learned gate alphas" in out
