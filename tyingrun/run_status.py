"""``status.json``: how a run ended - "completed", or "failed" with its one-line error and exit status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from tyingrun.metrics.sinks import write_json_atomic

STATUS_FILE = "status.json"


def write_status(run_dir: Path, status: str, **details: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / STATUS_FILE, {"status": status, **details})


def read_status(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
