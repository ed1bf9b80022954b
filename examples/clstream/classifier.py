"""The classifier of every method: a linear discriminant (LDA) of Gaussian class statistics, and the task-identity
head built the same way on the frozen pre-trained features.

`norga.cl` keeps the statistics (`cl.ClassStatistics`) and offers HiDe-Prompt's classifier alignment
(`cl.align_classifier`), which retrains head rows by SGD on features sampled from them. The main job solves for
the rows in closed form instead (`lda_head`): no sampling and no optimizer, so the head of a task does not
depend on a random draw; `norga.cl` has no closed-form head, so it lives here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from norga import cl

from .config import Config
from .streams import Stream, task_indices


def lda_head(stats: cl.ClassStatistics, classes: Sequence[int], shrinkage: float) -> tuple[Tensor, Tensor]:
    """Linear classifier of Gaussian class statistics with a shared covariance (linear discriminant analysis).

    `logit_c(x) = x·Σ⁻¹μ_c − ½ μ_c·Σ⁻¹μ_c` with `Σ` the mean of the classes' covariances plus `shrinkage`
    times its mean variance on the diagonal. Only means and covariances are kept, never images or features of
    past tasks (as in HiDe-Prompt's classifier alignment, which samples from the same statistics).

    Args:
        stats: Statistics holding at least 2 samples of every class in `classes`.
        classes: Global class ids of the rows to solve for.
        shrinkage: Ridge on the shared covariance, relative to its mean variance.

    Returns:
        `(weight (K, F), bias (K,))` for `classes`, float32.
    """
    means = torch.stack([stats.mean(c) for c in classes]).double()
    cov = torch.stack([stats.covariance(c) for c in classes]).double().mean(0)
    cov = cov + shrinkage * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    w = torch.linalg.solve(cov, means.T).T  # (K, F)
    b = -0.5 * (means * w).sum(1)
    return w.float(), b.float()


@torch.no_grad()
def set_rows(head: nn.Linear, classes: Sequence[int], weight: Tensor, bias: Tensor) -> None:
    """Writes the classifier rows of `classes`; the other rows are left unchanged."""
    rows = torch.as_tensor(list(classes))
    head.weight[rows] = weight.to(head.weight)
    head.bias[rows] = bias.to(head.bias)


def task_identity_heads(stream: Stream, train_feats: Tensor, test_feats: Tensor, cfg: Config) -> list[Tensor]:
    """Task-identity inference (TII): a linear head on the frozen pre-trained features.

    After each task its classes' Gaussian statistics (mean, covariance) are added and the head is the
    `lda_head` of every class seen so far. Each prediction depends on its own sample only.

    Returns:
        For each task t, the class predicted for every test sample among the classes seen after t; its task
        (through `cl.task_of_class`) selects the sample's prompt.
    """
    stats = cl.ClassStatistics()
    head = nn.Linear(train_feats.shape[1], stream.num_classes)
    preds = []
    for t in tqdm(range(stream.num_tasks), desc="task-identity head", disable=not cfg.progress, leave=False):
        idx = task_indices(stream.train.labels, stream.splits[t])
        stats.update(train_feats[idx].double(), stream.train.labels[idx])
        seen = stream.seen_classes(t)
        set_rows(head, seen, *lda_head(stats, seen, cfg.lda_shrinkage))
        with torch.no_grad():
            preds.append(cl.mask_unseen_logits(head(test_feats), seen).argmax(-1))
    return preds
