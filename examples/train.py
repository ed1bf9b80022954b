"""Train prompt experts across tasks with norga: the loop to copy into your project.

Two recipes, as the authors' code runs them (docs/howto/training.md; differences in docs/fidelity.md):

* `prefix` / `norga`: one prompt per task on blocks 0-4 (a PrefixPool with the authors' prompt momentum),
  the NoRGa gate's alpha and tau trained on the first task only, each task's prompt started from the previous
  one, earlier prompts frozen, the authors' feature regulariser. At test time each sample runs with the prompt
  of its own predicted task (task-identity inference by the nearest class mean of frozen features).
* `smope`: one shared SMoPE per block 0-5, a dense warm-up on the first task, router and prototype losses,
  a counting pass after each task.

Data: one DataLoader of `(images, labels)` per task. `--data cifar100 --root DIR` reads torchvision's
CIFAR-100 (no download) in `--tasks` tasks; `--data random` is a tiny random stream that runs in seconds:

```bash
python examples/train.py --method norga --data random
```
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import norga
from norga import cl


def task_loaders(args: argparse.Namespace) -> tuple[list[DataLoader], list[DataLoader], list[list[int]]]:
    """Train and test loaders per task, and the classes of each task."""
    if args.data == "random":
        splits = [[2 * t, 2 * t + 1] for t in range(args.tasks)]
        pattern = torch.randn(2 * args.tasks, 3, args.img_size, args.img_size)  # one image per class, plus noise
        y = torch.arange(2 * args.tasks).repeat(16)
        train = TensorDataset(pattern[y] + 0.5 * torch.randn_like(pattern[y]), y)
        test = TensorDataset(pattern[y] + 0.5 * torch.randn_like(pattern[y]), y)
    else:
        import torchvision
        from torchvision import transforms as T

        tf = T.Compose([T.Resize(args.img_size), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
        train = torchvision.datasets.CIFAR100(args.root, train=True, transform=tf)
        test = torchvision.datasets.CIFAR100(args.root, train=False, transform=tf)
        splits = cl.split_tasks(cl.class_order(100, seed=0), num_tasks=args.tasks)

    def per_task(data: Dataset, shuffle: bool) -> list[DataLoader]:
        labels = data.tensors[1] if isinstance(data, TensorDataset) else torch.as_tensor(data.targets)
        idx = [torch.isin(labels, torch.tensor(s)).nonzero().flatten().tolist() for s in splits]
        return [DataLoader(Subset(data, i), batch_size=args.batch_size, shuffle=shuffle) for i in idx]

    return per_task(train, True), per_task(test, False), splits


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-logits features of a timm ViT."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def train_pool(
    model: nn.Module,
    pool: norga.PrefixPool,
    loaders: Sequence[DataLoader],
    splits: Sequence[Sequence[int]],
    args: argparse.Namespace,
) -> list[torch.Tensor]:
    """Prefix tuning / NoRGa: returns the class means of each task (features under the task's prompt)."""
    gated = args.method == "norga"
    prototypes: list[torch.Tensor] = []
    for task, loader in enumerate(loaders):
        if task > 0:
            pool.copy_task_(task - 1, task)  # start from the previous task's prompt
            if gated:
                norga.gates.freeze_gates(model)  # alpha, tau: first task only
        pool.train_only(task)  # earlier prompts get no gradient and are restored after each step
        norga.set_task(model, task)
        model.zero_grad(set_to_none=True)  # no gradient left from the last task (a frozen gate keeps its .grad)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=args.lr)
        pool.protect(optimizer)
        stats = cl.ClassStatistics()
        model.train()
        for epoch in range(args.epochs):
            for x, y in loader:
                f = features(model, x)
                if epoch == args.epochs - 1:
                    stats.update(f.detach().double(), y)
                logits = cl.mask_unseen_logits(model.head(f), splits[task])  # this task's classes only
                reg = cl.contrastive_regularization(f, torch.stack(prototypes) if prototypes else None)
                loss = F.cross_entropy(logits, y) + 0.1 * reg
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
        norga.end_task(model)  # prompt momentum: the task's prompt becomes the blend that training used
        prototypes += [stats.mean(c).float() for c in splits[task]]
    return prototypes


def train_smope(
    model: nn.Module, loaders: Sequence[DataLoader], splits: Sequence[Sequence[int]], args: argparse.Namespace
) -> None:
    """SMoPE: the authors' phases per task (a fresh optimizer each), router and prototype losses, counting pass."""
    params = [p for p in model.parameters() if p.requires_grad]
    for task, loader in enumerate(loaders):
        for phase in norga.prompts.training_phases(task, args.epochs):  # dense warm-up on task 0
            norga.set_dense(model, phase.dense)
            optimizer = torch.optim.Adam(params, lr=args.lr)  # a fresh optimizer per phase
            model.train()
            for _ in range(phase.epochs):
                for x, y in loader:
                    logits = cl.mask_unseen_logits(model(x), splits[task])  # this task's classes only
                    router, proto = norga.smope_losses(model)
                    loss = F.cross_entropy(logits, y) + 1e-5 * router + 1e-5 * proto
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        norga.set_dense(model, False)
        with norga.count_usage(model):  # evaluation pass over the task's data: which experts it uses
            for x, _ in loader:
                model(x)
        norga.end_task(model)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    backbone: nn.Module,
    test_loaders: Sequence[DataLoader],
    splits: Sequence[Sequence[int]],
    train_loaders: Sequence[DataLoader],
    args: argparse.Namespace,
) -> list[float]:
    """Accuracy per task. Pool methods predict each sample's task first and classify among its classes; SMoPE
    classifies among all classes seen (the authors then align the classifier on class statistics, see
    norga.cl.align_classifier; without it the last task's classes dominate)."""
    model.eval()
    seen = [c for s in splits for c in s]
    task_of = cl.task_of_class(splits)
    tii = None
    if args.method != "smope":  # nearest class mean of the frozen, unprompted backbone's features
        feats = [(features(backbone, x), y) for loader in train_loaders for x, y in loader]
        tii = cl.NearestClassMean.from_features(torch.cat([f for f, _ in feats]), torch.cat([y for _, y in feats]))
    accs = []
    for loader in test_loaders:
        correct = total = 0
        for x, y in loader:
            if tii is None:
                logits = cl.mask_unseen_logits(model(x), seen)
            else:  # each sample with its predicted task's prompt, among that task's classes
                task_ids = tii.predict_task(features(backbone, x), task_of)
                with norga.use_task(model, task_ids):
                    logits = cl.mask_to_task(model(x), task_ids, splits)
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
        accs.append(100.0 * correct / total)
    return accs


def main(argv: Sequence[str] | None = None) -> list[float]:
    """Trains and evaluates one method; returns the accuracy on each task."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["prefix", "norga", "smope"], default="norga")
    p.add_argument("--data", choices=["random", "cifar100"], default="random")
    p.add_argument("--root", default="data", help="CIFAR-100 directory (torchvision layout)")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    train_loaders, test_loaders, splits = task_loaders(args)
    num_classes = sum(len(s) for s in splits)
    backbone = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=0).eval()
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=num_classes)
    model.load_state_dict(backbone.state_dict(), strict=False)  # your pretrained backbone, head aside
    if args.method == "smope":
        norga.patch_vit(model, prompt=norga.smope_factory(num_experts=25, top_k=5, noise_eps=0.4))
    else:
        pool = norga.PrefixPool(args.tasks, 5, 5, model.embed_dim, momentum=0.01)
        norga.patch_vit(model, gate=norga.NoRGaGate("sigmoid") if args.method == "norga" else None, prompt=pool)
    trained = ("prompt_pool.", "head.", ".prompt.", ".prefix_gate.")
    for name, param in model.named_parameters():  # the backbone stays frozen
        param.requires_grad = any(name.startswith(t) or t in name for t in trained)
    if args.method == "smope":
        train_smope(model, train_loaders, splits, args)
    else:
        train_pool(model, pool, train_loaders, splits, args)
    accs = evaluate(model, backbone, test_loaders, splits, train_loaders, args)
    print(f"{args.method}: accuracy per task {[round(a, 1) for a in accs]}, mean {sum(accs) / len(accs):.1f}")
    return accs


if __name__ == "__main__":
    main()
