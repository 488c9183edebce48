"""Where measurements go: JSONL files in the run folder, the console (progress bar or log lines), wandb."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tyingrun.contracts import Sink
from tyingrun.errors import BadInput, warn
from tyingrun.files import MAPS_FILE, METRICS_FILE, RANKS_DIR, SUMMARY_FILE, strict_json, write_json_atomic

log = logging.getLogger("tyingrun")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def written_at(row: Any) -> Optional[int]:
    """The step at which a row was written (None: not a row with a step). A learned decision's maps.jsonl row
    (``step``: the decision) is written when its reward is measured, at ``reward_step``."""
    if not isinstance(row, dict):
        return None
    step = row.get("step") if row.get("reward_step") is None else row["reward_step"]
    return step if isinstance(step, int) and not isinstance(step, bool) else None


RowRule = Callable[[int], Callable[[Dict[str, Any]], bool]]


def logged_by(step: int) -> Callable[[Dict[str, Any]], bool]:
    """metrics.jsonl: a row at step s was written before the checkpoint at s."""
    def kept(row: Dict[str, Any]) -> bool:
        written = written_at(row)
        return written is not None and written <= step
    return kept


def decided_before(step: int) -> Callable[[Dict[str, Any]], bool]:
    """maps.jsonl: a row was written by a decision taken after the step it is written at (``written_at``), which
    comes after that step's checkpoint, so the checkpoint at ``step`` holds only rows written at earlier steps. A
    learned decision with no ``reward_step`` is the run's last one, written when the run ended: a resumed run
    (even one extended past that end) takes it again."""
    def kept(row: Dict[str, Any]) -> bool:
        written = written_at(row)
        return written is not None and written < step and not ("reward" in row and row.get("reward_step") is None)
    return kept


LEADING_STEP = re.compile(r'\s*\{"step":\s*(\d+)')


def _torn_before_checkpoint(line: str, keep: Callable[[Dict[str, Any]], bool]) -> bool:
    """Whether a torn row certainly lies before the checkpoint (so the checkpoint was written after it, and the
    tear is damage, not a crash): its step is readable, it is written at that step (a learned decision's row, which
    carries a reward, is written later), and the file's rule keeps a row written then."""
    match = LEADING_STEP.match(line)
    return match is not None and '"reward' not in line and keep({"step": int(match[1])})


def resumed_lines(path: Path, step: int, kept_on_resume: RowRule = logged_by,
                  warn_dropped: bool = True) -> List[str]:
    """The lines of a JSONL log that a resume from the checkpoint at ``step`` keeps: those ``kept_on_resume(step)``
    accepts. A torn last row (the file's end after its last newline, not JSON: what a crash or a full disk leaves)
    is dropped, with a warning unless ``warn_dropped`` is false; any other damage is BadInput saying where."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    keep = kept_on_resume(step)
    numbered = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    # A row is written with its newline in one write: a crash or a full disk can only cut the file's end short.
    torn = numbered[-1][0] if numbered and not text.endswith("\n") else None
    kept = []
    for number, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number != torn:
                raise BadInput(f"{path}: line {number} is not a JSON row ({line[:60]!r}); a crash only cuts the "
                               f"last row short, so the file was damaged after it was written - restore it from a "
                               f"backup, or delete that one line to resume without it") from None
            if _torn_before_checkpoint(line, keep):
                raise BadInput(f"{path}: its last row (line {number}, {line[:40]!r}) is torn, but the checkpoint at "
                               f"step {step} was written after it, so the file was damaged later - restore it from "
                               f"a backup, or delete that one line to resume without it") from None
            if warn_dropped:
                warn(f"{path}: dropping its torn last row (line {number}, {line[:40]!r}), written after the "
                     f"checkpoint at step {step} (what a crash leaves)")
            continue
        if written_at(row) is None:
            raise BadInput(f"{path}: line {number} is a JSON value without an integer step ({line[:60]!r}); "
                           f"restore the file from a backup, or delete that one line to resume without it")
        if keep(row):
            kept.append(line)
    return kept


class JsonlFile:
    """A JSONL log that rows are appended to. Given ``resume_step`` (the run resumes from its checkpoint at that
    step), it first drops what the interrupted run logged after the checkpoint: the rows ``kept_on_resume(step)``
    rejects, and a torn last row (resumed_lines)."""

    def __init__(self, path: Path, resume_step: Optional[int] = None, kept_on_resume: RowRule = logged_by):
        if resume_step is not None and path.exists():
            rows = resumed_lines(path, resume_step, kept_on_resume)
            path.write_text("".join(f"{row}\n" for row in rows))
        self._handle = path.open("a")

    def write(self, row: Dict[str, Any]) -> None:
        self._handle.write(strict_json(row) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class RewardedMapRows:
    """maps.jsonl rows, each written with the reward of its own decision.

    A learned decision's ``reward`` is measured K steps later and arrives with the next decision (as
    ``Decision.info["reward"]``), so each such row is held until then; the run's last decision is never rewarded
    and is written with ``reward: null`` when the run ends (``flush``). Rows without a reward go out at once.
    """

    def __init__(self, sinks: Sink):
        self._sinks = sinks
        self.held: Optional[Dict[str, Any]] = None

    def record(self, row: Dict[str, Any], step: int) -> None:
        """``row`` of a map change at ``step``; its ``reward`` key, if any, is the previous decision's reward."""
        if "reward" not in row:
            self._sinks.map_change(row)
            return
        reward_of_previous = row.pop("reward")
        if self.held is not None:
            self._sinks.map_change({**self.held, "reward": reward_of_previous, "reward_step": step})
        self.held = row

    def flush(self) -> None:
        if self.held is not None:
            self._sinks.map_change({**self.held, "reward": None, "reward_step": None})

    def state_dict(self) -> Dict[str, Any]:
        return {"unrewarded_row": self.held}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.held = state["unrewarded_row"]


def evaluation_line(step: int, result: Dict[str, Any], counts: Dict[str, int], n_layer: int) -> str:
    """The console line of an evaluation: its losses and quality, and how much of the model is its own."""
    shown = [f"{key} {result[key]:.4f}" for key in ("val_loss", "val_acc", "test_loss", "test_acc") if key in result]
    shown += [f"{key} {result[key]:.2f}" for key in ("val_ppl", "test_ppl") if key in result]
    return (f"step {step:>6}  {'  '.join(shown)}  independent {counts['independent_layers']}/{n_layer}  "
            f"trainable_params {counts['trainable_params']:,}")


def training_line(step: int, max_steps: int, row: Dict[str, Any], unit: str) -> str:
    """The console line of a metrics.jsonl training row."""
    return (f"step {step:>6}/{max_steps}  train_loss {row['train_loss']:.4f}  lr {row['lr']:.2e}  "
            f"{unit}/s {row[f'{unit}_per_s']:,.0f}")


class ConsoleSink:
    """A rich progress bar on a terminal; plain log lines (for files and Slurm logs) otherwise."""

    def __init__(self, mode: str, total_steps: int, quiet: bool = False):
        on_terminal = sys.stdout.isatty()
        # Log files and pipes get long lines rather than rich's default of 80 columns.
        self.console = Console(width=None if on_terminal else 160, quiet=quiet)
        use_bar = not quiet and (mode == "bar" or (mode == "auto" and on_terminal))
        self._bar: Optional[Progress] = None
        if use_bar:
            self._bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            )
            self._task = self._bar.add_task("train", total=total_steps, status="")
            self._bar.start()

    @property
    def uses_bar(self) -> bool:
        return self._bar is not None

    def line(self, text: str, show: bool = True) -> None:
        """Log ``text`` to run.log; print it too unless ``show`` is false and the bar already shows progress."""
        log.info(text)
        if show or not self.uses_bar:
            self.console.print(text, highlight=False, markup=False)

    def progress(self, step: int, status: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=status)

    def table(self, title: str, values: Dict[str, Any]) -> None:
        table = Table(title=title, show_header=False)
        for key, value in values.items():
            table.add_row(key, _fmt(value))
        self.console.print(table)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _numbers(row: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    return {f"{prefix}{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}


class WandbSink:
    """Imported only when ``log.wandb=true``; honours WANDB_MODE (online, offline, disabled) and WANDB_DIR.

    Metrics go to their own names, map changes to ``tying/...`` plus a ``tying/maps`` table of every map,
    and the summary to the run's summary.
    """

    MAP_COLUMNS = ("step", "map", "trainable", "layer", "action", "reward", "epsilon")

    @staticmethod
    def require_login() -> None:
        """Called before anything is built: online without credentials, wandb.init would prompt or fail late."""
        import wandb

        if wandb.setup().settings.mode not in ("offline", "dryrun", "disabled") and not wandb.login(
                prompt=False, verify=False):
            raise BadInput("log.wandb=true but wandb is not logged in here; run `wandb login` (or set "
                           "WANDB_API_KEY), or log locally with WANDB_MODE=offline and `wandb sync` later")

    def __init__(self, project: str, config: Dict[str, Any], out_dir: Path):
        import wandb

        self._wandb = wandb
        self._maps: List[List[Any]] = []
        self._run = wandb.init(
            project=project, config=config, name="/".join(out_dir.parts[-2:]), notes=str(out_dir),
            dir=None if "WANDB_DIR" in os.environ else str(out_dir),
        )

    def log(self, row: Dict[str, Any]) -> None:
        self._run.log(_numbers(row), step=row["step"])

    def map_change(self, row: Dict[str, Any]) -> None:
        self._run.log(_numbers(row, "tying/"), step=row["step"])
        self._maps.append([json.dumps(row.get(column)) if isinstance(row.get(column), list) else row.get(column)
                           for column in self.MAP_COLUMNS])

    def summary(self, summary: Dict[str, Any]) -> None:
        self._run.summary.update(summary)

    def close(self) -> None:
        if self._maps:
            self._run.log({"tying/maps": self._wandb.Table(columns=list(self.MAP_COLUMNS), data=self._maps)})
        self._run.finish()


class RunSinks:
    """Everything a run records, written as it happens; summary.json only when the run completes."""

    def __init__(self, out_dir: Path, console: ConsoleSink, wandb: Optional[WandbSink] = None,
                 resume_step: Optional[int] = None):
        self.out_dir = out_dir
        self.console = console
        self.wandb = wandb
        self._metrics = JsonlFile(out_dir / METRICS_FILE, resume_step)
        self._maps = JsonlFile(out_dir / MAPS_FILE, resume_step, decided_before)

    def metrics(self, row: Dict[str, Any]) -> None:
        self._metrics.write(row)
        if self.wandb:
            self.wandb.log(row)

    def map_change(self, row: Dict[str, Any]) -> None:
        self._maps.write(row)
        if self.wandb:
            self.wandb.map_change(row)

    def summary(self, summary: Dict[str, Any]) -> None:
        write_json_atomic(self.out_dir / SUMMARY_FILE, summary)
        if self.wandb:
            self.wandb.summary(summary)

    def close(self) -> None:
        self.console.close()
        self._metrics.close()
        self._maps.close()
        if self.wandb:
            self.wandb.close()


class RankSinks:
    """What a rank other than 0 records under data parallelism: the maps it applied, nothing else.

    Rank 0 writes the run's files; ``ranks/rank<r>_maps.jsonl`` lets anyone check that every rank trained
    with the same map at every step.
    """

    def __init__(self, out_dir: Path, rank: int, resume_step: Optional[int] = None):
        self.out_dir = out_dir
        self.console = ConsoleSink("lines", 0, quiet=True)
        (out_dir / RANKS_DIR).mkdir(parents=True, exist_ok=True)
        self._maps = JsonlFile(out_dir / RANKS_DIR / f"rank{rank}_maps.jsonl", resume_step, decided_before)

    def metrics(self, row: Dict[str, Any]) -> None:
        """Rank 0 records the metrics."""

    def map_change(self, row: Dict[str, Any]) -> None:
        self._maps.write(row)

    def summary(self, summary: Dict[str, Any]) -> None:
        """Rank 0 writes the summary."""

    def close(self) -> None:
        self._maps.close()
