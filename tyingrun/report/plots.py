"""PNG figures: a run's tying-map history, quality against trainable parameters, memory per group."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from tyingrun.files import MAPS_FILE, read_jsonl  # noqa: E402
from tyingrun.report.runs import Group, Run  # noqa: E402
from tyingrun.report.stats import Estimate  # noqa: E402
from tyingrun.report.tables import human_count  # noqa: E402

FROZEN_COLOUR = "#d9d9d9"
METRIC_LABELS = {
    "test_ppl": "test perplexity (lower is better)", "val_ppl": "validation perplexity (lower is better)",
    "test_acc": "test accuracy (higher is better)", "val_acc": "validation accuracy (higher is better)",
}
# Group names can be long ("dynamic_q policy.reward=neg_loss policy.steps_per_decision=10"): wrap them.
NAME_WIDTH = 36


def _wrap(text: str, width: int = NAME_WIDTH) -> str:
    return textwrap.fill(text, width, break_on_hyphens=False)


def map_rows(run: Run) -> List[Dict]:
    return read_jsonl(run.path / MAPS_FILE)


def _layer_colours(n_layer: int) -> ListedColormap:
    if n_layer <= 20:
        colours = plt.get_cmap("tab10" if n_layer <= 10 else "tab20").colors[:n_layer]
    else:
        colours = plt.get_cmap("turbo")(np.linspace(0, 1, n_layer))
    return ListedColormap(colours).with_extremes(bad=FROZEN_COLOUR)


def plot_map_history(run: Run, title: str, path: Path) -> None:
    """Slot x training step, coloured by the layer whose weights the slot computes with (the paper's Figure 1).

    Independent layers that are still frozen at their initial weights are drawn grey.
    """
    rows = map_rows(run)
    n_layer = len(rows[0]["map"])
    sources = np.array([row["map"] for row in rows], dtype=float).T
    frozen = np.array([[src == slot and not trainable for slot, (src, trainable) in
                        enumerate(zip(row["map"], row["trainable"], strict=True))] for row in rows]).T
    edges = [row["step"] for row in rows] + [max(run.summary["steps"], rows[-1]["step"] + 1)]
    cmap = _layer_colours(n_layer)
    norm = BoundaryNorm(np.arange(-0.5, n_layer), cmap.N)

    fig, ax = plt.subplots(figsize=(9, min(1.2 + 0.35 * n_layer, 9)), constrained_layout=True)
    mesh = ax.pcolormesh(edges, np.arange(-0.5, n_layer), np.ma.masked_where(frozen, sources), cmap=cmap, norm=norm)
    colourbar = fig.colorbar(mesh, ax=ax, label="weights of layer")
    colourbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(n_layer, 24)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("layer slot")
    ax.set_title(_wrap(title, 90))
    if frozen.any():
        fig.legend(handles=[Patch(color=FROZEN_COLOUR, label="independent, still frozen at its initial weights")],
                   loc="outside lower left", frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _group_colours(n: int) -> List:
    return list(plt.get_cmap("tab10" if n <= 10 else "tab20").colors)


def _plot_quality_against(groups: List[Group], metric: str, x_key: str, x_label: str, title: str,
                          path: Path) -> None:
    """One point per run reporting ``metric`` and ``x_key``: quality against that summary key, by group."""
    fig, ax = plt.subplots(figsize=(11, 5.5), constrained_layout=True)
    colours = _group_colours(len(groups))
    markers = "osD^vP*X"
    values = []
    for index, group in enumerate(groups):
        runs = [run for run in group.runs
                if run.summary.get(metric) is not None and run.summary.get(x_key) is not None]
        if not runs:
            continue
        quality = [run.summary[metric] for run in runs]
        values += quality
        label = f"{group.name} ({len(runs)} run{'s' if len(runs) > 1 else ''})"
        ax.scatter([run.summary[x_key] for run in runs], quality, color=colours[index % len(colours)],
                   marker=markers[index % len(markers)], s=45, label=_wrap(label), edgecolors="black",
                   linewidths=0.4)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: human_count(value)))
    if values and metric.endswith("_ppl") and max(values) > 20 * min(values):
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper", title="group")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality_vs_params(groups: List[Group], metric: str, path: Path) -> None:
    _plot_quality_against(groups, metric, "trainable_params", "trainable parameters at the end of training",
                          "Quality against trainable parameters, one point per run", path)


def _group_mean(group: Group, key: str) -> float:
    """Mean of ``key`` over the group's runs that report it; NaN when none does."""
    values = [run.summary[key] for run in group.runs if run.summary.get(key) is not None]
    return float(np.mean(values)) if values else float("nan")


def plot_memory(groups: List[Group], path: Path) -> None:
    """Per group (mean over seeds): train-state bytes, and beside them peak tensor bytes split into state and other.

    Peak tensor bytes are counted the same on every device; a group whose summaries predate them has no bar there.
    """
    names = [_wrap(group.name) for group in groups]
    train_state, peak_state, peak_other = (np.array([_group_mean(group, key) for group in groups])
                                           for key in ("train_state_bytes", "peak_state_bytes", "peak_other_bytes"))
    peak = peak_state + peak_other
    unit, size = ("GiB", 2**30) if np.nanmax(np.append(train_state, peak)) >= 4 * 2**30 else ("MiB", 2**20)
    train_state, peak_state, peak_other, peak = train_state / size, peak_state / size, peak_other / size, peak / size

    positions = np.arange(len(groups))
    lines = sum(name.count("\n") + 1 for name in names)
    fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(13, 2.0 + 0.3 * lines + 0.15 * len(groups)),
                                      constrained_layout=True)
    colours = _group_colours(len(groups))
    bar_colours = [colours[i % len(colours)] for i in positions]
    left.barh(positions, train_state, color=bar_colours)
    left.bar_label(left.containers[0], labels=[f"{v:.3g}" for v in train_state], padding=2, fontsize=8)
    measured = ~np.isnan(peak)
    measured_colours = [colour for colour, has in zip(bar_colours, measured, strict=True) if has]
    right.barh(positions[measured], peak_state[measured], color=measured_colours)
    other_bars = right.barh(positions[measured], peak_other[measured], left=peak_state[measured],
                            color=measured_colours, alpha=0.4, hatch="//")
    right.bar_label(other_bars, labels=[f"{v:.3g}" for v in peak[measured]], padding=2, fontsize=8)
    for position in positions[~measured]:
        right.text(0, position, " not measured (summary predates peak_tensor_bytes)", va="center", fontsize=8)
    left.set_yticks(positions, names)
    left.invert_yaxis()
    left.set_title("train state: parameters + gradients + optimizer state")
    right.set_title("peak tensors in a training step (same count on every device)")
    for axis in (left, right):
        axis.set_xlabel(unit)
        axis.margins(x=0.15)
        axis.grid(axis="x", alpha=0.3)
    split = [Patch(facecolor="grey", label="at the peak: state (weights, gradients, optimizer state)"),
             Patch(facecolor="grey", alpha=0.4, hatch="//", label="at the peak: other (activations, temporaries)")]
    fig.legend(handles=split, loc="outside lower right", frameon=False, fontsize=8)
    fig.suptitle("Memory per group (mean over seeds)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality_vs_flops(groups: List[Group], metric: str, path: Path) -> None:
    """The compute axis beside quality_vs_params: a looped block costs compute but no parameters."""
    _plot_quality_against(groups, metric, "train_flops_per_token",
                          "training FLOPs per token (forward + backward, every slot counted each time it runs)",
                          "Quality against training compute, one point per run", path)


def plot_accuracy_by_difficulty(members: Sequence[Tuple[Group, Dict[int, Estimate]]], difficulty: str, title: str,
                                path: Path) -> None:
    """Test accuracy against difficulty, a line per group: the mean over seeds with its 95% t-interval."""
    fig, ax = plt.subplots(figsize=(10, 5), constrained_layout=True)
    colours = _group_colours(len(members))
    for index, (group, accuracies) in enumerate(members):
        levels = sorted(accuracies)
        means = [accuracies[level].mean for level in levels]
        errors = [accuracies[level].halfwidth or 0.0 for level in levels]
        label = f"{group.name}, {group.settings['model.n_layer']} layers ({len(group.runs)} seeds)"
        ax.errorbar(levels, means, yerr=errors, marker="o", capsize=3, color=colours[index % len(colours)],
                    label=_wrap(label))
    levels = sorted({level for _, accuracies in members for level in accuracies})
    ax.set_xticks(levels)
    ax.set_xlim(levels[0] - 0.5, levels[-1] + 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(difficulty)
    ax.set_ylabel("test accuracy, whole answer right (mean ± 95% CI)")
    ax.set_title(f"Test accuracy by {difficulty}: {title}")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper", title="group")
    fig.savefig(path, dpi=120)
    plt.close(fig)
