"""What a prompt file records about the model, how it is read back, and how it is compared with a model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..patch import patched_layers
from ..prompts import POOL_NAME, model_prompt

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "compare",
    "norga_keys",
    "metadata",
    "model_name",
    "prompt_state_dict",
    "tensor_errors",
    "unwrap_model",
    "validate_metadata",
]

#: The value of the `format` field of the metadata.
FORMAT = "norga.prompts"
#: Version of the file layout; bumped on incompatible changes (2: the pool's configuration, momentum included).
FORMAT_VERSION = 2
# the metadata fields load_prompts reads
_FIELDS = ("model_name", "layers", "pool", "tensors")
_LAYER_FIELDS = ("index", "name", "class", "prompt", "gate")
_LABELS = {"length": "prompt length", "num_tasks": "number of tasks"}


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


def model_name(model: nn.Module) -> str:
    """timm's `pretrained_cfg` architecture (`"vit_base_patch16_224"`), else the class name."""
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


def head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """`(path, module)` of `model.get_classifier()` when it holds state, else `None`."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    found = get()
    if not isinstance(found, nn.Module) or not found.state_dict():
        return None  # no classifier, or one without state (nn.Identity when num_classes=0)
    for name, module in model.named_modules():
        if module is found and name:
            return name, found
    return None


def norga_keys(model: nn.Module, include_head: bool) -> tuple[list[str], str | None]:
    """The `state_dict` key prefixes of what norga added (and of the head), and the head's path."""
    prefixes = [POOL_NAME + "."] if model_prompt(model) is not None else []
    for layer in patched_layers(model):
        for attr in ("prefix_gate", "prompt"):
            if isinstance(getattr(layer.module, attr, None), nn.Module):
                prefixes.append(f"{layer.name}.{attr}.")
    head_name = None
    if include_head:
        found = head(model)
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
    prefixes, _ = norga_keys(model, include_head)
    state = model.state_dict()
    return {k: _plain(v) for k, v in state.items() if any(k.startswith(p) for p in prefixes)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def metadata(model: nn.Module, tensors: Mapping[str, torch.Tensor], head_name: str | None, name: str) -> dict[str, Any]:
    """The metadata of a prompt file for `model` and the tensors it stores."""
    import timm

    from .._version import __version__

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
        "timm_version": str(getattr(timm, "__version__", "unknown")),
        "torch_version": str(torch.__version__),
        "model_name": name,
        "model_class": type(model).__name__,
        "layers": layers,
        "pool": _config(model_prompt(model)),
        "head": head_name,
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in tensors.items()},
    }


def validate_metadata(meta: object, where: str) -> dict[str, Any]:
    """`meta` checked to be norga prompt metadata of this version; `where` names the file in messages.

    Raises:
        ValueError: another format or version, or missing or malformed fields.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: the norga metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} has norga checkpoint format version {meta.get('format_version')!r}; "
            f"this norga reads version {FORMAT_VERSION}"
        )
    problems = [f"no field {k!r}" for k in _FIELDS if k not in meta]
    if not problems:
        layers, tensors = meta["layers"], meta["tensors"]
        if not isinstance(layers, list) or not all(
            isinstance(x, dict) and set(_LAYER_FIELDS) <= set(x) for x in layers
        ):
            problems.append(f"'layers' must be a list of objects with the fields {list(_LAYER_FIELDS)}")
        if not isinstance(tensors, dict) or not all(
            isinstance(t, dict) and isinstance(t.get("shape"), list) and isinstance(t.get("dtype"), str)
            for t in tensors.values()
        ):
            problems.append("'tensors' must map each key to an object with a 'shape' list and a 'dtype'")
        if meta["pool"] is not None and not (isinstance(meta["pool"], dict) and "kind" in meta["pool"]):
            problems.append("'pool' must be null or an object with a 'kind'")
    if problems:
        raise ValueError(f"{where}: damaged norga metadata: " + "; ".join(problems))
    return meta


def parse_header(data: bytes, where: str) -> dict[str, Any]:
    """The norga metadata in the header of a safetensors file's bytes `data`, validated.

    Raises:
        ValueError: not a safetensors file, not a norga prompt file, or damaged metadata.
    """
    if len(data) < 8:
        raise ValueError(f"{where} is not a safetensors file: it has {len(data)} bytes, fewer than a header needs")
    size = int.from_bytes(data[:8], "little")
    try:
        if size > len(data) - 8:
            raise ValueError(f"its header length {size} is beyond the end of the file ({len(data)} bytes)")
        header = json.loads(data[8 : 8 + size])
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not a safetensors file: {e}") from e
    extra = header.get("__metadata__") or {}
    if not isinstance(extra, dict) or extra.get("format") != FORMAT or "norga" not in extra:
        got = extra.get("format") if isinstance(extra, dict) else None
        raise ValueError(
            f"{where} is a safetensors file but not a norga prompt checkpoint (header format {got!r}, expected "
            f"{FORMAT!r}); write one with norga.save_prompts"
        )
    try:
        meta = json.loads(extra["norga"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: the norga metadata is not valid JSON ({e})") from e
    return validate_metadata(meta, where)


def _describe(label: str, saved: Any, now: Any) -> tuple[bool, list[str]]:
    """`(same kind, messages)` for two differing configurations of one prompt, gate or pool."""
    if isinstance(saved, dict) and isinstance(now, dict) and saved.get("kind") == now.get("kind"):
        keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if label == "prompt pool":  # one line per field, in words
            return True, [
                f"prompt pool: {_LABELS.get(k, k)} {saved.get(k)!r} in the file, {now.get(k)!r} in this model"
                for k in keys
            ]
        diffs = [f"{k}={saved.get(k)!r} in the file, {now.get(k)!r} in this model" for k in keys]
        return True, [f"{label} {saved['kind']} differs: " + "; ".join(diffs)]
    sep = ": " if label == "prompt pool" else " "
    return False, [f"{label}{sep}{saved!r} in the file, {now!r} in this model"]


def _without(config: Any, ignore: frozenset[str]) -> Any:
    return {k: v for k, v in config.items() if k not in ignore} if isinstance(config, dict) and ignore else config


def compare(
    saved: dict[str, Any], now: dict[str, Any], ignore: frozenset[str] = frozenset()
) -> tuple[list[str], list[str]]:
    """`(errors, settings)`: differences that never load, and setting differences (refused under `strict`).

    Configuration fields named in `ignore` are not compared (state that a training state restores).
    """
    errors: list[str] = []
    settings: list[str] = []
    if saved["model_name"] != now["model_name"]:
        settings.append(
            f"another model: the file was saved from {saved['model_name']!r}, this model is {now['model_name']!r}"
        )
    s_idx, n_idx = [int(x["index"]) for x in saved["layers"]], [int(x["index"]) for x in now["layers"]]
    if s_idx != n_idx:
        errors.append(f"other layers: the file has prompts for layers {s_idx}, this model has layers {n_idx} patched")
    by_index = {int(n["index"]): n for n in now["layers"]}
    pairs = [("prompt pool", saved["pool"], now["pool"])]
    for s in saved["layers"]:
        n = by_index.get(int(s["index"]))
        if n is None:
            continue
        where = f"layer {s['index']} ({n['name']})"
        if s["name"] != n["name"]:
            errors.append(f"{where}: module path {s['name']!r} in the file, {n['name']!r} in this model")
        if s["class"] != n["class"]:
            errors.append(f"{where}: attention class {s['class']} in the file, {n['class']} in this model")
        pairs += [(f"{where}: prompt", s["prompt"], n["prompt"]), (f"{where}: gate", s["gate"], n["gate"])]
    for label, s_cfg, n_cfg in pairs:
        s_cfg, n_cfg = _without(s_cfg, ignore), _without(n_cfg, ignore)
        if s_cfg != n_cfg:
            same_kind, msgs = _describe(label, s_cfg, n_cfg)
            (settings if same_kind else errors).extend(msgs)
    return errors, settings


def tensor_errors(
    declared: Mapping[str, Any] | None, stored: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
) -> list[str]:
    """What keeps the `stored` tensors (under their `declared` shapes and dtypes) from loading into `targets`.

    Every key of `targets` must be stored; a stored tensor must have the declared shape and dtype (if
    `declared` is given) and the target's shape; a floating-point tensor is cast to the target's floating
    dtype, any other dtype must be the target's.
    """
    errors = []
    if declared is not None:
        errors += [
            f"{k}: the file holds this tensor but its metadata does not list it"
            for k in sorted(stored)
            if k not in declared
        ]
    for key in sorted(targets):
        target = targets[key]
        if key not in stored:
            errors.append(f"{key}: listed in the metadata but the file holds no such tensor")
            continue
        t = stored[key]
        shape, want = list(t.shape), list(target.shape)
        if declared is not None and key in declared:
            d = declared[key]
            if list(d["shape"]) != shape or d["dtype"] != _dtype_name(t.dtype):
                errors.append(
                    f"{key}: stored as {_dtype_name(t.dtype)} {tuple(shape)}, but the metadata gives "
                    f"{d['dtype']} {tuple(d['shape'])} (a damaged file)"
                )
                continue
        if shape != want:
            errors.append(f"{key}: shape {tuple(shape)} in the file, {tuple(want)} in this model")
        elif t.dtype != target.dtype and not (t.is_floating_point() and target.is_floating_point()):
            errors.append(
                f"{key}: dtype {_dtype_name(t.dtype)} in the file cannot be loaded into {_dtype_name(target.dtype)}"
            )
    return errors
