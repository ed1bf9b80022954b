"""Checkpoints of the CODA-Prompt codebase: L2P++, DualPrompt, CODA-Prompt and VQ-Prompt (layout in `norga.migrate`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._checks import check_float_tensor, check_int
from ..patch import patch_vit
from ..prompts import L2P, CODAPrompt, DualPrompt, QueryPrompt, VQPrompt
from .common import Checkpoint, authors_state_dict, checked_head, copy_head

__all__ = ["CODA_METHODS", "coda_prompt_tensors", "load_coda_checkpoint"]

#: The `method` names of `load_coda_checkpoint` and the tensors each has per layer (`g_p` on DualPrompt's G-layers).
CODA_METHODS: dict[str, tuple[str, ...]] = {
    "l2p": ("e_p", "e_k"),
    "dual": ("e_p", "e_k", "g_p"),
    "coda": ("e_p", "e_k", "e_a"),
    "vq": ("e_p", "e_k"),
}
_KEY = re.compile(r"^(?P<prefix>.*?)(?P<kind>e_p|e_k|e_a|g_p)_(?P<layer>\d+)$")
_OPTIONS = {
    "l2p": {"top_k", "pull"},
    "dual": set(),
    "coda": {"ortho_mu"},
    "vq": {"temperature", "vq_coef", "commit_coef"},
}


def coda_prompt_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    """The prompt tensors of a `ViTZoo` state dict by kind (`e_p`, `e_k`, `e_a`, `g_p`) and layer.

    Raises:
        ValueError: no prompt tensors, or tensors under several prefixes.
    """
    found: dict[str, dict[int, torch.Tensor]] = {}
    prefixes = set()
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None:
            continue
        prefixes.add(m["prefix"])
        found.setdefault(m["kind"], {})[int(m["layer"])] = check_float_tensor(key, value)
    if not found:
        raise ValueError(
            "not a CODA-Prompt codebase checkpoint: no prompt.e_p_<layer> / e_k / e_a / g_p keys (found e.g. "
            f"{sorted(state)[:5]})"
        )
    if len(prefixes) > 1:
        raise ValueError(f"prompt tensors under several prefixes {sorted(prefixes)}")
    return found


def _shape_of(found: dict[str, dict[int, torch.Tensor]], kind: str, rank: int) -> tuple[int, ...]:
    shapes = {tuple(t.shape) for t in found[kind].values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != rank:
        raise ValueError(f"the {kind}_<layer> tensors must share one shape of {rank} dimensions, got {sorted(shapes)}")
    return shapes.pop()


def _build(
    method: str, found: dict[str, dict[int, torch.Tensor]], num_tasks: int, options: dict[str, Any]
) -> QueryPrompt:
    """The norga module for `method` shaped like the checkpoint, its tensors copied in (the RNG untouched)."""
    wanted = CODA_METHODS[method]
    kinds = set(found)
    if kinds != set(wanted) and not (method == "dual" and kinds == {"e_p", "e_k"}):
        guess = [m for m, k in CODA_METHODS.items() if set(k) == kinds]
        raise ValueError(
            f"method={method!r} expects the tensors {list(wanted)} per layer, the checkpoint has {sorted(kinds)}"
            + (f" (a checkpoint of method={guess[0]!r}?)" if guess else "")
        )
    e_layers = sorted(found["e_p"])
    if sorted(found["e_k"]) != e_layers or ("e_a" in found and sorted(found["e_a"]) != e_layers):
        raise ValueError(
            f"the checkpoint's prompts, keys and attention vectors are on different layers: "
            f"{ {k: sorted(v) for k, v in found.items()} }"
        )
    pool, length, dim = _shape_of(found, "e_p", 3)
    key_pool, key_dim = _shape_of(found, "e_k", 2)
    if key_pool != pool or ("e_a" in found and _shape_of(found, "e_a", 2) != (pool, key_dim)):
        raise ValueError(f"the keys ({key_pool}) and prompts ({pool}) of the checkpoint differ in pool size")
    unknown = set(options) - _OPTIONS[method]
    if unknown:
        raise TypeError(
            f"load_coda_checkpoint(method={method!r}) takes the options {sorted(_OPTIONS[method])}, got "
            f"{sorted(unknown)}"
        )
    common: dict[str, Any] = {"pool_size": pool, "key_dim": key_dim}
    with torch.random.fork_rng(devices=[]):  # building draws initial values that the checkpoint replaces
        if method == "l2p":
            module: QueryPrompt = L2P(num_tasks, dim, length=length, layers=e_layers, **common, **options)
        elif method == "coda":
            module = CODAPrompt(num_tasks, dim, length=length, layers=e_layers, **common, **options)
        elif method == "vq":
            module = VQPrompt(num_tasks, dim, length=length, layers=e_layers, **common, **options)
        else:
            g = found.get("g_p", {})
            g_shape = _shape_of(found, "g_p", 2) if g else (2, dim)
            module = DualPrompt(
                num_tasks, dim, e_length=length, g_length=g_shape[0], g_layers=sorted(g), e_layers=e_layers, **common
            )
    targets = {
        "e_p": "e_prompts" if method == "dual" else "prompts",
        "e_k": "e_keys" if method == "dual" else "keys",
        "e_a": "attention",
        "g_p": "g_prompts",
    }
    with torch.no_grad():
        for kind, by_layer in found.items():
            param = getattr(module, targets[kind])
            for i, layer in enumerate(sorted(by_layer)):
                param[i].copy_(by_layer[layer])
    return module


def load_coda_checkpoint(
    model: nn.Module,
    checkpoint: Checkpoint,
    method: str,
    *,
    num_tasks: int,
    task: int = 0,
    include_head: bool = True,
    backend: str = "auto",
    **options: Any,
) -> nn.Module:
    """Patch a timm ViT with the prompts of a checkpoint of the CODA-Prompt codebase (`ViTZoo.state_dict()`).

    The CODA-Prompt repository (GT-RIPL/CODA-Prompt) and the SMoPE repository save their learner's model as
    `{feat.*: backbone, prompt.e_p_<l>, prompt.e_k_<l>, prompt.e_a_<l>, prompt.g_p_<l>: prompts, last.*: head}`.
    This builds the matching norga module on the checkpoint's layers (the `<l>` are block indices), copies the
    prompts in, patches `model` with it and copies `last` into `model.get_classifier()`. The backbone (`feat`)
    is not read: load the pretrained timm weights the authors used first.

    Args:
        model: An unpatched timm ViT of the checkpoint's width (and head size with `include_head`).
        checkpoint: A path (read with `torch.load(weights_only=True)`) or the loaded state dict.
        method: `"l2p"` ([`L2P`][norga.prompts.L2P]), `"dual"` ([`DualPrompt`][norga.prompts.DualPrompt]),
            `"coda"` ([`CODAPrompt`][norga.prompts.CODAPrompt]) or `"vq"` ([`VQPrompt`][norga.prompts.VQPrompt]).
        num_tasks: The run's number of tasks (their `n_tasks`; CODA-Prompt splits its components by it).
        task: The task the checkpoint was saved at (their `task_count`, a plain attribute they do not save):
            the active task, and for CODA-Prompt the tasks whose components exist (`started = task + 1`).
        include_head: Also copy `last.weight` / `last.bias` into the model's classifier.
        backend: Prefix-attention backend of the patched layers.
        **options: What their `prompt_param` carries that the file cannot tell: `top_k` and `pull` for `"l2p"`,
            `ortho_mu` for `"coda"`, `temperature`, `vq_coef`, `commit_coef` for `"vq"` (defaults: the authors').

    Returns:
        `model`, patched in place, its module at `model.prompt_pool`.

    Raises:
        ValueError: not such a checkpoint, tensors of another method, inconsistent shapes, a model of another
            width, head or number of features, or a `task` out of range. Nothing changes then.
        TypeError: an option the method does not take.
    """
    if method not in CODA_METHODS:
        raise ValueError(f"method must be one of {sorted(CODA_METHODS)}, got {method!r}")
    check_int("num_tasks", num_tasks, 1)
    state = authors_state_dict(checkpoint)
    module = _build(method, coda_prompt_tensors(state), num_tasks, options)
    task = module.check_task(task)
    head = checked_head(model, state, ["last", "head"]) if include_head else None
    patch_vit(model, prompt=module, backend=backend)  # checks all, then changes the model
    module.task = task
    if isinstance(module, CODAPrompt):
        module.started = task + 1
    if head is not None:
        copy_head(*head)
    return model
