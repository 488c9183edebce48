"""PNG figures of looped arms: quality against the loop count evaluated (a line per arm, a star at the count it
trained at), accuracy by difficulty against loops per arm on reasoning tasks, and test loss against training FLOPs
per token and trainable parameters for every arm, untied and looped."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from tyingrun.report.difficulty import DIFFICULTY_NAMES  # noqa: E402
from tyingrun.report.loops import LoopedArm, LoopFamily, blocks_text, summary_of, unique_blocks  # noqa: E402
from tyingrun.report.plots import _group_colours, _group_mean, _wrap  # noqa: E402
from tyingrun.report.stats import Estimate, estimate  # noqa: E402
from tyingrun.report.tables import human_count  # noqa: E402

METRIC_AXES = {"loss": "test loss (lower is better)", "ppl": "test perplexity (lower is better)",
               "acc": "test accuracy (higher is better)"}
TRAINED = Line2D([], [], marker="*", linestyle="", markersize=14, markerfacecolor="white", markeredgecolor="black",
                 label="the loop count it trained at")


def _line(axis: plt.Axes, found: Dict[int, Estimate], **style) -> None:
    """Means over seeds against loop count, with their 95% t-intervals."""
    loops = sorted(found)
    axis.errorbar(loops, [found[r].mean for r in loops], yerr=[found[r].halfwidth or 0.0 for r in loops],
                  marker="o", capsize=3, **style)


def _loop_axis(axis: plt.Axes, loops: List[int]) -> None:
    axis.set_xscale("log", base=2)
    axis.set_xticks(loops, [str(r) for r in loops])
    axis.minorticks_off()
    axis.set_xlabel("loops evaluated (same weights)")
    axis.grid(alpha=0.3)


def plot_quality_vs_loops(family: LoopFamily, path: Path) -> None:
    """Test loss (and accuracy or perplexity where scored) against loops evaluated, a line per looped arm; the
    untied arms' test losses as dotted levels."""
    arms = [arm for arm in family.looped if arm.scored_at_several_loop_counts]
    metrics = [metric for metric in METRIC_AXES if any(arm.quality_by_loops(metric) for arm in arms)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics) + 3, 5), constrained_layout=True,
                             squeeze=False)
    colours = _group_colours(len(family.looped))
    for position, (axis, metric) in enumerate(zip(axes[0], metrics, strict=True)):
        evaluated = set()
        for index, arm in enumerate(family.looped):
            found = arm.quality_by_loops(metric)
            if not found or not arm.scored_at_several_loop_counts:
                continue
            evaluated |= set(found)
            colour = colours[index % len(colours)]
            label = f"{arm.group.name}, {arm.shape.layout} ({len(arm.group.runs)} seeds)" if position == 0 else None
            _line(axis, found, color=colour, label=_wrap(label) if label else None)
            if arm.shape.loops in found:
                axis.scatter([arm.shape.loops], [found[arm.shape.loops].mean], marker="*", s=220, color=colour,
                             edgecolors="black", zorder=3)
        if metric == "loss":
            for group in family.untied:
                losses = list(group.values_by_seed("test_loss").values())
                if losses:
                    axis.axhline(np.mean(losses), color="grey", linestyle=":", linewidth=1)
                    axis.annotate(f"untied, {blocks_text(unique_blocks(group))}", (1, np.mean(losses)),
                                  xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7,
                                  color="grey")
        _loop_axis(axis, sorted(evaluated))
        axis.set_ylabel(METRIC_AXES[metric] + ", mean ± 95% CI")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles + [TRAINED], labels + [TRAINED.get_label()], fontsize=8, loc="outside right upper",
               title="looped arm")
    fig.suptitle(f"Quality against loops evaluated: {family.title}")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_difficulty_vs_loops(arm: LoopedArm, by_loops: Dict[int, Dict[int, Estimate]], path: Path) -> None:
    """Test accuracy against loops evaluated, a line per difficulty: whether more loops help on harder instances."""
    name = DIFFICULTY_NAMES.get(arm.group.settings["dataset.name"], "difficulty")
    levels = sorted({level for found in by_loops.values() for level in found})
    fig, axis = plt.subplots(figsize=(9, 5), constrained_layout=True)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(levels)))
    for colour, level in zip(colours, levels, strict=True):
        _line(axis, {loops: found[level] for loops, found in by_loops.items() if level in found}, color=colour,
              label=f"{name} {level}")
    axis.axvline(arm.shape.loops, color="black", linestyle="--", linewidth=1, label="trained loops")
    _loop_axis(axis, sorted(by_loops))
    axis.set_ylim(0, 1.02)
    axis.set_ylabel("test accuracy, whole answer right (mean ± 95% CI)")
    axis.set_title(_wrap(f"Test accuracy by {name} and loops: {arm.group.name}, {arm.shape.layout}", 90))
    fig.legend(fontsize=8, loc="outside right upper")
    fig.savefig(path, dpi=120)
    plt.close(fig)


COSTS = {"train_flops_per_token": "training FLOPs per token (forward + backward)",
         "trainable_params": "trainable parameters"}


def cost_axes(family: LoopFamily) -> List[str]:
    """The cost keys (COSTS) that some run of the family reports."""
    groups = family.untied + [arm.group for arm in family.looped]
    return [key for key in COSTS if any(summary_of(run).get(key) for group in groups for run in group.runs)]


def plot_loss_vs_cost(family: LoopFamily, path: Path) -> None:
    """Test loss (mean ± 95% CI over seeds) against training FLOPs per token and against trainable parameters: the
    untied arms joined by depth, each looped arm its own marker."""
    costs = cost_axes(family)
    fig, axes = plt.subplots(1, len(costs), figsize=(5.5 * len(costs) + 3, 5), constrained_layout=True,
                             squeeze=False)
    colours = _group_colours(len(family.looped))
    for position, (axis, key) in enumerate(zip(axes[0], costs, strict=True)):
        untied = [(group, estimate(list(group.values_by_seed("test_loss").values()))) for group in family.untied
                  if group.values_by_seed("test_loss")]
        if untied:
            xs = [_group_mean(group, key) for group, _ in untied]
            axis.errorbar(xs, [found.mean for _, found in untied],
                          yerr=[found.halfwidth or 0.0 for _, found in untied], marker="s", color="black", capsize=3,
                          label="untied (policy=none)" if position == 0 else None)
            for x, (group, found) in zip(xs, untied, strict=True):
                axis.annotate(f" {unique_blocks(group):g}", (x, found.mean), fontsize=8)
        for index, arm in enumerate(family.looped):
            losses = list(arm.group.values_by_seed("test_loss").values())
            if losses:
                found = estimate(losses)
                axis.errorbar([_group_mean(arm.group, key)], [found.mean], yerr=[found.halfwidth or 0.0], marker="o",
                              markersize=8, linestyle="", capsize=3, color=colours[index % len(colours)],
                              label=_wrap(f"{arm.group.name}, {arm.shape.layout}") if position == 0 else None)
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: human_count(value)))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel(COSTS[key])
        axis.set_ylabel("test loss (mean ± 95% CI)")
        axis.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper", title="arm (untied: labelled by unique blocks)")
    fig.suptitle(f"Test loss against compute and parameters: {family.title}")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_loop_figures(families: List[LoopFamily], out_dir: Path) -> List[Path]:
    """Per family: quality against loops, loss against cost; per reasoning arm: accuracy by difficulty and loops."""
    paths: List[Path] = []
    for number, family in enumerate(families):
        model, dataset = family.looped[0].group.family
        stem = f"{model}_{dataset}" + (f"_{number}" if len(families) > 1 else "")
        if any(arm.scored_at_several_loop_counts for arm in family.looped):
            paths.append(out_dir / f"quality_vs_loops_{stem}.png")
            plot_quality_vs_loops(family, paths[-1])
        if cost_axes(family):
            paths.append(out_dir / f"loss_vs_cost_{stem}.png")
            plot_loss_vs_cost(family, paths[-1])
        for index, arm in enumerate(family.looped):
            by_loops = arm.accuracy_by_difficulty_by_loops()
            if len(by_loops) > 1:
                paths.append(out_dir / f"accuracy_by_difficulty_by_loops_{stem}_arm{index:02d}.png")
                plot_difficulty_vs_loops(arm, by_loops, paths[-1])
    return paths
