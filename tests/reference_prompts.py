"""Independent references for the prompt methods of the CODA-Prompt lineage, written from the authors' code
(`models/zoo.py` of Minhchuyentoancbn/SMoPE: `L2P`, `DualPrompt`, `CodaPrompt`, `VQPrompt`, `ViTZoo.forward`) in
its own form: one layer at a time, the prompts indexed and reshaped as they do, in float64.

Nothing here imports norga. Each function takes the query `(B, key_dim)` and one layer's parameters (as the
authors name them) and returns `(Ek, Ev, loss)` with `Ek`, `Ev` of shape `(B, Lp, dim)`.
"""

from __future__ import annotations

import torch


def normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`F.normalize`: `x / max(||x||, 1e-12)` along `dim`, in float64."""
    x = x.double()
    return x / x.pow(2).sum(dim=dim, keepdim=True).sqrt().clamp_min(1e-12)


def cosines(x_querry: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """`einsum('bj,kj->bk', normalize(q).detach(), normalize(K))`."""
    return torch.einsum("bj,kj->bk", normalize(x_querry, 1), normalize(K, 1))


def l2p_layer(x_querry, K, p, top_k: int, train: bool, pull: str = "cross"):
    """`DualPrompt.forward` with `task_id_bootstrap=False` (the authors' `L2P`) for one e-layer."""
    B = x_querry.shape[0]
    cos_sim = cosines(x_querry, K)
    k_idx = torch.topk(cos_sim, top_k, dim=1).indices
    loss = None
    if train:
        loss = (1.0 - cos_sim[:, k_idx]).sum() if pull == "cross" else (1.0 - cos_sim.gather(1, k_idx)).sum()
    P_ = p.double()[k_idx]  # (B, K, e_l, d)
    i = p.shape[1] // 2
    return P_[:, :, :i, :].reshape(B, -1, p.shape[-1]), P_[:, :, i:, :].reshape(B, -1, p.shape[-1]), loss, k_idx


def dual_e_layer(x_querry, K, p, train: bool, task_id: int):
    """`DualPrompt.forward` for one e-layer: the task's prompt in training (bootstrap), the top-1 otherwise."""
    B = x_querry.shape[0]
    cos_sim = cosines(x_querry, K)
    i = p.shape[1] // 2
    if train:
        loss = (1.0 - cos_sim[:, task_id]).sum()
        P_ = p.double()[task_id].expand(B, -1, -1)
        return P_[:, :i, :].reshape(B, -1, p.shape[-1]), P_[:, i:, :].reshape(B, -1, p.shape[-1]), loss, None
    k_idx = torch.topk(cos_sim, 1, dim=1).indices
    P_ = p.double()[k_idx]  # (B, 1, e_l, d)
    return P_[:, :, :i, :].reshape(B, -1, p.shape[-1]), P_[:, :, i:, :].reshape(B, -1, p.shape[-1]), None, k_idx


def dual_g_layer(x_querry, g_p):
    """`DualPrompt.forward` for one g-layer: the shared prompt, split."""
    B = x_querry.shape[0]
    j = g_p.shape[0] // 2
    P_ = g_p.double().expand(B, -1, -1)
    return P_[:, :j, :], P_[:, j:, :]


def ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    return ((t @ t.T - torch.eye(t.shape[0], dtype=torch.float64)) ** 2).mean()


def coda_layer(x_querry, K, A, p, task_count: int, n_tasks: int, train: bool, ortho_mu: float):
    """`CodaPrompt.forward` for one layer."""
    pt = int(K.shape[0] / n_tasks)
    s, f = int(task_count * pt), int((task_count + 1) * pt)
    K, A, p = K.double(), A.double(), p.double()
    if train and task_count > 0:  # earlier tasks' components detached
        K, A, p = (torch.cat((t[:s].detach().clone(), t[s:f]), dim=0) for t in (K, A, p))
    else:
        K, A, p = K[:f], A[:f], p[:f]
    a_querry = torch.einsum("bd,kd->bkd", x_querry.double(), A)
    n_K = normalize(K, 1)
    q = normalize(a_querry, 2)
    aq_k = torch.einsum("bkd,kd->bk", q, n_K)
    P_ = torch.einsum("bk,kld->bld", aq_k, p)
    i = p.shape[1] // 2
    loss = None
    if train and ortho_mu > 0:
        loss = ortho_mu * (ortho_penalty(K) + ortho_penalty(A) + ortho_penalty(p.reshape(p.shape[0], -1)))
    return P_[:, :i, :], P_[:, i:, :], loss, aq_k


def gram_schmidt(vv: torch.Tensor, task_count: int, pool: int, n_tasks: int) -> torch.Tensor:
    """`CodaPrompt.gram_schmidt`: columns of the transposed, flattened tensor; classical projections; the
    new components drawn with `torch.randn_like` in order; normalised at the end; the rest zeros."""
    shape = vv.shape
    vv = vv.reshape(shape[0], -1).T
    uu = torch.zeros_like(vv)
    pt = int(pool / n_tasks)
    s, f = int(task_count * pt), int((task_count + 1) * pt)
    if s > 0:
        uu[:, 0:s] = vv[:, 0:s].clone()
    for k in range(s, f):
        vk = torch.randn_like(vv[:, k])
        uk = 0
        for j in range(0, k):
            uj = uu[:, j].clone()
            uk = uk + (vk * uj).sum() / (uj * uj).sum() * uj
        uu[:, k] = vk - uk
    for k in range(s, f):
        uu[:, k] = uu[:, k] / uu[:, k].norm()
    return uu.T.reshape(shape)


def vq_layer(x_querry, K, p, soft_t: float, train: bool, vq_coef: float = 0.4, comit_coef: float = 0.1):
    """`VQPrompt.forward` for one layer."""
    n_K = normalize(K, 1)
    p = p.double()
    cos_sim = torch.einsum("bd,kd->bk", x_querry.double(), n_K)
    alpha = torch.softmax(cos_sim / soft_t, dim=1)
    p_a = torch.einsum("bk,kld->bld", alpha, p)
    dist = torch.pow(p_a.unsqueeze(1) - p, 2)
    idxmin = dist.sum(-1).sum(-1).min(1).indices
    quantized = p.index_select(0, idxmin.view(-1))
    e_latent = ((p_a - quantized.detach()) ** 2).mean()
    q_latent = ((quantized - p_a.detach()) ** 2).mean()
    P_ = p_a + (quantized - p_a).detach()
    i = p.shape[1] // 2
    loss = vq_coef * e_latent + comit_coef * q_latent if train else None
    return P_[:, :i, :], P_[:, i:, :], loss, (idxmin, dist.sum(-1).sum(-1), p_a)
