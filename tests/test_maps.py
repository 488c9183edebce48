import pytest

from tyingrun.config import Config, DatasetConfig, HardwareConfig, ModelConfig, PolicyConfig
from tyingrun.errors import BadInput
from tyingrun.preflight import check_policy
from tyingrun.tying import maps


def test_takase_patterns_zero_indexed():
    assert maps.sequential(6, 2) == [0, 0, 0, 3, 3, 3]
    assert maps.sequential(6, 3) == [0, 0, 2, 2, 4, 4]
    assert maps.cyclic(6, 2) == [0, 1, 0, 1, 0, 1]
    assert maps.cyclic(4, 2) == [0, 1, 0, 1]
    assert maps.cycle_rev(6, 3) == [0, 1, 2, 2, 1, 0]
    assert maps.cycle_rev(12, 4) == [0, 1, 2, 3, 0, 1, 2, 3, 3, 2, 1, 0]


def test_one_set_ties_everything_to_layer_zero_and_n_sets_equal_to_layers_is_none():
    assert maps.cyclic(5, 1) == [0] * 5
    assert maps.sequential(5, 5) == maps.identity(5)


def test_patterns_are_legal_and_resolved():
    for n_layer in range(2, 13):
        for n_sets in range(1, n_layer + 1):
            produced = [maps.cyclic(n_layer, n_sets)]
            if n_layer % n_sets == 0:
                produced.append(maps.sequential(n_layer, n_sets))
            if 2 * n_sets <= n_layer:
                produced.append(maps.cycle_rev(n_layer, n_sets))
            for src in produced:
                maps.validate(src, n_layer)
                assert maps.resolve(src) == src
                assert len(maps.roots_of(src)) == n_sets


def test_sequential_needs_a_divisor():
    with pytest.raises(ValueError, match=r"3 sets do not divide 4 layers; use one of \[1, 2, 4\]"):
        maps.sequential(4, 3)
    with pytest.raises(BadInput, match=r"policy.n_sets=3 does not fit model.n_layer=4: .* use one of \[1, 2, 4\]"):
        check_policy(pattern_config("sequential", n_layer=4, n_sets=3))


def test_n_sets_out_of_range():
    with pytest.raises(ValueError, match="between 1 and the 4 layers"):
        maps.cyclic(4, 5)
    with pytest.raises(ValueError, match="need at least 6 layers"):
        maps.cycle_rev(4, 3)
    with pytest.raises(BadInput, match="policy=cyclic: policy.n_sets=5 does not fit model.n_layer=4"):
        check_policy(pattern_config("cyclic", n_layer=4, n_sets=5))


def test_resolve_follows_chains_to_roots():
    assert maps.resolve([0, 0, 1, 2]) == [0, 0, 0, 0]
    assert maps.resolve([0, 1, 1, 2, 3]) == [0, 1, 1, 1, 1]
    assert maps.resolve([0, 1, 2, 1, 3]) == [0, 1, 2, 1, 1]


@pytest.mark.parametrize("src", [[0, 2, 1], [1, 1], [0, -1], [0, 0.5], [0, True]])
def test_validate_rejects_illegal_maps(src):
    with pytest.raises(BadInput):
        maps.validate(src, len(src))


def test_validate_rejects_wrong_length():
    with pytest.raises(BadInput, match="has 3 entries but the model has 4 layers"):
        maps.validate([0, 1, 2], 4)


def test_assign_moves_dependents_with_their_root():
    src = [0, 1, 1, 3]
    assert maps.assign(src, 1, 0) == [0, 0, 0, 3]
    assert maps.assign(src, 3, 3) == src
    assert maps.assign(src, 2, 2) == [0, 1, 2, 3]
    assert maps.assign([0, 0, 2, 2], 3, 1) == [0, 0, 2, 0]


def pattern_config(name, n_layer, n_sets):
    return Config(model=ModelConfig(n_layer=n_layer), dataset=DatasetConfig(), hardware=HardwareConfig(),
                  policy=PolicyConfig(name=name, n_sets=n_sets))
