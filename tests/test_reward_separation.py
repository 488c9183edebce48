"""The reward separation (report/rewards.py): Welch's t on known numbers, separation found where one action is
better despite a drift larger than the gain, none where the reward ignores the action, and the report's column."""

import json
import math
import random

import pytest

from tyingrun.report.rewards import episodes, layer_separation, reward_separation
from tyingrun.report.stats import welch_t

from .helpers import make_run, report, run_summary

N_LAYER = 4


def test_welch_t_of_known_samples():
    # means 2 and 1, sample variances 1 and 1: t = 1 / sqrt(1/3 + 1/3)
    assert welch_t([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == pytest.approx(1 / math.sqrt(2 / 3))
    # unequal sizes and variances: means 3 and 1, variances 4 and 1/3 -> 2 / sqrt(4/3 + 1/12)
    assert welch_t([1.0, 3.0, 5.0], [0.5, 1.0, 1.5, 1.0]) == pytest.approx(2 / math.sqrt(4 / 3 + (1 / 6) / 4))
    assert welch_t([2.0, 2.0], [1.0, 1.0]) == math.inf
    assert welch_t([1.0, 1.0], [1.0, 1.0]) is None


def decision_rows(reward_of, episodes_count=150, seed=0):
    """maps.jsonl rows of an episodic policy on N_LAYER layers acting uniformly at random: one row per decision,
    rewarded by ``reward_of(layer, action, episode, rng)``, after the step-0 row that names no layer."""
    rng = random.Random(seed)
    identity = {"map": list(range(N_LAYER)), "trainable": [True] * N_LAYER}
    rows = [{"step": 0, **identity}]
    for episode in range(episodes_count):
        for layer in range(1, N_LAYER):
            action = rng.randrange(layer + 1)
            rows.append({"step": len(rows), **identity, "layer": layer, "action": action,
                         "reward": reward_of(layer, action, episode, rng)})
    rows[-1]["reward"] = None  # the last decision is never rewarded
    return rows


def drifting(gain):
    """A reward that falls by 0.6 over training (far more than ``gain``), with noise 0.01, plus ``gain`` for the
    action that ties each layer to layer 0."""
    return lambda layer, action, episode, rng: 1.0 - 0.004 * episode + gain * (action == 0) + rng.gauss(0.0, 0.01)


def test_episodes_start_where_the_layer_does_not_rise():
    rows = [{"step": 0}, {"layer": 1}, {"layer": 2}, {"layer": 3}, {"layer": 1}, {"layer": 2}, {"layer": 2}]
    assert [[row["layer"] for row in episode] for episode in episodes(rows)] == [[1, 2, 3], [1, 2], [2]]


def test_a_better_action_is_separated_in_every_layer_despite_the_drift():
    rows = decision_rows(drifting(gain=0.02))
    assert reward_separation(rows, N_LAYER) == {"separable_layers": 1.0}


def test_without_centring_on_the_episode_the_drift_hides_the_same_gain():
    rows = decision_rows(drifting(gain=0.02))
    layer_3 = {}
    for row in rows:
        if row.get("layer") == 3 and row["reward"] is not None:
            layer_3.setdefault(row["action"], []).append(row["reward"])
    assert layer_separation(layer_3) < 2.0


def test_a_reward_that_ignores_the_action_separates_no_layer():
    rows = decision_rows(drifting(gain=0.0))
    assert reward_separation(rows, N_LAYER) == {"separable_layers": 0.0}


def test_clipped_rewards_separate_nothing_and_runs_without_rewards_have_no_separation():
    clipped = decision_rows(lambda layer, action, episode, rng: -10.0)
    assert reward_separation(clipped, N_LAYER) == {"separable_layers": 0.0}
    assert reward_separation([{"step": 0, "map": [0, 1, 2, 3]}, {"step": 4, "map": [0, 0, 2, 3]}], N_LAYER) == {}


def test_the_report_shows_the_separation_with_its_lowest_seed(tmp_path):
    root = tmp_path / "study"
    for seed, gain in enumerate((0.02, 0.02, 0.0)):
        run = make_run(root / "random" / str(seed), seed, run_summary(100.0 + seed), name="random",
                       reward="paired_improvement")
        (run / "maps.jsonl").write_text("".join(json.dumps(row) + "\n"
                                                for row in decision_rows(drifting(gain), seed=seed)))
    rows, markdown, _ = report(root, tmp_path / "out")
    found = rows["random"]
    assert float(found["separable_layers"]) == pytest.approx(2 / 3)
    assert float(found["separable_layers_lowest"]) == 0.0
    assert "| 67% (lowest 0%) |" in markdown
    assert "best action separable (docs/method.md#reward-separation)" in markdown
