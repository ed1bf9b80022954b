"""Class-incremental learning helpers: task splits, logit masks, metrics, TAP and TII.

Everything here is pure torch and device-agnostic. The pieces follow the pipeline of HiDe-Prompt,
which the NoRGa authors ran:

* task splits of a (seeded) class order, and the class -> task lookup table;
* logit masks: hide classes not seen yet, or keep only each sample's own task (WTP training,
  task-incremental evaluation);
* the metrics FA, CA and FM on the accuracy matrix ``acc[t][j]`` (accuracy in percent on task j
  after training task t);
* Gaussian class statistics and classifier alignment on features sampled from them (TAP);
* a nearest-class-mean task-identity predictor (TII) whose prediction for a sample never depends on
  the rest of its batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "AccuracyMatrix",
    "ClassStatistics",
    "NearestClassMean",
    "align_classifier",
    "class_order",
    "contrastive_regularization",
    "cumulative_average",
    "final_average",
    "forgetting",
    "freeze_gates",
    "mask_to_task",
    "mask_unseen_logits",
    "remap_labels",
    "split_tasks",
    "task_id_accuracy",
    "task_of_class",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Class order and task splits
# --------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    """Checks that ``value`` is an int (not a bool) of at least ``minimum`` and returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def class_order(num_classes: int, seed: int | None) -> list[int]:
    """Returns the order in which classes are presented to the learner.

    Args:
        num_classes: Number of classes, at least 1.
        seed: Seed of the permutation (``torch.Generator``, so the same seed gives the same order
            on every machine). ``None`` gives the identity order ``0, 1, ..., num_classes - 1``.

    Returns:
        A permutation of ``range(num_classes)`` as a list of ints.

    Raises:
        TypeError: If ``num_classes`` or ``seed`` is not an int.
        ValueError: If ``num_classes`` < 1.
    """
    _check_int("num_classes", num_classes, 1)
    if seed is None:
        return list(range(num_classes))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} ({seed!r})")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_classes, generator=generator).tolist()


def split_tasks(
    class_order: Sequence[int],
    num_tasks: int | None = None,
    classes_per_task: int | Sequence[int] | None = None,
) -> list[list[int]]:
    """Cuts a class order into consecutive tasks.

    Give exactly one of ``num_tasks`` (equal tasks) or ``classes_per_task`` (an int for equal
    tasks, or one size per task, e.g. ``[50, 10, 10, 10, 10, 10]``).

    Args:
        class_order: Class ids in presentation order, without repeats.
        num_tasks: Number of equal tasks; must divide ``len(class_order)``.
        classes_per_task: Size of every task (int, must divide ``len(class_order)``) or the size of
            each task (sequence of positive ints summing to ``len(class_order)``).

    Returns:
        One list of class ids per task, in order.

    Raises:
        TypeError: If a size is not an int.
        ValueError: If both or neither of ``num_tasks`` / ``classes_per_task`` are given, the class
            order is empty or has repeats, a size is < 1, the classes do not divide evenly, or the
            sizes do not sum to the number of classes.
    """
    order = [int(c) for c in class_order]
    total = len(order)
    if total == 0:
        raise ValueError("class_order must not be empty")
    if len(set(order)) != total:
        raise ValueError(f"class_order must not repeat a class, got {total} ids but {len(set(order))} distinct")
    if (num_tasks is None) == (classes_per_task is None):
        raise ValueError(
            f"give exactly one of num_tasks or classes_per_task, got num_tasks={num_tasks!r}, "
            f"classes_per_task={classes_per_task!r}"
        )
    if num_tasks is not None:
        _check_int("num_tasks", num_tasks, 1)
        if total % num_tasks:
            raise ValueError(f"{total} classes do not divide evenly into num_tasks={num_tasks}")
        sizes = [total // num_tasks] * num_tasks
    elif isinstance(classes_per_task, int) and not isinstance(classes_per_task, bool):
        _check_int("classes_per_task", classes_per_task, 1)
        if total % classes_per_task:
            raise ValueError(f"{total} classes do not divide evenly into classes_per_task={classes_per_task}")
        sizes = [classes_per_task] * (total // classes_per_task)
    elif isinstance(classes_per_task, Sequence):
        sizes = [_check_int("classes_per_task[i]", s, 1) for s in classes_per_task]
        if sum(sizes) != total:
            raise ValueError(f"classes_per_task must sum to the number of classes {total}, got {sum(sizes)} ({sizes})")
    else:
        raise TypeError(f"classes_per_task must be an int or a sequence of ints, got {type(classes_per_task).__name__}")
    splits, start = [], 0
    for size in sizes:
        splits.append(order[start : start + size])
        start += size
    return splits


def task_of_class(splits: Sequence[Sequence[int]], num_classes: int | None = None) -> Tensor:
    """Builds the lookup table class id -> task id.

    Args:
        splits: One sequence of class ids per task, as returned by :func:`split_tasks`.
        num_classes: Length of the table; defaults to ``max class id + 1``.

    Returns:
        An int64 tensor of shape ``(num_classes,)`` with the task of each class, ``-1`` for a class
        in no task.

    Raises:
        ValueError: If ``splits`` is empty, a class id is negative or ``>= num_classes``, or a class
            is in two tasks.
    """
    flat = [int(c) for split in splits for c in split]
    if not flat:
        raise ValueError("splits must hold at least one class, got none")
    if num_classes is None:
        num_classes = max(flat) + 1
    if min(flat) < 0 or max(flat) >= num_classes:
        raise ValueError(f"class ids must lie in [0, {num_classes}), got min {min(flat)}, max {max(flat)}")
    table = torch.full((num_classes,), -1, dtype=torch.long)
    for task, split in enumerate(splits):
        for c in split:
            if table[int(c)] != -1:
                raise ValueError(f"class {int(c)} is in task {int(table[int(c)])} and in task {task}")
            table[int(c)] = task
    return table


def remap_labels(labels: Tensor, classes: Sequence[int] | Tensor) -> Tensor:
    """Maps global class ids to their position in ``classes`` (e.g. to index a task-local head).

    Args:
        labels: Int tensor of global class ids, any shape.
        classes: The class ids; ``classes[i]`` maps to ``i``.

    Returns:
        An int64 tensor shaped like ``labels`` with local indices.

    Raises:
        ValueError: If a label is not in ``classes`` or ``classes`` repeats an id.
    """
    classes_t = torch.as_tensor(classes, dtype=torch.long, device=labels.device).flatten()
    if classes_t.unique().numel() != classes_t.numel():
        raise ValueError(f"classes must not repeat an id, got {classes_t.tolist()}")
    hits = labels.long().unsqueeze(-1) == classes_t  # (..., K)
    found = hits.any(-1)
    if not bool(found.all()):
        missing = labels[~found].unique().tolist()
        raise ValueError(f"labels {missing} are not in classes {classes_t.tolist()}")
    return hits.long().argmax(-1)


# --------------------------------------------------------------------------------------------------
# Logit masks
# --------------------------------------------------------------------------------------------------


def _class_ids(classes: Sequence[int] | Tensor, num_classes: int, device: torch.device) -> Tensor:
    """Validates class ids against ``num_classes`` and returns them as an int64 tensor."""
    ids = torch.as_tensor(classes, device=device).flatten()
    if ids.numel() == 0:
        return ids.long()
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"class ids must be integers, got dtype {ids.dtype}")
    ids = ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
        raise ValueError(f"class ids must lie in [0, {num_classes}), got min {int(ids.min())}, max {int(ids.max())}")
    return ids


def mask_unseen_logits(logits: Tensor, seen_classes: Sequence[int] | Tensor, fill: float = float("-inf")) -> Tensor:
    """Returns a copy of ``logits`` in which the classes not seen yet hold ``fill``.

    Args:
        logits: Tensor of shape ``(..., C)``, classes on the last dim.
        seen_classes: Ids of the classes seen so far, each in ``[0, C)``.
        fill: Value for the unseen classes (``-inf`` removes them from a softmax).

    Returns:
        A new tensor shaped like ``logits``; ``logits`` itself is not changed.

    Raises:
        TypeError: If ``seen_classes`` are not integers.
        ValueError: If ``logits`` has no class dim or a class id is out of range.
    """
    if logits.dim() < 1:
        raise ValueError(f"logits must have shape (..., C), got shape {tuple(logits.shape)}")
    num_classes = logits.shape[-1]
    ids = _class_ids(seen_classes, num_classes, logits.device)
    seen = torch.zeros(num_classes, dtype=torch.bool, device=logits.device)
    seen[ids] = True
    return logits.masked_fill(~seen, fill)


def mask_to_task(
    logits: Tensor,
    task_ids: Tensor,
    splits: Sequence[Sequence[int]],
    fill: float = float("-inf"),
) -> Tensor:
    """Keeps, for each sample, only the logits of its own task's classes.

    Used for task-incremental evaluation and for WTP training, where the logits of the other tasks
    are masked.

    Args:
        logits: Tensor of shape ``(B, C)``.
        task_ids: Int tensor of shape ``(B,)``, the task of each sample.
        splits: One sequence of class ids per task, ids in ``[0, C)``.
        fill: Value for the classes of other tasks.

    Returns:
        A new ``(B, C)`` tensor; ``logits`` itself is not changed.

    Raises:
        TypeError: If ``task_ids`` is not an integer tensor.
        ValueError: On a shape mismatch, a task id outside ``[0, len(splits))`` or a class id
            outside ``[0, C)``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, C), got shape {tuple(logits.shape)}")
    if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
        raise TypeError(f"task_ids must be an integer tensor, got dtype {task_ids.dtype}")
    if task_ids.shape != logits.shape[:1]:
        raise ValueError(f"task_ids must have shape ({logits.shape[0]},) to match logits, got {tuple(task_ids.shape)}")
    num_tasks, num_classes = len(splits), logits.shape[1]
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
        raise ValueError(
            f"task_ids must lie in [0, {num_tasks}), got min {int(task_ids.min())}, max {int(task_ids.max())}"
        )
    allowed = torch.zeros(num_tasks, num_classes, dtype=torch.bool, device=logits.device)
    for task, split in enumerate(splits):
        allowed[task, _class_ids(split, num_classes, logits.device)] = True
    return logits.masked_fill(~allowed[task_ids.to(logits.device).long()], fill)


# --------------------------------------------------------------------------------------------------
# Metrics: FA, CA, FM on the accuracy matrix
# --------------------------------------------------------------------------------------------------


def _as_matrix(acc: Tensor | Sequence[Sequence[float | None]]) -> Tensor:
    """Converts an accuracy matrix (tensor or nested lists, ``None`` for missing) to float64."""
    if isinstance(acc, Tensor):
        mat = acc.detach().to("cpu", torch.float64)
    else:
        mat = torch.tensor([[math.nan if v is None else float(v) for v in row] for row in acc], dtype=torch.float64)
    if mat.dim() != 2 or mat.shape[0] != mat.shape[1] or mat.shape[0] == 0:
        raise ValueError(f"acc must be a non-empty square (T, T) matrix, got shape {tuple(mat.shape)}")
    lower = torch.tril(torch.ones_like(mat, dtype=torch.bool))
    bad = ~mat.isfinite() & lower
    if bool(bad.any()):
        t, j = bad.nonzero()[0].tolist()
        raise ValueError(
            f"acc must be filled with finite values on and below the diagonal, acc[{t}][{j}] is {mat[t, j].item()}"
        )
    return mat


def final_average(acc: Tensor | Sequence[Sequence[float | None]]) -> float:
    """Final average accuracy FA: the mean of ``acc[T-1][j]`` over all tasks j.

    Args:
        acc: ``(T, T)`` accuracy matrix in percent, ``acc[t][j]`` the accuracy on task j after
            training task t; entries above the diagonal are ignored (NaN or ``None``).

    Returns:
        FA in percent.

    Raises:
        ValueError: If ``acc`` is not square or misses an entry on or below the diagonal.
    """
    mat = _as_matrix(acc)
    return float(mat[-1].mean())


def cumulative_average(acc: Tensor | Sequence[Sequence[float | None]]) -> float:
    """Cumulative average accuracy CA: the mean over t of the mean of ``acc[t][0..t]``.

    Args:
        acc: ``(T, T)`` accuracy matrix in percent (see :func:`final_average`).

    Returns:
        CA in percent.

    Raises:
        ValueError: If ``acc`` is not square or misses an entry on or below the diagonal.
    """
    mat = _as_matrix(acc)
    row_means = [mat[t, : t + 1].mean() for t in range(mat.shape[0])]
    return float(torch.stack(row_means).mean())


def forgetting(acc: Tensor | Sequence[Sequence[float | None]]) -> float:
    """Forgetting measure FM: mean over old tasks j < T-1 of ``max_{t<T-1} acc[t][j] - acc[T-1][j]``.

    The max runs over ``j <= t < T-1``, the rows in which task j had been trained. FM is ``0.0``
    when T == 1 (there is no old task).

    Args:
        acc: ``(T, T)`` accuracy matrix in percent (see :func:`final_average`).

    Returns:
        FM in percentage points (negative when the old tasks improved).

    Raises:
        ValueError: If ``acc`` is not square or misses an entry on or below the diagonal.
    """
    mat = _as_matrix(acc)
    num_tasks = mat.shape[0]
    if num_tasks == 1:
        return 0.0
    drops = [mat[j : num_tasks - 1, j].max() - mat[-1, j] for j in range(num_tasks - 1)]
    return float(torch.stack(drops).mean())


class AccuracyMatrix:
    """Accuracy matrix of a class-incremental run, ``acc[t][j]`` in percent (0-100).

    ``acc[t][j]`` is the accuracy on the test data of task j after training task t. Only the lower
    triangle (``j <= t``) is defined; the rest is NaN.

    Args:
        num_tasks: Number of tasks T, at least 1.

    Raises:
        TypeError: If ``num_tasks`` is not an int.
        ValueError: If ``num_tasks`` < 1.
    """

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = _check_int("num_tasks", num_tasks, 1)
        self.acc = torch.full((num_tasks, num_tasks), math.nan, dtype=torch.float64)

    def update(self, t: int, j: int, acc: float) -> None:
        """Records the accuracy on task ``j`` after training task ``t``.

        Args:
            t: Index of the task just trained, in ``[0, T)``.
            j: Index of the evaluated task, in ``[0, t]``.
            acc: Accuracy in percent, in ``[0, 100]``.

        Raises:
            TypeError: If ``t`` or ``j`` is not an int.
            ValueError: If ``t`` or ``j`` is out of range or ``acc`` is not in ``[0, 100]``.
        """
        _check_int("t", t, 0)
        _check_int("j", j, 0)
        if t >= self.num_tasks:
            raise ValueError(f"t must lie in [0, {self.num_tasks}), got {t}")
        if j > t:
            raise ValueError(f"j must be <= t (a task is evaluated only once trained), got t={t}, j={j}")
        acc = float(acc)
        if not 0.0 <= acc <= 100.0:
            raise ValueError(f"acc must be a percentage in [0, 100], got {acc}")
        self.acc[t, j] = acc

    def _upto(self, after_task: int | None) -> Tensor:
        """Returns the leading ``(t+1, t+1)`` block, ``t = after_task`` (default: the last task)."""
        t = self.num_tasks - 1 if after_task is None else _check_int("after_task", after_task, 0)
        if t >= self.num_tasks:
            raise ValueError(f"after_task must lie in [0, {self.num_tasks}), got {t}")
        return self.acc[: t + 1, : t + 1]

    def final_average(self, after_task: int | None = None) -> float:
        """FA (percent) after task ``after_task`` (default: the last); see :func:`final_average`."""
        return final_average(self._upto(after_task))

    def cumulative_average(self, after_task: int | None = None) -> float:
        """CA (percent) after task ``after_task`` (default: the last); see :func:`cumulative_average`."""
        return cumulative_average(self._upto(after_task))

    def forgetting(self, after_task: int | None = None) -> float:
        """FM (points) after task ``after_task`` (default: the last); see :func:`forgetting`."""
        return forgetting(self._upto(after_task))

    def to_list(self) -> list[list[float | None]]:
        """Returns the matrix as nested lists for JSON; missing entries (NaN) become ``None``."""
        return [[None if math.isnan(v) else v for v in row] for row in self.acc.tolist()]


# --------------------------------------------------------------------------------------------------
# Gaussian class statistics and classifier alignment (TAP)
# --------------------------------------------------------------------------------------------------


class ClassStatistics:
    """Per-class feature mean and covariance, accumulated over batches.

    Batches are merged with the pairwise update of Chan et al. (per class: count, mean and the
    centred scatter ``M2 = sum (x - mean)(x - mean)^T``), all in float64, so no large raw sums of
    squares are ever subtracted. Memory is ``F * F`` float64 numbers per class seen.

    Args:
        num_features: Feature size F; if ``None`` it is taken from the first batch.
    """

    def __init__(self, num_features: int | None = None) -> None:
        if num_features is not None:
            _check_int("num_features", num_features, 1)
        self.num_features = num_features
        self._count: dict[int, int] = {}
        self._mean: dict[int, Tensor] = {}
        self._m2: dict[int, Tensor] = {}

    @property
    def classes(self) -> list[int]:
        """The class ids seen so far, sorted."""
        return sorted(self._count)

    def count(self, c: int) -> int:
        """Number of samples seen for class ``c`` (0 if never seen)."""
        return self._count.get(int(c), 0)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Adds a batch of features to the statistics of their classes.

        Args:
            features: Tensor of shape ``(B, F)``.
            labels: Int tensor of shape ``(B,)`` with class ids.

        Raises:
            TypeError: If ``labels`` is not an integer tensor.
            ValueError: On a shape mismatch or a negative label.
        """
        if features.dim() != 2:
            raise ValueError(f"features must have shape (B, F), got shape {tuple(features.shape)}")
        if self.num_features is None:
            self.num_features = features.shape[1]
        if features.shape[1] != self.num_features:
            raise ValueError(f"features must have F={self.num_features} columns, got shape {tuple(features.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.shape != features.shape[:1]:
            raise ValueError(
                f"labels must have shape ({features.shape[0]},) to match features, got {tuple(labels.shape)}"
            )
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
        features = features.detach().double()
        labels = labels.to(features.device)
        for c in labels.unique().tolist():
            x = features[labels == c]
            m = x.shape[0]
            batch_mean = x.mean(0)
            centred = x - batch_mean
            batch_m2 = centred.T @ centred
            n = self._count.get(c, 0)
            if n == 0:
                self._count[c], self._mean[c], self._m2[c] = m, batch_mean, batch_m2
                continue
            delta = batch_mean - self._mean[c]
            total = n + m
            self._mean[c] = self._mean[c] + delta * (m / total)
            self._m2[c] = self._m2[c] + batch_m2 + torch.outer(delta, delta) * (n * m / total)
            self._count[c] = total

    def _require(self, c: int, minimum: int) -> int:
        """Returns ``int(c)`` after checking that class ``c`` has at least ``minimum`` samples."""
        c = int(c)
        if self._count.get(c, 0) < minimum:
            raise ValueError(f"class {c} needs at least {minimum} sample(s), has {self._count.get(c, 0)}")
        return c

    def mean(self, c: int) -> Tensor:
        """Mean feature of class ``c``, float64 of shape ``(F,)``.

        Raises:
            ValueError: If class ``c`` has no sample.
        """
        return self._mean[self._require(c, 1)].clone()

    def covariance(self, c: int) -> Tensor:
        """Unbiased covariance of class ``c`` (divides by n - 1, like ``np.cov``), float64 ``(F, F)``.

        Raises:
            ValueError: If class ``c`` has fewer than 2 samples.
        """
        c = self._require(c, 2)
        return self._m2[c] / (self._count[c] - 1)

    def sample(
        self,
        classes: Sequence[int],
        num_per_class: int,
        generator: torch.Generator | None = None,
        shrinkage: float = 1e-4,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """Draws features from ``N(mean_c, cov_c + shrinkage * I)`` for each class ``c``.

        The noise is drawn on the generator's device (CPU when ``generator`` is ``None``) and
        coloured with a float64 Cholesky factor, so the result only depends on the generator state.
        If a factorisation fails, the jitter added to the diagonal is multiplied by 10 (up to 6
        times) and a warning is logged.

        Args:
            classes: Class ids to draw, each with at least 2 samples seen.
            num_per_class: Number of features drawn per class.
            generator: Random generator; ``None`` uses torch's global one.
            shrinkage: Ridge added to the covariance diagonal, >= 0.
            dtype: Floating dtype of the returned features.

        Returns:
            ``(features, labels)``: ``(len(classes) * num_per_class, F)`` features on the device of
            the statistics, grouped by class in the order of ``classes``, and int64 labels.

        Raises:
            ValueError: If a class has fewer than 2 samples, ``classes`` is empty,
                ``shrinkage`` < 0, or a covariance stays singular after the jitter retries.
        """
        _check_int("num_per_class", num_per_class, 1)
        if shrinkage < 0:
            raise ValueError(f"shrinkage must be >= 0, got {shrinkage}")
        ids = [self._require(c, 2) for c in classes]
        if not ids:
            raise ValueError("classes must hold at least one class id, got none")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        out = []
        for c in ids:
            cov = self.covariance(c)
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            jitter = shrinkage
            for _ in range(7):
                chol, info = torch.linalg.cholesky_ex(cov + jitter * eye)
                if int(info) == 0:
                    break
                jitter = max(jitter * 10.0, 1e-10)
                logger.warning("covariance of class %d is not positive definite, jitter -> %g", c, jitter)
            else:
                raise ValueError(f"covariance of class {c} stays singular with a jitter of {jitter}")
            noise = torch.randn(
                num_per_class, cov.shape[0], generator=generator, dtype=torch.float64, device=gen_device
            )
            out.append(self._mean[c] + noise.to(cov.device) @ chol.T)
        device = out[0].device
        labels = torch.tensor(ids, dtype=torch.long, device=device).repeat_interleave(num_per_class)
        return torch.cat(out).to(dtype), labels

    def state_dict(self) -> dict[str, Tensor]:
        """Returns the statistics as tensors (classes, counts, means, scatters) for ``torch.save``."""
        ids = self.classes
        if not ids:
            return {"classes": torch.zeros(0, dtype=torch.long)}
        return {
            "classes": torch.tensor(ids, dtype=torch.long),
            "counts": torch.tensor([self._count[c] for c in ids], dtype=torch.long),
            "means": torch.stack([self._mean[c] for c in ids]),
            "m2": torch.stack([self._m2[c] for c in ids]),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replaces the statistics with those of :meth:`state_dict`.

        Raises:
            ValueError: If the state's feature size differs from ``num_features``.
        """
        self._count, self._mean, self._m2 = {}, {}, {}
        if state["classes"].numel() == 0:
            return
        num_features = state["means"].shape[1]
        if self.num_features is not None and num_features != self.num_features:
            raise ValueError(f"state has F={num_features} features, expected F={self.num_features}")
        self.num_features = num_features
        for i, c in enumerate(state["classes"].tolist()):
            self._count[c] = int(state["counts"][i])
            self._mean[c] = state["means"][i].double().clone()
            self._m2[c] = state["m2"][i].double().clone()


def _normalise_logits(logits: Tensor, temperature: float, groups: Sequence[Tensor] | None) -> Tensor:
    """Divides each row of ``logits`` by its L2 norm (or the mean of per-group norms) and ``temperature``."""
    if groups is None:
        norms = logits.norm(dim=-1, keepdim=True)
    else:
        norms = torch.stack([logits[:, g].norm(dim=-1) for g in groups], dim=-1).mean(-1, keepdim=True)
    return logits / ((norms + 1e-7) * temperature)


def align_classifier(
    head: nn.Linear,
    stats: ClassStatistics,
    classes: Sequence[int],
    *,
    steps: int,
    lr: float,
    num_per_class: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    logit_norm: float | None = 0.1,
    logit_norm_groups: Sequence[Sequence[int]] | None = None,
    weight_decay: float = 0.0,
    shrinkage: float = 1e-4,
) -> None:
    """Retrains the rows of ``head`` for ``classes`` on features sampled from class Gaussians (TAP).

    This is HiDe-Prompt's task-adaptive prediction and SLCA's classifier alignment. A pool of
    ``num_per_class`` features per class is drawn from ``stats`` and shuffled; the head takes one
    SGD step (momentum 0.9, learning rate annealed by a cosine over the steps) per minibatch of ``batch_size``, and a
    fresh pool is drawn whenever the current one is used up. HiDe-Prompt's ``E`` epochs thus match
    ``steps = E * ceil(len(classes) * num_per_class / batch_size)``.

    Only the logits of ``classes`` enter the cross-entropy (the other classes are masked out), so
    only the rows of ``head.weight`` and ``head.bias`` for ``classes`` change; all other rows are
    left bit-for-bit unchanged.

    With ``logit_norm = τ`` the logits are normalised per sample before the cross-entropy:
    ``logits / (‖logits‖₂ · τ)``, the norm taken over the ``classes`` columns (HiDe-Prompt uses
    τ = 0.1). If ``logit_norm_groups`` (e.g. the task splits) is given, ``‖logits‖₂`` is replaced by
    the mean over the groups of each group's logit norm, which is what the HiDe-Prompt and SLCA code
    computes. ``logit_norm = None`` uses the raw logits.

    Args:
        head: Linear classifier with one output per global class id; changed in place.
        stats: Class statistics holding at least 2 samples for every class in ``classes``.
        classes: Global class ids to align (e.g. every class seen so far).
        steps: Number of optimizer steps, >= 1.
        lr: SGD learning rate (start of the cosine schedule), > 0.
        num_per_class: Features drawn per class for each pool, >= 1.
        batch_size: Minibatch size, >= 1.
        generator: Random generator for sampling and shuffling; with a seeded generator the result
            is deterministic. ``None`` uses torch's global generator.
        logit_norm: Temperature τ of the logit normalisation, > 0, or ``None`` to disable it.
        logit_norm_groups: Optional groups of class ids (a subset of ``classes`` each) whose logit
            norms are averaged for the normalisation.
        weight_decay: SGD weight decay on the trained rows (HiDe-Prompt uses 5e-4).
        shrinkage: Ridge added to each covariance before sampling.

    Raises:
        TypeError: If ``head`` is not an ``nn.Linear`` or a count is not an int.
        ValueError: If ``classes`` is empty or repeats an id, a class id is out of range for the
            head, a class has fewer than 2 samples, the feature sizes differ, or ``lr`` /
            ``logit_norm`` is not positive.
    """
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
    _check_int("steps", steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("num_per_class", num_per_class, 1)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if logit_norm is not None and not logit_norm > 0:
        raise ValueError(f"logit_norm must be > 0 or None, got {logit_norm}")
    weight = head.weight
    ids = _class_ids(classes, head.out_features, weight.device)
    if ids.numel() == 0:
        raise ValueError("classes must hold at least one class id, got none")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"classes must not repeat an id, got {ids.tolist()}")
    if stats.num_features != head.in_features:
        raise ValueError(f"stats have F={stats.num_features} features, head expects {head.in_features}")
    groups = None
    if logit_norm is not None and logit_norm_groups is not None:
        groups = [
            remap_labels(torch.as_tensor(list(g), dtype=torch.long, device=weight.device), ids)
            for g in logit_norm_groups
        ]

    # Train copies of the selected rows only, so the other classes cannot move.
    sub_weight = weight.detach()[ids].clone().requires_grad_(True)
    params = [sub_weight]
    sub_bias = None
    if head.bias is not None:
        sub_bias = head.bias.detach()[ids].clone().requires_grad_(True)
        params.append(sub_bias)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    gen_device = generator.device if generator is not None else torch.device("cpu")

    pool_x = pool_y = None
    position = 0
    with torch.enable_grad():
        for _ in range(steps):
            if pool_x is None or position >= pool_x.shape[0]:
                pool_x, pool_y = stats.sample(ids.tolist(), num_per_class, generator, shrinkage, weight.dtype)
                perm = torch.randperm(pool_x.shape[0], generator=generator, device=gen_device)
                pool_x = pool_x.to(weight.device)[perm.to(weight.device)]
                pool_y = remap_labels(pool_y.to(weight.device), ids)[perm.to(weight.device)]
                position = 0
            assert pool_x is not None and pool_y is not None
            x = pool_x[position : position + batch_size]
            y = pool_y[position : position + batch_size]
            position += batch_size
            logits = F.linear(x, sub_weight, sub_bias)
            if logit_norm is not None:
                logits = _normalise_logits(logits, logit_norm, groups)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

    with torch.no_grad():
        head.weight[ids] = sub_weight.detach()
        if head.bias is not None and sub_bias is not None:
            head.bias[ids] = sub_bias.detach()


# --------------------------------------------------------------------------------------------------
# Task-identity inference
# --------------------------------------------------------------------------------------------------


class NearestClassMean:
    """Nearest-class-mean classifier, used for task-identity inference (TII).

    Each sample's prediction depends on that sample only: there is no batch-wise vote (the L2P /
    DualPrompt majority vote leaks across samples). Euclidean distances are computed pair by pair
    (no ``‖x‖² - 2x·m + ‖m‖²`` matmul trick), so they do not change with the batch size.

    Args:
        means: Class means of shape ``(K, F)``.
        classes: Global class id of each row of ``means``; defaults to ``0..K-1``.
        metric: ``"cosine"`` (largest cosine similarity) or ``"euclidean"`` (smallest distance).

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
        """Builds the classifier from the means of ``stats`` (all seen classes by default).

        Raises:
            ValueError: If a class has no sample.
        """
        ids = stats.classes if classes is None else [int(c) for c in classes]
        if not ids:
            raise ValueError("stats must hold at least one class, got none")
        return cls(torch.stack([stats.mean(c) for c in ids]), ids, metric)

    @classmethod
    def from_features(cls, features: Tensor, labels: Tensor, metric: str = "cosine") -> NearestClassMean:
        """Builds the classifier from the per-class means of ``features`` (B, F) with ``labels`` (B,)."""
        stats = ClassStatistics()
        stats.update(features, labels)
        return cls.from_statistics(stats, metric=metric).to(features.dtype)

    def to(self, *args: Any, **kwargs: Any) -> NearestClassMean:
        """Moves or casts the means like ``Tensor.to`` (``.to("cuda")``, ``.to(torch.float16)``).

        Returns:
            ``self``, with the class ids on the means' device.
        """
        self.means = self.means.to(*args, **kwargs)
        self.classes = self.classes.to(self.means.device)
        return self

    def scores(self, features: Tensor) -> Tensor:
        """Per-class scores ``(B, K)``, higher is closer (cosine similarity or minus distance).

        Raises:
            ValueError: If ``features`` is not ``(B, F)`` with the means' F.
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
        """Global class id of the nearest mean for each row of ``features`` (B, F); int64 ``(B,)``."""
        return self.classes.to(features.device)[self.scores(features).argmax(-1)]

    def predict_task(self, features: Tensor, task_of_class: Tensor) -> Tensor:
        """Task id of the nearest class for each row of ``features``, via the lookup table.

        Args:
            features: Tensor of shape ``(B, F)``.
            task_of_class: Lookup table class id -> task id, from :func:`task_of_class`.

        Returns:
            Int64 tensor of shape ``(B,)``.

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
        pred_task: Predicted task ids, shape ``(B,)``.
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


# --------------------------------------------------------------------------------------------------
# Contrastive regularisation of features (HiDe-Prompt / NoRGa training)
# --------------------------------------------------------------------------------------------------


def contrastive_regularization(features: Tensor, prototypes: Tensor | None = None, temperature: float = 0.8) -> Tensor:
    """The feature regulariser the HiDe-Prompt and NoRGa authors add to the task loss (their ``orth_loss``).

    With ``M = [prototypes; features]`` (the class means of the tasks seen before, then the batch's
    features, neither normalised), each row must be most similar to itself::

        loss = CE(M @ M^T / temperature, arange(len(M)))      (mean over the rows)

    which pushes the batch's features away from each other and from the old classes' means. The authors
    weight it by ``--reg`` (0.1 in their CIFAR-100 NoRGa script) and use ``temperature = 0.8``.

    Args:
        features: Pre-logits features of the batch ``(B, C)``.
        prototypes: Class means of earlier tasks ``(P, C)``, or ``None`` (first task).
        temperature: Divides the similarities; must be > 0.

    Returns:
        A scalar tensor (0 for an empty ``M``).

    Raises:
        TypeError: ``features`` or ``prototypes`` is not a floating tensor.
        ValueError: shapes do not match, or ``temperature`` is not a positive finite number.
    """
    if not isinstance(features, Tensor) or not features.is_floating_point() or features.dim() != 2:
        raise TypeError(f"features must be a floating tensor of shape (B, C), got {_describe(features)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    rows = features
    if prototypes is not None:
        if not isinstance(prototypes, Tensor) or not prototypes.is_floating_point() or prototypes.dim() != 2:
            raise TypeError(f"prototypes must be a floating tensor of shape (P, C), got {_describe(prototypes)}")
        if prototypes.shape[1] != features.shape[1]:
            raise ValueError(
                f"prototypes must have C={features.shape[1]} columns like features, got shape {tuple(prototypes.shape)}"
            )
        rows = torch.cat([prototypes.to(features), features], dim=0)
    if rows.shape[0] == 0:
        return features.new_zeros(())
    sim = rows @ rows.T / temperature
    return F.cross_entropy(sim, torch.arange(rows.shape[0], device=rows.device))


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


# --------------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------------


def freeze_gates(model: nn.Module, frozen: bool = True) -> int:
    """Stops (or restarts) training every NoRGa gate's ``alpha`` and ``tau`` in ``model``.

    The NoRGa authors train ``alpha`` and ``tau`` during the first task only and freeze them after
    it. This sets ``requires_grad`` of those parameters; call it before building the optimizer (or
    before wrapping the model in DDP, which fixes the set of trainable parameters when it is built).

    Args:
        model: A patched model (or a wrapper of one).
        frozen: ``True`` freezes, ``False`` makes the gates trainable again.

    Returns:
        The number of gates with learnable ``alpha``/``tau`` that were changed.

    Raises:
        ValueError: If ``model`` has no :class:`norga.NoRGaGate` with learnable ``alpha``/``tau``.
    """
    from .gates import NoRGaGate

    gates = [m for m in model.modules() if isinstance(m, NoRGaGate) and m.learnable]
    if not gates:
        raise ValueError("freeze_gates: the model has no NoRGaGate with learnable alpha/tau")
    for gate in gates:
        for p in (gate.alpha, gate.tau):
            p.requires_grad_(not frozen)
    return len(gates)
