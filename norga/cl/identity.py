"""Task-identity inference (TII): each sample's task from its own features, never from its batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .statistics import ClassStatistics

# --------------------------------------------------------------------------------------------------
# Task-identity inference
# --------------------------------------------------------------------------------------------------


class NearestClassMean:
    """Nearest-class-mean classifier, used for task-identity inference (TII).

    Each sample's prediction depends on that sample only: there is no batch-wise vote (the L2P /
    DualPrompt majority vote leaks across samples). Euclidean distances are computed pair by pair
    (no `‖x‖² - 2x·m + ‖m‖²` matmul trick), so they do not change with the batch size.

    Args:
        means: Class means of shape `(K, F)`.
        classes: Global class id of each row of `means`; defaults to `0..K-1`.
        metric: `"cosine"` (largest cosine similarity) or `"euclidean"` (smallest distance).

    Raises:
        ValueError: On a bad shape, a repeated class id or an unknown metric.
    """

    def __init__(self, means: Tensor, classes: Sequence[int] | Tensor | None = None, metric: str = "cosine") -> None:
        if means.dim() != 2 or means.shape[0] == 0:
            raise ValueError(f"means must have shape (K, F) with K >= 1, got shape {tuple(means.shape)}")
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        if classes is None:
            classes = torch.arange(means.shape[0])
        ids = torch.as_tensor(classes, dtype=torch.long, device=means.device).flatten()
        if ids.shape[0] != means.shape[0]:
            raise ValueError(f"classes must have {means.shape[0]} ids (one per mean), got {ids.shape[0]}")
        if ids.unique().numel() != ids.numel():
            raise ValueError(f"classes must not repeat an id, got {ids.tolist()}")
        self.means = means.detach()
        self.classes = ids
        self.metric = metric

    @classmethod
    def from_statistics(
        cls, stats: ClassStatistics, classes: Sequence[int] | None = None, metric: str = "cosine"
    ) -> NearestClassMean:
        """Builds the classifier from the means of `stats` (all seen classes by default).

        Raises:
            ValueError: If a class has no sample.
        """
        ids = stats.classes if classes is None else [int(c) for c in classes]
        if not ids:
            raise ValueError("stats must hold at least one class, got none")
        return cls(torch.stack([stats.mean(c) for c in ids]), ids, metric)

    @classmethod
    def from_features(cls, features: Tensor, labels: Tensor, metric: str = "cosine") -> NearestClassMean:
        """Builds the classifier from the per-class means of `features` (B, F) with `labels` (B,)."""
        stats = ClassStatistics()
        stats.update(features, labels)
        return cls.from_statistics(stats, metric=metric).to(features.dtype)

    def to(self, *args: Any, **kwargs: Any) -> NearestClassMean:
        """Moves or casts the means like `Tensor.to` (`.to("cuda")`, `.to(torch.float16)`).

        Returns:
            `self`, with the class ids on the means' device.
        """
        self.means = self.means.to(*args, **kwargs)
        self.classes = self.classes.to(self.means.device)
        return self

    def scores(self, features: Tensor) -> Tensor:
        """Per-class scores `(B, K)`, higher is closer (cosine similarity or minus distance).

        Raises:
            ValueError: If `features` is not `(B, F)` with the means' F.
        """
        if features.dim() != 2 or features.shape[1] != self.means.shape[1]:
            raise ValueError(f"features must have shape (B, {self.means.shape[1]}), got shape {tuple(features.shape)}")
        means = self.means.to(features)
        if self.metric == "cosine":
            # Row-wise dot products with every mean: (B, 1, F) * (1, K, F) summed over F.
            x = rearrange(F.normalize(features, dim=-1), "b f -> b 1 f")
            m = rearrange(F.normalize(means, dim=-1), "k f -> 1 k f")
            return (x * m).sum(-1)
        return -torch.cdist(features, means, compute_mode="donot_use_mm_for_euclid_dist")

    def predict_class(self, features: Tensor) -> Tensor:
        """Global class id of the nearest mean for each row of `features` (B, F); int64 `(B,)`."""
        return self.classes.to(features.device)[self.scores(features).argmax(-1)]

    def predict_task(self, features: Tensor, task_of_class: Tensor) -> Tensor:
        """Task id of the nearest class for each row of `features`, via the lookup table.

        Args:
            features: Tensor of shape `(B, F)`.
            task_of_class: Lookup table class id -> task id, from [`task_of_class`][norga.cl.task_of_class].

        Returns:
            Int64 tensor of shape `(B,)`.

        Raises:
            ValueError: If a class of the classifier is not in the table.
        """
        if int(self.classes.max()) >= task_of_class.shape[0]:
            raise ValueError(
                f"task_of_class has {task_of_class.shape[0]} entries, class {int(self.classes.max())} is not covered"
            )
        return task_of_class.to(features.device)[self.predict_class(features)]


def task_id_accuracy(pred_task: Tensor, true_task: Tensor) -> float:
    """Task-identity accuracy in percent (0-100).

    Args:
        pred_task: Predicted task ids, shape `(B,)`.
        true_task: True task ids, same shape.

    Returns:
        The percentage of samples whose task was predicted correctly.

    Raises:
        ValueError: If the shapes differ or there is no sample.
    """
    if pred_task.shape != true_task.shape:
        raise ValueError(
            "pred_task and true_task must have the same shape, "
            f"got {tuple(pred_task.shape)} and {tuple(true_task.shape)}"
        )
    if pred_task.numel() == 0:
        raise ValueError("task_id_accuracy needs at least one sample, got 0")
    return 100.0 * float((pred_task == true_task.to(pred_task.device)).double().mean())
