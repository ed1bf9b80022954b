"""`training_state` and `load_training_state`: everything of norga's that resuming training needs, as one dict.

A prompt file ([`save_prompts`][norga.checkpoint.save_prompts]) holds what a trained model computes with. To
resume *training* exactly, more is needed: which parameters train (a gate frozen after the first task), a
pool's active task, its frozen tasks and their snapshot, SMoPE's phase, and the state any other norga module
keeps outside its tensors. A module offers that through the optional training-state protocol:

- `module.training_state() -> dict`: its state, of tensors, numbers, strings, lists and dicts only;
- `module.check_training_state(state)`: raise `ValueError` / `TypeError` if `state` does not fit, changing nothing;
- `module.load_training_state(state)`: check, then restore it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .metadata import metadata, model_name, norga_keys, prompt_state_dict, unwrap_model, validate_metadata
from .prompts import LoadResult, check_fit, copy_into

__all__ = ["STATE_FORMAT", "STATE_FORMAT_VERSION", "load_training_state", "training_state"]

#: The value of the `format` field of a training state.
STATE_FORMAT = "norga.training_state"
#: Version of the training state's layout.
STATE_FORMAT_VERSION = 1
_KEYS = ("format", "format_version", "metadata", "tensors", "requires_grad", "modules")


def _stateful(model: nn.Module, prefixes: list[str]) -> dict[str, Any]:
    """The norga modules of `model` (under `prefixes`) that offer the training-state protocol, by path."""
    return {
        name: m
        for name, m in model.named_modules()
        if callable(getattr(m, "training_state", None)) and any((name + ".").startswith(p) for p in prefixes)
    }


def training_state(model: nn.Module, *, include_head: bool = True) -> dict[str, Any]:
    """All of norga's training state of `model`, to save next to the optimizer's and scheduler's.

    What it holds: the tensors [`save_prompts`][norga.checkpoint.save_prompts] stores (prompts, gates, SMoPE
    buffers and, with `include_head`, the classifier), which of them train (`requires_grad`: a gate frozen by
    [`freeze_gates`][norga.gates.freeze_gates]), each norga module's state outside its tensors (a pool's active
    task, `frozen_before` and the snapshot of its frozen tasks; SMoPE's dense phase; ...), and the metadata of a
    prompt file. Tensors are copies on the CPU; everything else is numbers, strings, lists and dicts, so the dict
    saves with `torch.save` and loads with `torch.load(..., weights_only=True)`:

    ```python
    torch.save({"norga": norga.training_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch}, "resume.pt")
    ```

    The backbone is not included (it does not train); neither are the optimizer, the scheduler, the data order,
    random number generators or a `protect` hook, which belong to the training loop (see
    [`load_training_state`][norga.checkpoint.load_training_state]).

    Raises:
        ValueError: the model is not patched, or `include_head` and it has no classifier.
    """
    inner = unwrap_model(model)
    tensors = prompt_state_dict(inner, include_head=include_head)
    prefixes, head_name = norga_keys(inner, include_head)
    params = dict(inner.named_parameters())
    return {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "metadata": metadata(inner, tensors, head_name, model_name(inner)),
        "tensors": {k: v.to("cpu", copy=True) for k, v in tensors.items()},
        "requires_grad": {k: bool(params[k].requires_grad) for k in tensors if k in params},
        "modules": {name: m.training_state() for name, m in _stateful(inner, prefixes).items()},
    }


def _checked(state: object) -> dict[str, Any]:
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be the dict norga.training_state returned, got {type(state).__name__}")
    if state.get("format") != STATE_FORMAT or state.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(
            f"state is not a norga training state of version {STATE_FORMAT_VERSION} (format "
            f"{state.get('format')!r}, version {state.get('format_version')!r}); make one with norga.training_state"
        )
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise ValueError(f"damaged training state: no field(s) {missing}")
    tensors, grads, modules = state["tensors"], state["requires_grad"], state["modules"]
    if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError("damaged training state: 'tensors' must map keys to tensors")
    if not isinstance(grads, Mapping) or not all(isinstance(v, bool) for v in grads.values()):
        raise ValueError("damaged training state: 'requires_grad' must map keys to bools")
    if not isinstance(modules, Mapping):
        raise ValueError("damaged training state: 'modules' must map module paths to their states")
    validate_metadata(state["metadata"], "the training state")
    return dict(state)


def load_training_state(model: nn.Module, state: Mapping[str, Any]) -> LoadResult:
    """Restore what [`training_state`][norga.checkpoint.training_state] returned, all or nothing.

    Everything is checked first, as [`load_prompts`][norga.checkpoint.load_prompts] checks a file (strictly:
    layers, kinds, settings, every tensor's presence, shape and dtype), and every module's state; a call that
    raises changes nothing. Then the tensors are copied in place (parameters keep their identity), their
    `requires_grad` and the modules' states are restored. To resume exactly, the training loop then does what
    belongs to it:

    ```python
    ckpt = torch.load("resume.pt", weights_only=True)
    norga.load_training_state(model, ckpt["norga"])   # the model patched as before, backbone loaded
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)  # same order
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    pool.protect(optimizer)                            # hooks belong to the new optimizer
    ```

    Args:
        model: The model, patched exactly as when the state was taken (or a DDP / `torch.compile` wrapper).
        state: The dict [`training_state`][norga.checkpoint.training_state] returned (e.g. from `torch.load`).

    Returns:
        A [`LoadResult`][norga.checkpoint.LoadResult] (no missing or unexpected keys: loading is strict).

    Raises:
        TypeError: `state` is not such a dict.
        ValueError: it does not fit the model (one message listing every difference), or a module's state is
            damaged.
    """
    checked = _checked(state)
    inner = unwrap_model(model)
    saved = checked["metadata"]
    given = checked["modules"]
    restored = frozenset(k for s in given.values() if isinstance(s, Mapping) for k in s)  # e.g. SMoPE's dense
    targets, _, _, _ = check_fit(inner, saved, checked["tensors"], True, "the training state", restored)
    prefixes, _ = norga_keys(inner, saved.get("head") is not None)
    modules = _stateful(inner, prefixes)
    if set(modules) != set(given):
        raise ValueError(
            f"the training state has module states for {sorted(given)}, this model has stateful norga modules "
            f"{sorted(modules)}"
        )
    params = dict(inner.named_parameters())
    grads = checked["requires_grad"]
    if set(grads) != {k for k in targets if k in params}:
        raise ValueError(
            f"the training state's requires_grad covers {sorted(grads)}, this model's norga parameters are "
            f"{sorted(k for k in targets if k in params)}"
        )
    for name, module in modules.items():
        try:
            module.check_training_state(given[name])
        except (TypeError, ValueError) as e:
            raise type(e)(f"the training state of {name} ({type(module).__name__}): {e}") from e
    copy_into(inner, targets, checked["tensors"])
    for name, module in modules.items():
        module.load_training_state(given[name])
    for key, flag in grads.items():
        params[key].requires_grad_(flag)
    return LoadResult(sorted(targets), [], [], saved)
