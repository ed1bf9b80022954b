"""The main job (examples/continual.py and its package clstream): paper-protocol loaders on fake datasets written
here, a 1-epoch end-to-end run on them with a tiny timm ViT, a smoke run of every method on random images, and
set-up errors.

Nothing is downloaded: the backbone comes from a local checkpoint the test writes.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import continual
import numpy as np
import pytest
import timm
import torch
from clstream import methods, sources, streams
from clstream.classifier import lda_head, set_rows
from clstream.config import Config, make_config
from clstream.context import Context, build_context
from tolerance import gamma

import norga
from norga import cl
from norga.prompts import smope_layers


# --------------------------------------------------------------------------------------------------
# Fake datasets in their usual layouts
# --------------------------------------------------------------------------------------------------
def _fake_cifar(root: Path, num_classes: int = 20, train_per: int = 4, test_per: int = 2) -> None:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for part, per in (("train", train_per), ("test", test_per)):
        labels = np.repeat(np.arange(num_classes), per)
        # each class has its own mean colour, so the classes are learnable
        data = (rng.integers(0, 60, size=(labels.size, 3072)) + (labels[:, None] * 9) % 190).astype(np.uint8)
        with (base / part).open("wb") as fh:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist()}, fh)
    with (base / "meta").open("wb") as fh:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(num_classes)]}, fh)


def _png(path: Path, value: int) -> None:
    Image = pytest.importorskip("PIL.Image", reason="image folders need Pillow")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(path)


def test_load_cifar100(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    train, test, names = streams.load_cifar100(tmp_path)
    assert train.images.shape == (80, 32, 32, 3) and train.images.dtype == torch.uint8
    assert test.labels.tolist() == np.repeat(np.arange(20), 2).tolist()
    assert names[:2] == ["c0", "c1"]
    # the pickle's CHW rows become HWC images
    with (tmp_path / "cifar-100-python" / "train").open("rb") as fh:
        raw = pickle.load(fh, encoding="bytes")[b"data"][5]
    np.testing.assert_array_equal(train.images[5].numpy(), raw.reshape(3, 32, 32).transpose(1, 2, 0))
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        streams.load_cifar100(tmp_path / "nowhere")


def test_load_imagenet_r_seeded_disjoint(tmp_path: Path) -> None:
    for c, wnid in enumerate(["n01443537", "n01484850", "n01494475"]):
        for i in range(5):
            _png(tmp_path / "imagenet-r" / wnid / f"art_{i}.jpg", 40 * c + i)
    train, test, classes = streams.load_imagenet_r(tmp_path, seed=3)
    assert classes == ["n01443537", "n01484850", "n01494475"]
    assert len(train) + len(test) == 15
    assert set(train.paths).isdisjoint(test.paths)
    assert sorted(test.labels.tolist()) == [0, 1, 2]
    again = streams.load_imagenet_r(tmp_path, seed=3)[1]
    assert again.paths == test.paths
    x = test.batch(torch.arange(len(test)), 16)
    assert x.shape == (3, 3, 16, 16)


def test_load_cub_official_split(tmp_path: Path) -> None:
    base = tmp_path / "CUB_200_2011"
    lines_img, lines_lab, lines_split = [], [], []
    k = 0
    for c, name in enumerate(["001.Black_footed_Albatross", "002.Laysan_Albatross"]):
        for i in range(3):
            k += 1
            rel = f"{name}/img_{i}.jpg"
            _png(base / "images" / rel, 50 * c + i)
            lines_img.append(f"{k} {rel}")
            lines_lab.append(f"{k} {c + 1}")
            lines_split.append(f"{k} {1 if i < 2 else 0}")
    (base / "images.txt").write_text("\n".join(lines_img) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(lines_lab) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(lines_split) + "\n")
    train, test, classes = streams.load_cub(tmp_path)
    assert classes == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    assert train.labels.tolist() == [0, 0, 1, 1] and test.labels.tolist() == [0, 1]
    assert all(p.endswith("img_2.jpg") for p in test.paths)
    (base / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        streams.load_cub(tmp_path)


def test_paper_stream_splits(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    stream = streams.paper_stream("cifar100", tmp_path, seed=1, num_tasks=4)
    assert len(stream.splits) == 4 and all(len(s) == 5 for s in stream.splits)
    assert sorted(c for s in stream.splits for c in s) == list(range(20))


# --------------------------------------------------------------------------------------------------
# End to end on the fake CIFAR-100, through main()
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_paper_protocol_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_cifar(tmp_path / "data")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0)
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    out = tmp_path / "res" / "results.json"
    methods = ["prefix", "norga-sigmoid", "smope", "dualprompt", "linear-probe", "finetune"]
    names = ["hide-prompt", *methods[1:]]  # "prefix": hide-prompt's earlier name
    try:
        import matplotlib  # noqa: F401

        plot = []
    except ImportError:
        plot = ["--no-plot"]
    rc = continual.main(
        [
            *plot,
            "--dataset",
            "cifar100",
            "--data-root",
            str(tmp_path / "data"),
            "--checkpoint",
            str(ckpt),
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--num-tasks",
            "2",
            "--methods",
            ",".join(methods),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["num_classes"] == 20
    assert list(res["methods"]) == names
    for r in res["methods"].values():
        assert set(r) >= {"FA", "CA", "FM", "acc_matrix", "task_id_acc", "seconds", "trainable_params"}
        acc = r["acc_matrix"]
        assert acc[0][1] is None and all(0.0 <= acc[t][j] <= 100.0 for t in range(2) for j in range(t + 1))
        # float64 on both sides: a sum and a division, a difference (and a mean of one): 2 roundings each
        assert r["FA"] == pytest.approx((acc[1][0] + acc[1][1]) / 2, rel=2 * gamma(torch.float64, 2), abs=0)
        assert r["FM"] == pytest.approx(acc[0][0] - acc[1][0], rel=2 * gamma(torch.float64, 2), abs=0)
    assert res["methods"]["finetune"]["trainable_params"] > res["methods"]["hide-prompt"]["trainable_params"]
    assert out.with_suffix(".png").is_file() or plot
    assert "hide-prompt" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# The budget presets and the classifier
# --------------------------------------------------------------------------------------------------
def test_make_config_presets_and_overrides() -> None:
    cfg, data = make_config("offline", quick=True, seed=3, progress=False)
    assert (cfg.epochs, cfg.batch_size, cfg.img_size, cfg.prompt_at, cfg.seed) == (2, 32, 56, "last", 3)
    assert data == {"tasks_per_domain": 1, "train_per_class": 40, "test_per_class": 25}
    cfg, data = make_config("offline", quick=False, seed=0, progress=True, epochs=5, test_per_class=7)
    assert cfg.epochs == 5 and data == {"tasks_per_domain": 2, "train_per_class": 150, "test_per_class": 7}
    cfg, data = make_config("imagenet-r", quick=False, seed=0, progress=True, batch_size=64)
    assert (cfg.prompt_at, cfg.prompt_length, cfg.img_size, cfg.lr) == ("first", 20, 224, 0.03 * 64 / 256)
    assert data == {}
    cfg, _ = make_config("cifar100", quick=False, seed=0, progress=True, batch_size=64, lr=0.5)
    assert (cfg.prompt_length, cfg.lr) == (5, 0.5)  # an explicit lr is not rescaled


def test_lda_head_classifies_as_linear_discriminant_analysis() -> None:
    # scikit-learn's LDA on the same samples: its covariance is the prior-weighted mean of the biased class
    # covariances, ours the mean of the unbiased ones (equal class sizes: a factor n / (n - 1)), and its bias
    # adds log priors (equal: a constant). Both change no decision, so the predicted classes must agree.
    lda_cls = pytest.importorskip("sklearn.discriminant_analysis").LinearDiscriminantAnalysis
    g = torch.Generator().manual_seed(0)
    classes, n, dim = [4, 1, 7], 60, 5
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    x = torch.cat([torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix + 2 * c for c in range(3)])
    y = torch.tensor(classes).repeat_interleave(n)
    stats = cl.ClassStatistics()
    stats.update(x, y)
    weight, bias = lda_head(stats, classes, shrinkage=0.0)
    probe = 3 * torch.randn(300, dim, generator=g, dtype=torch.float64) @ mix + 2  # around all three classes
    ours = torch.tensor(classes)[(probe.float() @ weight.T + bias).argmax(1)]
    theirs = lda_cls(solver="lsqr").fit(x.numpy(), y.numpy()).predict(probe.numpy())
    assert set(theirs.tolist()) == set(classes)
    assert ours.tolist() == theirs.tolist()  # the nearest class mean would disagree on 183 of them
    head = torch.nn.Linear(dim, 8)
    before = head.weight.detach().clone()
    set_rows(head, classes, weight, bias)
    assert torch.equal(head.weight[classes], weight) and torch.equal(head.bias[classes], bias)
    others = [c for c in range(8) if c not in classes]
    assert torch.equal(head.weight[others], before[others])


# --------------------------------------------------------------------------------------------------
# The training loop on random images (offline-stream code path: cached frozen blocks)
# --------------------------------------------------------------------------------------------------
def _random_stream(
    num_tasks: int = 2, classes_per_task: int = 3, train_per: int = 6, test_per: int = 3, size: int = 16
) -> streams.Stream:
    g = torch.Generator().manual_seed(0)
    c = num_tasks * classes_per_task

    def make(per: int) -> streams.ImageSet:
        labels = torch.arange(c).repeat_interleave(per)
        base = (labels * (200 // c)).view(-1, 1, 1).to(torch.int64)
        imgs = (base + torch.randint(0, 50, (labels.numel(), size, size), generator=g)).clamp(0, 255)
        return streams.ImageSet(imgs.to(torch.uint8), None, labels)

    splits = [list(range(t * classes_per_task, (t + 1) * classes_per_task)) for t in range(num_tasks)]
    return streams.Stream("random", make(train_per), make(test_per), splits, [str(i) for i in range(c)])


def _tiny_context(prompt_at: str = "last") -> Context:
    backbone = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=28, embed_dim=32, depth=4, num_heads=2, num_classes=0
    )
    cfg = Config(
        epochs=1,
        batch_size=8,
        img_size=28,
        pool_layers=2,
        smope_layers=2,
        prompt_length=2,
        smope_experts=4,
        smope_top_k=2,
        prompt_at=prompt_at,
        progress=False,
    )
    return build_context(_random_stream(), backbone, cfg)


@pytest.mark.parametrize("method", methods.METHODS)
def test_every_method_runs_on_random_images(method: str) -> None:
    ctx = _tiny_context()
    assert ctx.start == 2 and ctx.train_in.tokens is not None  # blocks 0-1 cached
    r = methods.run_method(ctx, method)
    acc = r["acc_matrix"]
    assert acc[0][1] is None
    assert all(0.0 <= acc[t][j] <= 100.0 for t in range(2) for j in range(t + 1))
    assert 0.0 <= r["task_id_acc"] <= 100.0 and r["trainable_params"] > 0
    if method != "finetune":  # the backbone is frozen and shared: no method may change it
        for p in ctx.backbone.parameters():
            assert not p.requires_grad


def test_pool_method_keeps_past_prompts_and_head_rows() -> None:
    # The evaluation memoises a test sample's logits under a task's prompt: valid only if that prompt and the
    # head rows of that task's classes never change after the task (frozen pool, masked loss, row-wise TAP).
    ctx = _tiny_context()
    ctx.stream = _random_stream(num_tasks=3)
    ctx = build_context(ctx.stream, ctx.backbone, ctx.cfg)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_task_end(t: int, pool: torch.nn.Module, head: torch.nn.Linear) -> None:
        for j, (prompt, w, b) in enumerate(seen):
            rows = ctx.stream.splits[j]
            assert torch.equal(pool.prompts[j].detach(), prompt), f"prompt of task {j} changed during task {t}"
            assert torch.equal(head.weight[rows].detach(), w) and torch.equal(head.bias[rows].detach(), b)
        rows = ctx.stream.splits[t]
        seen.append(
            (pool.prompts[t].detach().clone(), head.weight[rows].detach().clone(), head.bias[rows].detach().clone())
        )

    methods.run_pool(ctx, "tanh", on_task_end=on_task_end)
    assert len(seen) == 3


def test_smope_follows_the_authors_schedule_and_counting(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _tiny_context()
    ctx.cfg.epochs = 2
    calls: list[tuple[int, int, bool, bool]] = []  # (task, epochs, dense, every layer in the same mode)
    real_batches = methods.task_batches
    models: list[torch.nn.Module] = []
    real_patch = norga.patch_vit

    def patch(model: torch.nn.Module, **kw: object) -> torch.nn.Module:
        models.append(model)
        return real_patch(model, **kw)

    def recording_batches(
        c: Context, task: int, epochs: int, gen: torch.Generator, desc: str
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        layers = smope_layers(models[0])
        calls.append((task, epochs, layers[0].dense, all(m.dense == layers[0].dense for m in layers)))
        return real_batches(c, task, epochs, gen, desc)

    optimizers: list[torch.optim.Optimizer] = []
    real_adam = torch.optim.Adam

    def adam(*args: object, **kw: object) -> torch.optim.Optimizer:
        optimizers.append(real_adam(*args, **kw))
        return optimizers[-1]

    counts: list[float] = []
    real_end_task = norga.end_task

    def end_task(model: torch.nn.Module) -> None:
        counts.append(sum(float(m.usage.sum()) for m in smope_layers(model)))
        real_end_task(model)

    monkeypatch.setattr(norga, "patch_vit", patch)
    monkeypatch.setattr(methods, "task_batches", recording_batches)
    monkeypatch.setattr(methods.torch.optim, "Adam", adam)
    monkeypatch.setattr(norga, "end_task", end_task)
    methods.run_smope(ctx)
    # task 0: dense warm-up for epochs // 2, then sparse for all epochs; task 1: sparse only
    assert calls == [(0, 1, True, True), (0, 2, False, True), (1, 2, False, True)]
    assert len(optimizers) == len(calls)  # a fresh optimizer for every phase
    # counting pass over each task's training data: samples x heads x top-K x SMoPE layers, cumulative
    per_task = [int(torch.isin(ctx.stream.train.labels, torch.tensor(s)).sum()) for s in ctx.stream.splits]
    heads, k, layers = 2, ctx.cfg.smope_top_k, ctx.cfg.smope_layers
    assert counts == [per_task[0] * heads * k * layers, (per_task[0] + per_task[1]) * heads * k * layers]


def test_prompt_at_first_runs_whole_backbone() -> None:
    ctx = _tiny_context(prompt_at="first")
    assert ctx.start == 0 and ctx.train_in.tokens is None
    r = methods.run_method(ctx, "norga-gelu")
    assert r["acc_matrix"][1][0] is not None


# --------------------------------------------------------------------------------------------------
# Set-up failures: a clear message and a non-zero exit, before any training
# --------------------------------------------------------------------------------------------------
def test_missing_data_source_exits_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise sources.DataSourceError("animal_mnist", "files not found", manual="pip download ...")

    monkeypatch.setattr(sources, "ensure_sources", fail)
    rc = continual.main(["--quick", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "r.json"), "--no-plot"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "set-up failed" in err and "animal_mnist" in err
    assert not (tmp_path / "r.json").exists()


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert continual.main(["--methods", "prefix,l2pp", "--no-plot"]) == 2
    assert "l2pp" in capsys.readouterr().err
    assert continual.main(["--dataset", "cub", "--no-plot"]) == 2
    assert "--data-root" in capsys.readouterr().err
    _fake_cifar(tmp_path)
    rc = continual.main(
        [
            "--dataset",
            "cifar100",
            "--data-root",
            str(tmp_path),
            "--no-plot",
            "--checkpoint",
            str(tmp_path / "missing.pth"),
        ]
    )
    assert rc == 1 and "does not exist" in capsys.readouterr().err
