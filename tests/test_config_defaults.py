"""Each default has one owner: the dataclass schemas. A preset under conf/ states only what differs from them."""

from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tyingrun.config import SECTION_SCHEMAS

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.mark.parametrize("group", ["model", "dataset", "policy", "hardware"])
def test_presets_state_only_what_differs_from_the_schema(group):
    schema = SECTION_SCHEMAS[group]
    defaults = {f.name: getattr(schema(), f.name) for f in fields(schema)}
    presets = sorted((CONF / group).glob("*.yaml"))
    assert presets
    for preset in presets:
        values = OmegaConf.to_container(OmegaConf.load(preset))
        repeated = {key: value for key, value in values.items() if key != "name" and defaults[key] == value}
        assert not repeated, f"{preset.name} repeats the schema's defaults {repeated}"


def _defaults_of(section, option=None):
    """What a section holds before an experiment speaks: the schema's defaults, then the chosen preset's values."""
    schema = SECTION_SCHEMAS[section]
    values = {f.name: getattr(schema(), f.name) for f in fields(schema)}
    if option is not None:
        values.update(OmegaConf.to_container(OmegaConf.load(CONF / section / f"{option}.yaml")))
    return values


def test_experiments_state_only_what_differs_from_the_presets_they_pick():
    primary = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))
    picked = {key: option for entry in primary["defaults"] if isinstance(entry, dict)
              for key, option in entry.items() if key in SECTION_SCHEMAS}
    experiments = sorted((CONF / "experiment").glob("*.yaml"))
    assert experiments
    for experiment in experiments:
        values = OmegaConf.to_container(OmegaConf.load(experiment))
        choices = dict(picked)
        for entry in values.pop("defaults", []):
            choices.update({key.removeprefix("override /"): option for key, option in entry.items()})
        repeated = {f"{section}.{key}": value
                    for section, keys in values.items() if section in SECTION_SCHEMAS
                    for key, value in keys.items() if _defaults_of(section, choices.get(section))[key] == value}
        assert not repeated, f"{experiment.name} repeats what its presets and the schema already set: {repeated}"
