"""The sandwich patterns (middle_cycle, middle_sequence), inline maps and groups: their formulas, and one line
for every illegal input."""

import pytest

from tyingrun.errors import BadInput
from tyingrun.policies import build_policy
from tyingrun.preflight import preflight
from tyingrun.tying import maps

from .helpers import bad_input_line, small_lm_config


def test_middle_patterns_of_the_issue():
    assert maps.middle_sequence(8, 3) == [0, 1, 1, 3, 3, 5, 5, 7]
    assert maps.middle_cycle(7, 2) == [0, 1, 2, 1, 2, 1, 6]


@pytest.mark.parametrize("n_layer", [3, 4, 6, 8, 12])
def test_middle_patterns_equal_their_formulas(n_layer):
    middle = n_layer - 2
    for n_sets in range(1, middle + 1):
        cycle = maps.middle_cycle(n_layer, n_sets)
        assert cycle == [0] + [1 + (i - 1) % n_sets for i in range(1, n_layer - 1)] + [n_layer - 1]
        if middle % n_sets == 0:
            width = middle // n_sets
            sequence = maps.middle_sequence(n_layer, n_sets)
            assert sequence == [0] + [1 + ((i - 1) // width) * width for i in range(1, n_layer - 1)] + [n_layer - 1]
            assert len(maps.roots_of(sequence)) == n_sets + 2
        assert len(maps.roots_of(cycle)) == n_sets + 2
        assert maps.resolve(cycle) == cycle


@pytest.mark.parametrize("policy, n_layer, n_sets, expected", [
    ("middle_sequence", 8, 4, "4 sets do not divide the 6 middle layers; use one of [1, 2, 3, 6]"),
    ("middle_cycle", 8, 7, "7 sets must be between 1 and the 6 middle layers"),
    ("middle_cycle", 2, 1, "need at least 3 layers"),
    ("middle_sequence", 4, 3, "3 sets must be between 1 and the 2 middle layers"),
])
def test_bad_middle_combinations_are_refused_in_one_line(policy, n_layer, n_sets, expected):
    cfg = small_lm_config(policy=policy, policy_keys={"n_sets": n_sets})
    cfg.model.n_layer = n_layer
    with pytest.raises(BadInput) as err:
        preflight(cfg)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert f"policy={policy}: policy.n_sets={n_sets} does not fit model.n_layer={n_layer}" in str(err.value)


def fixed_map(**policy_keys):
    cfg = small_lm_config(policy="from_file", policy_keys=policy_keys)
    preflight(cfg)
    return build_policy(cfg.policy, cfg.model.n_layer).start(cfg.model.n_layer).src


def test_inline_map_and_groups_make_the_map():
    assert fixed_map(map=[0, 0, 2, 2]) == [0, 0, 2, 2]
    assert fixed_map(map=[0, 0, 1, 3]) == [0, 0, 0, 3]  # chains resolve, as a file's do
    assert fixed_map(groups=[[0, 1, 2], [3]]) == [0, 0, 0, 3]
    assert fixed_map(groups=[[3, 1]]) == [0, 1, 2, 1]  # the group's lowest slot owns the weights
    assert fixed_map(groups=[]) == [0, 1, 2, 3]


@pytest.mark.parametrize("keys, expected", [
    ({"map": [0, 0, 2]}, "policy.map: tying map [0, 0, 2] has 3 entries but the model has 4 layers"),
    ({"map": [0, 0, 5, 2]}, "entry 2 is 5; each entry must be an integer in [0, 2]"),
    ({"map": [0, 1, 2, -1]}, "entry 3 is -1"),
    ({"map": [0, "a", 2, 3]}, "entry 1 is 'a'"),
    ({"map": [0, 0.5, 2, 3]}, "entry 1 is 0.5"),
    ({"map": [0, True, 2, 3]}, "entry 1 is True"),
    ({"groups": [[0, 1], [1, 2]]}, "layer 1 is in two groups"),
    ({"groups": [[0, 4]]}, "there is no layer 4; the model has layers 0..3"),
    ({"groups": [[0, "x"]]}, "'x' is not a layer index"),
    ({"groups": [[0, 1.5]]}, "1.5 is not a layer index"),
    ({"groups": [[]]}, "is not a non-empty list"),
    ({"groups": [0, 1]}, "group 0 is not a non-empty list"),
    ({"map": [0, 0, 2, 2], "groups": [[0, 1]]}, "takes one of policy.path, policy.map or policy.groups"),
    ({"map": [0, 0, 2, 2], "path": "x.json"}, "not policy.path and policy.map"),
])
def test_illegal_inline_maps_and_groups_are_refused_in_one_line(keys, expected):
    with pytest.raises(BadInput) as err:
        fixed_map(**keys)
    assert expected in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("policy, keys, expected", [
    ("none", {"share": "attention"}, "policy=none does not use policy.share"),
    ("cyclic", {"map": [0, 0, 2, 2]}, "policy=cyclic does not use policy.map"),
    ("cyclic", {"share_norms": True}, "policy.share_norms=true needs policy.share=attention or policy.share=mlp"),
    ("cyclic", {"share": "norms"}, "policy.share='norms' is not an option; choose one of: block, attention, mlp"),
])
def test_share_keys_are_checked(policy, keys, expected):
    with pytest.raises(BadInput) as err:
        preflight(small_lm_config(policy=policy, policy_keys=keys))
    assert expected in str(err.value)


@pytest.mark.parametrize("policy", ["cyclic", "middle_cycle", "from_file", "random", "dynamic_q"])
def test_every_tying_policy_reads_share(policy):
    keys = {"share": "mlp", "share_norms": True}
    if policy == "from_file":
        keys["map"] = [0, 0, 0, 0]
    preflight(small_lm_config(policy=policy, policy_keys=keys))


@pytest.mark.parametrize("overrides, expected", [
    (["policy=middle_sequence", "policy.n_sets=4", "model.n_layer=8"], "4 sets do not divide the 6 middle layers"),
    (["policy=from_file", "policy.map=[0,0,9,2]"], "policy.map: tying map [0, 0, 9, 2]: entry 2 is 9"),
    (["policy=from_file", "policy.groups=[[0,1],[1,3]]"], "layer 1 is in two groups"),
    (["policy=from_file", "policy.map=[0,a,2,3]"], "entry 1 is 'a'"),
])
def test_bad_patterns_maps_and_groups_are_one_line(tmp_path, overrides, expected):
    line = bad_input_line(overrides, tmp_path / "run")
    assert line.startswith("tyingrun: error: ") and expected in line
