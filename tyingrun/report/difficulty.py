"""Reasoning tasks: test accuracy per difficulty (hops, operands or bits), as a Markdown table and one figure per
(model, dataset) with a line per group, each point the mean over seeds with its 95% t-interval."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

from tyingrun.report.plots import plot_accuracy_by_difficulty
from tyingrun.report.runs import Group
from tyingrun.report.stats import Estimate, estimate
from tyingrun.report.tables import estimate_text

BREAKDOWN = "test_acc_by_difficulty"
# What a difficulty counts, by dataset.
DIFFICULTY_NAMES = {"phop": "hops", "addition": "operands", "parity": "bits"}


def accuracy_by_difficulty(group: Group) -> Dict[int, Estimate]:
    """Per difficulty, the test accuracy over the group's seeds (where every seed reports that difficulty)."""
    values: Dict[int, List[float]] = defaultdict(list)
    breakdowns = [run.summary[BREAKDOWN] for run in group.runs
                  if run.summary is not None and isinstance(run.summary.get(BREAKDOWN), dict)]
    for breakdown in breakdowns:
        for level, accuracy in breakdown.items():
            values[int(level)].append(accuracy)
    return {level: estimate(found) for level, found in sorted(values.items()) if len(found) == len(breakdowns)}


def families(groups: List[Group]) -> Dict[Tuple[str, str], List[Tuple[Group, Dict[int, Estimate]]]]:
    """The groups with a breakdown, by (model, dataset), each with its accuracies."""
    found: Dict[Tuple[str, str], List[Tuple[Group, Dict[int, Estimate]]]] = defaultdict(list)
    for group in groups:
        accuracies = accuracy_by_difficulty(group)
        if accuracies:
            found[group.family].append((group, accuracies))
    return found


def difficulty_section(groups: List[Group]) -> List[str]:
    """Markdown: per (model, dataset), a table of test accuracy (± 95% CI over seeds) by difficulty."""
    lines: List[str] = []
    for (model, dataset), members in families(groups).items():
        levels = sorted({level for _, accuracies in members for level in accuracies})
        name = DIFFICULTY_NAMES.get(dataset, "difficulty")
        lines += [f"## Test accuracy by {name}: {model} on {dataset}", "",
                  "| group | layers | seeds | " + " | ".join(f"{name} {level}" for level in levels) + " |",
                  "|" + "---|" * (3 + len(levels))]
        for group, accuracies in members:
            cells = [estimate_text(accuracies[level], 4) if level in accuracies else "" for level in levels]
            lines.append(f"| {group.name} | {group.settings['model.n_layer']} | {len(group.runs)} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    if lines:
        lines += ["Each cell: mean test accuracy (the whole answer right) at that difficulty over the group's seeds "
                  "± half-width of its 95% t-interval; difficulties above the training one measure extrapolation.",
                  ""]
    return lines


def write_difficulty_figures(groups: List[Group], out_dir: Path) -> List[Path]:
    """One accuracy-against-difficulty figure per (model, dataset) that has a breakdown, a line per group."""
    paths = []
    for (model, dataset), members in families(groups).items():
        path = out_dir / f"accuracy_by_difficulty_{model}_{dataset}.png"
        plot_accuracy_by_difficulty(members, DIFFICULTY_NAMES.get(dataset, "difficulty"), f"{model} on {dataset}",
                                    path)
        paths.append(path)
    return paths
