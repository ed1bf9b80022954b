"""The authors' SMoPE layer, imported from a checkout of their code that the user gives (never copied here).

The authors' repository (Minhchuyentoancbn/SMoPE) defines the prompt in ``models/zoo.py`` (``OnePrompt``: one
``(1, head_dim)`` Parameter per layer, expert and head for keys and for values, ``e_pk_{layer}_{expert}_{head}``
and ``e_pv_...``) and the attention that consumes it in ``models/vit.py`` (``Attention``). Their
``VisionTransformer.forward`` calls, for block ``i``, ``prompt.forward(q, i, x, train=..., task_id=...)``, which
returns ``([Ek, Ev, eps_decay], loss, x)``, and hands that list to the block's attention as
``attn(x, prompt=[Ek, Ev, eps_decay], topk=K, train=..., reduce_query=True)`` (``ViTZoo.forward`` sets
``reduce_query`` and ``topk = prompt.topk`` for SMoPE). :class:`AuthorsSMoPELayer` makes exactly those two calls
for block 0.

:func:`load_authors` imports the package ``models`` of the checkout under a private name, so that nothing of it is
put on ``sys.path`` and no other module named ``models`` is shadowed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Tuple

import torch
from torch import nn

import norga

#: The private name the authors' ``models`` package is imported under.
PACKAGE = "_smope_authors_models"


def load_authors(checkout: str) -> Tuple[Any, Any]:
    """``(OnePrompt, Attention)`` from ``checkout/models/zoo.py`` and ``checkout/models/vit.py``.

    Raises:
        FileNotFoundError: ``checkout`` has no ``models/__init__.py``.
    """
    init = os.path.join(checkout, "models", "__init__.py")
    if not os.path.isfile(init):
        raise FileNotFoundError(
            f"--authors {checkout!r}: no models/__init__.py there; give the root of a checkout of the authors' SMoPE "
            "code (Minhchuyentoancbn/SMoPE), which has models/zoo.py (OnePrompt) and models/vit.py (Attention)"
        )
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]  # another checkout imported before (the smoke test's stand-in, for example)
    spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[os.path.dirname(init)])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    zoo = importlib.import_module(PACKAGE + ".zoo")
    vit = importlib.import_module(PACKAGE + ".vit")
    return zoo.OnePrompt, vit.Attention


class AuthorsSMoPELayer(nn.Module):
    """Block 0's attention with the authors' SMoPE prompt, called as their ``VisionTransformer`` calls it.

    Args:
        one_prompt: Their ``OnePrompt`` class.
        attention: Their ``Attention`` class.
        dim: Width (768 for ViT-B).
        num_heads: Heads (12).
        num_experts: Experts per head; their ``prompt_param[0]`` (``e_p_length``) is twice it.
        top_k: Experts selected per sample and head (their ``prompt_param[1]``).
    """

    def __init__(self, one_prompt: Any, attention: Any, dim: int, num_heads: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        # prompt_param: e_p_length, topk, mu_router, mu_router_old, eps (the losses' weights play no part here)
        params = [2 * num_experts, top_k, 0.0, 0.0, 0.4]
        self.prompt = one_prompt(dim, 10, params, key_dim=dim, num_heads=num_heads)
        self.attn = attention(dim, num_heads=num_heads, qkv_bias=True)
        for name, p in self.prompt.named_parameters():  # one layer: only block 0's experts are trained
            if not name.startswith("e_pk_0_") and not name.startswith("e_pv_0_"):
                p.requires_grad_(False)
        self.num_heads, self.num_experts, self.top_k = num_heads, num_experts, top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.forward_with_scores(x)
        return out

    def forward_with_scores(self, x: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        """Their attention's output and what it returns beside it (``(prompt_score, prompt_score_label)``)."""
        prefix, _, x = self.prompt.forward(None, 0, x, train=self.training)
        out, scores = self.attn(x, prompt=prefix, topk=self.top_k, train=self.training, reduce_query=True)
        return out, scores

    def selected(self, x: torch.Tensor) -> torch.Tensor:
        """The experts their attention selects for ``x``, ``(B, H, K)`` sorted: the top ``K`` of the routing
        scores it returns (their ``prompt_score_label_``)."""
        _, (_, label) = self.forward_with_scores(x)
        return label.squeeze(2).topk(self.top_k, dim=-1).indices.sort(dim=-1).values

    @torch.no_grad()
    def copy_into(self, layer: norga.PrefixMoEAttention) -> None:
        """Give norga's SMoPE layer (its ``prompt`` an :class:`norga.SMoPE`) these experts and projections."""
        smope = layer.prompt
        assert isinstance(smope, norga.SMoPE)
        for h in range(self.num_heads):
            for j in range(self.num_experts):
                smope.keys[h, j].copy_(getattr(self.prompt, f"e_pk_0_{j}_{h}")[0])
                smope.values[h, j].copy_(getattr(self.prompt, f"e_pv_0_{j}_{h}")[0])
        layer.qkv.load_state_dict(self.attn.qkv.state_dict())
        layer.proj.load_state_dict(self.attn.proj.state_dict())
