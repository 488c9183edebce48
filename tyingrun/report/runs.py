"""Find run folders, group the finished ones that differ only in their seed, pick reference groups."""

from __future__ import annotations

import functools
import json
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from omegaconf import OmegaConf

from tyingrun.config import SECTION_SCHEMAS
from tyingrun.errors import BadInput
from tyingrun.files import ARMS_FILE, CONFIG_FILE, MAPS_FILE, SUMMARY_FILE, read_json, read_jsonl
from tyingrun.report.rewards import reward_separation
from tyingrun.run_status import read_status
from tyingrun.summary import NUMBER_KEYS

# Keys that do not change what a run measures: runs differing only in these are seeds of one group.
IGNORED_PREFIXES = ("train.seed", "log.", "hydra.")
# Shown in their own table columns, so never repeated in a group's label.
COLUMN_KEYS = ("model.name", "dataset.name", "policy.name")
# Quality metric kinds, as the suffix of summary keys: language models report perplexity, ViT accuracy.
QUALITY_KINDS = ("ppl", "acc")


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
        return f"no {SUMMARY_FILE}: still running, or stopped before it finished"

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("train.seed"))


@dataclass
class Group:
    runs: List[Run]
    label: str = ""
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        policy = self.settings["policy.name"]
        return f"{policy} {self.label}" if self.label else policy

    @property
    def family(self) -> Tuple[str, str]:
        """(model, dataset): the groups that can be compared with each other."""
        return self.settings["model.name"], self.settings["dataset.name"]

    def values_by_seed(self, key: str) -> Dict[Any, float]:
        """``key`` of each seed's summary; runs repeating a seed are averaged so each seed counts once."""
        values = defaultdict(list)
        for run in self.runs:
            if run.summary.get(key) is not None:
                values[run.seed].append(run.summary[key])
        return {seed: statistics.fmean(found) for seed, found in values.items()}


def quality_kind(runs: Sequence[Run]) -> Optional[str]:
    """The quality metric the runs' summaries report: "ppl" or "acc"; None if neither."""
    for kind in QUALITY_KINDS:
        if any(f"val_{kind}" in run.summary or f"test_{kind}" in run.summary for run in runs):
            return kind
    return None


def headline_metric(runs: Sequence[Run], kind: str) -> str:
    """``test_<kind>`` where every run has it, else ``val_<kind>`` (summaries written before the test split)."""
    test = f"test_{kind}"
    return test if all(run.summary.get(test) is not None for run in runs) else f"val_{kind}"


def reference_groups(groups: Sequence[Group], policy: str) -> Dict[Tuple[str, str], Group]:
    """Per (model, dataset), the group of ``policy`` that the others are compared with.

    Among several: the one without a label (its settings are the most common), then the one with the most layers.
    """
    candidates: Dict[Tuple[str, str], List[Group]] = defaultdict(list)
    for group in groups:
        if group.settings["policy.name"] == policy:
            candidates[group.family].append(group)
    return {family: min(found, key=lambda g: (g.label != "", -g.settings["model.n_layer"]))
            for family, found in candidates.items()}


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


@functools.cache
def schema_defaults() -> Dict[str, Any]:
    """Every config key of this tyingrun with its schema default, flattened (built once; callers copy it)."""
    return flatten({section: OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)
                    for section, schema in SECTION_SCHEMAS.items()})


def with_schema_defaults(config: Dict[str, Any]) -> Dict[str, Any]:
    """``config`` (flattened) with each key that this tyingrun added after the run was written set to its default:
    every new key defaults to the behaviour from before it existed, so an older run and a newer one that differ only
    in such a key are runs of the same settings."""
    return {**schema_defaults(), **config}


# Each arm of an ablation_arms.json: its fields and their types (``note`` may be null).
ARM_FIELDS: Dict[str, Union[type, Tuple[type, ...]]] = {"arm": str, "folder": str, "overrides": list,
                                                         "note": (str, type(None))}


def read_arms(root: Path) -> Optional[List[Dict[str, Any]]]:
    """The arms in ``root``'s ablation_arms.json (``arm``, ``folder``, ``overrides``, ``note``); None without it."""
    path = root / ARMS_FILE
    if not path.is_file():
        return None
    try:
        arms = read_json(path)["arms"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise BadInput(f"{path}: not an ablation arms file ({{\"arms\": [...]}}): {err}") from err
    if not isinstance(arms, list):
        raise BadInput(f"{path}: \"arms\" is a {type(arms).__name__}, not a list of arms")
    for index, arm in enumerate(arms):
        problem = _arm_problem(arm)
        if problem:
            raise BadInput(f"{path}: arm {index} {problem}; each arm is {{\"arm\": str, \"folder\": str, "
                           f"\"overrides\": [str, ...], \"note\": str}} - repair the file (make ablations writes it)")
    return arms


def _arm_problem(arm: Any) -> Optional[str]:
    if not isinstance(arm, dict):
        return f"is a {type(arm).__name__}, not an object"
    for key, kind in ARM_FIELDS.items():
        if key not in arm and key != "note":
            return f"has no {key!r}"
        value = arm.get(key)
        if not isinstance(value, kind):
            return f"has {key!r} of type {type(value).__name__}"
    if not all(isinstance(item, str) for item in arm["overrides"]):
        return "has 'overrides' items that are not strings"
    return None


# What a run spends: a group and its reference that differ in these are not paired unless asked
# (tyingrun-report --pair-other-budgets): their Δ would measure the budget as well as the policy.
BUDGET_KEYS = ("train.max_steps", "train.batch_size", "dataset.block_size")


def reference_differences(group: Group, reference: Group) -> Dict[str, Any]:
    """Every key outside the policy (policy.* is what is compared) whose value separates ``group`` from
    ``reference``: the key and the group's value."""
    return {key: value for key, value in group.settings.items()
            if not key.startswith("policy.") and key in reference.settings and reference.settings[key] != value}


def check_budgets(groups: Sequence[Group], references: Dict[Tuple[str, str], Group], allow: bool) -> None:
    """BadInput naming the first group whose budget (BUDGET_KEYS) differs from its reference's, unless ``allow``."""
    for group in groups:
        reference = references.get(group.family)
        if allow or reference is None or reference is group:
            continue
        budget = [key for key in reference_differences(group, reference) if key in BUDGET_KEYS]
        if budget:
            what = ", ".join(f"{key}={show_value(group.settings[key])} against {show_value(reference.settings[key])}"
                             for key in budget)
            raise BadInput(f"group '{group.name}' has another budget than its reference '{reference.name}' ({what}), "
                           f"so its Δ would measure the budget too; report runs of one budget together, or pass "
                           f"--pair-other-budgets to pair them anyway")


# A summary number beyond this is not a measurement (and would overflow the statistics).
LARGEST_NUMBER = 1e100


def load_run(path: Path) -> Run:
    """The run in ``path``, its summary with the reward separation its maps.jsonl shows (report/rewards.py); a folder
    whose files do not read back is a run that did not finish, with the reason."""
    try:
        config = OmegaConf.to_container(OmegaConf.load(path / CONFIG_FILE), resolve=False)
        if not isinstance(config, dict):
            raise ValueError(f"{CONFIG_FILE} is not a mapping")
        config = with_schema_defaults(flatten(config))
    except Exception as err:  # noqa: BLE001 - a damaged folder is reported, not fatal
        return damaged(path, {}, f"{CONFIG_FILE} does not read back ({_first_line(err)})")
    try:
        status = read_status(path)
        if status is not None and not isinstance(status, dict):
            raise ValueError("status.json is not a JSON object")
        summary_path = path / SUMMARY_FILE
        summary = read_json(summary_path) if summary_path.is_file() else None
        if summary is not None:
            check_summary(summary)
            if (path / MAPS_FILE).is_file():
                summary = {**summary, **reward_separation(read_jsonl(path / MAPS_FILE), config["model.n_layer"])}
    except Exception as err:  # noqa: BLE001
        return damaged(path, config, _first_line(err))
    return Run(path, config, summary, status)


def damaged(path: Path, config: Dict[str, Any], why: str) -> Run:
    return Run(path, config, None, {"status": "failed", "error": f"damaged run folder: {why}"})


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:200]


def check_summary(summary: Any) -> None:
    """ValueError unless ``summary`` is an object with a numeric val_loss and finite, bounded numbers where
    tyingrun.summary types numbers."""
    if not isinstance(summary, dict):
        raise ValueError(f"{SUMMARY_FILE} is not a JSON object")
    if not _is_number(summary.get("val_loss")):
        raise ValueError(f"{SUMMARY_FILE} has no numeric val_loss")
    for key, value in summary.items():
        if isinstance(value, float) and not (abs(value) <= LARGEST_NUMBER):
            raise ValueError(f"{SUMMARY_FILE}: {key}={value} is not a measurement")
        if key in NUMBER_KEYS and value is not None and not _is_number(value):
            raise ValueError(f"{SUMMARY_FILE}: {key}={value!r} is not a number")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= LARGEST_NUMBER


def find_runs(paths: Sequence[Path]) -> List[Run]:
    """Every folder under ``paths`` (or one of them itself) holding a Hydra-resolved .hydra/config.yaml."""
    folders: Dict[Path, None] = {}
    for root in paths:
        if not root.is_dir():
            raise BadInput(f"{root}: no such folder; give run folders or folders that contain them")
        for config in sorted(root.rglob(CONFIG_FILE), key=_natural_key):
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
                parts.append(f"{key}={show_value(value)}")
        result.append(" ".join(parts))
    return result


def show_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return "[" + ",".join(show_value(v) for v in value) + "]"
    return str(value)
