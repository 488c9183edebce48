"""tyingrun.overrides.hydra_value: whatever the string, Hydra's own override parser reads back exactly it."""

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from tyingrun.overrides import hydra_value

TEXTS = [
    "/runs/01_dynamic_q/0/summary.json", "relative/run", "~/runs/a", "a~b",
    "C:\\runs\\a", "ends in a backslash\\", "two\\\\backslashes", "\\'", "\\\\'", "'",
    "it's", 'say "hi"', "'quoted'", "a b", " leading and trailing ", "",
    "données/été", "日本語/ラン", "key=value", "a,b,c", "[0,1]", "{a: 1}", "(x)", "a b,c=[d]",
    "null", "true", "False", "1e3", "42", "-7", "inf", "nan",
]


@pytest.mark.parametrize("text", TEXTS)
def test_hydra_reads_back_the_string(text):
    override = OverridesParser.create().parse_override(f"train.resume={hydra_value(text)}")
    assert not override.is_sweep_override()
    assert override.value() == text


def test_plain_paths_stay_unquoted_and_the_rest_is_single_quoted():
    assert hydra_value("/runs/01_dynamic_q/0/summary.json") == "/runs/01_dynamic_q/0/summary.json"
    assert hydra_value("/a b/it's") == "'/a b/it\\'s'"
    assert hydra_value("C:\\runs\\a") == "'C:\\runs\\a'"  # a backslash before a letter is kept as it is
    assert hydra_value("a\\") == "'a\\\\'"
    assert hydra_value("1e3") == "'1e3'"  # unquoted, Hydra would read the float 1000.0
