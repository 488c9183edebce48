"""Policies whose map is fixed for the whole run: none, Takase's patterns, and a map from an earlier run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from tyingrun.errors import BadInput
from tyingrun.policies.base import Decision, Policy
from tyingrun.tying import maps

FIXED_PATTERNS = {
    "none": lambda n_layer, n_sets: maps.identity(n_layer),
    "sequential": maps.sequential,
    "cyclic": maps.cyclic,
    "cycle_rev": maps.cycle_rev,
}


class FixedPolicy(Policy):
    def __init__(self, name: str, src: List[int]):
        self.name = name
        self.src = src

    def start(self, n_layer: int) -> Decision:
        maps.validate(self.src, n_layer)
        return Decision(maps.resolve(self.src), [True] * n_layer)


def _read_map(path: Path) -> list:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            raise BadInput(f"policy.path={path}: maps.jsonl has no rows; point it at a finished run's maps.jsonl")
        return rows[-1]["map"]
    return json.loads(path.read_text())["final_map"]


def map_from_file(path: Optional[str], n_layer: int) -> List[int]:
    """The last map of an earlier run's maps.jsonl, or the final_map of its summary.json."""
    if not path:
        raise BadInput("policy=from_file needs policy.path=<an earlier run's summary.json or maps.jsonl>")
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "summary.json"
    if not file.is_file():
        raise BadInput(f"policy.path={path}: no such file; give an earlier run's summary.json or maps.jsonl")
    try:
        src = _read_map(file)
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise BadInput(f"policy.path={path}: not a tyingrun summary.json or maps.jsonl ({err})") from None
    if not isinstance(src, list):
        raise BadInput(f"policy.path={path}: the saved map is not a list")
    try:
        maps.validate(src, n_layer)
    except BadInput as err:
        raise BadInput(f"policy.path={path}: {err}") from None
    return src
