"""Class orders, task splits, the class -> task table, and logit masks for class-incremental learning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_int


def class_order(num_classes: int, seed: int | None) -> list[int]:
    """Returns the order in which classes are presented to the learner.

    Args:
        num_classes: Number of classes, at least 1.
        seed: Seed of the permutation (`torch.Generator`, so the same seed gives the same order
            on every machine). `None` gives the identity order `0, 1, ..., num_classes - 1`.

    Returns:
        A permutation of `range(num_classes)` as a list of ints.

    Raises:
        TypeError: If `num_classes` or `seed` is not an int.
        ValueError: If `num_classes` < 1.
    """
    check_int("num_classes", num_classes, 1)
    if seed is None:
        return list(range(num_classes))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} ({seed!r})")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_classes, generator=generator).tolist()


def split_tasks(
    class_order: Sequence[int], num_tasks: int | None = None, classes_per_task: int | Sequence[int] | None = None
) -> list[list[int]]:
    """Cuts a class order into consecutive tasks.

    Give exactly one of `num_tasks` (equal tasks) or `classes_per_task` (an int for equal
    tasks, or one size per task, e.g. `[50, 10, 10, 10, 10, 10]`).

    Args:
        class_order: Class ids in presentation order, without repeats.
        num_tasks: Number of equal tasks; must divide `len(class_order)`.
        classes_per_task: Size of every task (int, must divide `len(class_order)`) or the size of
            each task (sequence of positive ints summing to `len(class_order)`).

    Returns:
        One list of class ids per task, in order.

    Raises:
        TypeError: If a size is not an int.
        ValueError: If both or neither of `num_tasks` / `classes_per_task` are given, the class
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
        check_int("num_tasks", num_tasks, 1)
        if total % num_tasks:
            raise ValueError(f"{total} classes do not divide evenly into num_tasks={num_tasks}")
        sizes = [total // num_tasks] * num_tasks
    elif isinstance(classes_per_task, int) and not isinstance(classes_per_task, bool):
        check_int("classes_per_task", classes_per_task, 1)
        if total % classes_per_task:
            raise ValueError(f"{total} classes do not divide evenly into classes_per_task={classes_per_task}")
        sizes = [classes_per_task] * (total // classes_per_task)
    elif isinstance(classes_per_task, Sequence):
        sizes = [check_int("classes_per_task[i]", s, 1) for s in classes_per_task]
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
        splits: One sequence of class ids per task, as returned by [`split_tasks`][norga.cl.split_tasks].
        num_classes: Length of the table; defaults to `max class id + 1`.

    Returns:
        An int64 tensor of shape `(num_classes,)` with the task of each class, `-1` for a class
        in no task.

    Raises:
        ValueError: If `splits` is empty, a class id is negative or `>= num_classes`, or a class
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
    """Maps global class ids to their position in `classes` (e.g. to index a task-local head).

    Args:
        labels: Int tensor of global class ids, any shape.
        classes: The class ids; `classes[i]` maps to `i`.

    Returns:
        An int64 tensor shaped like `labels` with local indices.

    Raises:
        ValueError: If a label is not in `classes` or `classes` repeats an id.
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
    """Validates class ids against `num_classes` and returns them as an int64 tensor."""
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
    """Returns a copy of `logits` in which the classes not seen yet hold `fill`.

    Args:
        logits: Tensor of shape `(..., C)`, classes on the last dim.
        seen_classes: Ids of the classes seen so far, each in `[0, C)`.
        fill: Value for the unseen classes (`-inf` removes them from a softmax).

    Returns:
        A new tensor shaped like `logits`; `logits` itself is not changed.

    Raises:
        TypeError: If `seen_classes` are not integers.
        ValueError: If `logits` has no class dim or a class id is out of range.
    """
    if logits.dim() < 1:
        raise ValueError(f"logits must have shape (..., C), got shape {tuple(logits.shape)}")
    num_classes = logits.shape[-1]
    ids = _class_ids(seen_classes, num_classes, logits.device)
    seen = torch.zeros(num_classes, dtype=torch.bool, device=logits.device)
    seen[ids] = True
    return logits.masked_fill(~seen, fill)


def mask_to_task(
    logits: Tensor, task_ids: Tensor, splits: Sequence[Sequence[int]], fill: float = float("-inf")
) -> Tensor:
    """Keeps, for each sample, only the logits of its own task's classes.

    Used for task-incremental evaluation and for WTP training, where the logits of the other tasks
    are masked.

    Args:
        logits: Tensor of shape `(B, C)`.
        task_ids: Int tensor of shape `(B,)`, the task of each sample.
        splits: One sequence of class ids per task, ids in `[0, C)`.
        fill: Value for the classes of other tasks.

    Returns:
        A new `(B, C)` tensor; `logits` itself is not changed.

    Raises:
        TypeError: If `task_ids` is not an integer tensor.
        ValueError: On a shape mismatch, a task id outside `[0, len(splits))` or a class id
            outside `[0, C)`.
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
