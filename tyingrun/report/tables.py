"""One row per group of seeds: CSV with the raw means, Markdown and a rich console table for people."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from rich.table import Table
from rich.text import Text

from tyingrun.report.runs import Group, Run

# Quality metrics: mean and standard deviation over seeds.
QUALITY = ("val_ppl", "val_acc")
# Summary keys averaged over seeds; a CSV column holds the mean of the summary key of the same name.
AVERAGED = (
    "trainable_params", "trainable_params_mean", "independent_layers", "independent_layers_mean",
    "trainable_layers", "trainable_layers_mean", "train_state_bytes", "peak_memory_bytes", "wall_time_s",
    "tokens_per_s", "samples_per_s",
)


def _values(runs: Sequence[Run], key: str) -> List[float]:
    return [run.summary[key] for run in runs if run.summary.get(key) is not None]


def group_row(group: Group) -> Dict[str, Any]:
    """The group's identity and, for every summary key it reports, the mean over its seeds."""
    settings, runs = group.settings, group.runs
    row: Dict[str, Any] = {
        "model": settings["model.name"], "dataset": settings["dataset.name"], "policy": settings["policy.name"],
        "label": group.label, "n_layer": settings["model.n_layer"], "seeds": len(runs),
    }
    for key in QUALITY:
        values = _values(runs, key)
        if values:
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    for key in AVERAGED:
        values = _values(runs, key)
        if values:
            row[key] = statistics.fmean(values)
    row["peak_memory_kind"] = runs[0].summary.get("peak_memory_kind", "")
    row["runs"] = ";".join(str(run.path) for run in runs)
    return row


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    columns: Dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def human_count(value: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def _bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.2f} h"
    return f"{value / 60:.1f} min" if value >= 60 else f"{value:.1f} s"


def _mean_std(row: Dict[str, Any], key: str, digits: int) -> str:
    if row["seeds"] < 2:
        return f"{row[key]:.{digits}f}"
    return f"{row[key]:.{digits}f} ± {row[f'{key}_std']:.{digits}f}"


def _pair(row: Dict[str, Any], key: str, fmt: Callable[[float], str]) -> str:
    return f"{fmt(row[key])} / {fmt(row[f'{key}_mean'])}"


MEMORY_KINDS = {"cpu_rss": "RSS", "cuda_max_allocated": "CUDA"}

# (header, summary key the column needs, how to show it), in table order.
DISPLAY: Tuple[Tuple[str, Optional[str], Callable[[Dict[str, Any]], str]], ...] = (
    ("model", None, lambda r: r["model"]),
    ("dataset", None, lambda r: r["dataset"]),
    ("policy", None, lambda r: r["policy"]),
    ("differs", None, lambda r: r["label"]),
    ("layers", None, lambda r: str(r["n_layer"])),
    ("seeds", None, lambda r: str(r["seeds"])),
    ("val PPL", "val_ppl", lambda r: _mean_std(r, "val_ppl", 2)),
    ("val acc", "val_acc", lambda r: _mean_std(r, "val_acc", 4)),
    ("trainable params (end/mean)", "trainable_params", lambda r: _pair(r, "trainable_params", human_count)),
    ("indep. layers (end/mean)", "independent_layers", lambda r: _pair(r, "independent_layers", "{:.3g}".format)),
    ("trainable layers (end/mean)", "trainable_layers", lambda r: _pair(r, "trainable_layers", "{:.3g}".format)),
    ("train state", "train_state_bytes", lambda r: _bytes(r["train_state_bytes"])),
    ("peak memory", "peak_memory_bytes",
     lambda r: f"{_bytes(r['peak_memory_bytes'])} {MEMORY_KINDS.get(r['peak_memory_kind'], '')}".rstrip()),
    ("wall time", "wall_time_s", lambda r: _seconds(r["wall_time_s"])),
    ("tokens/s", "tokens_per_s", lambda r: f"{r['tokens_per_s']:,.0f}"),
    ("samples/s", "samples_per_s", lambda r: f"{r['samples_per_s']:,.0f}"),
)


def display_cells(rows: List[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    """Headers and formatted cells, leaving out columns that no row reports (a cell is blank where a row lacks it)."""
    shown = [(header, needs, show) for header, needs, show in DISPLAY if needs is None or any(needs in r for r in rows)]
    cells = [[show(row) if needs is None or needs in row else "" for _, needs, show in shown] for row in rows]
    return [header for header, _, _ in shown], cells


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    headers, cells = display_cells(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells]
    return "\n".join(lines)


def console_table(rows: List[Dict[str, Any]], title: str) -> Table:
    headers, cells = display_cells(rows)
    table = Table(title=title)
    for header in headers:
        # Only the free-text column wraps; numbers stay on one line.
        table.add_column(header, overflow="fold", no_wrap=header != "differs", ratio=3 if header == "differs" else None)
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))
    return table
