"""``tyingrun-report``: finished run folders -> report.md, report.csv (loops.csv, quality_by_loops.csv where there are
looped arms) and PNG figures."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from rich.console import Console

from tyingrun.errors import BadInput
from tyingrun.files import CONFIG_FILE, MAPS_FILE
from tyingrun.report.difficulty import difficulty_section, write_difficulty_figures
from tyingrun.report.loop_plots import write_loop_figures
from tyingrun.report.loop_report import console_phi_tables, loops_section, write_loop_csvs
from tyingrun.report.loops import LoopFamily, loop_families
from tyingrun.report.plots import plot_map_history, plot_memory, plot_quality_vs_flops, plot_quality_vs_params
from tyingrun.report.rewards import SEPARATION_T
from tyingrun.report.runs import (
    QUALITY_KINDS,
    Group,
    Run,
    check_budgets,
    find_runs,
    group_runs,
    headline_metric,
    quality_kind,
    read_arms,
    reference_groups,
)
from tyingrun.report.sharing import write_sharing
from tyingrun.report.tables import (
    CLIPPED_LIMIT,
    EPSILON_LIMIT,
    console_tables,
    group_row,
    markdown_table,
    write_csv,
)

FILE_WIDTH_LIMIT = 1000
TABLE_LEGEND = ("±: half-width of the 95% t-interval over seeds; Δ: group − reference per shared seed, "
                "± its 95% t-interval; (ns): that interval contains 0; (val): on val, the runs have no test split")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def figure_metric(groups: List[Group]) -> Optional[str]:
    """What the quality figure plots: the test metric where every run of that kind has it, else val."""
    runs = [run for group in groups for run in group.runs]
    kind = quality_kind(runs)
    if kind is None:
        return None
    return headline_metric([run for run in runs if quality_kind([run]) == kind], kind)


def write_figures(groups: List[Group], out_dir: Path, families: Sequence[LoopFamily] = ()) -> List[Path]:
    """The figures of ``groups``: quality against parameters, memory, and one map history per group; those of the
    looped arms' ``families``."""
    if not groups:
        return []
    figures = []
    metric = figure_metric(groups)
    if metric is not None:
        figures.append(out_dir / "quality_vs_params.png")
        plot_quality_vs_params(groups, metric, figures[-1])
        if any(run.summary.get("train_flops_per_token") for group in groups for run in group.runs):
            figures.append(out_dir / "quality_vs_flops.png")
            plot_quality_vs_flops(groups, metric, figures[-1])
    figures += write_difficulty_figures(groups, out_dir)
    figures += write_loop_figures(list(families), out_dir)
    figures.append(out_dir / "memory.png")
    plot_memory(groups, figures[-1])
    for index, group in enumerate(groups):
        run = group.runs[0]
        if (run.path / MAPS_FILE).is_file():
            path = out_dir / f"map_{index:02d}_{_slug(group.name)[:60]}.png"
            plot_map_history(run, f"Tying map: {group.name}, seed {run.summary.get('seed')}", path)
            figures.append(path)
    return figures


def _family(family: Tuple[str, str]) -> str:
    return "/".join(family)


def quality_notes(rows: List[Dict[str, Any]], metric: Optional[str]) -> List[str]:
    """What the quality columns are, and where they fall back to val because summaries have no test split."""
    notes = ["test and val are the final evaluations over the whole test and validation splits, each shown as "
             "mean ± half-width of the 95% t-interval over seeds (mean ± t(0.975, n−1)·s/√n, n = seeds); "
             "one seed has no interval."]
    without_test = [row for row in rows if any(f"val_{kind}" in row and f"test_{kind}_mean" not in row
                                               for kind in QUALITY_KINDS)]
    if without_test:
        figure = f"; the figure plots {metric} for every run" if metric else ""
        notes.append(f"{len(without_test)} of {len(rows)} groups have summaries without test_* (written before "
                     "runs evaluated the test split): their test cell is blank and a Δ involving them is on val "
                     f"(marked val){figure}.")
    return notes


def paired_notes(groups: List[Group], references: Dict[Tuple[str, str], Group], reference: str) -> List[str]:
    """Which group each (model, dataset) is compared with, how, and where there is none."""
    chosen = ", ".join(f"{_family(family)}: `{group.name}`" for family, group in references.items())
    notes = []
    if references:
        notes.append(
            f"Δ vs {reference}: per (model, dataset) the reference is its {reference} group (the one without a "
            f"'differs' label where there are several, then the one with the most layers): {chosen}. Each other "
            "group's runs are paired with the reference's by seed; Δ = group − reference on each shared seed, shown "
            "as mean ± half-width of the 95% t-interval over the pairs ('pairs' = n). (ns): the interval contains "
            "0: at this many seeds the difference is not distinguishable from zero. A negative Δ PPL or a positive "
            "Δ acc favours the group.")
    missing = sorted({group.family for group in groups} - references.keys())
    if missing:
        notes.append(f"No {reference} group for {', '.join(map(_family, missing))}: no Δ there.")
    return notes


def diagnostics_notes(rows: List[Dict[str, Any]]) -> List[str]:
    return decision_notes(rows) + separation_notes(rows)


def decision_notes(rows: List[Dict[str, Any]]) -> List[str]:
    if not any("decisions" in row for row in rows):
        return []
    return ["decisions, final ε, clipped rewards: means over seeds of what the learned policies report: decisions "
            "taken, epsilon at the end (its lowest value), the share of rewards at the reward's floor. ⚠ marks a "
            f"value at which the agent could not have learned (more than {CLIPPED_LIMIT:.0%} of the rewards clipped, "
            f"or epsilon never below {EPSILON_LIMIT}): such a group's quality says nothing about what the agent "
            "would have found."]


def separation_notes(rows: List[Dict[str, Any]]) -> List[str]:
    if not any(row.get("separable_layers") is not None for row in rows):
        return []
    return [f"best action separable (docs/method.md#reward-separation): per run, from its maps.jsonl, the share of "
            "the layers 1..L-1 whose best action (highest mean reward, each reward taken relative to its episode's "
            f"mean) is at least {SEPARATION_T:g} standard errors (Welch's t) above every other action taken at least "
            "twice; the mean over seeds, and the lowest seed. On a policy that picks uniformly (random, given the "
            "learners' reward) it measures whether the reward can tell the actions apart at all; on a learner it "
            "reads low, because a learner that exploits rarely tries the other actions."]


def arms_section(paths: Sequence[Path], groups: List[Group]) -> List[str]:
    """For each reported ablation study: every arm, the command that ran it and its note."""
    lines = []
    for root in paths:
        arms = read_arms(root)
        if arms is not None:
            lines += [f"## Ablation arms in `{root}`", ""]
            lines += [arm_line(root, arm, groups) for arm in arms]
            lines.append("")
    return lines


def arm_line(root: Path, arm: Dict[str, Any], groups: List[Group]) -> str:
    folder = (root / arm["folder"]).resolve()
    names = [group.name for group in groups if any(run.path.is_relative_to(folder) for run in group.runs)]
    line = f"- `{arm['folder']}` **{arm['arm']}**: `{shlex.join(['tyingrun', '-m', *arm['overrides']])}`"
    if arm.get("note"):
        line += f": {arm['note']}"
    return line + (f" (table: {'; '.join(names)})" if names else "")


def markdown_report(rows: List[Dict[str, Any]], notes: List[str], arms: List[str], unfinished: List[Run],
                    figures: List[Path], out_dir: Path, reference: str) -> str:
    lines = [
        "# tyingrun report", "",
        f"{sum(row['seeds'] for row in rows)} finished runs in {len(rows)} groups; a group is runs whose "
        "configs differ only in train.seed (and logging). Params and layers show the end of training / the mean "
        "over steps, means over seeds. 'differs' names what sets a group apart from the others of its model, "
        "dataset and policy.", "",
        markdown_table(rows, reference), "",
    ]
    warnings = [row["learning_warning"] for row in rows if row["learning_warning"]]
    lines += [f"- **{warning}**" for warning in warnings] + ([""] if warnings else [])
    lines += [f"- {note}" for note in notes] + [""]
    if any(row["peak_memory_kind"] == "cpu_rss" for row in rows):
        lines += ["Peak memory on CPU is the process's peak resident set since it started: jobs of a sweep that "
                  "share a process (Hydra's basic launcher) carry the peaks of the jobs before them.", ""]
    lines += arms
    if unfinished:
        lines += ["## Runs that did not finish", ""]
        lines += [f"- `{run.path}`: {run.problem}" for run in unfinished]
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{path.stem}]({path.relative_to(out_dir)})" for path in figures]
        lines.append("")
    return "\n".join(lines)


def write_report(paths: Sequence[Path], out_dir: Optional[Path] = None, console: Optional[Console] = None,
                 reference: str = "none", pair_other_budgets: bool = False) -> Path:
    """Report on every run folder under ``paths`` into ``out_dir`` (default: the first path); print the table.

    Each group is compared with the ``reference`` policy's group of its model and dataset, seed by seed; a group of
    another budget (runs.BUDGET_KEYS) than its reference is refused unless ``pair_other_budgets``.
    """
    runs = find_runs(paths)
    if not runs:
        raise BadInput(f"no run folders (with {CONFIG_FILE}) under {', '.join(map(str, paths))}")
    out_dir = out_dir or paths[0]
    groups = group_runs(runs)
    unfinished = [run for run in runs if not run.finished]
    references = reference_groups(groups, reference)
    check_budgets(groups, references, pair_other_budgets)
    arms = arms_section(paths, groups)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [group_row(group, references.get(group.family)) for group in groups]
    write_csv(rows, out_dir / "report.csv")
    families = loop_families(groups)
    loop_csvs = write_loop_csvs(families, out_dir)
    figures = write_figures(groups, out_dir, families)
    notes = [*quality_notes(rows, figure_metric(groups)), *paired_notes(groups, references, reference),
             *diagnostics_notes(rows)]
    sections = [*difficulty_section(groups), *loops_section(families), *arms]
    report = markdown_report(rows, notes, sections, unfinished, figures, out_dir, reference)
    report += "\n".join(["", *write_sharing(groups)])
    (out_dir / "report.md").write_text(report)

    title = f"{len(runs) - len(unfinished)} finished runs in {len(groups)} groups"
    tables = console_tables(rows, reference, title, TABLE_LEGEND) + console_phi_tables(families)
    # Files and pipes get each table whole, on lines as long as it needs (rich squeezes a table wider than the
    # console, its free-text column first, down to nothing).
    console = console or Console(width=None if sys.stdout.isatty() else max(
        Console(width=FILE_WIDTH_LIMIT).measure(table).maximum for table in tables))
    for table in tables:
        console.print(table)
    for line in [row["learning_warning"] for row in rows if row["learning_warning"]]:
        console.print(line, highlight=False, markup=False)
    for run in unfinished:
        console.print(f"did not finish: {run.path}: {run.problem}", highlight=False, markup=False)
    files = ", ".join(["report.csv", *(path.name for path in loop_csvs)])
    console.print(f"report written to {out_dir / 'report.md'} and {files}, {len(figures)} figures",
                  highlight=False, markup=False)
    return out_dir / "report.md"
