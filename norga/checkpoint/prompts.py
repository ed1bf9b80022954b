"""`save_prompts` and `load_prompts`: what norga added to a model, as one safetensors file."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .._checks import check_bool
from ..patch import patched_layers
from ..prompts import prefix_pools
from .files import PathLike, check_target, readable_file, write_atomic
from .metadata import (
    FORMAT,
    compare,
    head,
    metadata,
    norga_keys,
    parse_header,
    prompt_state_dict,
    tensor_errors,
    unwrap_model,
)
from .metadata import (
    model_name as default_model_name,
)

__all__ = ["LoadResult", "check_fit", "copy_into", "load_prompts", "read_prompt_metadata", "save_prompts"]

_META_KEY = "norga"


class LoadResult(NamedTuple):
    """What [`load_prompts`][norga.checkpoint.load_prompts] did.

    Attributes:
        loaded_keys: Keys copied into the model.
        missing_keys: norga keys of the model that the file does not have (only with `strict=False`).
        unexpected_keys: Keys of the file that the model does not have (only with `strict=False`).
        metadata: The file's metadata (see [`read_prompt_metadata`][norga.checkpoint.read_prompt_metadata]).
    """

    loaded_keys: list[str]
    missing_keys: list[str]
    unexpected_keys: list[str]
    metadata: dict[str, Any]


def save_prompts(
    model: nn.Module, path: PathLike, *, include_head: bool = False, model_name: str | None = None
) -> dict[str, Any]:
    """Save what norga added to `model` (prompts, gates, SMoPE buffers; optionally the head).

    Args:
        model: A model patched with [`patch_vit`][norga.patch.patch_vit] (or a DDP / `torch.compile` wrapper).
        path: Output file (`.safetensors` by convention).
        include_head: Also store the classifier (`model.get_classifier()`, e.g. `head.weight`).
        model_name: The model name recorded in the metadata; default: timm's `pretrained_cfg`
            architecture (`"vit_base_patch16_224"`), else the class name.

    Returns:
        The metadata written to the file's header.

    The file is written whole or not at all ([`write_atomic`][norga.checkpoint.files.write_atomic]): an existing
    file is replaced by the new content or kept, no temporary file stays behind, and the file gets the mode a
    plain `open()` would give it.

    Raises:
        ValueError: the model is not patched, or `include_head` and it has no classifier.
        TypeError: `path`, `include_head` or `model_name` has the wrong type.
        FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError: the folder of `path` does not
            exist, is not a folder or cannot be entered or written into, or `path` is a folder (the message names
            the path and the cause).
    """
    from safetensors.torch import save

    check_bool("include_head", include_head)
    if model_name is not None and not isinstance(model_name, str):
        raise TypeError(f"model_name must be a str or None, got {type(model_name).__name__}")
    check_target(path)
    inner = unwrap_model(model)
    tensors = prompt_state_dict(inner, include_head=include_head)
    _, head_name = norga_keys(inner, include_head)
    meta = metadata(inner, tensors, head_name, model_name or default_model_name(inner))
    # safetensors refuses shared or non-contiguous storage: store independent contiguous copies.
    out = {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_atomic(path, save(out, metadata={"format": FORMAT, _META_KEY: json.dumps(meta)}))
    return meta


def _read(path: PathLike) -> tuple[bytes, str]:
    p = readable_file(path)
    with open(p, "rb") as f:
        return f.read(), repr(p)


def read_prompt_metadata(path: PathLike) -> dict[str, Any]:
    """The metadata stored by [`save_prompts`][norga.checkpoint.save_prompts] in the header of `path`.

    Raises:
        TypeError: `path` is not a `str` or `os.PathLike`.
        ValueError: `path` is not a safetensors file written by [`save_prompts`][norga.checkpoint.save_prompts].
        FileNotFoundError, IsADirectoryError, PermissionError: no such file, a folder, or not readable.
    """
    data, where = _read(path)
    return parse_header(data, where)


def check_fit(
    inner: nn.Module,
    saved: dict[str, Any],
    stored: Mapping[str, torch.Tensor],
    strict: bool,
    where: str,
    ignore: frozenset[str] = frozenset(),
) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
    """Everything that decides whether `saved` (and its `stored` tensors) loads into `inner`; nothing changes.

    `ignore` names configuration fields not to compare (what a training state restores).

    Returns:
        `(targets, missing, unexpected, notes)`: the model's tensors to copy into, by key; the keys on one side
        only; the warnings to give (`strict=False`).

    Raises:
        ValueError: the model is not patched, or the file does not fit it (one message listing every difference).
    """
    if not patched_layers(inner):
        raise ValueError(f"{type(inner).__name__} has no norga-patched attention layer; call norga.patch_vit first")
    head_name = saved.get("head")
    mine = prompt_state_dict(inner, include_head=False)
    if head_name is not None:
        found = head(inner)
        if found is None or found[0] != head_name:
            raise ValueError(
                f"the file stores the classifier {head_name!r} but this model's classifier is "
                f"{None if found is None else found[0]!r}"
            )
        mine.update(prompt_state_dict(inner, include_head=True))
    errors, settings = compare(saved, metadata(inner, mine, head_name, default_model_name(inner)), ignore)
    declared = saved["tensors"]
    missing = sorted(set(mine) - set(declared))
    unexpected = sorted(set(declared) - set(mine))
    if strict:
        errors += settings
        if missing:
            errors.append(f"missing keys (in this model, not in the file): {missing}")
        if unexpected:
            errors.append(f"unexpected keys (in the file, not in this model): {unexpected}")
    targets = {k: mine[k] for k in mine if k in declared}
    errors += tensor_errors(declared, stored, targets)
    if errors:
        context = [] if strict else settings  # what strict=False would only have warned about, for context
        raise ValueError(
            f"cannot load prompts from {where} into {type(inner).__name__}:\n  - " + "\n  - ".join(errors + context)
        )
    notes = [] if strict else list(settings)
    if missing or unexpected:
        notes.append(f"strict=False: skipped missing keys {missing} and unexpected keys {unexpected}")
    return targets, missing, unexpected, notes


@torch.no_grad()
def copy_into(inner: nn.Module, targets: Mapping[str, torch.Tensor], stored: Mapping[str, torch.Tensor]) -> None:
    """Copy the checked `stored` tensors into the model's `targets`, in place (identities kept).

    A pool with frozen tasks takes its snapshot of them again from the loaded prompts, so that `protect` /
    `restore_frozen_` keep what was loaded, not what the pool held before.
    """
    live = dict(inner.state_dict(keep_vars=True))
    for key in sorted(targets):
        dst = live[key]
        dst.copy_(stored[key].to(device=dst.device, dtype=dst.dtype))
    for pool in prefix_pools(inner):
        pool.snapshot_frozen_()


def load_prompts(model: nn.Module, path: PathLike, *, strict: bool = True) -> LoadResult:
    """Load a [`save_prompts`][norga.checkpoint.save_prompts] file into a model patched the same way.

    The file is read once and everything is checked before anything is copied: the prompted layers and their
    attention classes, the kinds and settings of the prompt modules, gates and pool (a pool's momentum too),
    and every tensor's presence, shape and dtype against the metadata and the model. A call that raises
    changes nothing. A checkpoint that stores the head loads it into `model.get_classifier()`. Tensors are
    copied in place (parameters keep their identity, so optimizers stay valid) and cast to the model's device
    and floating dtype. A pool whose earlier tasks are frozen (`train_only`) takes its snapshot of them again
    from the loaded prompts.

    Args:
        model: A patched model (or a DDP / `torch.compile` wrapper of one).
        path: A file written by [`save_prompts`][norga.checkpoint.save_prompts].
        strict: If True, the model name and every setting must match and the file's keys must be exactly the
            model's norga keys (plus the head's if the file has one). If False, those differences are
            warnings and keys present on one side only are skipped (and reported in the result). Other layers,
            other kinds of prompt, gate or pool, and tensors that do not fit are errors in both modes.

    Returns:
        A [`LoadResult`][norga.checkpoint.LoadResult].

    Raises:
        ValueError: the file is not a norga prompt checkpoint, or it does not fit the model; the message
            lists every difference, naming each tensor with what was expected and found.
        FileNotFoundError, IsADirectoryError, PermissionError: no such file, a folder, or not readable.
    """
    from safetensors.torch import load

    check_bool("strict", strict)
    data, where = _read(path)
    saved = parse_header(data, where)
    try:
        stored = load(data)
    except Exception as e:  # safetensors' own error for a header that does not match the data
        raise ValueError(f"{where}: the tensors cannot be read ({e})") from e
    inner = unwrap_model(model)
    targets, missing, unexpected, notes = check_fit(inner, saved, stored, strict, where)
    for note in notes:
        warnings.warn(f"load_prompts: {note}", UserWarning, stacklevel=2)
    copy_into(inner, targets, stored)
    return LoadResult(sorted(targets), missing, unexpected, saved)
