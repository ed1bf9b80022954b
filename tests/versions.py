"""Skips for what the installed torch or timm cannot have, each naming the release that has it (DEVELOPERS.md: a
skip only for a feature the installed version cannot have; docs/compat.md lists them).

The library's own features that need a newer torch are `norga._compat.NEEDS` (the library raises a clear error or
falls back there); `TEST_NEEDS` holds what only the tests use of torch. `NORGA_TEST_NO_VERSION_SKIPS=1` runs the
tests of `TEST_NEEDS` on an older torch anyway, to see what fails there (docs/compat.md).
"""

from __future__ import annotations

import os

import pytest
import timm
import torch

from norga._compat import NEEDS, TORCH

__all__ = ["LIFTED", "TEST_NEEDS", "TORCH", "TORCH_OWN_DEPRECATIONS", "has", "needs", "needs_timm"]

#: NORGA_TEST_NO_VERSION_SKIPS=1: the tests of TEST_NEEDS run whatever the torch (module docstring)
LIFTED = os.environ.get("NORGA_TEST_NO_VERSION_SKIPS") == "1"

#: what each feature of `NEEDS` is, in a skip's reason
WHAT = {
    "export": "export-aware backend selection (torch.compiler.is_exporting)",
    "compile_messages": "norga's messages from inside torch.compile(fullgraph=True)",
    "flex": "backend 'flex' (FlexAttention compiling norga's score_mod)",
}

#: what only the tests use -> (the first torch release that has it, what it is)
TEST_NEEDS: dict[str, tuple[tuple[int, int], str]] = {
    "fx": ((2, 9), "torch.fx tracing of timm's models (before, timm's is_causal reaches SDPA as a Proxy)"),
    "fx_query": ((2, 7), "torch.fx tracing through the query pass (a forward pre-hook that calls the model)"),
    "fsdp2": ((2, 9), "FSDP2 with replicated gates (fully_shard's ignored_params) as DDP computes them"),
    "fake_cuda": ((2, 10), "fake CUDA tensors that require grad on a machine without a CUDA driver"),
    "flex_reference": ((2, 14), "FlexAttention's reference implementation differentiating a score_mod's tensors"),
}


#: DeprecationWarnings that torch's own code raises on some releases, not the caller's: Dynamo of torch 2.12 and
#: 2.13 instantiates an autograd Function when it traces `Function.apply` (merge under torch.compile)
TORCH_OWN_DEPRECATIONS = [r".* should not be instantiated\. Methods on autograd functions are all static"]
if not (2, 12) <= TORCH < (2, 14):
    TORCH_OWN_DEPRECATIONS = []


def _release(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def _need(feature: str) -> tuple[tuple[int, int], str]:
    return (NEEDS[feature], WHAT[feature]) if feature in NEEDS else TEST_NEEDS[feature]


def has(feature: str) -> bool:
    """Whether the installed torch has `feature` (a key of `NEEDS` or `TEST_NEEDS`)."""
    return TORCH >= _need(feature)[0]


def needs(feature: str) -> pytest.MarkDecorator:
    """Skip unless the installed torch has `feature` (a key of `NEEDS` or `TEST_NEEDS`)."""
    version, what = _need(feature)
    reason = f"{what} needs torch >= {_release(version)}, this is torch {torch.__version__}"
    return pytest.mark.skipif(TORCH < version and not (LIFTED and feature in TEST_NEEDS), reason=reason)


def needs_timm(version: tuple[int, int, int], what: str) -> pytest.MarkDecorator:
    """Skip unless the installed timm is at least `version`."""
    have = tuple(int(p) for p in timm.__version__.split("+")[0].split(".")[:3] if p.isdigit())
    release = ".".join(map(str, version))
    return pytest.mark.skipif(have < version, reason=f"{what} needs timm >= {release}, this is timm {timm.__version__}")
