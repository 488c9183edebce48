"""After a sweep (``tyingrun -m``): name every job that failed, and make the sweep exit non-zero.

Each job records its own failure in its folder's status.json and returns, so the sweep goes on whatever
the launcher (in-process, joblib workers, Slurm); this Hydra callback runs in the launching process and
reads those files once every job has returned.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tyingrun.files import STATUS_FILE
from tyingrun.run_status import read_status


@dataclass
class FailedJob:
    job_dir: Path
    error: str
    exit_code: int


def failed_jobs(sweep_dir: Path) -> List[FailedJob]:
    """Jobs of the latest sweep into ``sweep_dir`` that failed, in the order they failed.

    A folder can hold jobs of an earlier sweep into the same directory: only status files written after
    the sweep's multirun.yaml count (both stamped by the same file system, so clocks of other nodes and
    coarse timestamps do not matter).
    """
    marker = sweep_dir / "multirun.yaml"
    since = marker.stat().st_mtime if marker.is_file() else 0.0
    files = [path for path in sweep_dir.rglob(STATUS_FILE) if path.stat().st_mtime >= since]
    failures = []
    for path in sorted(files, key=lambda path: path.stat().st_mtime):
        status = read_status(path.parent)
        if status["status"] == "failed":
            failures.append(FailedJob(path.parent, status["error"], status["exit_code"]))
    return failures


class FailedJobsCallback(Callback):
    """Configured under ``hydra.callbacks`` in conf/config.yaml."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failures = failed_jobs(Path(config.hydra.sweep.dir))
        if not failures:
            return
        for job in failures:
            sys.stderr.write(f"tyingrun: failed job {job.job_dir}: {job.error}\n")
        # Hydra turns a callback's exceptions into warnings; SystemExit is not one, so it ends the sweep's
        # process with 2 when every failure was bad input and 1 otherwise.
        raise SystemExit(min(job.exit_code for job in failures))
