"""One row per group of seeds: CSV with the raw numbers, Markdown and a rich console table for people."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from rich.table import Table
from rich.text import Text

from tyingrun.report.runs import (
    QUALITY_KINDS,
    Group,
    Run,
    headline_metric,
    quality_kind,
    reference_differences,
    show_value,
)
from tyingrun.report.stats import Estimate, estimate, paired_differences

SPLITS = ("test", "val")
# Summary keys averaged over seeds; a CSV column holds the mean of the summary key of the same name.
AVERAGED = (
    "trainable_params", "trainable_params_mean", "independent_layers", "independent_layers_mean",
    "trainable_layers", "trainable_layers_mean", "train_state_bytes", "peak_tensor_bytes", "peak_state_bytes",
    "peak_other_bytes", "peak_memory_bytes", "stored_params", "train_flops_per_token", "wall_time_s",
    "tokens_per_s", "samples_per_s", "val_tokens", "test_tokens", "val_samples", "test_samples",
    "decisions", "final_epsilon", "clipped_reward_fraction",
    # Evidence that a learned policy learned (docs/method.md#learning-diagnostics).
    "q_spread_min", "q_spread_mean", "greedy_fraction_last20", "greedy_map_stability",
    # Whether the rewards told the actions apart (docs/method.md#reward-separation; from maps.jsonl).
    "separable_layers",
)
# Learning diagnostics that must hold on every seed: the CSV also holds their lowest value over seeds (<key>_lowest).
LOWEST_OVER_SEEDS = ("q_spread_min", "greedy_map_stability", "separable_layers")
PAIRED = ("paired_reference", "paired_metric", "paired_n", "paired_diff_mean", "paired_diff_ci_low",
          "paired_diff_ci_high", "paired_diff_contains_zero")
# A learned policy whose rewards mostly sat at the floor, or that mostly acted at random, could not have learned.
CLIPPED_LIMIT = 0.5
EPSILON_LIMIT = 0.5
# A learned policy whose greedy action changed over the last episodes in more than half the layers showed no sign
# of having settled on a map.
STABILITY_LIMIT = 0.5


def _values(runs: Sequence[Run], key: str) -> List[float]:
    return [run.summary[key] for run in runs if run.summary.get(key) is not None]


def estimate_columns(key: str, found: Estimate) -> Dict[str, Any]:
    return {
        f"{key}_mean": found.mean,
        # One seed has no sample std; report.csv has always written 0 there (the interval stays blank).
        f"{key}_std": 0.0 if found.std is None else found.std,
        f"{key}_ci_low": found.low,
        f"{key}_ci_high": found.high,
    }


def quality_columns(runs: Sequence[Run]) -> Dict[str, Any]:
    """Test and val perplexity or accuracy where every run reports it: mean, sample std, 95% t-interval over seeds."""
    columns: Dict[str, Any] = {}
    for kind in QUALITY_KINDS:
        for split in SPLITS:
            key = f"{split}_{kind}"
            values = _values(runs, key)
            # Each interval is over all the group's seeds, so 'seeds' is its n: a split some runs lack is left out.
            if len(values) < len(runs):
                continue
            found = estimate(values)
            if split == "val":
                # The mean under the summary key's own name: the column report.csv had before the intervals.
                columns[key] = found.mean
            columns.update(estimate_columns(key, found))
    return columns


def conversion_columns(runs: Sequence[Run]) -> Dict[str, Any]:
    """policy=recursive: test perplexity of the source and of the converted model before training, with intervals
    (where every run of the group has them)."""
    columns: Dict[str, Any] = {}
    for stage in ("source", "converted"):
        losses = _values(runs, f"{stage}_test_loss")
        if losses and len(losses) == len(runs):
            columns.update(estimate_columns(f"{stage}_test_ppl", estimate([math.exp(loss) for loss in losses])))
    return columns


def paired_metric(group: Group, reference: Group) -> Optional[str]:
    """The metric both groups report: test where every run of both has it, else val; None if they differ in kind."""
    kind = quality_kind(group.runs)
    if kind is None or kind != quality_kind(reference.runs):
        return None
    test = f"test_{kind}"
    both_test = headline_metric(group.runs, kind) == test and headline_metric(reference.runs, kind) == test
    return test if both_test else f"val_{kind}"


def paired_columns(group: Group, reference: Optional[Group]) -> Dict[str, Any]:
    """Group minus reference on the seeds both ran: mean difference and its 95% t-interval; blank without one."""
    columns: Dict[str, Any] = {**dict.fromkeys(PAIRED), "is_reference": group is reference}
    if reference is None:
        return columns
    columns["paired_reference"] = reference.name
    metric = paired_metric(group, reference)
    if group is reference or metric is None:
        return columns
    differences = paired_differences(group.values_by_seed(metric), reference.values_by_seed(metric))
    columns.update(paired_metric=metric, paired_n=len(differences))
    if differences:
        found = estimate(differences)
        columns.update(paired_diff_mean=found.mean, paired_diff_ci_low=found.low, paired_diff_ci_high=found.high,
                       paired_diff_contains_zero=found.contains_zero)
    return columns


def learning_problems(row: Dict[str, Any]) -> List[str]:
    """Why a learned policy's agent could not have learned, from its diagnostics' means over seeds."""
    problems = []
    clipped, epsilon = row.get("clipped_reward_fraction"), row.get("final_epsilon")
    if clipped is not None and clipped > CLIPPED_LIMIT:
        problems.append(f"{clipped:.0%} of rewards were clipped at the floor")
    if epsilon is not None and epsilon >= EPSILON_LIMIT:
        problems.append(f"epsilon never fell below {epsilon:.2f} (it explored at random most of the time)")
    return problems


def unsettled(row: Dict[str, Any]) -> Optional[str]:
    """Why a learned policy shows no sign of having learned, from the lowest greedy-map stability over seeds."""
    stability = row.get("greedy_map_stability_lowest")
    if stability is not None and stability < STABILITY_LIMIT:
        return (f"its greedy map did not settle (on its worst seed only {stability:.0%} of the layers kept their "
                f"greedy action over the last episodes)")
    return None


def learning_warning(row: Dict[str, Any]) -> str:
    problems, unsettled_map = learning_problems(row), unsettled(row)
    if not problems and not unsettled_map:
        return ""
    where = ", ".join(part for part in (f"{row['model']}/{row['dataset']}", row["label"]) if part)
    if problems:
        return f"warning: {row['policy']} ({where}): the agent could not have learned: {'; '.join(problems)}"
    return f"warning: {row['policy']} ({where}): no sign that the agent learned: {unsettled_map}"


def differs_from_reference(group: Group, reference: Optional[Group]) -> str:
    """What separates the group from its reference that its label (which compares it with the groups of its own
    policy) does not already say."""
    if reference is None or reference is group:
        return ""
    parts = (f"{key}={show_value(value)}" for key, value in reference_differences(group, reference).items())
    return " ".join(part for part in parts if part not in group.label.split())


def group_row(group: Group, reference: Optional[Group] = None) -> Dict[str, Any]:
    """The group's identity, quality statistics, difference from ``reference`` and the means of its summaries."""
    settings, runs = group.settings, group.runs
    row: Dict[str, Any] = {
        "model": settings["model.name"], "dataset": settings["dataset.name"], "policy": settings["policy.name"],
        "label": group.label, "n_layer": settings["model.n_layer"], "seeds": len(runs),
    }
    row.update(quality_columns(runs))
    row.update(conversion_columns(runs))
    row.update(paired_columns(group, reference))
    row["differs_from_reference"] = differs_from_reference(group, reference)
    for key in AVERAGED:
        values = _values(runs, key)
        if values:
            row[key] = statistics.fmean(values)
            if key in LOWEST_OVER_SEEDS:
                row[f"{key}_lowest"] = min(values)
    row["learning_warning"] = learning_warning(row)
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


def estimate_text(found: Estimate, digits: int) -> str:
    """``mean ± half-width`` of the 95% t-interval, or the mean alone (one value has no interval)."""
    mean = f"{found.mean:.{digits}f}"
    return mean if found.halfwidth is None else f"{mean} ± {found.halfwidth:.{digits}f}"


def _quality(row: Dict[str, Any], key: str, digits: int) -> str:
    mean, high = row[f"{key}_mean"], row[f"{key}_ci_high"]
    if high is None:
        return f"{mean:.{digits}f} (no CI: n=1)"
    return f"{mean:.{digits}f} ± {high - mean:.{digits}f}"


def _paired(row: Dict[str, Any], digits: int) -> str:
    if row["is_reference"]:
        return "reference"
    if row["paired_n"] is None:
        return ""
    if row["paired_n"] == 0:
        return "no shared seeds"
    mean, high = row["paired_diff_mean"], row["paired_diff_ci_high"]
    text = f"{mean:+.{digits}f}" if high is None else f"{mean:+.{digits}f} ± {high - mean:.{digits}f}"
    marks = ["no CI: 1 pair"] if high is None else ["ns"] if row["paired_diff_contains_zero"] else []
    if row["paired_metric"].startswith("val_"):
        marks.append("val")
    return f"{text} ({', '.join(marks)})" if marks else text


def _policy(row: Dict[str, Any]) -> str:
    if not row["learning_warning"]:
        return row["policy"]
    return f"{row['policy']} ⚠ could not learn" if learning_problems(row) else f"{row['policy']} ⚠ did not settle"


def _with_lowest(row: Dict[str, Any], key: str, fmt: Callable[[float], str], limit: Optional[float] = None) -> str:
    """The mean over seeds, and the lowest seed's value where there are several."""
    lowest = row.get(f"{key}_lowest")
    text = fmt(row[key]) if row["seeds"] == 1 or lowest is None else f"{fmt(row[key])} (lowest {fmt(lowest)})"
    return _flagged(text, limit is not None and lowest is not None and lowest < limit)


def _flagged(text: str, flag: bool) -> str:
    return f"{text} ⚠" if flag else text


def _pair(row: Dict[str, Any], key: str, fmt: Callable[[float], str]) -> str:
    return f"{fmt(row[key])} / {fmt(row[f'{key}_mean'])}"


def _peak_tensors(row: Dict[str, Any]) -> str:
    return f"{_bytes(row['peak_tensor_bytes'])} ({_bytes(row['peak_state_bytes'])} + {_bytes(row['peak_other_bytes'])})"


MEMORY_KINDS = {"cpu_rss": "RSS", "cuda_max_allocated": "CUDA"}

Column = Tuple[str, Optional[str], Callable[[Dict[str, Any]], str]]

# (header, row key the column needs, how to show it), in table order; {reference} is the reference policy.
IDENTITY: Tuple[Column, ...] = (
    ("model", None, lambda r: r["model"]),
    ("dataset", None, lambda r: r["dataset"]),
    ("policy", None, _policy),
    ("differs", None, lambda r: " ".join(filter(None, (r["label"], r["differs_from_reference"])))),
    ("layers", None, lambda r: str(r["n_layer"])),
    ("n (seeds)", None, lambda r: str(r["seeds"])),
)
QUALITY: Tuple[Column, ...] = (
    ("test PPL ± 95% CI", "test_ppl_mean", lambda r: _quality(r, "test_ppl", 2)),
    ("val PPL ± 95% CI", "val_ppl_mean", lambda r: _quality(r, "val_ppl", 2)),
    ("test acc ± 95% CI", "test_acc_mean", lambda r: _quality(r, "test_acc", 4)),
    ("val acc ± 95% CI", "val_acc_mean", lambda r: _quality(r, "val_acc", 4)),
    ("source test PPL", "source_test_ppl_mean", lambda r: _quality(r, "source_test_ppl", 2)),
    ("test PPL after conversion", "converted_test_ppl_mean", lambda r: _quality(r, "converted_test_ppl", 2)),
    ("Δ PPL vs {reference}", "val_ppl_mean", lambda r: _paired(r, 2)),
    ("Δ acc vs {reference}", "val_acc_mean", lambda r: _paired(r, 4)),
    ("pairs", "paired_n", lambda r: str(r["paired_n"])),
    ("decisions", "decisions", lambda r: f"{r['decisions']:.0f}"),
    ("final ε", "final_epsilon",
     lambda r: _flagged(f"{r['final_epsilon']:.2f}", r["final_epsilon"] >= EPSILON_LIMIT)),
    ("clipped rewards", "clipped_reward_fraction",
     lambda r: _flagged(f"{r['clipped_reward_fraction']:.0%}", r["clipped_reward_fraction"] > CLIPPED_LIMIT)),
    ("value spread (min over layers)", "q_spread_min", lambda r: _with_lowest(r, "q_spread_min", "{:.3g}".format)),
    ("value spread (mean)", "q_spread_mean", lambda r: f"{r['q_spread_mean']:.3g}"),
    ("greedy, last 20%", "greedy_fraction_last20", lambda r: f"{r['greedy_fraction_last20']:.0%}"),
    ("greedy map stable", "greedy_map_stability",
     lambda r: _with_lowest(r, "greedy_map_stability", "{:.0%}".format, STABILITY_LIMIT)),
    ("best action separable", "separable_layers", lambda r: _with_lowest(r, "separable_layers", "{:.0%}".format)),
)
COST: Tuple[Column, ...] = (
    ("trainable params (end/mean)", "trainable_params", lambda r: _pair(r, "trainable_params", human_count)),
    ("indep. layers (end/mean)", "independent_layers", lambda r: _pair(r, "independent_layers", "{:.3g}".format)),
    ("trainable layers (end/mean)", "trainable_layers", lambda r: _pair(r, "trainable_layers", "{:.3g}".format)),
    ("stored params", "stored_params", lambda r: human_count(r["stored_params"])),
    ("train FLOPs/token", "train_flops_per_token", lambda r: human_count(r["train_flops_per_token"])),
    ("train state", "train_state_bytes", lambda r: _bytes(r["train_state_bytes"])),
    ("peak tensors (state + other)", "peak_tensor_bytes", _peak_tensors),
    ("peak memory", "peak_memory_bytes",
     lambda r: f"{_bytes(r['peak_memory_bytes'])} {MEMORY_KINDS.get(r['peak_memory_kind'], '')}".rstrip()),
    ("wall time", "wall_time_s", lambda r: _seconds(r["wall_time_s"])),
    ("tokens/s", "tokens_per_s", lambda r: f"{r['tokens_per_s']:,.0f}"),
    ("samples/s", "samples_per_s", lambda r: f"{r['samples_per_s']:,.0f}"),
)


def display_cells(rows: List[Dict[str, Any]], reference: str,
                  columns: Sequence[Column] = IDENTITY + QUALITY + COST) -> Tuple[List[str], List[List[str]]]:
    """Headers and formatted cells, leaving out columns that no row reports (a cell is blank where a row lacks it)."""
    def has(row: Dict[str, Any], needs: Optional[str]) -> bool:
        return needs is None or row.get(needs) is not None

    shown = [(header, needs, show) for header, needs, show in columns if any(has(r, needs) for r in rows)]
    cells = [[show(row) if has(row, needs) else "" for _, needs, show in shown] for row in rows]
    return [header.format(reference=reference) for header, _, _ in shown], cells


def markdown_table(rows: List[Dict[str, Any]], reference: str) -> str:
    return markdown_cells(*display_cells(rows, reference))


def markdown_cells(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A Markdown table of ``headers`` and rows of ``cells`` (a "|" inside a cell escaped)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells]
    return "\n".join(lines)


def console_table(rows: List[Dict[str, Any]], reference: str, columns: Sequence[Column], title: str,
                  caption: Optional[str] = None) -> Table:
    return console_cells(*display_cells(rows, reference, columns), title, caption)


def console_cells(headers: Sequence[str], cells: Sequence[Sequence[str]], title: str,
                  caption: Optional[str] = None) -> Table:
    """A rich table of ``headers`` and rows of ``cells``; only the free-text column ("differs") wraps."""
    table = Table(title=title, caption=caption)
    for header in headers:
        # Only the free-text column wraps; numbers stay on one line.
        table.add_column(header, overflow="fold", no_wrap=header != "differs", ratio=3 if header == "differs" else None)
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))
    return table


def console_tables(rows: List[Dict[str, Any]], reference: str, title: str, caption: str) -> List[Table]:
    """The table in two, quality and cost, since a terminal cannot scroll sideways through all its columns."""
    return [console_table(rows, reference, IDENTITY + QUALITY, f"{title}: quality", caption),
            console_table(rows, reference, IDENTITY + COST, f"{title}: cost")]
