"""``tyingrun`` (the Hydra app) and ``tyingrun-report``. A run that fails ends in one line on stderr: exit 2 for
bad input, 1 for anything else (its traceback goes to the run's run.log)."""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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
    register_configs,
    reject_unknown_keys,
    unknown_key_message,
)
from tyingrun.errors import EXIT_BAD_INPUT, EXIT_FAILED, BadInput, fail
from tyingrun.files import CONFIG_FILE, NOT_RUN_FILES, OVERRIDES_FILE, FolderInUse, lock_folder
from tyingrun.overrides import hydra_value
from tyingrun.run_status import write_status
from tyingrun.sweep import unstarted_notice
from tyingrun.train.launch import launched_by_torchrun
from tyingrun.train.signals import StopNow

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


# What this process knows of its run folder: held (the lock's descriptor), the snapshot a failed resume restores,
# and whether training began (from then on the folder is the run's own record, never restored).
# "sweep_job": (sweep folder, job number) of a job that an in-process sweep runs, whose stop ends the sweep.
FOLDER: Dict[str, Any] = {"dir": None, "lock": None, "snapshot": None, "training": False, "sweep_job": None}
# The files a failed resume must leave as they were (a log is cut back to its old length).
SNAPSHOT_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", OVERRIDES_FILE, "status.json", "summary.json")
SNAPSHOT_LOGS = ("run.log", "metrics.jsonl", "maps.jsonl")


def take_snapshot(folder: Path) -> Dict[str, Any]:
    files = {name: (folder / name).read_bytes() if (folder / name).is_file() else None for name in SNAPSHOT_FILES}
    logs = {name: (folder / name).stat().st_size if (folder / name).is_file() else None for name in SNAPSHOT_LOGS}
    return {"files": files, "logs": logs}


def restore_snapshot() -> None:
    """Put back what a resume that failed before training changed (Hydra's files, status, the log)."""
    folder, snapshot = FOLDER["dir"], FOLDER["snapshot"]
    if folder is None or snapshot is None or FOLDER["training"]:
        return
    for name, content in snapshot["files"].items():
        path = folder / name
        if content is None:
            path.unlink(missing_ok=True)
        elif not path.is_file() or path.read_bytes() != content:
            path.write_bytes(content)
    for name, size in snapshot["logs"].items():
        path = folder / name
        if size is None:
            path.unlink(missing_ok=True)
        elif path.is_file() and path.stat().st_size > size:
            os.truncate(path, size)


def task_config(config: DictConfig) -> DictConfig:
    """The run's config without Hydra's own node."""
    task = copy.deepcopy(config)
    with open_dict(task):
        task.pop("hydra", None)
    return task


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def hold_folder(folder: Path, key: str) -> None:
    """Lock ``folder`` for this process (once); exit 2 naming the holder when another process has it."""
    if FOLDER["lock"] is not None:
        return
    try:
        FOLDER["lock"] = lock_folder(folder)
    except FolderInUse as err:
        fail(f"{key}={folder}: {err}; wait for it to end, or give another folder")
    except OSError as err:
        fail(f"{key}={folder} cannot be a run folder: {err.strerror or err}; give a writable folder")
    FOLDER["dir"] = folder


def holds_run_files(folder: Path) -> List[str]:
    try:
        return sorted(path.name for path in folder.iterdir() if path.name not in NOT_RUN_FILES)
    except OSError:
        return []


def claim_run_folder(config: DictConfig) -> None:
    """Before Hydra writes anything: lock the run folder, then check the config and the folder - a new run
    refuses a folder holding another run's files (unless train.overwrite=true, which clears it once every check
    has passed), a resume checks its checkpoint - so a refused run leaves the folder exactly as it was."""
    from tyingrun.run import check_config, resume_point

    if not is_main_process():
        return
    folder = Path(str(config.hydra.run.dir)).expanduser()
    hold_folder(folder, "hydra.run.dir")
    train = config.train
    found = holds_run_files(folder)
    if not found:
        return
    try:
        task = task_config(config)
        reject_unknown_keys(task)
        cfg = OmegaConf.to_object(task)
        check_config(cfg)
        if train.resume:
            FOLDER["snapshot"] = take_snapshot(folder)
            resume_point(train.resume, folder)
            return
    except Exception as err:  # noqa: BLE001 - every failure here is one line, and the folder is untouched
        fail(*describe_failure(err))
    if not train.overwrite:
        fail(f"hydra.run.dir={folder} already holds another run's files ({', '.join(found[:3])}"
             f"{', ...' if len(found) > 3 else ''}); resume it with {resume_argument(folder)}, give another folder, "
             f"or add train.overwrite=true to clear it first")
    for name in found:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class RunFolderCallback(Callback):
    """Configured under ``hydra.callbacks`` in conf/config.yaml: runs before Hydra's job writes its files."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            claim_run_folder(config)
        except (OSError, OmegaConfBaseException) as err:
            fail(f"hydra.run.dir cannot be used: {' '.join(str(err).split())}")


@hydra.main(version_base="1.3", config_path="pkg://tyingrun.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from tyingrun.run import build_parts, execute

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN and is_main_process():
        FOLDER["lock"] = None
        hold_folder(out_dir, "job folder")
        if hydra_cfg.launcher._target_.endswith("BasicLauncher"):
            FOLDER["sweep_job"] = (Path(hydra_cfg.sweep.dir), hydra_cfg.job.num)
    try:
        reject_unknown_keys(cfg)
        parts = build_parts(OmegaConf.to_object(cfg), out_dir)
        FOLDER["training"] = True
        summary = execute(parts)
    except Exception as err:
        message, exit_code = describe_failure(err)
        if FOLDER["snapshot"] is not None and not FOLDER["training"]:
            # A resume that failed before training leaves its folder as it was.
            log.error(message)
            restore_snapshot()
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


def hydra_path(path: Any) -> str:
    return hydra_value(str(path))


def with_resume_arguments(argv: List[str]) -> List[str]:
    """``train.resume=DIR`` continues DIR's run: its own overrides come first, then the new ones, in DIR.

    Only RESUMABLE_KEYS may differ from the run's own config: anything else would change what the run is while
    its checkpoint goes on, so it is refused naming the key and the run's value."""
    given = []
    for arg in argv:
        if override_key(arg) == "train.resume":
            found = parsed(arg)
            given.append(str(found.value()) if found is not None else arg.split("=", 1)[1])
    if not given or given[-1] in ("null", "None"):
        return argv
    folder = Path(given[-1]).expanduser()
    try:
        saved = folder / OVERRIDES_FILE
        if not saved.is_file():
            return argv
        earlier = [arg for arg in OmegaConf.load(saved) if not arg.lstrip("+").startswith(("train.resume=", "hydra."))]
        refuse_changes(folder, argv)
    except OSError as err:
        fail(f"train.resume={given[-1]} cannot be read: {err.strerror or err}")
    except OmegaConfBaseException as err:
        fail(f"train.resume={given[-1]}: {saved} is damaged ({str(err).splitlines()[0]})")
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


def _stop_now(signum, frame):
    raise StopNow(signum)


def main() -> None:
    # A stop signal before (or after) the training loop ends the process at once with one line, 128 + signal.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_now)
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
            announce_unstarted_jobs()
        raise
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        if FOLDER["training"]:
            where = (f"at once (a second stop signal) during training; the newest checkpoint is kept, resume with: "
                     f"tyingrun {resume_argument(FOLDER['dir'])}")
        else:
            restore_snapshot()
            where = "during start-up; nothing was saved yet"
        sys.stderr.write(f"tyingrun: stopped by {name} {where}\n")
        announce_unstarted_jobs()
        sys.stderr.flush()
        os._exit(128 + signum)


def announce_unstarted_jobs() -> None:
    """After a stop signal in a job of an in-process sweep: name the jobs that will not start."""
    if FOLDER["sweep_job"] is not None:
        line = unstarted_notice(*FOLDER["sweep_job"])
        if line:
            sys.stderr.write(line + "\n")


def resume_argument(folder: Optional[Path]) -> str:
    from tyingrun.run import resume_argument as argument

    return argument(folder) if folder is not None else "train.resume=<run folder>"


def report_main(argv: Optional[List[str]] = None) -> None:
    """``tyingrun-report PATH [PATH ...] [--out DIR] [--reference POLICY]``."""
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
    args = parser.parse_args(argv)
    from tyingrun.report import write_report

    try:
        write_report(args.paths, args.out, reference=args.reference)
    except BadInput as err:
        fail(str(err), program="tyingrun-report")
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        fail(f"cannot write the report{where}: {err.strerror or err}; give a writable --out folder",
             program="tyingrun-report")


if __name__ == "__main__":
    main()
