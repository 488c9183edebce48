"""Policies whose map is fixed for the whole run: none, Takase's patterns, and a map from an earlier run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from tyingrun.config import registry_of
from tyingrun.errors import BadInput
from tyingrun.files import MAPS_FILE, SUMMARY_FILE, read_json, read_jsonl
from tyingrun.policies.base import Decision, Policy
from tyingrun.tying import maps

FIXED_PATTERNS = {
    "none": lambda n_layer, n_sets: maps.identity(n_layer),
    "sequential": maps.sequential,
    "cyclic": maps.cyclic,
    "cycle_rev": maps.cycle_rev,
    "middle_cycle": maps.middle_cycle,
    "middle_sequence": maps.middle_sequence,
}

# policy=recursive's policy.pattern names.
RECURSIVE_PATTERNS = registry_of("policy.pattern", {
    "cycle": maps.cyclic,
    "sequence": maps.sequential,
    "middle_cycle": maps.middle_cycle,
    "middle_sequence": maps.middle_sequence,
})


class FixedPolicy(Policy):
    def __init__(self, name: str, src: List[int]):
        self.name = name
        self.src = src

    def start(self, n_layer: int) -> Decision:
        maps.validate(self.src, n_layer)
        return Decision(maps.resolve(self.src), [True] * n_layer)


def given_map(path: Optional[str], src: Optional[list], groups: Optional[list], n_layer: int) -> List[int]:
    """policy=from_file's map: from an earlier run's file (policy.path), inline (policy.map) or from groups of
    slots (policy.groups); exactly one of the three. Raises BadInput in one line, naming the key."""
    given = [key for key, value in (("path", path), ("map", src), ("groups", groups)) if value is not None]
    if len(given) > 1:
        raise BadInput(f"policy=from_file takes one of policy.path, policy.map or policy.groups, not "
                       f"{' and '.join('policy.' + key for key in given)}")
    if src is not None:
        if not isinstance(src, (list, tuple)):
            raise BadInput(f"policy.map={src!r} must be a list with one layer index per slot, e.g. [0,0,2,2]")
        try:
            maps.validate(list(src), n_layer)
        except BadInput as err:
            raise BadInput(f"policy.map: {err}") from None
        return list(src)
    if groups is not None:
        try:
            return maps.from_groups(groups, n_layer)
        except ValueError as err:
            raise BadInput(f"policy.groups={_plain(groups)}: {err}") from None
    return map_from_file(path, n_layer)


def _plain(value):
    """A list as typed (OmegaConf ListConfig prints its repr otherwise)."""
    try:
        return json.dumps(list(value), separators=(",", ":"))
    except (TypeError, ValueError):
        return repr(value)


def _read_map(path: Path) -> list:
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        if not rows:
            raise BadInput(f"policy.path={path}: {MAPS_FILE} has no rows; point it at a finished run's {MAPS_FILE}")
        return rows[-1]["map"]
    return read_json(path)["final_map"]


def map_from_file(path: Optional[str], n_layer: int) -> List[int]:
    """The last map of an earlier run's maps.jsonl, or the final_map of its summary.json."""
    if not path:
        raise BadInput(f"policy=from_file needs policy.path=<an earlier run's {SUMMARY_FILE} or {MAPS_FILE}>, "
                       f"policy.map=[...] (one layer index per slot) or policy.groups=[[...],...]")
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / SUMMARY_FILE
    if not file.is_file():
        raise BadInput(f"policy.path={path}: no such file; give an earlier run's {SUMMARY_FILE} or {MAPS_FILE}")
    try:
        src = _read_map(file)
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise BadInput(f"policy.path={path}: not a tyingrun {SUMMARY_FILE} or {MAPS_FILE} ({err})") from None
    if not isinstance(src, list):
        raise BadInput(f"policy.path={path}: the saved map is not a list")
    try:
        maps.validate(src, n_layer)
    except BadInput as err:
        raise BadInput(f"policy.path={path}: {err}") from None
    return src
