"""norga._compat, where every version check lives: the features that need a newer torch say which release, or fall
back to what is safe. Each test runs on every supported torch: a newer one pretends to be older (`TORCH`
monkeypatched) where the fallback only reads the version, and checks the real behaviour of its own release."""

from __future__ import annotations

import pytest
import torch
from test_misuse import _compiled_mismatch, _pooled

import norga
from norga import _compat
from norga.functional import available_backends, flex, prefix_attention, select_backend


def test_version_tuple():
    for text, want in [("2.14.1", (2, 14)), ("2.13.0+cpu", (2, 13)), ("2.16.0a0+git1234", (2, 16)), ("3.0", (3, 0))]:
        assert _compat.version_tuple(text) == want
    assert _compat.TORCH == _compat.version_tuple(torch.__version__)


def test_require_names_the_release(monkeypatch):
    monkeypatch.setitem(_compat.NEEDS, "future", (99, 0))
    with pytest.raises(ValueError, match=r"^thing needs torch >= 99\.0, this is torch 2\.\d+.*; use another$"):
        _compat.require("future", "thing", "use another")
    monkeypatch.setitem(_compat.NEEDS, "future", (2, 5))
    _compat.require("future", "thing", "use another")  # every supported torch has it: nothing raised


@pytest.mark.parametrize("pretend", [(2, 5), (2, 10)])
def test_flex_needs_torch_2_11(monkeypatch, pretend):
    """Before torch 2.11 FlexAttention cannot compile flex's score_mod (it reads SMoPE's logits and the token bias by
    index): `flex` is not listed, and asking for it by name, or calling it, says which torch it needs."""
    monkeypatch.setattr(_compat, "TORCH", min(pretend, _compat.TORCH))
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    pk = torch.randn(2, 3, 4, 8)
    assert "flex" not in available_backends("cpu") and "merge" in available_backends("cpu")
    calls = (
        lambda: select_backend(q, "flex"),
        lambda: prefix_attention(q, k, v, (pk, pk), backend="flex"),
        lambda: flex.flex_attention(q, k, v, pk, pk, None, None, None, 8**-0.5),
    )
    for call in calls:
        with torch.no_grad(), pytest.raises(ValueError, match=r"backend 'flex' needs torch >= 2\.11, this is torch"):
            call()


@pytest.mark.parametrize("pretend", [None, (2, 6)], ids=["installed", "torch-2.6"])
def test_auto_under_compile_before_is_exporting(monkeypatch, pretend):
    """`auto` picks `merge` on CPU, also under torch.compile, but `sdpa` under torch.export (an exported program keeps
    an autograd Function's forward only). Before torch 2.7 nothing tells an export from a compilation: `sdpa` under
    both."""
    if pretend is not None:
        monkeypatch.setattr(_compat, "TORCH", min(pretend, _compat.TORCH))
    q = torch.randn(1, 2, 5, 8)
    assert select_backend(q, "auto") == "merge"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as inside torch.compile, not exporting
    assert select_backend(q, "auto") == ("merge" if _compat.has("export") else "sdpa")


@pytest.mark.parametrize("pretend", [None, (2, 13), (2, 6)], ids=["installed", "torch-2.13", "torch-2.6"])
def test_compiled_misuse_says_where_its_message_is(monkeypatch, pretend):
    """Inside torch.compile(fullgraph=True) the graph break carries norga's message from torch 2.14; on 2.7-2.13
    (where Dynamo cannot format it) a fixed text says that a check failed and that its message shows eagerly,
    where it does; before 2.7 the graph break has no message (`graph_break` has no `msg`)."""
    if pretend is not None:
        monkeypatch.setattr(_compat, "TORCH", min(pretend, _compat.TORCH))
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        _compiled_mismatch()
    if _compat.has("compile_messages"):
        expected = ["3 task ids were set but the batch has 2 samples"]
    elif _compat.TORCH >= (2, 7):
        expected = ["norga: a check failed", "eagerly", "torch 2.14"]
    else:
        expected = ["graph_break"]
    assert all(fragment in str(info.value) for fragment in expected), str(info.value)
    torch._dynamo.reset()
    model = _pooled().eval()
    norga.set_task(model, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="3 task ids were set but the batch has 2 samples"):
        model(torch.randn(2, 3, 32, 32))
