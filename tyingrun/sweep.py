"""After a sweep (``tyingrun -m``): name every job that failed, and make the sweep exit non-zero.

Each job records its own failure in its folder's status.json and returns, so the sweep goes on whatever
the launcher (in-process, joblib workers, Slurm); this Hydra callback runs in the launching process and
reads those files once every job has returned. A stop signal does end an in-process sweep: ``unstarted_notice``
names the jobs it leaves unstarted.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
        if status is not None and status["status"] == "failed":
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


def sweep_size(sweep_dir: Path) -> Optional[int]:
    """The number of jobs of the sweep into ``sweep_dir``, from the overrides its multirun.yaml records."""
    try:
        task = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task
        overrides = OverridesParser.create().parse_overrides(list(task))
    except (OSError, OmegaConfBaseException, HydraException):
        return None
    return math.prod(len(list(o.sweep_iterator())) if o.is_sweep_override() else 1 for o in overrides)


def unstarted_notice(sweep_dir: Path, job_num: int) -> Optional[str]:
    """The line for a stop signal that ended an in-process sweep in job ``job_num`` (0-based), or None when it was
    the last job."""
    total = sweep_size(sweep_dir)
    if total is not None and job_num + 1 >= total:
        return None
    later = f"jobs {job_num + 2} to {total}" if total is not None else "its later jobs"
    return (f"tyingrun: the sweep into {sweep_dir} stopped in job {job_num + 1}{f' of {total}' if total else ''}; "
            f"{later} were not started: resume this job with train.resume=, then rerun the sweep with only the "
            f"values not yet run")
