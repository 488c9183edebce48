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
