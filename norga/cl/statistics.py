"""Gaussian class statistics, classifier alignment on features sampled from them (TAP), and the feature
regulariser of the HiDe-Prompt / NoRGa authors."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from .tasks import _class_ids, remap_labels

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Gaussian class statistics and classifier alignment (TAP)
# --------------------------------------------------------------------------------------------------


class ClassStatistics:
    """Per-class feature mean and covariance, accumulated over batches.

    Batches are merged with the pairwise update of Chan et al. (per class: count, mean and the
    centred scatter `M2 = sum (x - mean)(x - mean)^T`), all in float64, so no large raw sums of
    squares are ever subtracted. Memory is `F * F` float64 numbers per class seen.

    Args:
        num_features: Feature size F; if `None` it is taken from the first batch.
    """

    def __init__(self, num_features: int | None = None) -> None:
        if num_features is not None:
            check_int("num_features", num_features, 1)
        self.num_features = num_features
        self._count: dict[int, int] = {}
        self._mean: dict[int, Tensor] = {}
        self._m2: dict[int, Tensor] = {}

    @property
    def classes(self) -> list[int]:
        """The class ids seen so far, sorted."""
        return sorted(self._count)

    def count(self, c: int) -> int:
        """Number of samples seen for class `c` (0 if never seen)."""
        return self._count.get(int(c), 0)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Adds a batch of features to the statistics of their classes.

        Args:
            features: Tensor of shape `(B, F)`.
            labels: Int tensor of shape `(B,)` with class ids.

        Raises:
            TypeError: If `labels` is not an integer tensor.
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
        """Returns `int(c)` after checking that class `c` has at least `minimum` samples."""
        c = int(c)
        if self._count.get(c, 0) < minimum:
            raise ValueError(f"class {c} needs at least {minimum} sample(s), has {self._count.get(c, 0)}")
        return c

    def mean(self, c: int) -> Tensor:
        """Mean feature of class `c`, float64 of shape `(F,)`.

        Raises:
            ValueError: If class `c` has no sample.
        """
        return self._mean[self._require(c, 1)].clone()

    def covariance(self, c: int) -> Tensor:
        """Unbiased covariance of class `c` (divides by n - 1, like `np.cov`), float64 `(F, F)`.

        Raises:
            ValueError: If class `c` has fewer than 2 samples.
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
        """Draws features from `N(mean_c, cov_c + shrinkage * I)` for each class `c`.

        The noise is drawn on the generator's device (CPU when `generator` is `None`) and
        coloured with a float64 Cholesky factor, so the result only depends on the generator state.
        If a factorisation fails, the jitter added to the diagonal is multiplied by 10 (up to 6
        times) and a warning is logged.

        Args:
            classes: Class ids to draw, each with at least 2 samples seen.
            num_per_class: Number of features drawn per class.
            generator: Random generator; `None` uses torch's global one.
            shrinkage: Ridge added to the covariance diagonal, >= 0.
            dtype: Floating dtype of the returned features.

        Returns:
            `(features, labels)`: `(len(classes) * num_per_class, F)` features on the device of
            the statistics, grouped by class in the order of `classes`, and int64 labels.

        Raises:
            ValueError: If a class has fewer than 2 samples, `classes` is empty,
                `shrinkage` < 0, or a covariance stays singular after the jitter retries.
        """
        check_int("num_per_class", num_per_class, 1)
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
        """Returns the statistics as tensors (classes, counts, means, scatters) for `torch.save`."""
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
        """Replaces the statistics with those of `state_dict`.

        Raises:
            ValueError: If the state's feature size differs from `num_features`.
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
    """Divides each row of `logits` by its L2 norm (or the mean of per-group norms) and `temperature`."""
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
    """Retrains the rows of `head` for `classes` on features sampled from class Gaussians (TAP).

    This is HiDe-Prompt's task-adaptive prediction and SLCA's classifier alignment. A pool of
    `num_per_class` features per class is drawn from `stats` and shuffled; the head takes one
    SGD step (momentum 0.9, learning rate annealed by a cosine over the steps) per minibatch of `batch_size`, and a
    fresh pool is drawn whenever the current one is used up. HiDe-Prompt's `E` epochs thus match
    `steps = E * ceil(len(classes) * num_per_class / batch_size)`.

    Only the logits of `classes` enter the cross-entropy (the other classes are masked out), so
    only the rows of `head.weight` and `head.bias` for `classes` change; all other rows are
    left bit-for-bit unchanged.

    With `logit_norm = τ` the logits are normalised per sample before the cross-entropy:
    `logits / (‖logits‖₂ · τ)`, the norm taken over the `classes` columns (HiDe-Prompt uses
    τ = 0.1). If `logit_norm_groups` (e.g. the task splits) is given, `‖logits‖₂` is replaced by
    the mean over the groups of each group's logit norm, which is what the HiDe-Prompt and SLCA code
    computes. `logit_norm = None` uses the raw logits.

    Args:
        head: Linear classifier with one output per global class id; changed in place.
        stats: Class statistics holding at least 2 samples for every class in `classes`.
        classes: Global class ids to align (e.g. every class seen so far).
        steps: Number of optimizer steps, >= 1.
        lr: SGD learning rate (start of the cosine schedule), > 0.
        num_per_class: Features drawn per class for each pool, >= 1.
        batch_size: Minibatch size, >= 1.
        generator: Random generator for sampling and shuffling; with a seeded generator the result
            is deterministic. `None` uses torch's global generator.
        logit_norm: Temperature τ of the logit normalisation, > 0, or `None` to disable it.
        logit_norm_groups: Optional groups of class ids (a subset of `classes` each) whose logit
            norms are averaged for the normalisation.
        weight_decay: SGD weight decay on the trained rows (HiDe-Prompt uses 5e-4).
        shrinkage: Ridge added to each covariance before sampling.

    Raises:
        TypeError: If `head` is not an `nn.Linear` or a count is not an int.
        ValueError: If `classes` is empty or repeats an id, a class id is out of range for the
            head, a class has fewer than 2 samples, the feature sizes differ, or `lr` /
            `logit_norm` is not positive.
    """
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    check_int("num_per_class", num_per_class, 1)
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
# Contrastive regularisation of features (HiDe-Prompt / NoRGa training)
# --------------------------------------------------------------------------------------------------


def contrastive_regularization(features: Tensor, prototypes: Tensor | None = None, temperature: float = 0.8) -> Tensor:
    """The feature regulariser the HiDe-Prompt and NoRGa authors add to the task loss (their `orth_loss`).

    With `M = [prototypes; features]` (the class means of the tasks seen before, then the batch's
    features, neither normalised), each row must be most similar to itself:

    ```python
    loss = CE(M @ M^T / temperature, arange(len(M)))      (mean over the rows)
    ```

    which pushes the batch's features away from each other and from the old classes' means. The authors
    weight it by `--reg` (0.1 in their CIFAR-100 NoRGa script) and use `temperature = 0.8`.

    Args:
        features: Pre-logits features of the batch `(B, C)`.
        prototypes: Class means of earlier tasks `(P, C)`, or `None` (first task).
        temperature: Divides the similarities; must be > 0.

    Returns:
        A scalar tensor (0 for an empty `M`).

    Raises:
        TypeError: `features` or `prototypes` is not a floating tensor.
        ValueError: shapes do not match, or `temperature` is not a positive finite number.
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
