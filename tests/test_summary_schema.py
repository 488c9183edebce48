"""summary.json against its typed schema (tyingrun/summary.py): a real run writes exactly the typed keys, each of
its type, and docs/run-folder.md documents every key in a table row of its own."""

import json
import re
import types
import typing
from dataclasses import replace
from pathlib import Path

import pytest

from tyingrun.config import PolicyConfig
from tyingrun.files import SUMMARY_FILE
from tyingrun.report.tables import AVERAGED
from tyingrun.summary import REQUIRED_KEYS, SUMMARY_KEYS, Summary

from .helpers import run_folder, small_lm_config

DOCS = Path(__file__).resolve().parent.parent / "docs" / "run-folder.md"
# What the report adds to a run's summary from its other files (report/rewards.py, from maps.jsonl).
REPORT_ADDED = {"separable_layers"}


def fits(value, annotation) -> bool:
    """Whether a JSON value read back has the type ``annotation`` (a float may be written as an integer)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(key, str) for key in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def test_fits_tells_the_types_apart():
    assert fits(3, int) and not fits(True, int) and not fits(3.5, int) and fits(3, float)
    assert fits([1, 2], typing.List[int]) and not fits([1, "2"], typing.List[int]) and not fits(None, float)
    assert fits(None, typing.Optional[float]) and fits({"a": 1}, typing.Dict[str, typing.Any])


@pytest.fixture(scope="module")
def dynamic_q_summary(tmp_path_factory, data_cache):
    """summary.json of a short dynamic_q run: every key but those of other tasks and of policy=recursive."""
    folder = tmp_path_factory.mktemp("dynamic-q-summary")
    cfg = small_lm_config(max_steps=4)
    cfg = replace(cfg, policy=PolicyConfig(name="dynamic_q", steps_per_decision=1))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TYINGRUN_CACHE", str(data_cache))
        returned = run_folder(cfg, folder)
    written = json.loads((folder / SUMMARY_FILE).read_text())
    return returned, written


@pytest.mark.slow
def test_a_run_writes_exactly_the_typed_keys_each_of_its_type(dynamic_q_summary):
    returned, written = dynamic_q_summary
    assert list(written) == list(returned)
    assert set(written) <= SUMMARY_KEYS, f"keys Summary does not type: {sorted(set(written) - SUMMARY_KEYS)}"
    assert REQUIRED_KEYS <= set(written), f"required keys missing: {sorted(REQUIRED_KEYS - set(written))}"
    # The optional keys of a GPT-2 run under dynamic_q: its task's, and every learned policy diagnostic.
    optional = set(written) - REQUIRED_KEYS
    assert optional == {"val_ppl", "test_ppl", "val_tokens", "test_tokens", "tokens_per_s", "decisions",
                        "final_epsilon", "clipped_reward_fraction", "q_spread_min", "q_spread_mean",
                        "greedy_fraction_last20", "greedy_map_stability"}
    hints = typing.get_type_hints(Summary)
    wrong = {key: value for key, value in written.items() if not fits(value, hints[key])}
    assert not wrong, f"values not of their Summary type: {wrong}"


def test_the_report_averages_only_summary_keys():
    assert set(AVERAGED) - REPORT_ADDED <= SUMMARY_KEYS


def test_every_summary_key_has_its_row_in_docs_run_folder():
    assert DOCS.is_file(), f"{DOCS} documents summary.json's keys; it is missing"
    rows = {match.group(1) for match in re.finditer(r"^\|\s*`([a-z0-9_]+)`", DOCS.read_text(), re.MULTILINE)}
    missing = sorted(SUMMARY_KEYS - rows)
    assert not missing, f"docs/run-folder.md has no table row starting with these summary keys: {missing}"
