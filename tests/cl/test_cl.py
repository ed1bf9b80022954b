"""Tests of norga.cl: splits, masks, metrics, class statistics, classifier alignment and TII."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within, gamma, tol, unit_roundoff
from torch import nn

from norga.cl import (
    AccuracyMatrix,
    ClassStatistics,
    NearestClassMean,
    align_classifier,
    class_order,
    contrastive_regularization,
    cumulative_average,
    final_average,
    forgetting,
    mask_to_task,
    mask_unseen_logits,
    remap_labels,
    split_tasks,
    task_id_accuracy,
    task_of_class,
)

NAN = math.nan


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Runs these small-tensor tests on one thread: on a busy 2-core machine, spinning OpenMP
    threads made the alignment tests 100x slower. The previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# class_order, split_tasks, task_of_class, remap_labels
# --------------------------------------------------------------------------------------------------


def test_class_order_is_seeded_permutation() -> None:
    a, b, c = class_order(100, 1993), class_order(100, 1993), class_order(100, 7)
    assert a == b
    assert a != c
    assert sorted(a) == list(range(100))
    assert a != list(range(100))
    assert all(isinstance(v, int) for v in a)


def test_class_order_identity_without_seed() -> None:
    assert class_order(5, None) == [0, 1, 2, 3, 4]


def test_class_order_errors() -> None:
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        class_order(0, 1)
    with pytest.raises(TypeError, match="num_classes must be an int, got float"):
        class_order(5.0, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed must be an int or None, got str"):
        class_order(5, "1")  # type: ignore[arg-type]


def test_split_tasks_equal_and_uneven_sizes() -> None:
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert split_tasks(order, num_tasks=5) == [[9, 8], [7, 6], [5, 4], [3, 2], [1, 0]]
    assert split_tasks(order, classes_per_task=5) == [[9, 8, 7, 6, 5], [4, 3, 2, 1, 0]]
    assert split_tasks(order, classes_per_task=[4, 2, 2, 2]) == [[9, 8, 7, 6], [5, 4], [3, 2], [1, 0]]
    assert split_tasks(order, num_tasks=1) == [order]


def test_split_tasks_errors() -> None:
    order = list(range(10))
    with pytest.raises(ValueError, match="exactly one of num_tasks or classes_per_task"):
        split_tasks(order)
    with pytest.raises(ValueError, match="exactly one of num_tasks or classes_per_task"):
        split_tasks(order, num_tasks=2, classes_per_task=5)
    with pytest.raises(ValueError, match="10 classes do not divide evenly into num_tasks=3"):
        split_tasks(order, num_tasks=3)
    with pytest.raises(ValueError, match="10 classes do not divide evenly into classes_per_task=4"):
        split_tasks(order, classes_per_task=4)
    with pytest.raises(ValueError, match=r"must sum to the number of classes 10, got 9"):
        split_tasks(order, classes_per_task=[5, 4])
    with pytest.raises(ValueError, match="classes_per_task\\[i\\] must be >= 1, got 0"):
        split_tasks(order, classes_per_task=[10, 0])
    with pytest.raises(ValueError, match="num_tasks must be >= 1, got 0"):
        split_tasks(order, num_tasks=0)
    with pytest.raises(TypeError, match="num_tasks must be an int, got float"):
        split_tasks(order, num_tasks=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="classes_per_task must be an int or a sequence of ints, got float"):
        split_tasks(order, classes_per_task=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not repeat a class, got 3 ids but 2 distinct"):
        split_tasks([0, 1, 1], num_tasks=1)
    with pytest.raises(ValueError, match="class_order must not be empty"):
        split_tasks([], num_tasks=1)


def test_task_of_class_lookup() -> None:
    table = task_of_class([[2, 0], [1, 3]])
    assert table.dtype == torch.long
    assert table.tolist() == [0, 1, 0, 1]
    assert task_of_class([[2, 0], [1, 3]], num_classes=6).tolist() == [0, 1, 0, 1, -1, -1]


def test_task_of_class_errors() -> None:
    with pytest.raises(ValueError, match="class 1 is in task 0 and in task 1"):
        task_of_class([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\), got min 0, max 3"):
        task_of_class([[0, 3]], num_classes=3)
    with pytest.raises(ValueError, match="at least one class"):
        task_of_class([[], []])


def test_remap_labels() -> None:
    labels = torch.tensor([[7, 3], [7, 1]])
    assert remap_labels(labels, [3, 7, 1]).tolist() == [[1, 0], [1, 2]]
    with pytest.raises(ValueError, match=r"labels \[5\] are not in classes \[3, 7, 1\]"):
        remap_labels(torch.tensor([3, 5]), [3, 7, 1])
    with pytest.raises(ValueError, match="must not repeat an id"):
        remap_labels(torch.tensor([3]), [3, 3])


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def test_mask_unseen_logits() -> None:
    logits = torch.randn(2, 3, 6)
    before = logits.clone()
    out = mask_unseen_logits(logits, [0, 3])
    assert torch.equal(logits, before)  # out of place
    for c in range(6):
        if c in (0, 3):
            assert torch.equal(out[..., c], logits[..., c])
        else:
            assert bool((out[..., c] == float("-inf")).all())
    out = mask_unseen_logits(logits, torch.tensor([5]), fill=-100.0)
    assert torch.equal(out[..., 5], logits[..., 5])
    assert bool((out[..., :5] == -100.0).all())


def test_mask_unseen_logits_errors() -> None:
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 4\), got min 1, max 4"):
        mask_unseen_logits(torch.zeros(2, 4), [1, 4])
    with pytest.raises(TypeError, match="class ids must be integers, got dtype torch.float32"):
        mask_unseen_logits(torch.zeros(2, 4), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"logits must have shape \(\.\.\., C\), got shape \(\)"):
        mask_unseen_logits(torch.tensor(1.0), [0])


def test_mask_to_task_per_sample() -> None:
    splits = [[0, 3], [1, 2], [4, 5]]
    logits = torch.arange(18, dtype=torch.float32).reshape(3, 6)
    out = mask_to_task(logits, torch.tensor([2, 0, 1]), splits)
    inf = float("-inf")
    expected = torch.tensor(
        [
            [inf, inf, inf, inf, 4.0, 5.0],  # sample 0 is in task 2: classes 4, 5
            [6.0, inf, inf, 9.0, inf, inf],  # sample 1 is in task 0: classes 0, 3
            [inf, 13.0, 14.0, inf, inf, inf],  # sample 2 is in task 1: classes 1, 2
        ]
    )
    assert torch.equal(out, expected)
    assert torch.equal(logits, torch.arange(18, dtype=torch.float32).reshape(3, 6))


def test_mask_to_task_errors() -> None:
    splits = [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match=r"task_ids must have shape \(2,\) to match logits, got \(3,\)"):
        mask_to_task(torch.zeros(2, 4), torch.tensor([0, 1, 1]), splits)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\), got min 0, max 2"):
        mask_to_task(torch.zeros(2, 4), torch.tensor([0, 2]), splits)
    with pytest.raises(TypeError, match="task_ids must be an integer tensor, got dtype torch.float32"):
        mask_to_task(torch.zeros(2, 4), torch.tensor([0.0, 1.0]), splits)
    with pytest.raises(ValueError, match=r"logits must have shape \(B, C\), got shape \(4,\)"):
        mask_to_task(torch.zeros(4), torch.tensor([0]), splits)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\)"):
        mask_to_task(torch.zeros(2, 3), torch.tensor([0, 1]), splits)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

# acc[t][j]: accuracy (%) on task j after training task t.
ACC = [
    [90.0, None, None],
    [92.0, 85.0, None],
    [70.0, 75.0, 95.0],
]
# FA = (70 + 75 + 95) / 3                               = 80.0
# CA = (90 + (92 + 85) / 2 + (70 + 75 + 95) / 3) / 3   = (90 + 88.5 + 80) / 3 = 258.5 / 3 = 86.1666...
# FM = ((max(90, 92) - 70) + (85 - 75)) / 2             = (22 + 10) / 2 = 16.0
FA, CA, FM = 80.0, 258.5 / 3, 16.0
# float64 means of at most 3 values, of 3 row means, a max and a difference: at most 7 roundings of
# positive terms, and the hand value's own (258.5 / 3)
METRICS = {"rel": gamma(torch.float64, 8), "abs": 0}


def test_metrics_hand_computed_3x3() -> None:
    assert final_average(ACC) == pytest.approx(FA, **METRICS)
    assert cumulative_average(ACC) == pytest.approx(CA, **METRICS)
    assert forgetting(ACC) == pytest.approx(FM, **METRICS)


def test_metrics_ignore_upper_triangle_of_tensor() -> None:
    acc = torch.tensor([[90.0, 1e6, -1e6], [92.0, 85.0, NAN], [70.0, 75.0, 95.0]])
    assert final_average(acc) == pytest.approx(FA, **METRICS)
    assert cumulative_average(acc) == pytest.approx(CA, **METRICS)
    assert forgetting(acc) == pytest.approx(FM, **METRICS)


def test_metrics_single_task() -> None:
    assert final_average([[60.0]]) == 60.0
    assert cumulative_average([[60.0]]) == 60.0
    assert forgetting([[60.0]]) == 0.0


def test_accuracy_matrix_class() -> None:
    m = AccuracyMatrix(3)
    for t, row in enumerate(ACC):
        for j in range(t + 1):
            m.update(t, j, row[j])  # type: ignore[arg-type]
    assert m.final_average() == pytest.approx(FA, **METRICS)
    assert m.cumulative_average() == pytest.approx(CA, **METRICS)
    assert m.forgetting() == pytest.approx(FM, **METRICS)
    # After task 1 only: [[90], [92, 85]].
    # FA = 88.5; CA = (90 + 88.5) / 2 = 89.25; FM = 90 - 92 = -2 (task 0 improved).
    assert m.final_average(after_task=1) == pytest.approx(88.5, **METRICS)
    assert m.cumulative_average(after_task=1) == pytest.approx(89.25, **METRICS)
    assert m.forgetting(after_task=1) == pytest.approx(-2.0, **METRICS)
    assert m.forgetting(after_task=0) == 0.0
    assert m.to_list() == ACC
    assert json.loads(json.dumps(m.to_list())) == ACC


def test_accuracy_matrix_single_task() -> None:
    m = AccuracyMatrix(1)
    m.update(0, 0, 42.0)
    assert (m.final_average(), m.cumulative_average(), m.forgetting()) == (42.0, 42.0, 0.0)
    assert m.to_list() == [[42.0]]


def test_metric_errors() -> None:
    m = AccuracyMatrix(3)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 3\), got 3"):
        m.update(3, 0, 50.0)
    with pytest.raises(ValueError, match="j must be <= t .*got t=0, j=1"):
        m.update(0, 1, 50.0)
    with pytest.raises(ValueError, match=r"acc must be a percentage in \[0, 100\], got 150.0"):
        m.update(1, 0, 150.0)
    with pytest.raises(ValueError, match="t must be >= 0, got -1"):
        m.update(-1, 0, 50.0)
    with pytest.raises(TypeError, match="j must be an int, got float"):
        m.update(1, 0.0, 50.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"acc\[0\]\[0\] is nan"):
        m.final_average()
    with pytest.raises(ValueError, match=r"after_task must lie in \[0, 3\), got 3"):
        m.final_average(after_task=3)
    with pytest.raises(ValueError, match="num_tasks must be >= 1, got 0"):
        AccuracyMatrix(0)
    with pytest.raises(ValueError, match=r"square \(T, T\) matrix, got shape \(2, 3\)"):
        final_average(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"acc\[1\]\[0\] is nan"):
        forgetting([[50.0, None], [None, 60.0]])


# --------------------------------------------------------------------------------------------------
# ClassStatistics
# --------------------------------------------------------------------------------------------------


def _random_class_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes, F = 5, far from the origin (offset 1000) so that naive float32 sums would fail."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 1000.0
    labels = rng.integers(0, 3, size=300) * 2 + 1  # class ids 1, 3, 5
    return features.astype(np.float32), labels


def test_class_statistics_match_numpy_over_batches() -> None:
    x, y = _random_class_data()
    stats = ClassStatistics()
    for start, stop in [(0, 7), (7, 100), (100, 101), (101, 300)]:
        stats.update(torch.from_numpy(x[start:stop]), torch.from_numpy(y[start:stop]))
    assert stats.classes == [1, 3, 5]
    for c in (1, 3, 5):
        xc = x[y == c].astype(np.float64)
        n = len(xc)
        assert stats.count(c) == n
        # Both sides in float64 from the same (float32) values. The mean: n terms (numpy), or batch means and
        # Chan merges (4 batches, ~5 roundings each): gamma_{2n + 21} of max |x|, which is ~1000.
        x64 = torch.from_numpy(xc)
        mean_err = tol(torch.float64, 2 * n + 21, float(x64.abs().max()))
        assert_within(stats.mean(c), torch.from_numpy(xc.mean(0)), mean_err)
        # The covariance: each centred value d = x - mean carries the means' error and its rounding (e_d);
        # the scatter sums n products d_i d_j (and the merges' outer products): per side
        # sum_k (|d_ki| + |d_kj|) e_d + gamma_{n+8} sum_k |d_ki d_kj|, divided by n - 1 (ddof = 1, np.cov's).
        d = (x64 - x64.mean(0)).abs()
        e_d = mean_err + tol(torch.float64, 2, float(d.max()))
        s1 = d.sum(0)
        scatter = e_d * (s1[:, None] + s1[None, :]) + tol(torch.float64, n + 8, 1.0) * (d.T @ d)
        want = torch.from_numpy(np.cov(xc, rowvar=False, ddof=1))
        assert_within(stats.covariance(c), want, 2 * scatter / (n - 1) + unit_roundoff(torch.float64) * want.abs())
    assert stats.count(0) == 0


def test_class_statistics_state_dict_round_trip() -> None:
    x, y = _random_class_data(1)
    stats = ClassStatistics()
    stats.update(torch.from_numpy(x), torch.from_numpy(y))
    other = ClassStatistics(5)
    other.load_state_dict(stats.state_dict())
    assert other.classes == [1, 3, 5]
    for c in (1, 3, 5):
        assert other.count(c) == stats.count(c)
        assert torch.equal(other.mean(c), stats.mean(c))
        assert torch.equal(other.covariance(c), stats.covariance(c))


def test_class_statistics_sample_converges_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(4, 4))
    x = rng.normal(size=(400, 4)) @ a + np.array([1.0, -2.0, 3.0, 0.5])
    stats = ClassStatistics(4)
    stats.update(torch.from_numpy(x), torch.zeros(400, dtype=torch.long))
    stats.update(torch.from_numpy(x[:50] * 2.0), torch.full((50,), 4))

    feats, labels = stats.sample([4, 0], 20000, torch.Generator().manual_seed(0), shrinkage=1e-4)
    assert feats.shape == (40000, 4) and feats.dtype == torch.float32
    assert labels.tolist() == [4] * 20000 + [0] * 20000
    drawn = feats[labels == 0].double().numpy()
    target_mean = x.mean(0)
    target_cov = np.cov(x, rowvar=False) + 1e-4 * np.eye(4)
    # Sampling error, not rounding: n = 20000 draws give a mean with standard error sqrt(diag(cov) / n) and a
    # covariance with standard error sqrt((cov_ij^2 + cov_ii cov_jj) / (n - 1)) (normal data). 7 standard
    # errors: a draw outside has probability below 1e-11 per entry under the model (the seeded draw is fixed).
    n = len(drawn)
    var = np.diag(target_cov)
    np.testing.assert_array_less(np.abs(drawn.mean(0) - target_mean), 7 * np.sqrt(var / n))
    cov_se = np.sqrt((target_cov**2 + np.outer(var, var)) / (n - 1))
    np.testing.assert_array_less(np.abs(np.cov(drawn, rowvar=False) - target_cov), 7 * cov_se)

    again, _ = stats.sample([4, 0], 20000, torch.Generator().manual_seed(0), shrinkage=1e-4)
    other, _ = stats.sample([4, 0], 20000, torch.Generator().manual_seed(1), shrinkage=1e-4)
    assert torch.equal(feats, again)
    assert not torch.equal(feats, other)


def test_class_statistics_sample_singular_covariance() -> None:
    # All samples on a line: the covariance has rank 1, the shrinkage makes it positive definite.
    t = torch.linspace(-1, 1, 20, dtype=torch.float64)
    stats = ClassStatistics()
    stats.update(torch.stack([t, 2 * t, -t], dim=1), torch.zeros(20, dtype=torch.long))
    feats, _ = stats.sample([0], 100, torch.Generator().manual_seed(0), shrinkage=1e-4)
    assert bool(feats.isfinite().all())
    # Orthogonal to the line (1, 2, -1), only the shrinkage noise (std sqrt(1e-4) = 0.01) remains: 100 draws
    # stay within 10 standard deviations (a normal draw beyond has probability 1.5e-23).
    off_line = feats.double() @ torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64) / math.sqrt(5)
    assert float(off_line.abs().max()) < 10 * math.sqrt(1e-4)


def test_class_statistics_errors() -> None:
    stats = ClassStatistics(3)
    stats.update(torch.randn(1, 3), torch.tensor([7]))
    assert stats.mean(7).shape == (3,)
    with pytest.raises(ValueError, match="class 7 needs at least 2 sample"):
        stats.covariance(7)
    with pytest.raises(ValueError, match="class 7 needs at least 2 sample"):
        stats.sample([7], 4)
    with pytest.raises(ValueError, match="class 2 needs at least 1 sample"):
        stats.mean(2)
    with pytest.raises(ValueError, match=r"features must have F=3 columns, got shape \(2, 4\)"):
        stats.update(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"features must have shape \(B, F\), got shape \(3,\)"):
        stats.update(torch.randn(3), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\) to match features, got \(3,\)"):
        stats.update(torch.randn(2, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="labels must be an integer tensor, got dtype torch.float32"):
        stats.update(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels must be >= 0, got -1"):
        stats.update(torch.randn(2, 3), torch.tensor([0, -1]))
    stats.update(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="shrinkage must be >= 0, got -1"):
        stats.sample([0], 4, shrinkage=-1.0)
    with pytest.raises(ValueError, match="num_per_class must be >= 1, got 0"):
        stats.sample([0], 0)
    with pytest.raises(ValueError, match="classes must hold at least one class id"):
        stats.sample([], 4)


# --------------------------------------------------------------------------------------------------
# align_classifier
# --------------------------------------------------------------------------------------------------


def _two_gaussians() -> tuple[ClassStatistics, np.ndarray, np.ndarray, np.ndarray]:
    """Classes 1 and 3 in F = 8, means +-3 e_0 with unit covariance; returns stats, means, fresh test data."""
    rng = np.random.default_rng(0)
    mu = {1: np.zeros(8), 3: np.zeros(8)}
    mu[1][0], mu[3][0] = 3.0, -3.0
    stats = ClassStatistics(8)
    for c in (1, 3):
        x = rng.normal(size=(500, 8)) + mu[c]
        stats.update(torch.from_numpy(x).float(), torch.full((500,), c))
    test_x = np.concatenate([rng.normal(size=(1000, 8)) + mu[c] for c in (1, 3)])
    test_y = np.repeat([1, 3], 1000)
    return stats, np.stack([mu[1], mu[3]]), test_x, test_y


def _accuracy_on(head: nn.Linear, x: np.ndarray, y: np.ndarray, classes: list[int]) -> float:
    """Accuracy (%) of ``head`` restricted to ``classes``, computed with numpy."""
    w = head.weight.detach().double().numpy()[classes]
    b = head.bias.detach().double().numpy()[classes]
    pred = np.asarray(classes)[np.argmax(x @ w.T + b, axis=1)]
    return 100.0 * float(np.mean(pred == y))


def _bad_head(means: np.ndarray) -> nn.Linear:
    """A head with 5 outputs whose rows for classes 1 and 3 point at the wrong class.

    The two rows are not exact opposites: with logit normalisation and two classes, ``w_1 = -w_3``
    keeps every normalised logit vector on one line, a saddle that no gradient leaves.
    """
    torch.manual_seed(0)
    head = nn.Linear(8, 5)
    with torch.no_grad():
        head.weight[1] += torch.from_numpy(means[1]).float()  # class 1 row points at class 3
        head.weight[3] += 0.5 * torch.from_numpy(means[0]).float()
    return head


@pytest.mark.parametrize(
    ("logit_norm", "groups"), [(0.1, None), (0.1, [[1], [3]]), (None, None)], ids=["norm", "grouped", "raw"]
)
def test_align_classifier_fixes_bad_head(logit_norm: float | None, groups: list[list[int]] | None) -> None:
    stats, means, test_x, test_y = _two_gaussians()
    head = _bad_head(means)
    untouched = {name: p.detach().clone() for name, p in head.named_parameters()}
    assert _accuracy_on(head, test_x, test_y, [1, 3]) < 5.0

    align_classifier(
        head, stats, [1, 3], steps=200, lr=0.05, num_per_class=64, batch_size=32,
        generator=torch.Generator().manual_seed(0), logit_norm=logit_norm, logit_norm_groups=groups,
    )  # fmt: skip
    assert _accuracy_on(head, test_x, test_y, [1, 3]) > 95.0
    for row in (0, 2, 4):  # classes not aligned: bit-for-bit unchanged
        assert torch.equal(head.weight[row], untouched["weight"][row])
        assert torch.equal(head.bias[row], untouched["bias"][row])
    assert not torch.equal(head.weight[1], untouched["weight"][1])


@pytest.mark.parametrize("variant", ["norm", "grouped", "raw"])
def test_align_classifier_first_step_matches_hand_written_loss(variant: str) -> None:
    """One step on one batch holding the whole pool is plain gradient descent (the momentum buffer
    starts as the gradient, the cosine schedule starts at lr) on the loss written out here."""
    stats, _, _, _ = _two_gaussians()
    torch.manual_seed(1)
    head = nn.Linear(8, 5)
    with torch.no_grad():
        # Same-sign logits: with one class per group and logits of opposite signs, the grouped
        # normalisation fixes the logit gap at 2 / tau and the gradient vanishes.
        head.bias += 5.0
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    lr, tau = 0.3, 0.1
    norm = {"norm": tau, "grouped": tau, "raw": None}[variant]
    groups = [[1], [3]] if variant == "grouped" else None
    align_classifier(
        head, stats, [1, 3], steps=1, lr=lr, num_per_class=16, batch_size=32,
        generator=torch.Generator().manual_seed(4), logit_norm=norm, logit_norm_groups=groups,
    )  # fmt: skip

    # The same pool: the first draw of a generator seeded alike (the shuffle does not change a mean loss).
    x, y = stats.sample([1, 3], 16, torch.Generator().manual_seed(4))
    target = (y == 3).long()  # local index: class 1 -> 0, class 3 -> 1

    def normalise(z: torch.Tensor) -> torch.Tensor:
        if variant == "norm":  # z / (||z|| * tau)
            return z / ((z.pow(2).sum(-1, keepdim=True).sqrt() + 1e-7) * tau)
        if variant == "grouped":  # z / (mean(|z_1|, |z_3|) * tau): one class per group
            return z / ((z.abs().mean(-1, keepdim=True) + 1e-7) * tau)
        return z

    # the step in float64 on the same float32 values
    x64 = x.double()
    w = w0[[1, 3]].double().requires_grad_(True)
    b = b0[[1, 3]].double().requires_grad_(True)
    z = x64 @ w.T + b
    zn = normalise(z)
    (-torch.log_softmax(zn, dim=1).gather(1, target[:, None]).mean()).backward()
    new_w, new_b = w0[[1, 3]].double() - lr * w.grad, b0[[1, 3]].double() - lr * b.grad
    # The float32 step: each sample's gradient is a chain of at most 48 roundings (the 8-term logits, the
    # normalisation, the log-softmax and their backward) on terms within the envelope
    # |d zn / d z|^T (p + onehot) |x| (float64 here, first order); the mean over the N samples adds N; the
    # update lr * g and w0 - ... two more roundings of the new weights.
    p = torch.softmax(zn, dim=1).detach() + F.one_hot(target, 2).double()
    jac = torch.func.vmap(torch.func.jacrev(normalise))(z.detach())  # (N, 2, 2): d zn_i / d z_i
    envelope = (jac.abs().transpose(1, 2) @ p.unsqueeze(-1))[..., 0]  # (N, 2)
    g_err = tol(torch.float32, 48 + len(x), 1.0) / len(x)
    u = unit_roundoff(torch.float32)
    assert_within(head.weight[[1, 3]], new_w, lr * g_err * (envelope.T @ x64.abs()) + 2 * u * new_w.abs())
    assert_within(head.bias[[1, 3]], new_b, lr * g_err * envelope.sum(0) + 2 * u * new_b.abs())
    assert not torch.equal(head.weight[[1, 3]], w0[[1, 3]])


def test_align_classifier_is_deterministic_under_generator() -> None:
    stats, means, _, _ = _two_gaussians()
    heads = [_bad_head(means) for _ in range(3)]
    for head, seed in zip(heads, (5, 5, 6)):
        align_classifier(
            head, stats, [1, 3], steps=10, lr=0.05, num_per_class=8, batch_size=4,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
    assert torch.equal(heads[0].weight, heads[1].weight)
    assert not torch.equal(heads[0].weight, heads[2].weight)


def test_align_classifier_errors() -> None:
    stats, means, _, _ = _two_gaussians()
    head = _bad_head(means)
    kw = {"steps": 1, "lr": 0.1, "num_per_class": 2, "batch_size": 2}
    with pytest.raises(TypeError, match="head must be an nn.Linear, got Sequential"):
        align_classifier(nn.Sequential(head), stats, [1, 3], **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 5\), got min 1, max 5"):
        align_classifier(head, stats, [1, 5], **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"classes must not repeat an id, got \[1, 1\]"):
        align_classifier(head, stats, [1, 1], **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="classes must hold at least one class id"):
        align_classifier(head, stats, [], **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class 2 needs at least 2 sample"):
        align_classifier(head, stats, [1, 2], **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stats have F=8 features, head expects 4"):
        align_classifier(nn.Linear(4, 5), stats, [1, 3], **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr must be > 0, got 0"):
        align_classifier(head, stats, [1, 3], steps=1, lr=0.0, num_per_class=2, batch_size=2)
    with pytest.raises(ValueError, match="logit_norm must be > 0 or None, got -0.1"):
        align_classifier(head, stats, [1, 3], **kw, logit_norm=-0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        align_classifier(head, stats, [1, 3], steps=0, lr=0.1, num_per_class=2, batch_size=2)
    with pytest.raises(TypeError, match="batch_size must be an int, got float"):
        align_classifier(head, stats, [1, 3], steps=1, lr=0.1, num_per_class=2, batch_size=2.0)  # type: ignore


# --------------------------------------------------------------------------------------------------
# NearestClassMean and task-identity accuracy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_nearest_class_mean_separable(metric: str) -> None:
    rng = np.random.default_rng(0)
    centres = {5: 10 * np.eye(6)[0], 2: 10 * np.eye(6)[1], 9: 10 * np.eye(6)[2]}
    labels = np.repeat([5, 2, 9], 50)
    x = np.stack([centres[c] for c in labels]) + 0.5 * rng.normal(size=(150, 6))
    features, y = torch.from_numpy(x).float(), torch.from_numpy(labels)

    ncm = NearestClassMean.from_features(features, y, metric=metric)
    assert ncm.predict_class(features).tolist() == labels.tolist()

    table = task_of_class([[2, 5], [9]])  # classes 2, 5 -> task 0; class 9 -> task 1
    expected_task = [{2: 0, 5: 0, 9: 1}[c] for c in labels]
    pred_task = ncm.predict_task(features, table)
    assert pred_task.tolist() == expected_task
    assert task_id_accuracy(pred_task, torch.tensor(expected_task)) == 100.0


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_nearest_class_mean_matches_numpy_reference(metric: str) -> None:
    rng = np.random.default_rng(1)
    means = rng.normal(size=(7, 16))
    x = rng.normal(size=(300, 16))
    classes = [10, 11, 12, 13, 14, 15, 16]
    ncm = NearestClassMean(torch.from_numpy(means), classes, metric=metric)
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        mn = means / np.linalg.norm(means, axis=1, keepdims=True)
        scores = xn @ mn.T
        # float64 on both sides: two norms (F squares each, a sqrt, a division) and a dot product of F
        # terms whose absolute values sum to at most 1
        err = gamma(torch.float64, 3 * x.shape[1] + 6)
    else:
        scores = -((x[:, None, :] - means[None]) ** 2).sum(-1)
        # F squared differences summed (and torch's sqrt, monotone): gamma_{F+3} of the largest distance
        err = gamma(torch.float64, x.shape[1] + 3) * float(np.abs(scores).max())
    ref = np.argmax(scores, axis=1)
    # the winner beats the runner-up by more than both sides' rounding: the argmax is the same on any CPU
    top2 = np.sort(scores, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 2 * err
    assert ncm.predict_class(torch.from_numpy(x)).tolist() == (np.asarray(classes)[ref]).tolist()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_nearest_class_mean_is_batch_invariant(metric: str) -> None:
    gen = torch.Generator().manual_seed(0)
    stats = ClassStatistics()
    stats.update(torch.randn(400, 32, generator=gen), torch.randint(0, 20, (400,), generator=gen))
    ncm = NearestClassMean.from_statistics(stats, metric=metric).to(torch.float32)
    table = task_of_class(split_tasks(list(range(20)), num_tasks=4))
    x = torch.randn(257, 32, generator=gen)  # overlapping classes: many near-ties
    batch_cls, batch_task = ncm.predict_class(x), ncm.predict_task(x, table)
    single_cls = torch.cat([ncm.predict_class(x[i : i + 1]) for i in range(len(x))])
    single_task = torch.cat([ncm.predict_task(x[i : i + 1], table) for i in range(len(x))])
    assert torch.equal(batch_cls, single_cls)
    assert torch.equal(batch_task, single_task)
    # The batch order does not matter either.
    perm = torch.randperm(len(x), generator=gen)
    assert torch.equal(ncm.predict_class(x[perm]), batch_cls[perm])
    assert len(set(batch_cls.tolist())) > 5  # the test data really spreads over classes


def test_nearest_class_mean_errors() -> None:
    means = torch.randn(3, 4)
    with pytest.raises(ValueError, match="metric must be 'cosine' or 'euclidean', got 'l1'"):
        NearestClassMean(means, metric="l1")
    with pytest.raises(ValueError, match="classes must have 3 ids .*got 2"):
        NearestClassMean(means, [0, 1])
    with pytest.raises(ValueError, match=r"classes must not repeat an id, got \[0, 0, 1\]"):
        NearestClassMean(means, [0, 0, 1])
    with pytest.raises(ValueError, match=r"means must have shape \(K, F\) with K >= 1, got shape \(4,\)"):
        NearestClassMean(torch.randn(4))
    ncm = NearestClassMean(means, [0, 1, 7])
    with pytest.raises(ValueError, match=r"features must have shape \(B, 4\), got shape \(2, 5\)"):
        ncm.predict_class(torch.randn(2, 5))
    with pytest.raises(ValueError, match="task_of_class has 4 entries, class 7 is not covered"):
        ncm.predict_task(torch.randn(2, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="stats must hold at least one class"):
        NearestClassMean.from_statistics(ClassStatistics())


def test_task_id_accuracy() -> None:
    # 3 of 4 correct -> 75 %.
    assert task_id_accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])) == 75.0
    with pytest.raises(ValueError, match=r"same shape, got \(2,\) and \(3,\)"):
        task_id_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="at least one sample, got 0"):
        task_id_accuracy(torch.tensor([]), torch.tensor([]))


# --------------------------------------------------------------------------------------------------
# Contrastive regularisation (the authors' orth_loss)
# --------------------------------------------------------------------------------------------------
def _contrastive_ref(features: torch.Tensor, prototypes: torch.Tensor | None, temperature: float) -> float:
    """Theirs: M = [prototypes; features]; mean_i (logsumexp_j(m_i . m_j / T) - m_i . m_i / T), float64 loops."""
    rows = [r.double() for r in ([] if prototypes is None else list(prototypes))] + [r.double() for r in features]
    total = 0.0
    for i, mi in enumerate(rows):
        sims = torch.stack([(mi * mj).sum() / temperature for mj in rows])
        total += float(torch.logsumexp(sims, 0) - sims[i])
    return total / len(rows)


def test_contrastive_regularization_hand_checked() -> None:
    f = torch.eye(2)  # two orthogonal unit features, temperature 1: each row's CE is log(e + 1) - 1
    got = contrastive_regularization(f, temperature=1.0)
    # exact similarities; float32 exp (1 ulp) of values <= e, a 2-term sum, a log (1 ulp), the subtraction
    # and the mean: a few roundings of values <= e + 1, 12 u in all
    assert math.isclose(got.item(), math.log(math.e + 1) - 1, rel_tol=0, abs_tol=tol(torch.float32, 12))


@pytest.mark.parametrize("with_prototypes", [False, True])
def test_contrastive_regularization_matches_reference(with_prototypes: bool) -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 5, generator=g, requires_grad=True)
    protos = torch.randn(4, 5, generator=g) if with_prototypes else None
    got = contrastive_regularization(f, protos, temperature=0.8)
    want = _contrastive_ref(f.detach(), protos, 0.8)
    # float32: similarities are dot products of length 5 and a division (gamma_6 of sum |m_i| |m_j| / T); a
    # row's log-sum-exp over its R similarities moves with them and adds R + 6 roundings (exp, log: 1 ulp)
    # of values <= |lse|; its CE subtracts one more similarity; the mean over R rows adds gamma_R of the CEs
    m = (f.detach() if protos is None else torch.cat([protos, f.detach()])).double()
    rows = len(m)
    ds = tol(torch.float32, 6, float((m.abs() @ m.abs().T).max()) / 0.8)
    lse = float(torch.logsumexp(m @ m.T / 0.8, dim=1).abs().max())
    u = unit_roundoff(torch.float32)
    bound = 2 * ds + u * (rows + 6 + 3 * lse) + tol(torch.float32, rows, want)
    assert math.isclose(got.item(), want, rel_tol=0, abs_tol=bound)
    got.backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_contrastive_regularization_errors() -> None:
    with pytest.raises(TypeError, match="features must be a floating tensor"):
        contrastive_regularization(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="prototypes must have C=2 columns"):
        contrastive_regularization(torch.ones(3, 2), torch.ones(4, 3))
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        contrastive_regularization(torch.ones(3, 2), temperature=0.0)
    assert contrastive_regularization(torch.ones(0, 2)).item() == 0.0
