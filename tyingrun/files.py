"""The files a run leaves, and how they are written and read: their names, atomic writes, JSON and JSONL, and
the folder lock.

Neutral and cheap: the data cache, the sinks, the checkpoints, the report and the sweep callback all use it; it
imports no torch and nothing of tyingrun. Weight files (tensors) are tyingrun.tying.weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List

# ---- what a run folder holds ----
SUMMARY_FILE = "summary.json"  # written when the run completes
METRICS_FILE = "metrics.jsonl"  # one row per log and per evaluation
MAPS_FILE = "maps.jsonl"  # one row per map change
CONVERSION_FILE = "conversion.json"  # policy=recursive: the conversion and its losses before training
STATUS_FILE = "status.json"  # how the run ended (tyingrun.run_status)
CONFIG_FILE = ".hydra/config.yaml"  # the resolved config Hydra saved: it marks a run folder
OVERRIDES_FILE = ".hydra/overrides.yaml"  # the command line's overrides, replayed by train.resume
RANKS_DIR = "ranks"  # under data parallelism, ranks/rank<r>_maps.jsonl of every other rank
CHECKPOINTS_DIR = "checkpoints"  # checkpoints/step_<N>/ (tyingrun.train.checkpoint)
# ---- what a checkpoint folder holds ----
WEIGHTS_FILE = "model.safetensors"  # each weight storage once (unique_weights)
STATE_FILE = "state.json"  # the rest of the training state, tensors referenced into STATE_TENSORS_FILE
STATE_TENSORS_FILE = "state.safetensors"
# ---- at the top of an ablation study's folder: which arm each numbered folder holds, and its overrides ----
ARMS_FILE = "ablation_arms.json"

LOCK_FILE = ".tyingrun.lock"  # held (flock) by the process that runs in the folder; holds its pid
RUN_LOG_FILE = "run.log"  # Hydra's job log (conf/hydra/job_logging/file_only.yaml)
WANDB_DIR = "wandb"  # log.wandb=true: wandb's own files, unless WANDB_DIR is set
# train.overwrite=true: the earlier run's files, held here until the new run has read its sources and built
# (put back if it fails before training, deleted once it trains).
OVERWRITTEN_DIR = ".tyingrun-overwritten"
# Every name a run writes at the top of its folder: a folder holding these and nothing else is a run folder.
RUN_FOLDER_NAMES = frozenset({
    SUMMARY_FILE, METRICS_FILE, MAPS_FILE, CONVERSION_FILE, STATUS_FILE, CONFIG_FILE.split("/")[0], RANKS_DIR,
    CHECKPOINTS_DIR, LOCK_FILE, RUN_LOG_FILE, WANDB_DIR, OVERWRITTEN_DIR,
})

# mkstemp's 0600 would hide results and shared caches from the other users of a machine.
FILE_MODE = 0o644


@contextmanager
def atomic_path(path: Path, make_parents: bool = False) -> Iterator[Path]:
    """Yield a temporary path (an empty file, mode 0644) in ``path``'s folder; rename it into place when the
    block ends without error, and remove it otherwise. Readers see no file or the old one, or the whole new one.

    A folder that cannot hold the temporary file (or, with ``make_parents``, be made) raises the plain OSError
    before anything is yielded; callers word it for their own settings.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb"):
            os.fchmod(fd, FILE_MODE)
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, so it is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(value) for value in obj]
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (no bare NaN or Infinity): non-finite numbers are written as null."""
    return json.dumps(finite_or_null(obj), allow_nan=False, **kwargs)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented strict JSON, written with atomic_path: readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(strict_json(obj, indent=2) + "\n", encoding="utf-8")


class FolderInUse(Exception):
    """Another process holds the folder's lock; ``pid`` is what it wrote into the lock file (None if unknown)."""

    def __init__(self, folder: Path, pid: Any):
        super().__init__(f"{folder} is in use by another tyingrun process (pid {pid or 'unknown'})")
        self.pid = pid


def lock_folder(folder: Path) -> int:
    """Hold an exclusive lock on ``folder`` (made as needed) for as long as the returned descriptor is open (the
    process's life); raise FolderInUse naming the holder's pid. OSError passes (an unwritable folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip()
        os.close(fd)
        raise FolderInUse(folder, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def read_json(path: Path) -> Any:
    """The JSON document at ``path``; FileNotFoundError, json.JSONDecodeError and UnicodeDecodeError pass."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def file_sha256(path: Path) -> str:
    """The SHA-256 of the bytes of ``path`` (hex), read in chunks: what the data cache and checkpoints record."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_jsonl(path: Path) -> List[Any]:
    """One JSON value per non-blank line of ``path`` (metrics.jsonl, maps.jsonl)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
