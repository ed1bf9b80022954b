"""Misuse of the public API: a clear TypeError / ValueError naming the argument, and no half-done change.

Table-driven: each case builds what it needs, makes one bad call, and names the exception type and the
fragments its message must contain (the argument, what was expected, what was given). The atomicity tests
check that a call that raises leaves the model, the pools and the files exactly as they were.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
from versions import needs

import norga
from norga.checkpoint import FORMAT_VERSION, read_prompt_metadata


def _vit(depth: int = 3, **kw: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth, num_classes=5, **kw
    )


def _pooled(num_tasks: int = 3) -> torch.nn.Module:
    model = _vit()
    norga.patch_vit(model, layers=[0, 1], prompt=norga.PrefixPool(num_tasks, 2, 4, 192), gate="tanh")
    return model


def _smoped() -> torch.nn.Module:
    model = _vit()
    norga.patch_vit(model, layers=[0, 1], prompt=norga.smope_factory(num_experts=4, top_k=2))
    return model


def _qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    return q, k, v, (torch.randn(4, 24), torch.randn(4, 24))


def _two_pools() -> torch.nn.Module:
    """A model with two pools (one registered by patch_vit, one more as a submodule) of 3 and 2 tasks."""
    model = _pooled(num_tasks=3)
    model.extra_pool = norga.PrefixPool(2, 1, 4, 192)
    return model


def _bad_metadata_file(tmp: Path) -> Path:
    from safetensors.torch import save_file

    path = tmp / "bad.safetensors"
    meta = {"format": "norga.prompts", "format_version": FORMAT_VERSION, "model_name": "x", "pool": None, "tensors": {}}
    save_file({"t": torch.zeros(1)}, str(path), metadata={"format": "norga.prompts", "norga": json.dumps(meta)})
    return path


def _shared_pool() -> None:
    pool = norga.PrefixPool(2, 2, 4, 192)
    first = norga.patch_vit(_vit(), layers=[0, 1], prompt=pool)
    norga.patch_vit(_vit(), layers=[0, 1], prompt=pool)
    del first


def _compiled_mismatch() -> None:
    model = _pooled().eval()
    norga.set_task(model, torch.tensor([0, 1, 2]))
    torch.compile(model, fullgraph=True, backend="eager")(torch.randn(2, 3, 32, 32))


# (id, call, exception type, message fragments)
CASES: list[tuple[str, Callable[[Path], Any], type[BaseException], list[str]]] = [
    ("patch_vit float layers", lambda t: norga.patch_vit(_vit(), layers=[0.7, 1.2]), TypeError, ["layers", "0.7"]),
    ("patch_vit str model", lambda t: norga.patch_vit("vit"), TypeError, ["nn.Module", "str"]),
    ("patch_vit gate int", lambda t: norga.patch_vit(_vit(), gate=3), TypeError, ["gate", "int"]),
    (
        "patch_vit factory returns a tensor",
        lambda t: norga.patch_vit(_vit(), prompt=lambda i, a: torch.zeros(1)),
        TypeError,
        ["factory must return an nn.Module or None", "Tensor"],
    ),
    ("patch_vit pool shared by two models", lambda t: _shared_pool(), ValueError, ["already attached", "deepcopy"]),
    (
        "patch_vit huge SMoPE",
        lambda t: norga.patch_vit(_vit(), prompt=norga.smope_factory(num_experts=10**9)),
        ValueError,
        ["num_experts=1000000000 is too large", "GiB"],
    ),
    (
        "patch_vit ParallelScalingBlock",
        lambda t: norga.patch_vit(timm.create_model("vit_base_patch16_xp_224", pretrained=False, depth=1, img_size=32)),
        ValueError,
        ["ParallelScalingBlock", "no attention module to patch"],
    ),
    (
        "patch_vit DiffAttention",
        lambda t: norga.patch_vit(
            timm.create_model("vit_dwee_patch16_reg1_gap_256", pretrained=False, depth=1, img_size=32)
        ),
        ValueError,
        ["DiffAttention", "differential attention"],
    ),
    (
        "patch_vit windowed model",
        lambda t: norga.patch_vit(
            timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1))
        ),
        ValueError,
        ["WindowAttention", "windowed"],
    ),
    ("attention_layers str", lambda t: norga.patch.attention_layers("x"), TypeError, ["attention_layers", "str"]),
    ("unpatch_vit int", lambda t: norga.unpatch_vit(3), TypeError, ["unpatch_vit", "int"]),
    ("set_dense str", lambda t: norga.set_dense(_smoped(), "False"), TypeError, ["dense must be a bool", "'False'"]),
    ("end_task str", lambda t: norga.end_task("m"), TypeError, ["end_task", "str"]),
    ("smope_losses None", lambda t: norga.smope_losses(None), TypeError, ["smope_losses", "NoneType"]),
    ("count_usage no SMoPE", lambda t: norga.count_usage(_vit()).__enter__(), ValueError, ["count_usage", "SMoPE"]),
    ("NoRGaGate learnable str", lambda t: norga.NoRGaGate(learnable="no"), TypeError, ["learnable", "'no'"]),
    ("NoRGaGate bad activation", lambda t: norga.NoRGaGate("relu"), ValueError, ["'relu'", "tanh"]),
    ("SMoPE scale str", lambda t: norga.SMoPE(192, 3, scale="0.1"), TypeError, ["scale", "'0.1'"]),
    ("PrefixPool momentum", lambda t: norga.PrefixPool(2, 1, 4, 8, momentum=2.0), ValueError, ["momentum", "2.0"]),
    (
        "prefix_attention gate int",
        lambda t: norga.prefix_attention(*_qkv(), gate=3),
        TypeError,
        ["gate must be None", "int"],
    ),
    (
        "prefix_attention gate of another width",
        lambda t: norga.prefix_attention(*_qkv(), gate=torch.nn.Linear(5, 5)),
        ValueError,
        ["gate Linear", r"\(2, 3, 5, 4\)", "same shape"],
    ),
    ("set_task float", lambda t: norga.set_task(_pooled(), 1.0), TypeError, ["task", "float"]),
    ("set_task out of range", lambda t: norga.set_task(_pooled(), 7), ValueError, [r"\[0, 3\)", "7"]),
    (
        "set_task meta ids",
        lambda t: norga.set_task(_pooled(), torch.tensor([0, 1], device="meta")),
        ValueError,
        ["meta device"],
    ),
    (
        "use_task batch mismatch",
        lambda t: _with_task(_pooled(), torch.tensor([0, 1, 2]), torch.randn(2, 3, 32, 32)),
        ValueError,
        ["3 task ids were set but the batch has 2 samples"],
    ),
    (
        "save_prompts missing directory",
        lambda t: norga.save_prompts(_pooled(), t / "missing" / "p.safetensors"),
        FileNotFoundError,
        ["path", "missing", "does not exist"],
    ),
    (
        "save_prompts include_head str",
        lambda t: norga.save_prompts(_pooled(), t / "p.safetensors", include_head="yes"),
        TypeError,
        ["include_head", "'yes'"],
    ),
    (
        "load_prompts metadata without layers",
        lambda t: norga.load_prompts(_pooled(), _bad_metadata_file(t)),
        ValueError,
        ["damaged norga metadata", "'layers'"],
    ),
    ("read_prompt_metadata missing file", lambda t: read_prompt_metadata(t / "nope.st"), FileNotFoundError, ["nope"]),
    ("torch.jit.script", lambda t: torch.jit.script(_pooled()), NotImplementedError, ["TorchScript", "torch.export"]),
    (
        "torch.jit.script prefix_attention",
        lambda t: torch.jit.script(norga.prefix_attention),
        NotImplementedError,
        [r"TorchScript is not supported \(norga.functional.dispatch.prefix_attention cannot", "torch.export"],
    ),
]


def _with_task(model: torch.nn.Module, ids: torch.Tensor, x: torch.Tensor) -> None:
    with norga.use_task(model, ids):
        model(x)


@pytest.mark.parametrize("case, call, exc, fragments", CASES, ids=[c[0] for c in CASES])
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_misuse_gets_a_clear_error(tmp_path: Path, case: str, call: Callable, exc: type, fragments: list[str]) -> None:
    with pytest.raises(exc) as info:
        call(tmp_path)
    message = str(info.value)
    for fragment in fragments:
        assert re.search(fragment, message), f"{case}: {fragment!r} not in {message!r}"
    if exc is not Exception:  # never a crash from inside torch or Python
        assert type(info.value).__module__ == "builtins", f"{case}: {type(info.value)}"


@needs("compile_messages")
def test_compiled_misuse_gets_its_message() -> None:
    """Inside torch.compile(fullgraph=True) the graph break carries norga's message."""
    with pytest.raises(Exception, match="3 task ids were set but the batch has 2 samples"):
        _compiled_mismatch()


def test_smope_training_forward_on_an_empty_batch_has_finite_losses() -> None:
    model = _smoped().train()
    with norga.count_usage(model):
        model(torch.randn(3, 3, 32, 32))
    norga.end_task(model)
    model(torch.randn(0, 3, 32, 32))
    router, proto = norga.smope_losses(model)
    assert torch.isfinite(router) and torch.isfinite(proto)


def test_print_of_a_gated_model_does_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    text = repr(_pooled())
    assert "NoRGaGate(activation=tanh" in text
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]


# --------------------------------------------------------------------------------------------------
# Atomicity: a call that raises changes nothing
# --------------------------------------------------------------------------------------------------
def _snapshot(model: torch.nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    types = [(n, type(m).__name__) for n, m in model.named_modules()]
    return types, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: tuple[list[tuple[str, str]], dict[str, torch.Tensor]]) -> None:
    types, state = _snapshot(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    for k in state:
        assert torch.equal(state[k], before[1][k]), k


def test_patch_vit_whose_factory_fails_at_block_2_changes_nothing() -> None:
    model = _vit(depth=4)
    before = _snapshot(model)

    def factory(i: int, attn: torch.nn.Module) -> torch.nn.Module:
        if i == 2:
            raise RuntimeError("factory failed")
        return norga.PrefixPrompt(4, 192)

    with pytest.raises(RuntimeError, match="factory failed"):
        norga.patch_vit(model, layers=[0, 1, 2, 3], prompt=factory)
    _assert_unchanged(model, before)
    norga.patch_vit(model, layers=[0, 1, 2, 3], prompt=lambda i, a: norga.PrefixPrompt(4, 192))  # a retry works
    assert len(norga.patch.patched_layers(model)) == 4


def test_patch_vit_errors_leave_the_pool_free() -> None:
    pool = norga.PrefixPool(2, 3, 4, 192)
    model = _vit()
    with pytest.raises(ValueError, match="num_layers=3 but 2 layers"):
        norga.patch_vit(model, layers=[0, 1], prompt=pool)
    assert not norga.patch.patched_layers(model) and not hasattr(model, "prompt_pool")
    norga.patch_vit(_vit(), layers=[0, 1, 2], prompt=pool)  # the pool was not taken


def test_a_pool_is_free_again_after_unpatch_and_a_deepcopy_is_free() -> None:
    pool = norga.PrefixPool(2, 2, 4, 192)
    first = norga.patch_vit(_vit(), layers=[0, 1], prompt=pool)
    norga.patch_vit(_vit(), layers=[0, 1], prompt=copy.deepcopy(pool))  # a copy is another pool
    twin = copy.deepcopy(first)  # a copied model holds its own pool
    assert twin.prompt_pool is not pool
    norga.unpatch_vit(first)
    norga.patch_vit(_vit(), layers=[0, 1], prompt=pool)


def test_set_task_with_two_pools_changes_neither_when_one_rejects() -> None:
    model = _two_pools()
    pools = norga.prompts.prefix_pools(model)
    norga.set_task(model, 1)
    with pytest.raises(ValueError, match=r"\[0, 2\), got 2"):
        norga.set_task(model, 2)  # valid for the first pool (3 tasks), not the second (2 tasks)
    assert [p.task for p in pools] == [1, 1]
    with pytest.raises(ValueError):
        with norga.use_task(model, torch.tensor([0, 2])):
            pass
    assert [p.task for p in pools] == [1, 1]


def test_load_norga_checkpoint_on_a_patched_model_changes_nothing() -> None:
    model = _pooled()
    before = _snapshot(model)
    ckpt = {
        "model": {
            "e_prompt.prompt": torch.rand(2, 2, 3, 4, 3, 64),
            "head.weight": torch.randn(5, 192),
            "head.bias": torch.randn(5),
        }
    }
    with pytest.raises(ValueError, match="already patched"):
        norga.load_norga_checkpoint(model, ckpt, layers=[0, 1])
    _assert_unchanged(model, before)


def test_load_smope_checkpoint_on_a_patched_model_changes_nothing() -> None:
    model = _smoped()
    before = _snapshot(model)
    state = {f"e_pk_{e}_{j}_{h}": torch.rand(1, 64) for e in (0, 1) for j in range(4) for h in range(3)}
    state |= {f"e_pv_{e}_{j}_{h}": torch.rand(1, 64) for e in (0, 1) for j in range(4) for h in range(3)}
    state |= {"last.weight": torch.randn(5, 192), "last.bias": torch.randn(5)}
    with pytest.raises(ValueError, match="already patched"):
        norga.load_smope_checkpoint(model, {"model": state}, layers=[0, 1], top_k=2)
    _assert_unchanged(model, before)


def test_unpatch_vit_of_an_unpatched_model_changes_nothing() -> None:
    model = _vit()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="no norga-patched attention layer"):
        norga.unpatch_vit(model)
    _assert_unchanged(model, before)


def test_load_prompts_that_does_not_fit_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    norga.save_prompts(_pooled(num_tasks=3), path)
    other = _pooled(num_tasks=4)
    before = _snapshot(other)
    with pytest.raises(ValueError, match="number of tasks 3 in the file, 4 in this model"):
        norga.load_prompts(other, path)
    _assert_unchanged(other, before)


def test_save_prompts_that_raises_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.safetensors"
    norga.save_prompts(_pooled(), path)
    old = path.read_bytes()

    def broken(fd: int) -> None:  # the data is written, then the disk gives up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match=f"cannot write '{re.escape(str(path))}': No space left on device"):
        norga.save_prompts(_pooled(), path)
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]  # no temporary file left behind


def test_end_task_that_raises_changes_no_smope_layer() -> None:
    model = _smoped()
    model.extra_pool = norga.PrefixPool(3, 1, 4, 192, momentum=0.1)
    model.extra_pool.set_task(torch.tensor([0, 1]))
    with norga.count_usage(model):
        model(torch.randn(2, 3, 32, 32))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="per-sample task ids are set"):
        norga.end_task(model)
    _assert_unchanged(model, before)
