"""The learning study (make ablations SCALE=learn): its preset composes with every arm and passes the preflight,
its sizing gives every learned run 300+ decisions with epsilon at its floor, and the default study is unchanged."""

import math

import pytest
from omegaconf import OmegaConf

from tyingrun.ablations import LEARN_STAGE_1, STAGE_1, STUDIES, learn_stage_2
from tyingrun.config import Config
from tyingrun.policies.dynamic_q import EPSILON_DECAY, EPSILON_FLOOR
from tyingrun.preflight import preflight

from .helpers import BEST, compose


def composed(overrides):
    cfg = compose(["+experiment=dlt_learning", *overrides])
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))


def test_the_default_studies_are_unchanged():
    for scale in ("cpu", "paper"):
        study = STUDIES[scale]
        assert study.experiment == f"ablation_{scale}" and study.source == "dynamic_q"
        assert {arm: overrides for arm, (overrides, _) in study.stage_1.items()} == STAGE_1


@pytest.mark.parametrize("arm", list(LEARN_STAGE_1))
def test_every_learning_arm_composes_and_passes_the_preflight(arm):
    overrides, note = LEARN_STAGE_1[arm]
    cfg = composed(overrides)
    preflight(cfg)
    assert note and cfg.model.n_layer == 6 and cfg.dataset.name == "pydoc"


@pytest.mark.parametrize("arm", ["dynamic_q", "dynamic_q_learning", "dynamic_q_learning_neg_loss",
                                 "dynamic_q_learning_paper_reward", "bandit", "random"])
def test_each_learned_run_takes_300_decisions_and_reaches_the_epsilon_floor(arm):
    cfg = composed(LEARN_STAGE_1[arm][0])
    steps, k, layers = cfg.train.max_steps, cfg.policy.steps_per_decision, cfg.model.n_layer
    decisions = (steps - 1) // k
    assert decisions >= 300
    if cfg.policy.name != "dynamic_q":
        return
    if cfg.policy.epsilon_schedule == "episode":
        episodes_to_floor = math.ceil(math.log(EPSILON_FLOOR) / math.log(EPSILON_DECAY))
        assert episodes_to_floor * (layers - 1) < decisions
    else:
        to_floor = math.ceil(math.log(EPSILON_FLOOR) / math.log(cfg.policy.epsilon_decay_per_decision))
        # At the floor for at least the last 20% of the decisions (greedy_fraction_last20 measures them).
        assert to_floor + 1 <= 0.8 * decisions


def test_the_learning_arm_runs_the_option_set_the_tests_check():
    policy = composed(LEARN_STAGE_1["dynamic_q_learning"][0]).policy
    assert {key: getattr(policy, key) for key in BEST} == BEST
    for arm, reward in (("dynamic_q_learning_neg_loss", "neg_loss"), ("dynamic_q_learning_paper_reward", "paper")):
        variant = composed(LEARN_STAGE_1[arm][0]).policy
        assert variant.reward == reward and {key: getattr(variant, key) for key in BEST if key != "reward"} == {
            key: value for key, value in BEST.items() if key != "reward"}
    bandit = composed(LEARN_STAGE_1["bandit"][0]).policy
    assert (bandit.reward, bandit.reward_normalization) == (BEST["reward"], BEST["reward_normalization"])
    # random ignores its rewards, but logs the learners' reward: its separation measures that reward's signal.
    assert composed(LEARN_STAGE_1["random"][0]).policy.reward == BEST["reward"]


def test_learn_stage_2_is_the_fixed_maps_at_the_learned_count(tmp_path):
    arms = learn_stage_2(n_layer=6, kept=4, learned_map=tmp_path / "summary.json")
    overrides = {arm: specific for arm, (specific, _) in arms.items()}
    assert list(overrides) == ["from_file_learned_map", "cyclic", "sequential"]
    assert overrides["cyclic"] == ["policy=cyclic", "policy.n_sets=4", "policy.grad=frozen_copy"]
    # Of the divisors of 6, 3 is nearest to 4.
    assert overrides["sequential"] == ["policy=sequential", "policy.n_sets=3", "policy.grad=frozen_copy"]
    assert "nearest to the 4 dynamic_q_learning kept" in arms["sequential"][1]
    for specific in overrides.values():
        preflight(composed(specific))
