"""The main job's outputs: a table on stdout, `results.json` and a plot of the accuracy after each task."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .streams import Stream


def format_table(results: Mapping[str, Mapping[str, Any]], num_classes: int, num_tasks: int) -> str:
    """One line per method: FA, CA, FM, task-id accuracy, trainable parameters and seconds."""
    lines = [
        f"{num_tasks} tasks, {num_classes} classes (chance {100.0 / num_classes:.1f}% over all classes)",
        f"{'method':<14} {'FA':>6} {'CA':>6} {'FM':>6} {'task-id':>8} {'params':>9} {'seconds':>8}",
    ]
    for name, r in results.items():
        lines.append(
            f"{name:<14} {r['FA']:6.2f} {r['CA']:6.2f} {r['FM']:6.2f} {r['task_id_acc']:8.2f} "
            f"{r['trainable_params']:9d} {r['seconds']:8.1f}"
        )
    return "\n".join(lines)


def write_results(
    path: Path,
    results: Mapping[str, Mapping[str, Any]],
    stream: Stream,
    cfg: Config,
    data: Mapping[str, int],
    total_seconds: float,
) -> None:
    """Writes `{"num_classes", "methods": {name: results}, "config"}` as JSON; `config` holds the budget, the
    stream's options (`data`), the dataset, the task splits and the total time."""
    payload = {
        "num_classes": stream.num_classes,
        "methods": dict(results),
        "config": {
            **dataclasses.asdict(cfg),
            **data,
            "dataset": stream.name,
            "num_tasks": stream.num_tasks,
            "splits": stream.splits,
            "total_seconds": total_seconds,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))


def plot_results(results: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """Average accuracy over the tasks seen so far, after each task, one line per method (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    num_tasks = 1
    for name, r in results.items():
        acc = r["acc_matrix"]
        curve = [float(np.mean(acc[t][: t + 1])) for t in range(len(acc))]
        num_tasks = len(curve)
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=f"{name} (FA {r['FA']:.1f})")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy on seen tasks (%)")
    ax.set_title(title)
    ax.set_xticks(range(1, num_tasks + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
