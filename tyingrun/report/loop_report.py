"""The looped arms in report.md, loops.csv and quality_by_loops.csv: what one loop is worth (φ, per arm, beside the
published value) and quality at every evaluated loop count, by difficulty on reasoning tasks."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from rich.table import Table

from tyingrun.report.difficulty import DIFFICULTY_NAMES
from tyingrun.report.loops import (
    PUBLISHED_PHI,
    LoopedArm,
    LoopFamily,
    PhiResult,
    Reading,
    blocks_text,
    summary_of,
    unique_blocks,
)
from tyingrun.report.stats import estimate
from tyingrun.report.tables import console_cells, estimate_columns, estimate_text, markdown_cells, write_csv

LOOPS_CSV = "loops.csv"
QUALITY_CSV = "quality_by_loops.csv"
# The quality metrics scored at several loop counts (test_<metric>_by_loops), with their digits.
LOOP_METRICS = {"loss": 4, "ppl": 2, "acc": 4}
PHI_HEADER = f"φ ± 95% CI (published {PUBLISHED_PHI})"


def phi_text(result: Optional[PhiResult], digits: int = 3) -> str:
    """φ over seeds (mean ± 95% CI) where every seed reads a number; else the reading of the mean loss, saying how
    many seeds had no number."""
    if result is None:
        return ""
    if result.over_seeds is not None:
        return estimate_text(result.over_seeds, digits)
    outside = sum(not reading.exact for reading in result.by_seed.values())
    text = result.from_mean.text(digits)
    if result.from_mean.exact or outside < len(result.by_seed):
        text += f" (of the mean loss; no interval: {outside} of {len(result.by_seed)} seeds without a number)"
    return text


def _train_loops(arm: LoopedArm) -> str:
    if arm.shape.train_loops == "fixed":
        return "fixed"
    means = [summary_of(run)["train_loops_mean"] for run in arm.group.runs if summary_of(run).get("train_loops_mean")]
    return f"{arm.shape.train_loops} (mean {statistics.fmean(means):.2f})" if means else arm.shape.train_loops


def _layout_cells(arm: LoopedArm) -> List[str]:
    shape = arm.shape
    blocks = (f"counts {','.join(map(str, shape.counts))}" if shape.counts is not None
              else f"{shape.prelude}/{shape.core}/{shape.coda}")
    return [arm.group.name, blocks, str(shape.loops), _train_loops(arm), shape.inject, shape.loop_params]


def _test_loss(arm: LoopedArm) -> str:
    losses = list(arm.group.values_by_seed("test_loss").values())
    return estimate_text(estimate(losses), 4) if losses else ""


def phi_cells(family: LoopFamily, by_loops: bool = True) -> Tuple[List[str], List[List[str]]]:
    """Per looped arm: its layout, test loss, effective unique blocks, φ, and (``by_loops``) φ at each loop count."""
    loop_counts = sorted({loops for arm in family.looped for loops in arm.phi_by_loops}) if by_loops else []
    headers = ["group", "prelude/core/coda", "loops", "train loops", "inject", "loop params", "test loss ± 95% CI",
               "effective unique blocks", PHI_HEADER, "seeds", *(f"φ at {loops} loops" for loops in loop_counts)]
    cells = []
    for arm in family.looped:
        effective = arm.phi.effective.text(2) if arm.phi is not None else _no_untied(arm)
        cells.append([*_layout_cells(arm), _test_loss(arm), effective, phi_text(arm.phi), str(len(arm.group.runs)),
                      *(phi_text(arm.phi_by_loops.get(loops)) for loops in loop_counts)])
    return headers, cells


def _no_untied(arm: LoopedArm) -> str:
    return "no untied arms of these settings" if arm.untied is None else "no test loss"


def untied_line(family: LoopFamily) -> str:
    if not family.untied:
        return ("No untied arms (policy=none) of these settings: φ needs untied arms of two or more depths on the "
                "same data, budget and width.")
    points = []
    for group in family.untied:
        losses = list(group.values_by_seed("test_loss").values())
        if losses:
            points.append(f"{blocks_text(unique_blocks(group))}: {estimate_text(estimate(losses), 4)} "
                          f"({len(losses)} seed{'s' if len(losses) > 1 else ''})")
    mean_curve = family.looped[0].untied.curve() if family.looped and family.looped[0].untied else None
    verdict = (f" {mean_curve.problem[0].upper()}{mean_curve.problem[1:]} (in the mean over seeds), so no looped arm's "
               f"effective blocks or φ can be read off it." if mean_curve is not None and mean_curve.problem else "")
    return "Untied arms read against (policy=none, test loss ± 95% CI): " + "; ".join(points) + "." + verdict


def quality_table(family: LoopFamily) -> List[str]:
    """Markdown: the test quality of each looped arm scored at several loop counts, at each of them, a row per
    metric."""
    arms = [arm for arm in family.looped if arm.scored_at_several_loop_counts]
    evaluated = sorted({loops for arm in arms for metric in LOOP_METRICS for loops in arm.quality_by_loops(metric)})
    if not evaluated:
        return []
    headers = ["group", "trained at", "metric", *(f"{loops} loops" for loops in evaluated)]
    cells = []
    for arm in arms:
        for metric, digits in LOOP_METRICS.items():
            found = arm.quality_by_loops(metric)
            if found:
                cells.append([arm.group.name, f"{arm.shape.loops} loops ({_train_loops(arm)})", f"test {metric}",
                              *(estimate_text(found[loops], digits) if loops in found else "" for loops in evaluated)])
    return [f"### Quality against loops evaluated: {family.title}", "", markdown_cells(headers, cells), "",
            "Each cell: the mean over the arm's seeds ± half-width of its 95% t-interval, the model trained at "
            "'trained at' loops and evaluated, with the same weights, at the column's loop count (arms scored at "
            "one loop count only, no train.eval_loops, are in the φ table alone).", ""]


def difficulty_tables(family: LoopFamily) -> List[str]:
    """Markdown: per looped arm on a reasoning task scored at several loop counts, test accuracy by difficulty
    (columns) at each loop count (rows)."""
    lines: List[str] = []
    for arm in family.looped:
        found = arm.accuracy_by_difficulty_by_loops()
        if len(found) < 2:
            continue
        name = DIFFICULTY_NAMES.get(arm.group.settings["dataset.name"], "difficulty")
        levels = sorted({level for by_level in found.values() for level in by_level})
        cells = [[f"{loops}{' (trained)' if loops == arm.shape.loops else ''}",
                  *(estimate_text(found[loops][level], 4) if level in found[loops] else "" for level in levels)]
                 for loops in sorted(found)]
        lines += [f"### Test accuracy by {name} and loops: {arm.group.name}", "",
                  markdown_cells(["loops", *(f"{name} {level}" for level in levels)], cells), ""]
    if lines:
        lines += ["Each cell: mean test accuracy (the whole answer right) over seeds ± half-width of its 95% "
                  "t-interval. Rows below and above the trained loop count, columns above the training difficulty: "
                  "whether more loops than trained help on harder instances.", ""]
    return lines


def loops_section(families: List[LoopFamily]) -> List[str]:
    """Markdown: how φ is read, then per family of looped arms the untied arms it is read against, φ per arm, and
    quality against loops."""
    if not families:
        return []
    lines = [
        "## What one loop is worth", "",
        "Effective unique blocks: where the arm's mean test loss meets the untied arms' test loss against unique "
        "blocks (means over seeds, joined by a monotone cubic in log blocks). φ = log((effective − prelude − coda) / "
        "core) / log(loops), read per seed against that seed's untied losses, as mean ± half-width of the 95% "
        f"t-interval over seeds, beside the published {PUBLISHED_PHI} (Schwethelm et al. 2026, language-model scale): "
        "a block looped r times is worth r^φ unique blocks. A loss outside the untied range gives only a bound "
        "(> or <), never an extrapolated number. 'φ at r loops' reads the loss the same weights reach when evaluated "
        "at r loops (docs/method.md#what-one-loop-is-worth).", ""]
    for family in families:
        lines += [f"### φ: {family.title}", "", untied_line(family), "", markdown_cells(*phi_cells(family)), ""]
        lines += [*quality_table(family), *difficulty_tables(family)]
    return lines


def _reading_columns(key: str, reading: Reading) -> Dict[str, Any]:
    return {key: reading.value, f"{key}_relation": reading.relation if reading.value is not None else "",
            f"{key}_note": reading.why}


def _phi_columns(key: str, result: PhiResult) -> Dict[str, Any]:
    columns: Dict[str, Any] = dict.fromkeys((f"{key}_mean", f"{key}_std", f"{key}_ci_low", f"{key}_ci_high"))
    if result.over_seeds is not None:
        columns.update(estimate_columns(key, result.over_seeds))
    columns.update(_reading_columns(f"{key}_of_mean_loss", result.from_mean))
    columns[f"{key}_by_seed"] = ";".join(f"{seed}={reading.text(6)}" for seed, reading in result.by_seed.items())
    return columns


def loop_row(arm: LoopedArm) -> Dict[str, Any]:
    """loops.csv: an arm's layout, test loss, effective unique blocks and φ (at its loops, then at each r)."""
    shape, settings = arm.shape, arm.group.settings
    row: Dict[str, Any] = {
        "model": settings["model.name"], "dataset": settings["dataset.name"], "group": arm.group.name,
        "prelude": shape.prelude, "core": shape.core, "coda": shape.coda, "loops": shape.loops,
        "counts": "" if shape.counts is None else ",".join(map(str, shape.counts)), "train_loops": shape.train_loops,
        "inject": shape.inject, "loop_params": shape.loop_params, "seeds": len(arm.group.runs),
        "published_phi": PUBLISHED_PHI,
    }
    losses = list(arm.group.values_by_seed("test_loss").values())
    if losses:
        row.update(estimate_columns("test_loss", estimate(losses)))
    if arm.untied is not None:
        curve = arm.untied.curve()
        row["untied_blocks"] = ";".join(f"{blocks:g}" for blocks in curve.blocks)
        row["untied_test_loss"] = ";".join(f"{loss:.6g}" for loss in curve.losses)
    if arm.phi is not None:
        row.update(_reading_columns("effective_blocks", arm.phi.effective))
        row.update(_phi_columns("phi", arm.phi))
    for loops, result in arm.phi_by_loops.items():
        row.update(_phi_columns(f"phi_at_{loops}", result))
    return row


def quality_rows(arm: LoopedArm) -> List[Dict[str, Any]]:
    """quality_by_loops.csv: one row per (metric, loop count, difficulty) with its mean and interval over seeds."""
    base = {"model": arm.group.settings["model.name"], "dataset": arm.group.settings["dataset.name"],
            "group": arm.group.name, "trained_loops": arm.shape.loops}
    rows = []
    for metric in LOOP_METRICS:
        for loops, found in arm.quality_by_loops(metric).items():
            rows.append({**base, "metric": f"test_{metric}", "difficulty": "", "loops": loops, "n": found.n,
                         **estimate_columns("value", found)})
    for loops, by_level in arm.accuracy_by_difficulty_by_loops().items():
        for level, found in by_level.items():
            rows.append({**base, "metric": "test_acc", "difficulty": level, "loops": loops, "n": found.n,
                         **estimate_columns("value", found)})
    return rows


def write_loop_csvs(families: List[LoopFamily], out_dir: Path) -> List[Path]:
    """loops.csv and quality_by_loops.csv where there are looped arms (and scored loop counts); the paths written."""
    arms = [arm for family in families for arm in family.looped]
    if not arms:
        return []
    write_csv([loop_row(arm) for arm in arms], out_dir / LOOPS_CSV)
    written = [out_dir / LOOPS_CSV]
    quality = [row for arm in arms for row in quality_rows(arm)]
    if quality:
        write_csv(quality, out_dir / QUALITY_CSV)
        written.append(out_dir / QUALITY_CSV)
    return written


def console_phi_tables(families: List[LoopFamily]) -> List[Table]:
    """The φ table of each family for the terminal (without the per-loop-count columns)."""
    return [console_cells(*phi_cells(family, by_loops=False), f"What one loop is worth: {family.title}")
            for family in families]
