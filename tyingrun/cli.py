"""``tyingrun`` (the Hydra app) and ``tyingrun-report``. A run that fails ends in one line on stderr: exit 2 for
bad input, 1 for anything else (its traceback goes to the run's run.log)."""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from tyingrun.config import (
    RESUMABLE_KEYS,
    RESUMABLE_SECTIONS,
    Config,
    register_configs,
    reject_unknown_keys,
    unknown_key_message,
)
from tyingrun.errors import EXIT_BAD_INPUT, EXIT_FAILED, BadInput, fail
from tyingrun.files import CHECKPOINTS_DIR, CONFIG_FILE, OVERRIDES_FILE
from tyingrun.overrides import hydra_value
from tyingrun.run_folder import RunFolder, process_run_folder
from tyingrun.run_status import write_status
from tyingrun.sweep import unstarted_notice
from tyingrun.train.launch import launched_by_torchrun
from tyingrun.train.signals import STOP_SIGNALS

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
    if isinstance(err, OmegaConfBaseException):
        key = getattr(err, "full_key", None)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return (f"bad value for {key}: {first}" if key else f"bad config: {first}"), EXIT_BAD_INPUT
    return f"{type(err).__name__}: {' '.join(str(err).split())} (traceback in run.log)", EXIT_FAILED


def task_config(config: DictConfig) -> DictConfig:
    """The run's config without Hydra's own node."""
    task = copy.deepcopy(config)
    with open_dict(task):
        task.pop("hydra", None)
    return task


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def claim_run_folder(config: DictConfig, folder: RunFolder) -> None:
    """Before Hydra writes anything: lock the run folder (rank 0), check the config, then let the folder check
    itself (RunFolder.claim), so a refused run leaves the folder exactly as it was."""
    from tyingrun.run import check_config, resume_point

    path = Path(str(config.hydra.run.dir)).expanduser()
    if not is_main_process():
        folder.path = path
        return
    folder.hold(path, "hydra.run.dir")
    if not folder.names():
        return
    try:
        task = task_config(config)
        reject_unknown_keys(task)
        cfg = cast(Config, OmegaConf.to_object(task))
        check_config(cfg)
        folder.claim(cfg, resume_point, resume_command(path))
    except Exception as err:  # noqa: BLE001 - every failure here is one line, and the folder is untouched
        folder.leave_refused()
        fail(*describe_failure(err))


class RunFolderCallback(Callback):
    """Configured under ``hydra.callbacks`` in conf/config.yaml: runs before Hydra's job writes its files."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            claim_run_folder(config, process_run_folder())
        except (OSError, OmegaConfBaseException) as err:
            fail(f"hydra.run.dir cannot be used: {' '.join(str(err).split())}")


@hydra.main(version_base="1.3", config_path="pkg://tyingrun.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from tyingrun.run import build_parts, execute

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    folder = process_run_folder()
    if hydra_cfg.mode == RunMode.MULTIRUN and is_main_process():
        folder.hold(out_dir, "job folder")
        if hydra_cfg.launcher._target_.endswith("BasicLauncher"):
            folder.sweep_job = (Path(hydra_cfg.sweep.dir), hydra_cfg.job.num)
    folder.path = out_dir
    try:
        reject_unknown_keys(cfg)
        parts = build_parts(OmegaConf.to_object(cfg), out_dir)
        folder.begin_training()
        summary = execute(parts)
    except Exception as err:
        message, exit_code = describe_failure(err)
        if folder.restorable:
            # A resume or an overwrite that failed before training leaves its folder as it was.
            log.error(message)
            folder.restore()
            fail(message, exit_code)
        log.error(message, exc_info=exit_code != EXIT_BAD_INPUT)
        if is_main_process():  # rank 0 owns the folder: another rank's status could land before rank 0 claims it
            write_status(out_dir, "failed", error=message, exit_code=exit_code)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # The sweep goes on; tyingrun.sweep names every failed job once all have returned.
            print(f"tyingrun: job {out_dir} failed: {message}", flush=True)
            return math.nan
        fail(message, exit_code)
    if is_main_process():
        write_status(out_dir, "completed")
    return summary["val_loss"]


PARSER = OverridesParser.create()


def parsed(arg: str) -> Optional[Any]:
    """Hydra's reading of one override (quotes and all), or None when Hydra cannot parse it (it says why later)."""
    try:
        return PARSER.parse_overrides([arg])[0]
    except Exception:  # noqa: BLE001 - Hydra reports its own parse errors when it composes
        return None


def override_key(arg: str) -> str:
    found = parsed(arg)
    return found.key_or_group if found is not None else arg.split("=", 1)[0].lstrip("+~")


def override_value(argv: List[str], key: str) -> Optional[str]:
    """The value the last override of ``key`` in ``argv`` gives (None when none does, or it gives null)."""
    given = None
    for arg in argv:
        if override_key(arg) == key:
            found = parsed(arg)
            given = str(found.value()) if found is not None else arg.split("=", 1)[1]
    return None if given in ("null", "None") else given


def hydra_path(path: Any) -> str:
    return hydra_value(str(path))


def with_resume_arguments(argv: List[str]) -> List[str]:
    """``train.resume=DIR`` continues DIR's run: its own overrides come first, then the new ones, in DIR.

    Only RESUMABLE_KEYS may differ from the run's own config: anything else would change what the run is while
    its checkpoint goes on, so it is refused naming the key and the run's value."""
    given = override_value(argv, "train.resume")
    if given is None:
        return argv
    folder = Path(given).expanduser()
    try:
        saved = folder / OVERRIDES_FILE
        if not saved.is_file():
            return argv
        earlier = [arg for arg in OmegaConf.load(saved) if not arg.lstrip("+").startswith(("train.resume=", "hydra."))]
        refuse_changes(folder, argv)
    except OSError as err:
        fail(f"train.resume={given} cannot be read: {err.strerror or err}")
    except OmegaConfBaseException as err:
        fail(f"train.resume={given}: {saved} is damaged ({str(err).splitlines()[0]})")
    new = [arg for arg in argv if override_key(arg) != "train.resume"]
    run_dir = [] if any(arg.startswith("hydra.run.dir=") for arg in argv) else [f"hydra.run.dir={hydra_path(folder)}"]
    return [*earlier, *new, f"train.resume={hydra_path(folder)}", *run_dir]


def refuse_changes(folder: Path, argv: List[str]) -> None:
    """Exit 2 for the first override that would change what the resumed run is."""
    saved = OmegaConf.load(folder / CONFIG_FILE)
    hydra_file = folder / ".hydra" / "hydra.yaml"
    choices = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices") if hydra_file.is_file() else None
    for arg in argv:
        found = parsed(arg)
        if found is None:
            continue
        key = found.key_or_group
        if key.startswith("hydra") or key in RESUMABLE_KEYS or key.split(".")[0] in RESUMABLE_SECTIONS:
            continue
        value = None if found.is_delete() else found.value()
        if "." not in key:  # a config group: model=..., policy=...
            before = OmegaConf.select(choices, key) if choices is not None else None
            before = before if before is not None else OmegaConf.select(saved, f"{key}.name")
        else:
            before = OmegaConf.select(saved, key, throw_on_missing=False)
            before = OmegaConf.to_container(before) if OmegaConf.is_config(before) else before
        if value == before:
            continue
        shown = "null" if before is None else before
        fail(f"train.resume continues the run as it was: {key} cannot change (the run has {key}={shown}); "
             f"a resume may change only {', '.join(k for k in RESUMABLE_KEYS if k != 'train.resume')} and "
             f"{', '.join(f'{section}.*' for section in RESUMABLE_SECTIONS)} - start a new run to change {key}")


def with_rank_arguments(argv: List[str]) -> List[str]:
    """Under torchrun every rank composes the config: all must write into rank 0's run folder, and only
    rank 0 writes Hydra's files and the run log."""
    if not launched_by_torchrun():
        return argv
    import torch

    from tyingrun.train.distributed import broadcast_object, init_from_env

    mesh = init_from_env()
    device = torch.device("cuda", mesh.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    given = any(arg.startswith("hydra.run.dir=") for arg in argv)
    rank0_dir = time.strftime("outputs/runs/%Y-%m-%d/%H-%M-%S-ddp")
    run_dir = [] if given else [f"hydra.run.dir={broadcast_object(rank0_dir, device)}"]
    quiet = [] if mesh.is_main else ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return [*argv, *run_dir, *quiet]


def stop_at_once(signum: int, frame: Any) -> None:
    """A stop signal outside the training loop, or a second one in it: one line, the folder put back when nothing
    trained yet, and exit 128 + signal at once. All of it happens in the handler: an exception raised from a
    handler surfaces wherever the interpreter is, and inside a finalizer (``__del__``, a weakref callback) it is
    swallowed, which let a stopped run go on to the end."""
    folder = process_run_folder()
    if folder.training and any((folder.at / CHECKPOINTS_DIR).glob("step_*")):
        where = f"at once during training; the newest checkpoint is kept, resume with: {resume_command(folder.at)}"
        if is_main_process():
            write_status(folder.at, "stopped", error=f"stopped by {signal.Signals(signum).name} at once",
                         exit_code=128 + signum, resume=resume_command(folder.at))
    elif folder.training:
        where = "at once, before the run's first checkpoint; start it again"
    else:
        folder.restore()
        where = "during start-up; nothing was saved yet"
    lines = [f"tyingrun: stopped by {signal.Signals(signum).name} {where}", *unstarted_jobs()]
    os.write(sys.stderr.fileno(), ("\n".join(lines) + "\n").encode())
    os._exit(128 + signum)


def main() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop_at_once)
    try:
        # Let exceptions reach us instead of Hydra's multi-line report, so each becomes one line.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        sys.argv = [sys.argv[0], *with_rank_arguments(with_resume_arguments(sys.argv[1:]))]
        register_configs()
        try:
            _hydra_main()
        except CONFIG_ERRORS as err:
            fail(explain(err))
        except OmegaConfBaseException as err:
            fail(describe_failure(err)[0])
        except OSError as err:
            fail(f"cannot write the run folder: {' '.join(str(err).split())}")
        finally:
            if launched_by_torchrun():  # only torchrun's processes join a process group
                from tyingrun.train.distributed import leave_process_group

                leave_process_group()
    except SystemExit as stop:
        if isinstance(stop.code, int) and stop.code > 128:  # a run that checkpointed after a stop signal
            for line in unstarted_jobs():
                sys.stderr.write(line + "\n")
        raise


def unstarted_jobs() -> List[str]:
    """After a stop signal in a job of an in-process sweep: the line naming the jobs that will not start."""
    sweep_job = process_run_folder().sweep_job
    line = unstarted_notice(*sweep_job) if sweep_job is not None else None
    return [line] if line else []


def resume_command(folder: Path) -> str:
    from tyingrun.run import resume_command as command

    return command(folder)


def report_main(argv: Optional[List[str]] = None) -> None:
    """``tyingrun-report PATH [PATH ...] [--out DIR] [--reference POLICY] [--pair-other-budgets]``."""
    parser = argparse.ArgumentParser(
        prog="tyingrun-report",
        description="Tables (report.md, report.csv) and PNG figures from tyingrun run folders; runs that differ "
                    "only in train.seed are one group (mean and 95% t-interval over seeds), compared seed by seed "
                    "with the reference policy's group.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or folders that contain them (sweeps)")
    parser.add_argument("--out", type=Path, help="where to write the report (default: the first PATH)")
    parser.add_argument("--reference", default="none", metavar="POLICY",
                        help="policy.name of the group every other group of its model and dataset is compared with, "
                             "on the seeds both ran (default: none)")
    parser.add_argument("--pair-other-budgets", action="store_true",
                        help="pair a group with a reference of another budget (train.max_steps, train.batch_size, "
                             "dataset.block_size), which is refused otherwise")
    args = parser.parse_args(argv)
    from tyingrun.report import write_report

    try:
        write_report(args.paths, args.out, reference=args.reference, pair_other_budgets=args.pair_other_budgets)
    except BadInput as err:
        fail(str(err), program="tyingrun-report")
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        fail(f"cannot write the report{where}: {err.strerror or err}; give a writable --out folder",
             program="tyingrun-report")


if __name__ == "__main__":
    main()
