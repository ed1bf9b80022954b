"""Prompt-only checkpoints: :func:`save_prompts` and :func:`load_prompts`.

A patched model's backbone is a stock timm model whose weights anyone can rebuild; what training adds is
small: the prompt pool, each patched layer's gate and prompt module (a :class:`norga.PrefixPrompt`, a
:class:`norga.SMoPE` with its usage buffers, ...), and optionally the classifier head. These functions
store exactly that, as a `safetensors <https://huggingface.co/docs/safetensors>`_ file (timm depends on
``safetensors``) whose header carries JSON metadata:

* ``norga_version``, ``timm_version``, ``model_name`` (timm architecture name) and ``model_class``;
* the prompted layers: their index in :func:`norga.attention_layers`, module path, norga class, the
  prompt module's kind and configuration (e.g. SMoPE's ``num_experts``, ``top_k``, ``noise_eps``,
  ``scale``, ``dense``) and the gate's kind (e.g. NoRGaGate's activation and learnability);
* the prompt pool's ``num_tasks``, ``num_layers``, ``length`` and ``dim``; the head's module path;
* every tensor's shape and dtype.

:func:`load_prompts` compares all of it with the model it loads into and raises one ``ValueError`` that
lists every difference (another model, other layers, another prompt length, another gate activation,
missing or extra tensors) before it changes anything.

Example::

    norga.save_prompts(model, "task3.safetensors", include_head=True)

    fresh = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    fresh.load_state_dict(backbone_weights)                     # the same pretrained backbone
    norga.patch_vit(fresh, gate=norga.NoRGaGate("sigmoid"), prompt=norga.PrefixPool(10, 5, 20, 768))
    norga.load_prompts(fresh, "task3.safetensors")              # identical outputs to ``model``
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

from .gates import NoRGaGate
from .patch import POOL_NAME, patched_layers
from .prompts import PoolPrompt, PrefixPool, PrefixPrompt

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

#: The value of the ``format`` field of the metadata.
FORMAT = "norga.prompts"
#: Version of the file layout; bumped on incompatible changes.
FORMAT_VERSION = 1
_META_KEY = "norga"
# the metadata fields load_prompts reads
_META_FIELDS = ("model_name", "layers", "pool", "tensors")
_LAYER_FIELDS = ("index", "name", "class", "prompt", "gate")

PathLike = Union[str, "os.PathLike[str]"]


class LoadResult(NamedTuple):
    """What :func:`load_prompts` did.

    Attributes:
        loaded_keys: Keys copied into the model.
        missing_keys: norga keys of the model that the file does not have (only with ``strict=False``).
        unexpected_keys: Keys of the file that the model does not have (only with ``strict=False``).
        metadata: The file's metadata (see :func:`read_prompt_metadata`).
    """

    loaded_keys: list[str]
    missing_keys: list[str]
    unexpected_keys: list[str]
    metadata: dict[str, Any]


# --------------------------------------------------------------------------- model inspection
def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
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


def _gate_info(gate: nn.Module | None) -> dict[str, Any] | None:
    if gate is None:
        return None
    if isinstance(gate, NoRGaGate):
        return {"kind": "NoRGaGate", "activation": gate.activation_name, "learnable": bool(gate.learnable)}
    return {"kind": type(gate).__qualname__}


def _prompt_info(prompt: nn.Module | None) -> dict[str, Any] | None:
    if prompt is None:
        return None
    if isinstance(prompt, PoolPrompt):
        return {"kind": "PoolPrompt", "pool_layer": int(prompt.index)}
    if isinstance(prompt, PrefixPrompt):
        _, length, dim = prompt.prompt.shape
        return {"kind": "PrefixPrompt", "length": int(length), "dim": int(dim)}
    try:
        from .smope import SMoPE
    except ImportError:  # pragma: no cover - smope ships with norga
        SMoPE = None  # type: ignore[assignment,misc]
    if SMoPE is not None and isinstance(prompt, SMoPE):
        return {
            "kind": "SMoPE",
            "num_heads": int(prompt.num_heads),
            "num_experts": int(prompt.num_experts),
            "top_k": int(prompt.top_k),
            "noise_eps": float(prompt.noise_eps),
            "scale": float(prompt.scale),
            "dense": bool(prompt.dense),
            "gate": _gate_info(prompt.gate),
        }
    return {"kind": type(prompt).__qualname__}


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
    """The entries of ``model.state_dict()`` that norga added (and the head if ``include_head``).

    Keys are those of the unwrapped model (``prompt_pool.prompts``, ``blocks.0.attn.prefix_gate.alpha``,
    ``blocks.0.attn.prompt.keys``, ``head.weight``, ...). Tensors are detached and share memory with
    the model.

    Raises:
        ValueError: the model has no patched layer, or ``include_head`` and no classifier.
    """
    model = unwrap_model(model)
    if not patched_layers(model):
        raise ValueError(f"{type(model).__name__} has no norga-patched attention layer; call norga.patch_vit first")
    prefixes, _ = _norga_prefixes(model, include_head)
    state = model.state_dict()
    return {k: _plain(v) for k, v in state.items() if any(k.startswith(p) for p in prefixes)}


def _metadata(model: nn.Module, tensors: Mapping[str, torch.Tensor], head: str | None, name: str) -> dict[str, Any]:
    import timm

    from . import __version__

    pool = getattr(model, POOL_NAME, None)
    layers = []
    for layer in patched_layers(model):
        m = layer.module
        layers.append(
            {
                "index": layer.index,
                "name": layer.name,
                "class": type(m).__name__,
                "prompt": _prompt_info(getattr(m, "prompt", None)),
                "gate": _gate_info(getattr(m, "prefix_gate", None)),
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


# --------------------------------------------------------------------------- save
def save_prompts(
    model: nn.Module,
    path: PathLike,
    *,
    include_head: bool = False,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Save what norga added to ``model`` (prompts, gates, SMoPE buffers; optionally the head).

    Args:
        model: A model patched with :func:`norga.patch_vit` (or a DDP / ``torch.compile`` wrapper).
        path: Output file (``.safetensors`` by convention).
        include_head: Also store the classifier (``model.get_classifier()``, e.g. ``head.weight``).
        model_name: The model name recorded in the metadata; default: timm's ``pretrained_cfg``
            architecture (``"vit_base_patch16_224"``), else the class name.

    Returns:
        The metadata written to the file's header.

    The file is written next to ``path`` under a temporary name and renamed into place, so an existing
    file is replaced whole or not at all.

    Raises:
        ValueError: the model is not patched, ``include_head`` and it has no classifier, or the directory
            of ``path`` does not exist.
        TypeError: ``path``, ``include_head`` or ``model_name`` has the wrong type.
    """
    from safetensors.torch import save_file

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(include_head, bool):
        raise TypeError(f"include_head must be a bool, got {type(include_head).__name__} ({include_head!r})")
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


# --------------------------------------------------------------------------- load
def read_prompt_metadata(path: PathLike) -> dict[str, Any]:
    """The metadata stored by :func:`save_prompts` in the header of ``path``.

    Raises:
        ValueError: ``path`` is not a safetensors file written by :func:`save_prompts`.
        FileNotFoundError: ``path`` does not exist.
    """
    from safetensors import safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
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


def _fmt(layers: list[dict[str, Any]]) -> list[int]:
    return [int(layer["index"]) for layer in layers]


def _compare(saved: dict[str, Any], now: dict[str, Any], strict: bool) -> tuple[list[str], list[str]]:
    """(errors, warnings) describing how two metadata dicts differ."""
    errors: list[str] = []
    notes: list[str] = []
    if saved["model_name"] != now["model_name"]:
        msg = f"another model: the file was saved from {saved['model_name']!r}, this model is {now['model_name']!r}"
        (errors if strict else notes).append(msg)
    s_layers, n_layers = saved["layers"], now["layers"]
    if _fmt(s_layers) != _fmt(n_layers):
        errors.append(
            f"other layers: the file has prompts for layers {_fmt(s_layers)}, this model has layers "
            f"{_fmt(n_layers)} patched"
        )
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
    if sp != np_:
        if sp is None or np_ is None:
            errors.append(
                f"prompt pool: {'none' if sp is None else sp} in the file, "
                f"{'none' if np_ is None else np_} in this model"
            )
        else:
            for field in ("num_tasks", "num_layers", "length", "dim"):
                if sp[field] != np_[field]:
                    label = {"length": "prompt length", "num_tasks": "number of tasks"}.get(field, field)
                    errors.append(f"prompt pool: {label} {sp[field]} in the file, {np_[field]} in this model")
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
    """Load a :func:`save_prompts` file into a model patched the same way.

    Everything is checked before anything is copied: the prompted layers and their attention classes,
    the prompt modules' kinds and configuration, the gates' kinds and activations, the pool's shape and
    every tensor's shape. A checkpoint that stores the head loads it into ``model.get_classifier()``.
    Tensors are copied in place (parameters keep their identity, so optimizers stay valid) and cast to
    the model's dtype and device.

    Args:
        model: A patched model (or a DDP / ``torch.compile`` wrapper of one).
        path: A file written by :func:`save_prompts`.
        strict: If True, the model name must match and the file's keys must be exactly the model's
            norga keys (plus the head's if the file has one). If False, a different model name is a
            warning and keys present on one side only are skipped (and reported in the result).

    Returns:
        A :class:`LoadResult`.

    Raises:
        ValueError: the file is not a norga prompt checkpoint, or it does not fit the model; the message
            lists every difference.
    """
    from safetensors.torch import load_file

    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
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
            target = targets[key]
            src = tensors[key]
            target.copy_(src.to(device=target.device, dtype=target.dtype))
    return LoadResult(loaded, missing, unexpected, saved)
