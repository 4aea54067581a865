"""PNG plots of pruning results (matplotlib, headless): per-layer sparsity and accuracy against sparsity."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_layer_sparsity(
    layer_reports: Mapping[float, Mapping[str, Mapping[str, Any]]],
    path: str | os.PathLike,
    title: str = "Per-layer sparsity",
    max_labels: int = 60,
) -> str:
    """One line per target sparsity: the measured sparsity of every pruned layer, in model order.

    `layer_reports` maps a target sparsity to the `"layers"` entry of `hf_tgprune.sparsity_report`
    (`{layer name: {"numel", "zeros", "sparsity"}}`). Layer names label the x axis when there are at most
    `max_labels` layers; a second panel shows each layer's size, to explain why big layers are pruned more.
    """
    plt = _pyplot()
    if not layer_reports:
        raise ValueError("No layer reports to plot.")
    names = list(next(iter(layer_reports.values())))
    x = range(len(names))
    fig, (ax, ax_size) = plt.subplots(
        2, 1, figsize=(max(8, 0.28 * len(names)), 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for target in sorted(layer_reports):
        layers = layer_reports[target]
        values = [100 * layers[name]["sparsity"] for name in names]
        ax.plot(x, values, marker="o", markersize=3, label=f"target {100 * target:.4g}%")
        ax.axhline(100 * target, linestyle=":", linewidth=0.8, color=ax.lines[-1].get_color())
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    sizes = [next(iter(layer_reports.values()))[name]["numel"] for name in names]
    ax_size.bar(x, sizes, color="gray")
    ax_size.set_yscale("log")
    ax_size.set_ylabel("weights")
    if len(names) <= max_labels:
        ax_size.set_xticks(list(x))
        ax_size.set_xticklabels(names, rotation=90, fontsize=6)
    else:
        ax_size.set_xlabel(f"layer index ({len(names)} layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_accuracy_vs_sparsity(
    runs: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    metric: str = "accuracy",
    dense: float | None = None,
    teacher: float | None = None,
    title: str = "Top-1 accuracy vs sparsity",
) -> str:
    """Accuracy after pruning and after retraining for each run, with the dense student and teacher as lines.

    Each run is `{"sparsity": s, "after_pruning": {metric: ...}, "after_retraining": {metric: ...}}`
    (the `runs` list of the recipe's results.json); accuracies are fractions and are plotted in percent.
    """
    plt = _pyplot()
    runs = sorted(runs, key=lambda run: run["sparsity"])
    x = [100 * run["sparsity"] for run in runs]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for stage, style in (("after_pruning", "s--"), ("after_retraining", "o-")):
        points = [(xi, (run.get(stage) or {}).get(metric)) for xi, run in zip(x, runs)]
        points = [(xi, 100 * y) for xi, y in points if y is not None]
        if points:
            ax.plot(*zip(*points), style, label=stage.replace("_", " "))
    if dense is not None:
        ax.axhline(100 * dense, color="black", linestyle=":", label="dense student")
    if teacher is not None:
        ax.axhline(100 * teacher, color="tab:red", linestyle="-.", label="teacher")
    ax.set_xlabel("sparsity of the prunable weights (%)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
