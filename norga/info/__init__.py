"""The self-check a user with a GPU runs first, a bug report attaches and a GPU run records: `python -m norga.info`.

It prints the norga, torch, timm and Python versions and the device, runs every backend available there against a
float64 reference (forward and gradients, each dtype, with and without a token bias) within rounding-error bounds,
times each against the floor (SDPA over `[prefix; tokens]` with no gate), and exits with status 1 on any mismatch.
[`self_check`][norga.info.check.self_check] is the same as a function.
"""

from .check import CheckResult, main, report, self_check, versions

__all__ = ["CheckResult", "main", "report", "self_check", "versions"]
