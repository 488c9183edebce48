"""``tyingrun-report``: finished run folders -> report.md, report.csv and PNG figures."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from rich.console import Console

from tyingrun.errors import BadInput
from tyingrun.report.plots import plot_map_history, plot_memory, plot_quality_vs_params
from tyingrun.report.runs import Group, Run, find_runs, group_runs
from tyingrun.report.tables import console_table, group_row, markdown_table, write_csv


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def write_figures(groups: List[Group], out_dir: Path) -> List[Path]:
    """The figures of ``groups``: quality against parameters, memory, and one map history per group."""
    if not groups:
        return []
    metric = "val_ppl" if any("val_ppl" in run.summary for g in groups for run in g.runs) else "val_acc"
    figures = [out_dir / "quality_vs_params.png", out_dir / "memory.png"]
    plot_quality_vs_params(groups, metric, figures[0])
    plot_memory(groups, figures[1])
    for index, group in enumerate(groups):
        run = group.runs[0]
        if (run.path / "maps.jsonl").is_file():
            path = out_dir / f"map_{index:02d}_{_slug(group.name)[:60]}.png"
            plot_map_history(run, f"Tying map: {group.name}, seed {run.summary.get('seed')}", path)
            figures.append(path)
    return figures


def markdown_report(rows: List[Dict[str, Any]], unfinished: List[Run], figures: List[Path], out_dir: Path) -> str:
    lines = [
        "# tyingrun report", "",
        f"{sum(row['seeds'] for row in rows)} finished runs in {len(rows)} groups; a group is runs whose "
        "configs differ only in train.seed (and logging). Values are means over seeds (± sample std); "
        "params and layers show the end of training / the mean over steps. 'differs' names what sets a group "
        "apart from the others of its model, dataset and policy.", "",
        markdown_table(rows), "",
    ]
    if any(row["peak_memory_kind"] == "cpu_rss" for row in rows):
        lines += ["Peak memory on CPU is the process's peak resident set since it started: jobs of a sweep that "
                  "share a process (Hydra's basic launcher) carry the peaks of the jobs before them.", ""]
    if unfinished:
        lines += ["## Runs that did not finish", ""]
        lines += [f"- `{run.path}`: {run.problem}" for run in unfinished]
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{path.stem}]({path.relative_to(out_dir)})" for path in figures]
        lines.append("")
    return "\n".join(lines)


def write_report(paths: Sequence[Path], out_dir: Optional[Path] = None, console: Optional[Console] = None) -> Path:
    """Report on every run folder under ``paths`` into ``out_dir`` (default: the first path); print the table."""
    runs = find_runs(paths)
    if not runs:
        raise BadInput(f"no run folders (with .hydra/config.yaml) under {', '.join(map(str, paths))}")
    out_dir = out_dir or paths[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    unfinished = [run for run in runs if not run.finished]
    rows = [group_row(group) for group in groups]
    write_csv(rows, out_dir / "report.csv")
    figures = write_figures(groups, out_dir)
    (out_dir / "report.md").write_text(markdown_report(rows, unfinished, figures, out_dir))

    # Files and pipes get the whole table on long lines rather than rich's default of 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 240)
    console.print(console_table(rows, f"{len(runs) - len(unfinished)} finished runs in {len(groups)} groups"))
    for run in unfinished:
        console.print(f"did not finish: {run.path}: {run.problem}", highlight=False, markup=False)
    console.print(f"report written to {out_dir / 'report.md'} and report.csv, {len(figures)} figures",
                  highlight=False, markup=False)
    return out_dir / "report.md"
