"""``status.json``: how a run ended - "completed"; "failed" with its one-line error and exit status; or "stopped"
by a signal, with its exit status and the command that resumes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from tyingrun.files import STATUS_FILE, read_json, write_json_atomic

# Set by tyingrun-launch for its ranks: the command that starts the run again (``tyingrun`` when unset).
LAUNCH_COMMAND_ENV = "TYINGRUN_LAUNCH_COMMAND"


def write_status(run_dir: Path, status: str, **details: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / STATUS_FILE, {"status": status, **details})


def read_status(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / STATUS_FILE
    return read_json(path) if path.is_file() else None
