"""PNG figures: a run's tying-map history, quality against trainable parameters, memory per group."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from tyingrun.report.runs import Group, Run  # noqa: E402
from tyingrun.report.tables import human_count  # noqa: E402

FROZEN_COLOUR = "#d9d9d9"
MEMORY_KINDS = {"cpu_rss": "process peak RSS", "cuda_max_allocated": "CUDA peak allocated"}
# Group names can be long ("dynamic_q policy.reward=neg_loss policy.steps_per_decision=10"): wrap them.
NAME_WIDTH = 36


def _wrap(text: str, width: int = NAME_WIDTH) -> str:
    return textwrap.fill(text, width, break_on_hyphens=False)


def map_rows(run: Run) -> List[Dict]:
    return [json.loads(line) for line in (run.path / "maps.jsonl").read_text().splitlines()]


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


def plot_quality_vs_params(groups: List[Group], metric: str, path: Path) -> None:
    """One point per run: validation quality against the parameters it trains at the end, coloured by group."""
    fig, ax = plt.subplots(figsize=(11, 5.5), constrained_layout=True)
    colours = _group_colours(len(groups))
    markers = "osD^vP*X"
    for index, group in enumerate(groups):
        params = [run.summary["trainable_params"] for run in group.runs]
        quality = [run.summary[metric] for run in group.runs]
        runs = f"{len(group.runs)} run{'s' if len(group.runs) > 1 else ''}"
        ax.scatter(params, quality, color=colours[index % len(colours)], marker=markers[index % len(markers)],
                   s=45, label=_wrap(f"{group.name} ({runs})"), edgecolors="black", linewidths=0.4)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: human_count(value)))
    values = [run.summary[metric] for group in groups for run in group.runs]
    if metric == "val_ppl" and max(values) > 20 * min(values):
        ax.set_yscale("log")
    ax.set_xlabel("trainable parameters at the end of training")
    ax.set_ylabel("validation perplexity (lower is better)" if metric == "val_ppl" else "validation accuracy")
    ax.set_title("Quality against trainable parameters, one point per run")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper", title="group")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(groups: List[Group], path: Path) -> None:
    """Train-state bytes (params + grads + optimizer state) and peak memory, mean over each group's seeds."""
    names = [_wrap(group.name) for group in groups]
    state = [np.mean([run.summary["train_state_bytes"] for run in group.runs]) for group in groups]
    peak = [np.mean([run.summary["peak_memory_bytes"] for run in group.runs]) for group in groups]
    unit, size = ("GiB", 2**30) if max(peak + state) >= 4 * 2**30 else ("MiB", 2**20)
    state, peak = [v / size for v in state], [v / size for v in peak]
    kinds = {run.summary.get("peak_memory_kind") for group in groups for run in group.runs}
    peak_label = " / ".join(sorted(MEMORY_KINDS.get(kind, str(kind)) for kind in kinds))

    positions = np.arange(len(groups))
    lines = sum(name.count("\n") + 1 for name in names)
    fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(13, 1.6 + 0.3 * lines + 0.15 * len(groups)),
                                      constrained_layout=True)
    colours = _group_colours(len(groups))
    bar_colours = [colours[i % len(colours)] for i in positions]
    left.barh(positions, state, color=bar_colours)
    right.barh(positions, peak, color=bar_colours)
    left.set_yticks(positions, names)
    left.invert_yaxis()
    left.set_xlabel(unit)
    right.set_xlabel(unit)
    left.set_title("train state: parameters + gradients + optimizer state")
    right.set_title(f"peak memory ({peak_label})")
    for axis, values in ((left, state), (right, peak)):
        axis.bar_label(axis.containers[0], labels=[f"{v:.3g}" for v in values], padding=2, fontsize=8)
        axis.margins(x=0.15)
        axis.grid(axis="x", alpha=0.3)
    fig.suptitle("Memory per group (mean over seeds)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
