"""The methods of the main job, each a plain loop over tasks and batches (frozen backbone; only prompts, gates
and the head train, except `finetune`), all with the same epochs, batch size, seed and data (the learning
rates are the authors'):

- `hide-prompt` (formerly `prefix`), `norga-tanh`, `norga-sigmoid`, `norga-gelu`: one prompt per task in a
  `norga.PrefixPool` (HiDe-Prompt's prefix tuning / NoRGa pipeline). Before task t the prompt of task t-1 is
  copied into slot t; past prompts are frozen; NoRGa's alpha and tau train on the first task only. Test
  samples get their task from the task-identity head (`clstream.classifier`) and are classified with their own
  predicted task's prompt, among that task's classes.
- `smope`: `norga.SMoPE` sparse prompt experts shared by every task (dense warm-up for half of the first task's
  epochs, adaptive noise, router and prototype losses, a counting pass after each task); no task id is needed.
- `l2p`, `dualprompt`, `coda-p`, `vq-prompt`: the CODA-Prompt lineage's L2P++, DualPrompt, CODA-Prompt and
  VQ-Prompt (`norga.prompts`), prompts chosen per sample from the query of the frozen model (its pre-trained
  features, computed once per image), a fresh optimizer per task and each method's auxiliary loss; no task id.
- `linear-probe`: a linear head on the frozen pre-trained features (the task-identity head itself).
- `finetune`: sequential fine-tuning of the trainable blocks and the head.

The classifier is the same for every method: during training the head learns the current task's classes (the
other logits masked); after each task the rows of its classes are replaced by the LDA of their Gaussian feature
statistics, collected during the task's last epoch. Methods whose features drift (`smope`, `finetune`) keep old
classes' statistics from the time they were learned and re-solve every seen class after each task, which is
where their forgetting shows.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from tqdm import tqdm

import norga
from norga import cl
from norga.gates import freeze_gates
from norga.prompts import smope_layers, training_phases

from .classifier import lda_head, set_rows
from .context import Context, features, freeze
from .streams import task_indices

QUERY_METHODS = ("l2p", "dualprompt", "coda-p", "vq-prompt")
METHODS = (
    "hide-prompt",
    "norga-tanh",
    "norga-sigmoid",
    "norga-gelu",
    "smope",
    *QUERY_METHODS,
    "linear-probe",
    "finetune",
)
#: Earlier names of methods, still accepted by `--methods`.
ALIASES = {"prefix": "hide-prompt"}
POOL_GATES: dict[str, str | None] = {
    "hide-prompt": None,
    "norga-tanh": "tanh",
    "norga-sigmoid": "sigmoid",
    "norga-gelu": "gelu",
}

# What a method returns: the accuracy matrix, the final task-identity accuracy and the trainable parameters.
MethodResult = tuple[cl.AccuracyMatrix, float, int]


# --------------------------------------------------------------------------------------------------
# The training loop's pieces
# --------------------------------------------------------------------------------------------------
def task_batches(
    ctx: Context, task: int, epochs: int, gen: torch.Generator, desc: str
) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """`(epoch, inputs, labels, indices)` over `epochs` shuffled passes through the training data of task `task`.

    `gen` draws the shuffles (and the flips of image inputs), so a run is reproducible from its seed; a tqdm
    bar counts the steps.
    """
    cfg = ctx.cfg
    idx = task_indices(ctx.stream.train.labels, ctx.stream.splits[task])
    steps = epochs * math.ceil(idx.numel() / cfg.batch_size)
    with tqdm(total=steps, desc=desc, disable=not cfg.progress, leave=False) as bar:
        for epoch in range(epochs):
            order = idx[torch.randperm(idx.numel(), generator=gen)]
            for b in order.split(cfg.batch_size):
                yield epoch, ctx.train_in.get(b, train=True, gen=gen), ctx.stream.train.labels[b], b
                bar.update()


def task_generator(ctx: Context, task: int) -> torch.Generator:
    """The generator of task `task`'s shuffles, seeded from the run's seed and the task."""
    return torch.Generator().manual_seed(ctx.cfg.seed * 1000 + task)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor, params: Sequence[nn.Parameter], clip: float) -> None:
    """One step on `loss`, with the gradient norm of `params` clipped to `clip`."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


def masked_ce(logits: Tensor, labels: Tensor, classes: Sequence[int]) -> Tensor:
    """Cross-entropy among the current task's classes only (the other logits masked)."""
    return F.cross_entropy(cl.mask_unseen_logits(logits, classes), labels)


def count_params(params: Iterable[nn.Parameter]) -> int:
    """Number of distinct trainable values in `params`."""
    return int(sum(p.numel() for p in {id(p): p for p in params}.values()))


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def record_accuracy(acc: cl.AccuracyMatrix, t: int, pred: Tensor, labels: Tensor, task_of_class: Tensor) -> Tensor:
    """Fills `acc[t][0..t]`, the accuracy of `pred` on the test samples of each task; returns their true tasks."""
    true_task = task_of_class[labels]
    for j in range(t + 1):
        sel = true_task == j
        acc.update(t, j, 100.0 * float((pred[sel] == labels[sel]).double().mean()))
    return true_task


@torch.no_grad()
def evaluate_seen(
    ctx: Context, t: int, model: VisionTransformer, head: nn.Linear, acc: cl.AccuracyMatrix, queried: bool = False
) -> float:
    """Classifies the test samples of the classes seen so far among all of them; returns the accuracy of the
    task of the predicted class (the task-identity accuracy of methods without task ids). `queried`: the model
    has a `QueryPrompt` (its queries are the pre-trained features, see `query_features`)."""
    stream = ctx.stream
    seen = stream.seen_classes(t)
    test_idx = task_indices(stream.test.labels, seen)
    preds = []
    bar = tqdm(test_idx.split(ctx.cfg.eval_batch), desc="  eval", disable=not ctx.cfg.progress, leave=False)
    for b in bar:
        logits = head(query_features(ctx, model, ctx.test_in.get(b, train=False), ctx.test_feats, b, queried))
        preds.append(cl.mask_unseen_logits(logits, seen).argmax(-1))
    pred = torch.cat(preds)
    true_task = record_accuracy(acc, t, pred, stream.test.labels[test_idx], ctx.task_of_class)
    return cl.task_id_accuracy(ctx.task_of_class[pred], true_task)


@torch.no_grad()
def fill_memo(
    ctx: Context, model: VisionTransformer, head: nn.Linear, memo: Tensor, idx: Tensor, tasks: Tensor
) -> None:
    """Logits of test samples `idx` with the prompts of `tasks` (per sample), stored in `memo`.

    A task's prompt, and the head rows of its classes, never change after the task is trained (the prompt is
    frozen and restored; the head rows get no gradient), so these logits are computed once per (sample, task).
    """
    model.eval()
    batches = list(zip(idx.split(ctx.cfg.eval_batch), tasks.split(ctx.cfg.eval_batch)))
    for b, tb in tqdm(batches, desc="  eval", disable=not ctx.cfg.progress, leave=False):
        with norga.use_task(model, tb):
            memo[b, tb] = head(features(model, ctx.test_in.get(b, train=False), ctx.start))


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------
def run_pool(
    ctx: Context,
    gate: str | None,
    on_task_end: Callable[[int, norga.PrefixPool, nn.Linear], None] | None = None,
) -> MethodResult:
    """Prefix tuning / NoRGa with one prompt per task, TII, and each test sample on its own prompt.

    `on_task_end(t, pool, head)` is called after task `t` is trained and its head rows solved (for tests).
    """
    cfg, stream = ctx.cfg, ctx.stream
    model = copy.deepcopy(ctx.backbone)
    dim = model.embed_dim
    layers = cfg.prompted_blocks(len(model.blocks), cfg.pool_layers)
    pool = norga.PrefixPool(stream.num_tasks, len(layers), cfg.prompt_length, dim, momentum=cfg.prompt_momentum)
    norga.patch_vit(model, gate=None if gate is None else norga.NoRGaGate(gate), prompt=pool, layers=layers)
    freeze(model)
    head = nn.Linear(dim, stream.num_classes)
    gates = [p for m in model.modules() if isinstance(m, norga.NoRGaGate) for p in (m.alpha, m.tau)]
    pool.prompts.requires_grad_(True)
    memo = torch.full((len(ctx.test_in), stream.num_tasks, stream.num_classes), math.nan)
    acc = cl.AccuracyMatrix(stream.num_tasks)
    tii = math.nan
    prototypes = torch.empty(0, dim)  # class means of the earlier tasks, for the contrastive regulariser
    for t in range(stream.num_tasks):
        classes = stream.splits[t]
        if t > 0:
            pool.copy_task_(t - 1, t)
        if gates:  # alpha and tau train on the first task only, as the authors do
            freeze_gates(model, frozen=t > 0)
        pool.train_only(t)
        model.zero_grad(set_to_none=True)  # no gradient left from the last task (a frozen gate keeps its .grad)
        params = [pool.prompts, *head.parameters(), *[p for p in gates if p.requires_grad]]
        model.train()
        norga.set_task(model, t)
        stats = cl.ClassStatistics()
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        pool.protect(optimizer)
        desc = f"{'norga-' + gate if gate else 'hide-prompt'} task {t}"
        for epoch, x, y, _ in task_batches(ctx, t, cfg.epochs, task_generator(ctx, t), desc):
            f = features(model, x, ctx.start)
            if epoch == cfg.epochs - 1:  # the last epoch's features give the task's class statistics
                stats.update(f.detach().double(), y)
            reg = cl.contrastive_regularization(f, prototypes if len(prototypes) else None)
            loss = masked_ce(head(f), y, classes) + cfg.contrastive_reg * reg
            optimizer_step(optimizer, loss, params, cfg.clip)
        norga.end_task(model)  # prompt momentum: the task's prompt becomes the blend that training used
        # the rows of this task's classes become the LDA of their statistics under the task's prompt
        set_rows(head, classes, *lda_head(stats, classes, cfg.lda_shrinkage))
        prototypes = torch.cat([prototypes, torch.stack([stats.mean(c).float() for c in classes])])
        if on_task_end is not None:
            on_task_end(t, pool, head)
        # evaluation: TII among the classes seen so far, then the predicted task's prompt and classes
        test_idx = task_indices(stream.test.labels, stream.seen_classes(t))
        pred_task = ctx.task_of_class[ctx.tii_class[t][test_idx]]
        need = memo[test_idx, pred_task, 0].isnan()
        fill_memo(ctx, model, head, memo, test_idx[need], pred_task[need])
        pred = cl.mask_to_task(memo[test_idx, pred_task], pred_task, stream.splits).argmax(-1)
        true_task = record_accuracy(acc, t, pred, stream.test.labels[test_idx], ctx.task_of_class)
        tii = cl.task_id_accuracy(pred_task, true_task)
    return acc, tii, count_params([pool.prompts, *head.parameters(), *gates])


def run_smope(ctx: Context) -> MethodResult:
    """SMoPE: shared sparse prompt experts, dense warm-up on the first task, router and prototype losses."""
    cfg, stream = ctx.cfg, ctx.stream
    model = copy.deepcopy(ctx.backbone)
    layers = cfg.prompted_blocks(len(model.blocks), cfg.smope_layers)
    norga.patch_vit(
        model,
        prompt=norga.smope_factory(num_experts=cfg.smope_experts, top_k=cfg.smope_top_k, noise_eps=cfg.smope_eps),
        layers=layers,
    )
    freeze(model)
    experts = [p for m in smope_layers(model) for p in (m.keys, m.values)]
    for p in experts:
        p.requires_grad_(True)
    head = nn.Linear(model.embed_dim, stream.num_classes)
    params = [*experts, *head.parameters()]
    acc = cl.AccuracyMatrix(stream.num_tasks)
    tii = math.nan
    stats = cl.ClassStatistics()
    for t in range(stream.num_tasks):
        classes = stream.splits[t]
        gen = task_generator(ctx, t)
        # the authors' schedule: on the first task a dense warm-up for half the epochs, then sparse for all of
        # them, each phase with a fresh optimizer; the class statistics come from the last sparse epoch
        for phase in training_phases(t, cfg.epochs):
            norga.set_dense(model, phase.dense)
            model.train()
            optimizer = torch.optim.Adam(params, lr=cfg.smope_lr)
            desc = f"smope task {t}" + (" (dense)" if phase.dense else "")
            for epoch, x, y, _ in task_batches(ctx, t, phase.epochs, gen, desc):
                f = features(model, x, ctx.start)
                if not phase.dense and epoch == phase.epochs - 1:
                    stats.update(f.detach().double(), y)
                ce = masked_ce(head(f), y, classes)
                router, proto = norga.smope_losses(model)
                loss = ce + cfg.router_mu * router + (cfg.proto_mu * proto if t > 0 else 0.0)
                optimizer_step(optimizer, loss, params, cfg.clip)
        norga.set_dense(model, False)
        # usage as the authors count it: the noise-free top-K of an evaluation pass over the task's training data
        with norga.count_usage(model):
            for b in task_indices(stream.train.labels, classes).split(cfg.eval_batch):
                features(model, ctx.train_in.get(b, train=False), ctx.start)
        norga.end_task(model)
        seen = stream.seen_classes(t)
        set_rows(head, seen, *lda_head(stats, seen, cfg.lda_shrinkage))  # old classes: statistics of their time
        model.eval()
        tii = evaluate_seen(ctx, t, model, head, acc)
    return acc, tii, count_params(params)


def query_features(ctx: Context, model: nn.Module, x: Tensor, feats: Tensor, b: Tensor, queried: bool) -> Tensor:
    """`features(model, x, ...)`; for a `QueryPrompt` model fed cached tokens, with `norga.use_query` of the
    pre-trained features of samples `b` (the query of the authors' `ViTZoo.forward`, computed once per image in
    `build_context`). Fed images, the model computes its query itself (of the flipped image in training)."""
    if not queried or ctx.start == 0:
        return features(model, x, ctx.start)
    with norga.use_query(model, feats[b]):
        return features(model, x, ctx.start)


def query_prompt(name: str, num_tasks: int, dim: int, layers: Sequence[int]) -> norga.prompts.QueryPrompt:
    """The method `name` with the authors' CIFAR-100 parameters (GT-RIPL/CODA-Prompt `experiments/cifar-100.sh`:
    L2P++ [30, 20], DualPrompt [10, 20, 6] with a pool of at least the number of tasks, CODA-P [100, 8, 0.0];
    VQ-Prompt's script: [10, 8, 1]) on the prompted blocks (DualPrompt: the G-prompt on the first two of five)."""
    if name == "l2p":
        return norga.prompts.L2P(num_tasks, dim, pool_size=30, length=20, top_k=5, layers=layers)
    if name == "dualprompt":
        g = max(1, 2 * len(layers) // 5)
        return norga.prompts.DualPrompt(
            num_tasks,
            dim,
            pool_size=max(10, num_tasks),
            e_length=20,
            g_length=6,
            g_layers=layers[:g],
            e_layers=layers[g:],
        )
    if name == "coda-p":
        return norga.prompts.CODAPrompt(num_tasks, dim, pool_size=100, length=8, ortho_mu=0.0, layers=layers)
    return norga.prompts.VQPrompt(num_tasks, dim, pool_size=10, length=8, temperature=1.0, layers=layers)


def run_query(ctx: Context, name: str) -> MethodResult:
    """L2P++, DualPrompt, CODA-P or VQ-Prompt: prompts chosen per sample from its query, a fresh optimizer per task
    (as the authors), the method's auxiliary loss (`norga.prompt_losses`); no task id at test time."""
    cfg, stream = ctx.cfg, ctx.stream
    model = copy.deepcopy(ctx.backbone)
    layers = cfg.prompted_blocks(len(model.blocks), cfg.pool_layers)
    prompt = query_prompt(name, stream.num_tasks, model.embed_dim, layers)
    norga.patch_vit(model, prompt=prompt)
    freeze(model)
    prompt.requires_grad_(True)
    head = nn.Linear(model.embed_dim, stream.num_classes)
    params = [*prompt.parameters(), *head.parameters()]
    acc = cl.AccuracyMatrix(stream.num_tasks)
    tii = math.nan
    stats = cl.ClassStatistics()
    for t in range(stream.num_tasks):
        classes = stream.splits[t]
        norga.set_task(model, t)  # DualPrompt trains the task's E-prompt; CODA-P draws the task's components
        model.train()
        optimizer = torch.optim.Adam(params, lr=cfg.query_lr)
        for epoch, x, y, b in task_batches(ctx, t, cfg.epochs, task_generator(ctx, t), f"{name} task {t}"):
            f = query_features(ctx, model, x, ctx.train_feats, b, True)
            if epoch == cfg.epochs - 1:
                stats.update(f.detach().double(), y)
            optimizer_step(optimizer, masked_ce(head(f), y, classes) + norga.prompt_losses(model), params, cfg.clip)
        norga.end_task(model)
        seen = stream.seen_classes(t)
        set_rows(head, seen, *lda_head(stats, seen, cfg.lda_shrinkage))  # old classes: statistics of their time
        model.eval()
        tii = evaluate_seen(ctx, t, model, head, acc, queried=True)
    return acc, tii, count_params(params)


def run_linear_probe(ctx: Context) -> MethodResult:
    """A linear head on the frozen pre-trained features: the LDA of the class statistics (the TII head)."""
    stream = ctx.stream
    acc = cl.AccuracyMatrix(stream.num_tasks)
    tii = math.nan
    for t in range(stream.num_tasks):
        test_idx = task_indices(stream.test.labels, stream.seen_classes(t))
        pred = ctx.tii_class[t][test_idx]
        true_task = record_accuracy(acc, t, pred, stream.test.labels[test_idx], ctx.task_of_class)
        tii = cl.task_id_accuracy(ctx.task_of_class[pred], true_task)
    return acc, tii, ctx.train_feats.shape[1] * stream.num_classes + stream.num_classes


def run_finetune(ctx: Context) -> MethodResult:
    """Sequential fine-tuning of the trainable blocks (those after the cached ones), the final norm and the head."""
    cfg, stream = ctx.cfg, ctx.stream
    model = copy.deepcopy(ctx.backbone)
    freeze(model)
    tuned = [p for blk in model.blocks[ctx.start :] for p in blk.parameters()] + list(model.norm.parameters())
    for p in tuned:
        p.requires_grad_(True)
    head = nn.Linear(model.embed_dim, stream.num_classes)
    params = tuned + list(head.parameters())
    acc = cl.AccuracyMatrix(stream.num_tasks)
    tii = math.nan
    stats = cl.ClassStatistics()
    for t in range(stream.num_tasks):
        classes = stream.splits[t]
        model.train()
        groups = [{"params": tuned, "lr": cfg.finetune_lr}, {"params": list(head.parameters()), "lr": cfg.lr}]
        optimizer = torch.optim.Adam(groups, lr=cfg.lr)
        for epoch, x, y, _ in task_batches(ctx, t, cfg.epochs, task_generator(ctx, t), f"finetune task {t}"):
            f = features(model, x, ctx.start)
            if epoch == cfg.epochs - 1:
                stats.update(f.detach().double(), y)
            optimizer_step(optimizer, masked_ce(head(f), y, classes), params, cfg.clip)
        seen = stream.seen_classes(t)
        set_rows(head, seen, *lda_head(stats, seen, cfg.lda_shrinkage))  # old classes: statistics of their time
        model.eval()
        tii = evaluate_seen(ctx, t, model, head, acc)
    return acc, tii, count_params(params)


def run_method(ctx: Context, name: str) -> dict[str, Any]:
    """Runs one method on the stream and returns its results entry (FA, CA, FM, matrix, TII, time, params)."""
    torch.manual_seed(ctx.cfg.seed)
    start = time.time()
    if name in POOL_GATES:
        acc, tii, trainable = run_pool(ctx, POOL_GATES[name])
    elif name == "smope":
        acc, tii, trainable = run_smope(ctx)
    elif name in QUERY_METHODS:
        acc, tii, trainable = run_query(ctx, name)
    elif name == "linear-probe":
        acc, tii, trainable = run_linear_probe(ctx)
    elif name == "finetune":
        acc, tii, trainable = run_finetune(ctx)
    else:
        raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
    return {
        "FA": acc.final_average(),
        "CA": acc.cumulative_average(),
        "FM": acc.forgetting(),
        "acc_matrix": acc.to_list(),
        "task_id_acc": tii,
        "seconds": time.time() - start,
        "trainable_params": trainable,
    }
