"""One owner for the values a key accepts: tyingrun.config.CHOICES; the registries keyed by them are built with
registry_of, which refuses a registry whose names drift from the schema's."""

import pytest

from tyingrun.config import CHOICES, registry_of
from tyingrun.data.text import WIKI2_VARIANTS
from tyingrun.policies.dynamic_q import REWARDS
from tyingrun.policies.fixed import RECURSIVE_PATTERNS
from tyingrun.train.recursive import INIT_SOURCES
from tyingrun.tying.stack import GRAD_MODES, SHARE_MODES


def test_the_registries_are_keyed_by_the_schema_choices():
    assert tuple(REWARDS) == CHOICES["policy.reward"]
    assert tuple(RECURSIVE_PATTERNS) == CHOICES["policy.pattern"]
    assert tuple(INIT_SOURCES) == CHOICES["policy.init"]
    assert tuple(WIKI2_VARIANTS) == CHOICES["dataset.variant"]
    assert GRAD_MODES == CHOICES["policy.grad"]
    assert SHARE_MODES == (*CHOICES["policy.share"], "matrices", "all_but_norms")


@pytest.mark.parametrize("registry", [{"raw": 1}, {"v1": 1, "raw": 2}, {"raw": 1, "v1": 2, "v2": 3}])
def test_a_registry_that_drifts_from_the_choices_is_refused(registry):
    with pytest.raises(ValueError, match=r"CHOICES\['dataset.variant'\] is \('raw', 'v1'\)"):
        registry_of("dataset.variant", registry)
    assert registry_of("dataset.variant", {"raw": 1, "v1": 2}) == {"raw": 1, "v1": 2}
