"""Build a fresh virtual environment with given versions of torch, torchvision, timm and einops, install norga
(editable, with the test extra) into it, run the whole test suite and write a summary.

    python tools/compat.py --torch 2.14.1 --torchvision 0.29.1 --timm 1.0.31 --einops 0.8.2 \
        --constraints constraints.txt   # the pinned set
    python tools/compat.py --torch 2.6.0 --torchvision 0.21.0 --timm 1.0.28 --einops 0.7.0 --with "numpy<2"
    python tools/compat.py ... --dry-run                  # print the commands, run nothing
    python tools/compat.py --torch 2.4.1 ... --below-floors  # versions that norga's own ranges refuse
    python tools/compat.py ... -- -x tests/test_patch.py  # arguments after -- go to pytest instead of the suite's

Run it from anywhere with any Python 3.9+ (3.11+ for `--below-floors`, which reads pyproject.toml with tomllib;
the venv is made with that interpreter, `--python` picks another).
OUT (`--out`, default `compat_results/torch-<torch>_timm-<timm>`) receives `pip.log`, `freeze.txt`,
`pytest.log`, `junit.xml`, `summary.json` and `summary.md` (the versions installed, the counts, the failed
tests). The venv is `OUT/venv` unless `--venv` names one, and is deleted at the end unless `--keep-venv`.
Exit status: pytest's (0: the suite passed), or 2 if the install failed.

pip reads its usual configuration; a machine-wide constraint file that caps torch (as on the development
machines, /etc/xdg/pip) is lifted for this one command with `PIP_CONSTRAINT=/dev/null`. Nothing here is a test:
`tests/test_compat_tool.py` checks the commands (`--dry-run`) and the summary on a small JUnit file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "timm", "einops")
REPORTED = PACKAGES + ("numpy", "pytest", "hypothesis", "onnx", "onnxruntime", "matplotlib")


def parse_args(argv: list[str]) -> argparse.Namespace:
    pytest_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, pytest_args = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    for name in PACKAGES:
        p.add_argument(f"--{name}", required=True, help=f"{name} version (exact, as pip's ==)")
    p.add_argument("--with", dest="extra", action="append", default=[], help="a further requirement (repeatable)")
    p.add_argument("--constraints", type=Path, help="a pip constraints file for everything else (constraints.txt)")
    p.add_argument("--out", type=Path, help="folder for the logs and the summary")
    p.add_argument("--venv", type=Path, help="where to build the venv (default OUT/venv; replaced if it exists)")
    p.add_argument("--keep-venv", action="store_true", help="keep the venv afterwards")
    p.add_argument("--python", default=sys.executable, help="interpreter the venv is made with")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds the suite may run (default 4 h)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument(
        "--below-floors",
        action="store_true",
        help="install versions below norga's published floors: norga with --no-deps after the versions and the\n"
        "test extra's requirements (pyproject.toml), to see what fails there",
    )
    args = p.parse_args(argv)
    args.pytest_args = pytest_args
    if args.out is None:
        args.out = ROOT / "compat_results" / f"torch-{args.torch}_timm-{args.timm}"
    if args.venv is None:
        args.venv = args.out / "venv"
    return args


def test_requirements() -> list[str]:
    """The test extra's requirements, from pyproject.toml (Python 3.11's tomllib)."""
    import tomllib

    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"])


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The commands: make the venv, install the versions and norga[test], run the suite."""
    py = str(args.venv / "bin" / "python")
    pins = [f"{name}=={getattr(args, name)}" for name in PACKAGES]
    junit = str(args.out / "junit.xml")
    pip = [py, "-m", "pip", "install"] + (["-c", str(args.constraints.resolve())] if args.constraints else [])
    cmds = {"venv": [args.python, "-m", "venv", str(args.venv)]}
    if args.below_floors:
        cmds["install"] = [*pip, *pins, *args.extra, *test_requirements()]
        cmds["install_norga"] = [*pip, "--no-deps", "-e", str(ROOT)]
    else:
        # one resolver run: torch, torchvision and timm are chosen together, norga's own ranges apply too
        cmds["install"] = [*pip, *pins, *args.extra, "-e", f"{ROOT}[test]"]
    cmds["test"] = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args.pytest_args]
    return cmds


def summarize(junit: Path) -> dict[str, object]:
    """Counts (passed, failed, errors, skipped) and the ids of failed tests from a pytest JUnit file (all 0 if pytest
    wrote none)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    skipped: dict[str, int] = {}
    cases = ET.parse(junit).getroot().iter("testcase") if junit.exists() else iter(())
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            # pytest writes an error for a failing fixture or teardown, a failure for the test itself
            counts["failed" if "failure" in kinds else "errors"] += 1
            failed.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = next(c for c in case if c.tag == "skipped").get("message", "")
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed, "skip_reasons": skipped}


def installed(py: Path) -> dict[str, str]:
    """The versions of the packages that matter, as the venv's importlib.metadata reports them."""
    code = (
        "import json, importlib.metadata as m\n"
        "def v(n):\n"
        "    try:\n"
        "        return m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        f"print(json.dumps({{n: v(n) for n in {list(REPORTED)!r}}}))"
    )
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout
    return {k: v for k, v in json.loads(out).items() if v is not None}


def markdown(summary: dict[str, object]) -> str:
    versions = summary["versions"]
    assert isinstance(versions, dict)
    lines = [
        "| " + " | ".join(versions) + " | passed | failed | errors | skipped | seconds |",
        "|" + " --- |" * (len(versions) + 5),
        "| "
        + " | ".join(str(v) for v in versions.values())
        + f" | {summary['passed']} | {summary['failed']} | {summary['errors']} | {summary['skipped']}"
        + f" | {summary['seconds']:.0f} |",
        "",
        f"Command: `{summary['command']}`",
        "",
    ]
    if summary["failed_tests"]:
        lines += ["Failed:", ""] + [f"- `{t}`" for t in summary["failed_tests"]] + [""]  # type: ignore[union-attr]
    if summary["skip_reasons"]:
        lines += ["Skipped:", ""]
        lines += [f"- {n} × {r}" for r, n in summary["skip_reasons"].items()] + [""]  # type: ignore[union-attr]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cmds = commands(args)
    if args.dry_run:
        for name, cmd in cmds.items():
            print(f"{name}: {shlex.join(cmd)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.venv.exists():
        shutil.rmtree(args.venv)
    subprocess.run(cmds["venv"], check=True)
    with open(args.out / "pip.log", "w") as log:
        for step in [s for s in ("install", "install_norga") if s in cmds]:
            rc = subprocess.run(cmds[step], stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                print(f"install failed (exit {rc}); see {args.out / 'pip.log'}", file=sys.stderr)
                return 2
    py = args.venv / "bin" / "python"
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    (args.out / "freeze.txt").write_text(freeze)
    start = time.monotonic()
    with open(args.out / "pytest.log", "w") as log:
        try:
            rc = subprocess.run(
                cmds["test"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = time.monotonic() - start
    junit = args.out / "junit.xml"
    summary: dict[str, object] = {"versions": installed(py), "exit": rc, "seconds": seconds}
    summary["command"] = shlex.join(["python", "tools/compat.py", *argv])
    summary["threads"] = os.environ.get("OMP_NUM_THREADS")
    summary.update(summarize(junit))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    if not args.keep_venv:
        shutil.rmtree(args.venv)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
