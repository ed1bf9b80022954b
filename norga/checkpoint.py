"""Prompt-only checkpoints: [`save_prompts`][norga.checkpoint.save_prompts] and
[`load_prompts`][norga.checkpoint.load_prompts].

A patched model's backbone is a stock timm model anyone can rebuild; what training adds is small: the prompt
pool, each patched layer's gate and prompt module (with SMoPE's usage buffers), and optionally the head. These
functions store exactly that as a [safetensors](https://huggingface.co/docs/safetensors) file whose header
carries JSON metadata: versions, the model name and class, the prompted layers (index, module path, norga
class, prompt and gate configuration), the pool's shape, the head's path and every tensor's shape and dtype.
`load_prompts` compares all of it with the model and raises one `ValueError` listing every difference before
it changes anything.

```python
norga.save_prompts(model, "task3.safetensors", include_head=True)
fresh = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
fresh.load_state_dict(backbone_weights)                     # the same pretrained backbone
norga.patch_vit(fresh, gate=norga.NoRGaGate("sigmoid"), prompt=norga.PrefixPool(10, 5, 20, 768))
norga.load_prompts(fresh, "task3.safetensors")              # identical outputs to `model`
```
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple, Union

import torch
from torch import nn

from ._checks import check_bool
from .patch import patched_layers
from .prompts import POOL_NAME, PrefixPool

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LoadResult",
    "load_prompts",
    "prompt_state_dict",
    "read_prompt_metadata",
    "save_prompts",
    "unwrap_model",
]

#: The value of the `format` field of the metadata.
FORMAT = "norga.prompts"
#: Version of the file layout; bumped on incompatible changes.
FORMAT_VERSION = 1
_META_KEY = "norga"
# the metadata fields load_prompts reads
_META_FIELDS = ("model_name", "layers", "pool", "tensors")
_LAYER_FIELDS = ("index", "name", "class", "prompt", "gate")

PathLike = Union[str, "os.PathLike[str]"]


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


def _check_path(path: object) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    for _ in range(8):
        inner = getattr(model, "module", None)
        if not isinstance(model, nn.parallel.DistributedDataParallel) and type(model).__name__ != "DataParallel":
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _model_name(model: nn.Module) -> str:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("architecture"):
            return str(cfg["architecture"])
    return type(model).__name__


def _config(module: nn.Module | None) -> dict[str, Any] | None:
    """A prompt module's or gate's `checkpoint_config()`, or its kind when it has none."""
    if module is None:
        return None
    config = getattr(module, "checkpoint_config", None)
    return config() if callable(config) else {"kind": type(module).__qualname__}


def _head(model: nn.Module) -> tuple[str, nn.Module] | None:
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    head = get()
    if not isinstance(head, nn.Module) or not head.state_dict():
        return None  # no classifier, or one without state (nn.Identity when num_classes=0)
    for name, module in model.named_modules():
        if module is head and name:
            return name, head
    return None


def _norga_prefixes(model: nn.Module, include_head: bool) -> tuple[list[str], str | None]:
    prefixes = []
    if isinstance(getattr(model, POOL_NAME, None), PrefixPool):
        prefixes.append(POOL_NAME + ".")
    for layer in patched_layers(model):
        for attr in ("prefix_gate", "prompt"):
            if isinstance(getattr(layer.module, attr, None), nn.Module):
                prefixes.append(f"{layer.name}.{attr}.")
    head_name = None
    if include_head:
        found = _head(model)
        if found is None:
            raise ValueError(
                f"include_head=True but {type(model).__name__} has no classifier module (get_classifier() "
                "returned none, or an Identity head with no parameters)"
            )
        head_name = found[0]
        prefixes.append(head_name + ".")
    return prefixes, head_name


def _plain(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # DTensor (FSDP2): gather the full tensor
    if callable(full):
        t = full()
    return t.detach()


def prompt_state_dict(model: nn.Module, *, include_head: bool = False) -> dict[str, torch.Tensor]:
    """The entries of `model.state_dict()` that norga added (and the head if `include_head`).

    Keys are those of the unwrapped model (`prompt_pool.prompts`, `blocks.0.attn.prefix_gate.alpha`,
    `blocks.0.attn.prompt.keys`, `head.weight`, ...). Tensors are detached and share memory with
    the model.

    Raises:
        ValueError: the model has no patched layer, or `include_head` and no classifier.
    """
    model = unwrap_model(model)
    if not patched_layers(model):
        raise ValueError(f"{type(model).__name__} has no norga-patched attention layer; call norga.patch_vit first")
    prefixes, _ = _norga_prefixes(model, include_head)
    state = model.state_dict()
    return {k: _plain(v) for k, v in state.items() if any(k.startswith(p) for p in prefixes)}


def _metadata(model: nn.Module, tensors: Mapping[str, torch.Tensor], head: str | None, name: str) -> dict[str, Any]:
    import timm

    from ._version import __version__

    pool = getattr(model, POOL_NAME, None)
    layers = []
    for layer in patched_layers(model):
        m = layer.module
        layers.append(
            {
                "index": layer.index,
                "name": layer.name,
                "class": type(m).__name__,
                "prompt": _config(getattr(m, "prompt", None)),
                "gate": _config(getattr(m, "prefix_gate", None)),
                "backend": getattr(m, "backend", None),
            }
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "norga_version": __version__,
        "timm_version": getattr(timm, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "model_name": name,
        "model_class": type(model).__name__,
        "layers": layers,
        "pool": None
        if not isinstance(pool, PrefixPool)
        else {"num_tasks": pool.num_tasks, "num_layers": pool.num_layers, "length": pool.length, "dim": pool.dim},
        "head": head,
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()
        },
    }


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

    The file is written next to `path` under a temporary name and renamed into place, so an existing
    file is replaced whole or not at all.

    Raises:
        ValueError: the model is not patched, `include_head` and it has no classifier, or the directory
            of `path` does not exist.
        TypeError: `path`, `include_head` or `model_name` has the wrong type.
    """
    from safetensors.torch import save_file

    _check_path(path)
    check_bool("include_head", include_head)
    if model_name is not None and not isinstance(model_name, str):
        raise TypeError(f"model_name must be a str or None, got {type(model_name).__name__}")
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise ValueError(f"path: the directory {folder!r} of {os.fspath(path)!r} does not exist; create it first")
    if os.path.isdir(target):
        raise ValueError(f"path: {os.fspath(path)!r} is a directory, expected a file name")
    inner = unwrap_model(model)
    tensors = prompt_state_dict(inner, include_head=include_head)
    _, head = _norga_prefixes(inner, include_head)
    meta = _metadata(inner, tensors, head, model_name or _model_name(inner))
    # safetensors refuses shared or non-contiguous storage: store independent contiguous copies.
    out = {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".norga-", suffix=".safetensors.tmp")
    os.close(fd)
    try:
        save_file(out, tmp, metadata={"format": FORMAT, _META_KEY: json.dumps(meta)})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return meta


def read_prompt_metadata(path: PathLike) -> dict[str, Any]:
    """The metadata stored by [`save_prompts`][norga.checkpoint.save_prompts] in the header of `path`.

    Raises:
        ValueError: `path` is not a safetensors file written by [`save_prompts`][norga.checkpoint.save_prompts].
        FileNotFoundError: `path` does not exist.
    """
    from safetensors import safe_open

    _check_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {os.fspath(path)!r}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise ValueError(f"{os.fspath(path)!r} is not a safetensors file: {e}") from e
    if header.get("format") != FORMAT or _META_KEY not in header:
        raise ValueError(
            f"{os.fspath(path)!r} is a safetensors file but not a norga prompt checkpoint "
            f"(header format {header.get('format')!r}, expected {FORMAT!r}); write one with norga.save_prompts"
        )
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)!r}: the norga metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{os.fspath(path)!r}: the norga metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} has norga checkpoint format version {meta.get('format_version')!r}; "
            f"this norga reads version {FORMAT_VERSION}"
        )
    problems = [f"no field {k!r}" for k in _META_FIELDS if k not in meta]
    if not problems:
        layers, tensors = meta["layers"], meta["tensors"]
        if not isinstance(layers, list) or not all(
            isinstance(x, dict) and set(_LAYER_FIELDS) <= set(x) for x in layers
        ):
            problems.append(f"'layers' must be a list of objects with the fields {list(_LAYER_FIELDS)}")
        if not isinstance(tensors, dict) or not all(isinstance(t, dict) and "shape" in t for t in tensors.values()):
            problems.append("'tensors' must map each key to an object with a 'shape'")
    if problems:
        raise ValueError(f"{os.fspath(path)!r}: damaged norga metadata: " + "; ".join(problems))
    return meta


def _compare(saved: dict[str, Any], now: dict[str, Any], strict: bool) -> tuple[list[str], list[str]]:
    """(errors, warnings) describing how two metadata dicts differ."""
    errors: list[str] = []
    notes: list[str] = []
    if saved["model_name"] != now["model_name"]:
        msg = f"another model: the file was saved from {saved['model_name']!r}, this model is {now['model_name']!r}"
        (errors if strict else notes).append(msg)
    s_layers, n_layers = saved["layers"], now["layers"]
    s_idx, n_idx = [int(x["index"]) for x in s_layers], [int(x["index"]) for x in n_layers]
    if s_idx != n_idx:
        errors.append(f"other layers: the file has prompts for layers {s_idx}, this model has layers {n_idx} patched")
    by_index = {int(n["index"]): n for n in n_layers}
    for s in s_layers:
        n = by_index.get(int(s["index"]))
        if n is None:
            continue
        where = f"layer {s['index']} ({n['name']})"
        if s["name"] != n["name"]:
            errors.append(f"{where}: module path {s['name']!r} in the file, {n['name']!r} in this model")
        if s["class"] != n["class"]:
            errors.append(f"{where}: attention class {s['class']} in the file, {n['class']} in this model")
        if s["prompt"] != n["prompt"]:
            errors.append(f"{where}: prompt {_describe(s['prompt'], n['prompt'])}")
        if s["gate"] != n["gate"]:
            errors.append(f"{where}: gate {_describe(s['gate'], n['gate'])}")
    sp, np_ = saved["pool"], now["pool"]
    if sp != np_ and (sp is None or np_ is None):
        errors.append(f"prompt pool: {sp or 'none'} in the file, {np_ or 'none'} in this model")
    elif sp != np_:
        labels = {"length": "prompt length", "num_tasks": "number of tasks"}
        errors += [
            f"prompt pool: {labels.get(f, f)} {sp[f]} in the file, {np_[f]} in this model"
            for f in ("num_tasks", "num_layers", "length", "dim")
            if sp[f] != np_[f]
        ]
    return errors, notes


def _describe(saved: Any, now: Any) -> str:
    if isinstance(saved, dict) and isinstance(now, dict) and saved.get("kind") == now.get("kind"):
        diffs = [
            f"{k}={saved.get(k)!r} in the file, {now.get(k)!r} in this model"
            for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)
        ]
        return f"{saved['kind']} differs: " + "; ".join(diffs)
    return f"{saved!r} in the file, {now!r} in this model"


def load_prompts(model: nn.Module, path: PathLike, *, strict: bool = True) -> LoadResult:
    """Load a [`save_prompts`][norga.checkpoint.save_prompts] file into a model patched the same way.

    Everything is checked before anything is copied: the prompted layers and their attention classes,
    the prompt modules' kinds and configuration, the gates' kinds and activations, the pool's shape and
    every tensor's shape. A checkpoint that stores the head loads it into `model.get_classifier()`.
    Tensors are copied in place (parameters keep their identity, so optimizers stay valid) and cast to
    the model's dtype and device.

    Args:
        model: A patched model (or a DDP / `torch.compile` wrapper of one).
        path: A file written by [`save_prompts`][norga.checkpoint.save_prompts].
        strict: If True, the model name must match and the file's keys must be exactly the model's
            norga keys (plus the head's if the file has one). If False, a different model name is a
            warning and keys present on one side only are skipped (and reported in the result).

    Returns:
        A [`LoadResult`][norga.checkpoint.LoadResult].

    Raises:
        ValueError: the file is not a norga prompt checkpoint, or it does not fit the model; the message
            lists every difference.
    """
    from safetensors.torch import load_file

    check_bool("strict", strict)
    saved = read_prompt_metadata(path)
    inner = unwrap_model(model)
    if not patched_layers(inner):
        raise ValueError(f"{type(inner).__name__} has no norga-patched attention layer; call norga.patch_vit first")
    head = saved.get("head")
    mine = prompt_state_dict(inner, include_head=False)
    if head is not None:
        found = _head(inner)
        if found is None or found[0] != head:
            raise ValueError(
                f"the file stores the classifier {head!r} but this model's classifier is "
                f"{None if found is None else found[0]!r}"
            )
        mine.update(prompt_state_dict(inner, include_head=True))
    now = _metadata(inner, mine, head, _model_name(inner))
    errors, notes = _compare(saved, now, strict)

    file_keys = set(saved["tensors"])
    missing = sorted(set(mine) - file_keys)
    unexpected = sorted(file_keys - set(mine))
    if strict and missing:
        errors.append(f"missing keys (in this model, not in the file): {missing}")
    if strict and unexpected:
        errors.append(f"unexpected keys (in the file, not in this model): {unexpected}")
    for key in sorted(file_keys & set(mine)):
        s_shape = tuple(saved["tensors"][key]["shape"])
        if s_shape != tuple(mine[key].shape):
            errors.append(f"{key}: shape {s_shape} in the file, {tuple(mine[key].shape)} in this model")
    if errors:
        raise ValueError(
            f"cannot load prompts from {os.fspath(path)!r} into {type(inner).__name__}:\n  - " + "\n  - ".join(errors)
        )
    for note in notes:
        warnings.warn(f"load_prompts: {note}", UserWarning, stacklevel=2)
    if missing or unexpected:
        warnings.warn(
            f"load_prompts(strict=False): skipped missing keys {missing} and unexpected keys {unexpected}",
            UserWarning,
            stacklevel=2,
        )

    tensors = load_file(os.fspath(path))
    targets = dict(inner.state_dict(keep_vars=True))
    loaded = sorted(file_keys & set(mine))
    with torch.no_grad():
        for key in loaded:
            targets[key].copy_(tensors[key].to(device=targets[key].device, dtype=targets[key].dtype))
    return LoadResult(loaded, missing, unexpected, saved)
