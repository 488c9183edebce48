"""``tyingrun`` (the Hydra app) and ``tyingrun-report``. A run that fails ends in one line on stderr: exit 2 for
bad input, 1 for anything else (its traceback goes to the run's run.log)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import List, NoReturn, Optional, Tuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from tyingrun.config import register_configs, reject_unknown_keys, unknown_key_message
from tyingrun.errors import BadInput
from tyingrun.run_status import write_status
from tyingrun.train.distributed import broadcast_object, init_from_env, launched_by_torchrun, leave_process_group

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
CONFIG_ERRORS = (HydraException, ConfigKeyError, ConfigAttributeError, ValidationError)

log = logging.getLogger("tyingrun")


def explain(err: BaseException) -> str:
    """One line for a composition or validation error: what is wrong, and what is allowed."""
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(err, MissingConfigException) and err.options is not None:
        group = (err.missing_cfg_file or "").rpartition("/")[0]
        option = (err.missing_cfg_file or "").rpartition("/")[2]
        return f"unknown option {group}={option}; choose one of: {', '.join(sorted(err.options))}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        return unknown_key_message(cause.full_key)
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        message = str(cause).splitlines()[0]
        return f"bad value for {cause.full_key}: {message}"
    return " ".join(str(err).split())


def describe_failure(err: Exception) -> Tuple[str, int]:
    """The one-line error and the exit status of a run that raised ``err``."""
    if isinstance(err, BadInput):
        return str(err), EXIT_BAD_INPUT
    if isinstance(err, CONFIG_ERRORS):
        return explain(err), EXIT_BAD_INPUT
    return f"{type(err).__name__}: {' '.join(str(err).split())} (traceback in run.log)", EXIT_FAILED


def fail(message: str, exit_code: int = EXIT_BAD_INPUT) -> NoReturn:
    sys.stderr.write(f"tyingrun: error: {message}\n")
    sys.exit(exit_code)


@hydra.main(version_base="1.3", config_path="pkg://tyingrun.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from tyingrun.run import run

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        reject_unknown_keys(cfg)
        summary = run(OmegaConf.to_object(cfg), out_dir)
    except Exception as err:
        message, exit_code = describe_failure(err)
        log.error(message, exc_info=exit_code != EXIT_BAD_INPUT)
        write_status(out_dir, "failed", error=message, exit_code=exit_code)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # The sweep goes on; tyingrun.sweep names every failed job once all have returned.
            print(f"tyingrun: job {out_dir} failed: {message}", flush=True)
            return math.nan
        fail(message, exit_code)
    write_status(out_dir, "completed")
    return summary["val_loss"]


def with_resume_arguments(argv: List[str]) -> List[str]:
    """``train.resume=DIR`` continues DIR's run: its own overrides come first, then the new ones, in DIR."""
    given = [arg.split("=", 1)[1] for arg in argv if arg.lstrip("+").startswith("train.resume=")]
    saved = Path(given[-1]).expanduser() / ".hydra" / "overrides.yaml" if given else None
    if saved is None or not saved.is_file():
        return argv
    earlier = [arg for arg in OmegaConf.load(saved) if not arg.lstrip("+").startswith(("train.resume=", "hydra."))]
    run_dir = [] if any(arg.startswith("hydra.run.dir=") for arg in argv) else [f"hydra.run.dir={given[-1]}"]
    return [*earlier, *argv, *run_dir]


def with_rank_arguments(argv: List[str]) -> List[str]:
    """Under torchrun every rank composes the config: all must write into rank 0's run folder, and only
    rank 0 writes Hydra's files and the run log."""
    if not launched_by_torchrun():
        return argv
    import torch

    mesh = init_from_env()
    device = torch.device("cuda", mesh.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    given = any(arg.startswith("hydra.run.dir=") for arg in argv)
    rank0_dir = time.strftime("outputs/runs/%Y-%m-%d/%H-%M-%S-ddp")
    run_dir = [] if given else [f"hydra.run.dir={broadcast_object(rank0_dir, device)}"]
    quiet = [] if mesh.is_main else ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return [*argv, *run_dir, *quiet]


def main() -> None:
    # Let exceptions reach us instead of Hydra's multi-line report, so each becomes one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = [sys.argv[0], *with_rank_arguments(with_resume_arguments(sys.argv[1:]))]
    register_configs()
    try:
        _hydra_main()
    except CONFIG_ERRORS as err:
        fail(explain(err))
    finally:
        leave_process_group()


def report_main(argv: Optional[List[str]] = None) -> None:
    """``tyingrun-report PATH [PATH ...] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="tyingrun-report",
        description="Tables (report.md, report.csv) and PNG figures from tyingrun run folders; runs that differ "
                    "only in train.seed are one group (mean and std over seeds).",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or folders that contain them (sweeps)")
    parser.add_argument("--out", type=Path, help="where to write the report (default: the first PATH)")
    args = parser.parse_args(argv)
    from tyingrun.report import write_report

    try:
        write_report(args.paths, args.out)
    except BadInput as err:
        fail(str(err))


if __name__ == "__main__":
    main()
