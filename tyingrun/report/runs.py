"""Find run folders and group the finished ones that differ only in their seed."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from tyingrun.errors import BadInput
from tyingrun.run_status import read_status

# Keys that do not change what a run measures: runs differing only in these are seeds of one group.
IGNORED_PREFIXES = ("train.seed", "log.", "hydra.")
# Shown in their own table columns, so never repeated in a group's label.
COLUMN_KEYS = ("model.name", "dataset.name", "policy.name")


@dataclass
class Run:
    path: Path
    config: Dict[str, Any]
    summary: Optional[Dict[str, Any]]
    status: Optional[Dict[str, Any]]

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def problem(self) -> str:
        """Why a run that did not finish has no summary."""
        if self.status and self.status.get("status") == "failed":
            return self.status["error"]
        return "no summary.json: still running, or stopped before it finished"


@dataclass
class Group:
    runs: List[Run]
    label: str = ""
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        policy = self.settings["policy.name"]
        return f"{policy} {self.label}" if self.label else policy


def _natural_key(path: Path) -> List[Any]:
    # Job folders 0, 1, ..., 10 sort as numbers, not as text.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become tuples so values can be compared and hashed."""
    if isinstance(node, dict):
        flat: Dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tuple(node) if isinstance(node, list) else node}


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(path: Path) -> Run:
    config = OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"), resolve=False)
    return Run(path, flatten(config), _read_json(path / "summary.json"), read_status(path))


def find_runs(paths: Sequence[Path]) -> List[Run]:
    """Every folder under ``paths`` (or one of them itself) holding a Hydra-resolved .hydra/config.yaml."""
    folders: Dict[Path, None] = {}
    for root in paths:
        if not root.is_dir():
            raise BadInput(f"{root}: no such folder; give run folders or folders that contain them")
        for config in sorted(root.rglob(".hydra/config.yaml"), key=_natural_key):
            folders[config.parent.parent.resolve()] = None
    return [load_run(folder) for folder in folders]


def _settings(run: Run) -> Tuple[Tuple[str, Any], ...]:
    return tuple(sorted((k, v) for k, v in run.config.items() if not k.startswith(IGNORED_PREFIXES)))


def group_runs(runs: Iterable[Run]) -> List[Group]:
    """Finished runs grouped by their config minus seed and logging, in the order first seen, labelled."""
    groups: Dict[Tuple, Group] = {}
    for run in runs:
        if run.finished:
            key = _settings(run)
            groups.setdefault(key, Group([], settings=dict(key))).runs.append(run)
    result = list(groups.values())
    for group, label in zip(result, labels([g.settings for g in result]), strict=True):
        group.label = label
    return result


def labels(settings: List[Dict[str, Any]]) -> List[str]:
    """What sets each group apart from the groups of the same model, dataset and policy.

    A key is named where the group's value is not the most common one among those groups (on a tie,
    every group names it), e.g. ``policy.reward=neg_loss`` for the one dynamic_q group that changed it.
    """
    family = [tuple(s.get(k) for k in COLUMN_KEYS) for s in settings]
    result = []
    for own, own_family in zip(settings, family, strict=True):
        relatives = [s for s, f in zip(settings, family, strict=True) if f == own_family]
        parts = []
        for key, value in own.items():
            # A key only some configs have comes from a newer schema, not from a choice.
            if key in COLUMN_KEYS or any(key not in r for r in relatives):
                continue
            counts = Counter(r.get(key) for r in relatives)
            if len(counts) < 2:
                continue
            top = max(counts.values())
            if counts[value] < top or list(counts.values()).count(top) > 1:
                parts.append(f"{key}={_show(value)}")
        result.append(" ".join(parts))
    return result


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)
