"""The run folder a ``tyingrun`` process works in: its lock, the claim a new run or a resume makes on it, what
``train.overwrite=true`` may clear, and what a run that fails before training puts back.

A folder is a run folder when it holds a run's config and nothing but the names a run writes
(files.RUN_FOLDER_NAMES). ``train.overwrite=true`` clears only such a folder, and only one that no source of the
new run (``train.init_from``, ``policy.path``) lives in; the earlier run's files are first moved aside
(OVERWRITTEN_DIR) and deleted once the new run has read every source and built, so a run that fails before
training leaves every byte as it was.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from tyingrun.config import Config
from tyingrun.errors import BadInput, fail
from tyingrun.files import (
    CONFIG_FILE,
    LOCK_FILE,
    OVERRIDES_FILE,
    OVERWRITTEN_DIR,
    RUN_FOLDER_NAMES,
    STATUS_FILE,
    SUMMARY_FILE,
    FolderInUse,
    lock_folder,
)

# The files a failed resume must leave as they were (a log is cut back to its old length).
SNAPSHOT_FILES = (CONFIG_FILE, ".hydra/hydra.yaml", OVERRIDES_FILE, STATUS_FILE, SUMMARY_FILE)
SNAPSHOT_LOGS = ("run.log", "metrics.jsonl", "maps.jsonl")


def is_run_name(name: str) -> bool:
    """Whether a run writes ``name`` at the top of its folder (an atomic write's temporary file included)."""
    if name in RUN_FOLDER_NAMES:
        return True
    return name.endswith(".tmp") and any(name.startswith(f".{known}.") for known in RUN_FOLDER_NAMES)


def listed(names: List[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def lives_in(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (links resolved)."""
    path, folder = path.expanduser().resolve(), folder.resolve()
    return path == folder or folder in path.parents


@dataclass
class Snapshot:
    """What a resume may change before it trains: whole small files, and the lengths of the logs."""

    files: Dict[str, Optional[bytes]]
    log_sizes: Dict[str, Optional[int]]

    @classmethod
    def of(cls, folder: Path) -> Snapshot:
        files = {name: (folder / name).read_bytes() if (folder / name).is_file() else None for name in SNAPSHOT_FILES}
        sizes = {name: (folder / name).stat().st_size if (folder / name).is_file() else None for name in SNAPSHOT_LOGS}
        return cls(files, sizes)

    def restore(self, folder: Path) -> None:
        for name, content in self.files.items():
            path = folder / name
            if content is None:
                path.unlink(missing_ok=True)
            elif not path.is_file() or path.read_bytes() != content:
                path.write_bytes(content)
        for name, size in self.log_sizes.items():
            path = folder / name
            if size is None:
                path.unlink(missing_ok=True)
            elif path.is_file() and path.stat().st_size > size:
                os.truncate(path, size)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@dataclass
class RunFolder:
    """This process's run folder. ``path`` is known to every rank; rank 0 alone holds the lock and claims it.

    Until ``begin_training`` the folder can be put back as it was (``restore``): the snapshot a resume took, or
    the earlier run's files an overwrite moved aside. From then on the folder is the new run's own record.
    """

    path: Optional[Path] = None
    lock: Optional[int] = None
    snapshot: Optional[Snapshot] = None
    overwriting: bool = False
    training: bool = False
    # (sweep folder, job number) of a job that an in-process sweep runs, whose stop ends the sweep.
    sweep_job: Optional[Tuple[Path, int]] = None
    new_lock_file: bool = False  # the lock file did not exist before this process locked the folder

    def leave_refused(self) -> None:
        """A refused claim leaves no lock file in a folder that had none (a user's folder stays as it was)."""
        if self.lock is not None and self.new_lock_file:
            (self.at / LOCK_FILE).unlink(missing_ok=True)

    @property
    def at(self) -> Path:
        """The folder (once the run has named it)."""
        if self.path is None:
            raise RuntimeError("the run folder is not known yet")
        return self.path

    def hold(self, folder: Path, key: str) -> None:
        """Lock ``folder`` for this process (a sweep's next job lets the last one go); exit 2 naming the holder
        when another process has it, or when it cannot be a folder."""
        if self.lock is not None and self.path == folder:
            return
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None
        self.new_lock_file = not (folder / LOCK_FILE).exists()
        try:
            self.lock = lock_folder(folder)
        except FolderInUse as err:
            fail(f"{key}={folder}: {err}; wait for it to end, or give another folder")
        except OSError as err:
            fail(f"{key}={folder} cannot be a run folder: {err.strerror or err}; give a writable folder")
        self.path = folder

    def names(self) -> List[str]:
        """What the folder holds besides the lock."""
        try:
            return sorted(entry.name for entry in self.at.iterdir() if entry.name != LOCK_FILE)
        except OSError:
            return []

    def claim(self, cfg: Config, check_resume: Callable[[str, Path], object], resume_hint: str) -> None:
        """Rank 0, before Hydra writes anything, once the config has passed every check: a resume checks its
        checkpoint (``check_resume(train.resume, folder)``, after a snapshot); a new run refuses a folder holding
        anything, unless train.overwrite=true and the folder is a run folder that no source lives in, whose
        files are then moved aside. ``resume_hint``: the command that would resume the run found there."""
        found = self.names()
        if not found:
            return
        if cfg.train.resume:
            self.snapshot = Snapshot.of(self.at)
            check_resume(cfg.train.resume, self.at)
            return
        if OVERWRITTEN_DIR in found:
            raise BadInput(f"hydra.run.dir={self.path} holds {OVERWRITTEN_DIR}, an earlier run's files that an "
                           f"interrupted train.overwrite=true set aside; move them back or delete that folder")
        self.refuse_foreign(found)
        if not cfg.train.overwrite:
            raise BadInput(f"hydra.run.dir={self.path} already holds another run's files ({listed(found)}); resume "
                           f"it with {resume_hint}, give another folder, or add train.overwrite=true "
                           f"to clear it first")
        self.refuse_sources(cfg)
        self.set_aside(found)

    def refuse_foreign(self, found: List[str]) -> None:
        foreign = [name for name in found if not is_run_name(name)]
        if foreign:
            raise BadInput(f"hydra.run.dir={self.path} holds {listed(foreign)}, which no tyingrun run writes; a run "
                           f"goes into an empty folder (or train.overwrite=true into a run folder) - give another "
                           f"hydra.run.dir")
        if not (self.at / CONFIG_FILE).is_file():
            raise BadInput(f"hydra.run.dir={self.path} holds {listed(found)} but no {CONFIG_FILE}, so it is not a "
                           f"run's folder; give another hydra.run.dir")

    def refuse_sources(self, cfg: Config) -> None:
        for key, value in (("train.init_from", cfg.train.init_from), ("policy.path", cfg.policy.path)):
            if value and lives_in(Path(value), self.at):
                raise BadInput(f"train.overwrite=true would clear hydra.run.dir={self.path}, where {key}={value} "
                               f"lives; copy the source elsewhere first, or give another hydra.run.dir")

    def set_aside(self, found: List[str]) -> None:
        aside = self.at / OVERWRITTEN_DIR
        aside.mkdir(exist_ok=True)
        for name in found:
            os.replace(self.at / name, aside / name)
        self.overwriting = True

    def begin_training(self) -> None:
        """The run has read its sources and built: what an overwrite set aside is deleted, nothing is put back."""
        self.training = True
        if self.overwriting:
            shutil.rmtree(self.at / OVERWRITTEN_DIR, ignore_errors=True)
            self.overwriting = False

    @property
    def restorable(self) -> bool:
        return not self.training and (self.snapshot is not None or self.overwriting)

    def restore(self) -> None:
        """Put back what a run that failed before training changed: a resume's snapshot, or the files an
        overwrite moved aside (the new run's own are removed)."""
        if not self.restorable:
            return
        if self.snapshot is not None:
            self.snapshot.restore(self.at)
            return
        aside = self.at / OVERWRITTEN_DIR
        for name in self.names():
            if name != OVERWRITTEN_DIR:
                remove(self.at / name)
        for entry in aside.iterdir():
            os.replace(entry, self.at / entry.name)
        aside.rmdir()
        self.overwriting = False


@functools.cache
def process_run_folder() -> RunFolder:
    """The one RunFolder of this process: Hydra builds the callback that claims it from the config, so the
    callback, the job and the signal handler reach it here rather than through arguments."""
    return RunFolder()
