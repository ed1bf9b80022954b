"""What differs between the torch releases norga supports (private module): every version check, in one place.

The core (patching, the `math`, `sdpa` and `merge` backends, prompts, checkpoints, migration) runs on every
supported torch. A few features need a newer one; `NEEDS` says which release, and each either says so in a clear
`ValueError` (`require`) or, where nothing can be detected, falls back to what is safe (docs/compat.md):

- `"export"`: `torch.compiler.is_exporting` (torch 2.7), which lets `auto` pick `sdpa` under `torch.export` only.
  Before it `auto` cannot tell an export from a compilation and picks `sdpa` under both.
- `"compile_messages"`: a graph break that carries norga's error message out of `torch.compile(fullgraph=True)`
  (a `msg` from torch 2.7, one Dynamo can format from torch 2.14). Before it the graph break carries a fixed
  text naming the release (2.7-2.13) or none (2.5-2.6); the error itself is raised where the code runs eagerly.
- `"flex"`: the `flex` backend (FlexAttention), whose `score_mod` reads SMoPE's logits and the token bias by index,
  which FlexAttention compiles from torch 2.11.

It imports only torch.
"""

from __future__ import annotations

import torch

__all__ = ["NEEDS", "TORCH", "graph_break", "has", "is_exporting", "require", "version_tuple"]


def version_tuple(version: str) -> tuple[int, int]:
    """`(major, minor)` of a version string such as `"2.14.1"`, `"2.13.0+cpu"` or `"2.16.0a0+git1234"`."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


#: The installed torch's `(major, minor)`.
TORCH = version_tuple(str(torch.__version__))

#: Feature -> the first torch release `(major, minor)` that has it (module docstring).
NEEDS: dict[str, tuple[int, int]] = {"export": (2, 7), "compile_messages": (2, 14), "flex": (2, 11)}


def has(feature: str) -> bool:
    """Whether the installed torch has `feature` (a key of `NEEDS`)."""
    return TORCH >= NEEDS[feature]


def require(feature: str, what: str, instead: str) -> None:
    """A `ValueError` naming the torch release that `what` needs (and what to use `instead`), unless the installed
    torch has `feature`."""
    if not has(feature):
        major, minor = NEEDS[feature]
        raise ValueError(f"{what} needs torch >= {major}.{minor}, this is torch {torch.__version__}; {instead}")


def is_exporting() -> bool:
    """Whether `torch.export` is tracing; before torch 2.7 (no way to tell), whether anything is compiling."""
    if has("export"):
        return bool(torch.compiler.is_exporting())
    return bool(torch.compiler.is_compiling())


def graph_break(error: Exception) -> None:
    """A `torch.compile` graph break that carries `error`'s message where the installed torch can trace it."""
    if has("compile_messages"):
        torch._dynamo.graph_break(msg=f"norga: {type(error).__name__}: {error}")
    elif TORCH >= (2, 7):  # a constant: older Dynamo cannot format the exception
        torch._dynamo.graph_break(msg="norga: a check failed; its message shows eagerly, or here from torch 2.14")
    else:  # no msg before torch 2.7
        torch._dynamo.graph_break()
