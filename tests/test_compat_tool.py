"""tools/compat.py (the version matrix of docs/compat.md) without building a venv: its commands (``--dry-run``) and
its summary of a pytest JUnit file, so that the script cannot rot between matrix runs."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ["--torch", "2.5.0", "--torchvision", "0.20.0", "--timm", "1.0.26", "--einops", "0.7.0"]


def _tool():
    spec = importlib.util.spec_from_file_location("compat_tool", ROOT / "tools" / "compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dry_run(*args: str) -> dict[str, list[str]]:
    res = subprocess.run(
        [sys.executable, "tools/compat.py", "--dry-run", *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return {line.split(": ", 1)[0]: shlex.split(line.split(": ", 1)[1]) for line in res.stdout.splitlines()}


def test_dry_run_installs_the_versions_with_norga_and_runs_the_suite(tmp_path):
    cmds = _dry_run(*VERSIONS, "--with", "numpy<2", "--out", str(tmp_path / "out"), "--", "-x", "tests/test_gates.py")
    py = str(tmp_path / "out" / "venv" / "bin" / "python")
    assert list(cmds) == ["venv", "install", "test"]
    assert cmds["venv"][1:] == ["-m", "venv", str(tmp_path / "out" / "venv")]
    pins = ["torch==2.5.0", "torchvision==0.20.0", "timm==1.0.26", "einops==0.7.0", "numpy<2"]
    assert cmds["install"] == [py, "-m", "pip", "install", *pins, "-e", f"{ROOT}[test]"]  # one resolver run
    junit = f"--junitxml={tmp_path / 'out' / 'junit.xml'}"
    assert cmds["test"] == [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", junit, "-x", "tests/test_gates.py"]


def test_dry_run_below_the_floors_and_with_constraints(tmp_path):
    pytest.importorskip("tomllib")  # Python 3.11+
    cmds = _dry_run(*VERSIONS, "--below-floors", "--constraints", "constraints.txt", "--out", str(tmp_path))
    assert list(cmds) == ["venv", "install", "install_norga", "test"]
    assert cmds["install"][4:6] == ["-c", str(ROOT / "constraints.txt")]
    assert "pytest>=8" in cmds["install"] and not any("norga" in c or c == "-e" for c in cmds["install"])
    assert cmds["install_norga"][-3:] == ["--no-deps", "-e", str(ROOT)]


def test_summary_counts_and_names_the_failures(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad[x]"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="tests.test_b" name="test_setup"><error message="fixture"/></testcase>'
        '<testcase classname="tests.test_b" name="test_old"><skipped message="needs torch &gt;= 2.12"/></testcase>'
        '<testcase classname="tests.test_b" name="test_old2"><skipped message="needs torch &gt;= 2.12"/></testcase>'
        "</testsuite></testsuites>"
    )
    tool = _tool()
    got = tool.summarize(junit)
    assert (got["passed"], got["failed"], got["errors"], got["skipped"]) == (1, 1, 1, 2)
    assert got["failed_tests"] == ["tests.test_a::test_bad[x]", "tests.test_b::test_setup"]
    assert got["skip_reasons"] == {"needs torch >= 2.12": 2}
    summary = {"versions": {"torch": "2.5.0", "timm": "1.0.26"}, "seconds": 12.3, "command": "python tools/compat.py"}
    text = tool.markdown({**summary, **got})
    assert "| 2.5.0 | 1.0.26 | 1 | 1 | 1 | 2 | 12 |" in text and "- `tests.test_a::test_bad[x]`" in text
    assert "- 2 × needs torch >= 2.12" in text
    json.dumps({**summary, **got})  # what summary.json holds


def test_summary_of_a_run_that_wrote_no_junit_file(tmp_path):
    """pytest killed by the timeout, or failing before collection, writes no JUnit file: the counts are 0."""
    got = _tool().summarize(tmp_path / "junit.xml")
    assert got == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": [], "skip_reasons": {}}
