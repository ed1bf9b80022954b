"""Metrics of continual learning on the accuracy matrix: FA, CA, FM."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_int

# --------------------------------------------------------------------------------------------------
# Metrics: FA, CA, FM on the accuracy matrix
# --------------------------------------------------------------------------------------------------


def _as_matrix(acc: Tensor | Sequence[Sequence[float | None]]) -> Tensor:
    """Converts an accuracy matrix (tensor or nested lists, `None` for missing) to float64."""
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
    """Final average accuracy FA: the mean of `acc[T-1][j]` over all tasks j.

    Args:
        acc: `(T, T)` accuracy matrix in percent, `acc[t][j]` the accuracy on task j after
            training task t; entries above the diagonal are ignored (NaN or `None`).

    Returns:
        FA in percent.

    Raises:
        ValueError: If `acc` is not square or misses an entry on or below the diagonal.
    """
    mat = _as_matrix(acc)
    return float(mat[-1].mean())


def cumulative_average(acc: Tensor | Sequence[Sequence[float | None]]) -> float:
    """Cumulative average accuracy CA: the mean over t of the mean of `acc[t][0..t]`.

    Args:
        acc: `(T, T)` accuracy matrix in percent (see [`final_average`][norga.cl.final_average]).

    Returns:
        CA in percent.

    Raises:
        ValueError: If `acc` is not square or misses an entry on or below the diagonal.
    """
    mat = _as_matrix(acc)
    row_means = [mat[t, : t + 1].mean() for t in range(mat.shape[0])]
    return float(torch.stack(row_means).mean())


def forgetting(acc: Tensor | Sequence[Sequence[float | None]]) -> float:
    """Forgetting measure FM: mean over old tasks j < T-1 of `max_{t<T-1} acc[t][j] - acc[T-1][j]`.

    The max runs over `j <= t < T-1`, the rows in which task j had been trained. FM is `0.0`
    when T == 1 (there is no old task).

    Args:
        acc: `(T, T)` accuracy matrix in percent (see [`final_average`][norga.cl.final_average]).

    Returns:
        FM in percentage points (negative when the old tasks improved).

    Raises:
        ValueError: If `acc` is not square or misses an entry on or below the diagonal.
    """
    mat = _as_matrix(acc)
    num_tasks = mat.shape[0]
    if num_tasks == 1:
        return 0.0
    drops = [mat[j : num_tasks - 1, j].max() - mat[-1, j] for j in range(num_tasks - 1)]
    return float(torch.stack(drops).mean())


class AccuracyMatrix:
    """Accuracy matrix of a class-incremental run, `acc[t][j]` in percent (0-100).

    `acc[t][j]` is the accuracy on the test data of task j after training task t. Only the lower
    triangle (`j <= t`) is defined; the rest is NaN.

    Args:
        num_tasks: Number of tasks T, at least 1.

    Raises:
        TypeError: If `num_tasks` is not an int.
        ValueError: If `num_tasks` < 1.
    """

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = check_int("num_tasks", num_tasks, 1)
        self.acc = torch.full((num_tasks, num_tasks), math.nan, dtype=torch.float64)

    def update(self, t: int, j: int, acc: float) -> None:
        """Records the accuracy on task `j` after training task `t`.

        Args:
            t: Index of the task just trained, in `[0, T)`.
            j: Index of the evaluated task, in `[0, t]`.
            acc: Accuracy in percent, in `[0, 100]`.

        Raises:
            TypeError: If `t` or `j` is not an int.
            ValueError: If `t` or `j` is out of range or `acc` is not in `[0, 100]`.
        """
        check_int("t", t, 0)
        check_int("j", j, 0)
        if t >= self.num_tasks:
            raise ValueError(f"t must lie in [0, {self.num_tasks}), got {t}")
        if j > t:
            raise ValueError(f"j must be <= t (a task is evaluated only once trained), got t={t}, j={j}")
        acc = float(acc)
        if not 0.0 <= acc <= 100.0:
            raise ValueError(f"acc must be a percentage in [0, 100], got {acc}")
        self.acc[t, j] = acc

    def _upto(self, after_task: int | None) -> Tensor:
        """Returns the leading `(t+1, t+1)` block, `t = after_task` (default: the last task)."""
        t = self.num_tasks - 1 if after_task is None else check_int("after_task", after_task, 0)
        if t >= self.num_tasks:
            raise ValueError(f"after_task must lie in [0, {self.num_tasks}), got {t}")
        return self.acc[: t + 1, : t + 1]

    def final_average(self, after_task: int | None = None) -> float:
        """FA (percent) after task `after_task` (default: the last); see [`final_average`][norga.cl.final_average]."""
        return final_average(self._upto(after_task))

    def cumulative_average(self, after_task: int | None = None) -> float:
        """CA (percent) after task `after_task` (default: the last); see `cumulative_average`."""
        return cumulative_average(self._upto(after_task))

    def forgetting(self, after_task: int | None = None) -> float:
        """FM (points) after task `after_task` (default: the last); see [`forgetting`][norga.cl.forgetting]."""
        return forgetting(self._upto(after_task))

    def to_list(self) -> list[list[float | None]]:
        """Returns the matrix as nested lists for JSON; missing entries (NaN) become `None`."""
        return [[None if math.isnan(v) else v for v in row] for row in self.acc.tolist()]
