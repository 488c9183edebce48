"""The learning options of dynamic_q (docs/method.md#learning-options), the bandit, and the learning diagnostics:
each formula on known losses, the faithful default left alone, a stub environment whose reward favours a known
map, and an exact resume with every option on."""

import copy
import json
import math
import random
import shutil
import statistics

import pytest
import torch

from tyingrun.config import PolicyConfig
from tyingrun.errors import BadInput
from tyingrun.policies import build_policy
from tyingrun.policies.dynamic_q import REPLAY_BATCH, Experience, QLearner
from tyingrun.policies.learning import STABILITY_EPISODES, GreedyRecord, RunningStats, first_argmax
from tyingrun.preflight import check_policy, preflight
from tyingrun.run import run
from tyingrun.tying import maps

from .helpers import BEST, follow, run_folder, run_steps, small_lm_config


def policy_config(name="dynamic_q", **keys):
    return PolicyConfig(name=name, grad="frozen_copy", **keys)


class BatchContext:
    """A DecisionContext with a reward stream of numbered batches; the loss of batch b at step s is
    ``loss(b, s)``, and every call is recorded; its map follows the decisions (run_steps, drive)."""

    def __init__(self, loss=lambda batch, step: 2.0 + 0.1 * batch - 0.01 * step, trainable_layers=2):
        self.step, self.loss, self.trainable_layers = 0, loss, trainable_layers
        self.drawn, self.scored = 0, []
        self.src = self.trainable = None

    def reward_batch(self):
        self.drawn += 1
        return {"id": torch.tensor([self.drawn])}

    def score_batch(self, batch=None):
        if batch is None:
            batch = self.reward_batch()
        batch_id = int(batch["id"])
        self.scored.append((batch_id, self.step))
        return self.loss(batch_id, self.step)

    def counts(self):
        return {"trainable_params": 100, "stored_params": 200, "independent_layers": 3,
                "trainable_layers": self.trainable_layers}


def test_new_keys_default_to_the_published_agent():
    defaults = PolicyConfig()
    assert (defaults.epsilon_schedule, defaults.reward_normalization, defaults.td_target, defaults.replay,
            defaults.target_update, defaults.q_lr_decay_updates) == ("episode", False, "same_layer", 0, 0, 0)


# --- epsilon per decision -------------------------------------------------------------------------------------


def test_epsilon_decays_once_per_rewarded_decision_to_the_floor():
    policy = build_policy(policy_config(epsilon_schedule="decision", epsilon_decay_per_decision=0.5,
                                        steps_per_decision=1), n_layer=4, seed=0)
    epsilons = [d.info["epsilon"] for d in run_steps(policy, BatchContext(), 10)]
    # Decision n is taken after n - 1 rewards: 0.5 ** (n - 1), never below 0.01.
    assert epsilons == pytest.approx([max(0.5 ** n, 0.01) for n in range(10)])
    assert policy.diagnostics()["final_epsilon"] == 0.01


@pytest.mark.parametrize("decay", [0.0, 1.5])
def test_epsilon_decay_out_of_range_is_bad_input(decay):
    with pytest.raises(BadInput, match="epsilon_decay_per_decision"):
        preflight(small_lm_config(policy="dynamic_q", policy_keys={"epsilon_decay_per_decision": decay}))


# --- paired improvement ---------------------------------------------------------------------------------------


def test_paired_improvement_scores_the_decisions_own_batch_before_and_after_its_k_steps():
    # Batch b's loss at step s: a per-batch offset that would swamp any action's effect, and a trend.
    def loss(batch, step):
        return 3.0 + 7.0 * math.sin(batch) - 0.01 * step * step

    policy = build_policy(policy_config(reward="paired_improvement", steps_per_decision=3), n_layer=4, seed=0)
    context = BatchContext(loss)
    decisions = run_steps(policy, context, 12)
    # One new reward batch per decision point; from the second point on the previous point's batch again first.
    assert context.drawn == 4
    assert context.scored == [(1, 3), (1, 6), (2, 6), (2, 9), (3, 9), (3, 12), (4, 12)]
    assert decisions[0].info["reward"] is None
    for n, decision in enumerate(decisions[1:], start=1):
        at, after = 3 * n, 3 * (n + 1)
        # CE at the decision - CE K steps later, on the same batch n: the batch's offset cancels exactly.
        assert decision.info["reward"] == pytest.approx(0.01 * (after ** 2 - at ** 2))


def test_paired_improvement_batch_waits_in_the_policy_state():
    policy = build_policy(policy_config(reward="paired_improvement", steps_per_decision=2), n_layer=4, seed=0)
    run_steps(policy, BatchContext(), 5)
    pending = policy.state_dict()["pending"]
    assert torch.equal(pending["batch"]["id"], torch.tensor([2]))


@pytest.mark.parametrize("name", ["dynamic_q", "random", "bandit"])
def test_other_rewards_draw_one_batch_per_decision_as_before(name):
    policy = build_policy(policy_config(name, reward="improvement", steps_per_decision=2), n_layer=4, seed=0)
    context = BatchContext()
    run_steps(policy, context, 8)
    assert context.scored == [(1, 2), (2, 4), (3, 6), (4, 8)]
    assert policy.state_dict()["pending"]["batch"] is None


# --- reward normalisation -------------------------------------------------------------------------------------


def test_welford_matches_the_sample_statistics_and_standardises():
    values = [0.3, -1.2, 4.0, 2.5, 2.5, -0.7]
    stats = RunningStats()
    normalized = [stats.normalize(value) for value in values]
    assert stats.count == 6
    assert stats.mean == pytest.approx(statistics.fmean(values))
    assert stats.std == pytest.approx(statistics.stdev(values))
    assert normalized[0] == 0.0  # one value has no spread
    for n in range(2, 7):
        seen = values[:n]
        assert normalized[n - 1] == pytest.approx((seen[-1] - statistics.fmean(seen)) / statistics.stdev(seen))
    constant = RunningStats()
    assert [constant.normalize(-10.0) for _ in range(3)] == [0.0, 0.0, 0.0]


def test_normalisation_changes_what_is_learned_not_what_is_logged():
    learned = []

    def record(transition, reward):
        learned.append(reward)

    def loss(batch, step):
        return 5.0 - 0.1 * step + 0.01 * step * step

    raw = build_policy(policy_config(reward="neg_loss", steps_per_decision=1), n_layer=3, seed=0)
    normalized = build_policy(policy_config(reward="neg_loss", reward_normalization=True, steps_per_decision=1),
                              n_layer=3, seed=0)
    normalized._learn = record
    rewards = [d.info["reward"] for d in run_steps(raw, BatchContext(loss), 8)[1:]]
    assert [d.info["reward"] for d in run_steps(normalized, BatchContext(loss), 8)[1:]] == rewards
    stats = RunningStats()
    assert learned == pytest.approx([stats.normalize(reward) for reward in rewards])
    assert normalized.state_dict()["reward_stats"]["count"] == 7


# --- the TD target, replay and the target network -------------------------------------------------------------


def reference_step(network, optimizer, batch, bootstrap=None):
    """The documented update, written out: y = r + 0.99 * max over next_layer's slice of the bootstrap network at
    s', one AdamW step on the mean of (Q(s)[layer's slice][a] - y)^2."""
    bootstrap = bootstrap or network
    predicted, targets = [], []
    for e in batch:
        with torch.no_grad():
            start = e.next_layer * (e.next_layer + 1) // 2
            best = bootstrap(torch.tensor(e.next_state, dtype=torch.float32))[start:start + e.next_layer + 1].max()
        targets.append(e.reward + 0.99 * best)
        start = e.layer * (e.layer + 1) // 2
        predicted.append(network(torch.tensor(e.state, dtype=torch.float32))[start + e.action])
    optimizer.zero_grad()
    torch.mean((torch.stack(predicted) - torch.stack(targets)) ** 2).backward()
    optimizer.step()


def clone(learner):
    network = copy.deepcopy(learner.network)
    return network, torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=0.01)


def assert_same_parameters(ours, theirs):
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_next_decision_target_reads_the_next_layers_slice_at_the_next_state():
    learner = QLearner(5, seed=0)
    network, optimizer = clone(learner)
    experience = Experience(state=[0, 1, 2, 3, 4], layer=2, action=0, reward=-0.5, next_state=[0, 1, 0, 3, 4],
                            next_layer=3)
    reference_step(network, optimizer, [experience])
    learner.learn(experience, rng=None)
    assert_same_parameters(learner.network, network)
    # Bootstrapping from layer 2's own slice instead (same_layer) is another update.
    other, other_optimizer = clone(QLearner(5, seed=0))
    reference_step(other, other_optimizer, [Experience(**{**experience.__dict__, "next_layer": 2})])
    assert not torch.allclose(other[2].bias, network[2].bias)


def test_the_policy_hands_the_learner_the_layer_decided_next():
    seen = []
    for td_target in ("same_layer", "next_decision"):
        policy = build_policy(policy_config(td_target=td_target, steps_per_decision=1), n_layer=4, seed=0)
        policy.learner.learn = lambda experience, rng, name=td_target: seen.append(
            (name, experience.layer, experience.next_layer))
        run_steps(policy, BatchContext(), 5)
    assert seen == [("same_layer", layer, layer) for layer in (1, 2, 3, 1)] + [
        ("next_decision", layer, next_layer) for layer, next_layer in ((1, 2), (2, 3), (3, 1), (1, 2))]


def test_replay_keeps_the_last_n_and_learns_from_a_uniform_sample_drawn_by_the_policy_rng():
    learner = QLearner(4, seed=1, replay=5)
    network, optimizer = clone(learner)
    rng, mirror = random.Random(7), random.Random(7)
    experiences = [Experience([0, 1, 2, 3], 1 + n % 3, n % 2, float(n), [0, 0, 2, 3], 1 + (n + 1) % 3)
                   for n in range(8)]
    buffer = []
    for experience in experiences:
        learner.learn(experience, rng)
        buffer = [*buffer, experience][-5:]
        batch = [buffer[mirror.randrange(len(buffer))] for _ in range(min(REPLAY_BATCH, len(buffer)))]
        reference_step(network, optimizer, batch)
        assert learner.buffer == buffer
        assert_same_parameters(learner.network, network)
    assert rng.getstate() == mirror.getstate()


def test_replay_samples_every_stored_transition_about_equally():
    learner = QLearner(3, seed=0, replay=4)
    for n in range(4):
        learner.buffer.append(Experience([0, 1, 2], 1, 0, float(n), [0, 0, 2], 2))
    rng = random.Random(0)
    drawn = [int(learner.buffer[rng.randrange(4)].reward) for _ in range(4000)]
    assert all(abs(drawn.count(n) / 4000 - 0.25) < 0.03 for n in range(4))


def test_target_network_is_synced_every_m_updates_and_is_what_the_target_reads():
    learner = QLearner(4, seed=2, target_update=3)
    network, optimizer = clone(learner)
    target = copy.deepcopy(network)
    experience = Experience([0, 1, 2, 3], 2, 1, 1.0, [0, 1, 1, 3], 3)
    for update in range(1, 8):
        reference_step(network, optimizer, [experience], bootstrap=target)
        learner.learn(experience, rng=None)
        if update % 3 == 0:
            target.load_state_dict(network.state_dict())
            assert_same_parameters(learner.target, learner.network)
        else:
            assert not torch.allclose(learner.target[2].weight, learner.network[2].weight)
        assert_same_parameters(learner.network, network)
        assert_same_parameters(learner.target, target)
    assert learner.updates == 7


def test_learning_rate_decay_takes_update_n_plus_1_at_lr_tau_over_tau_plus_n():
    learner = QLearner(4, seed=3, lr_decay_updates=4)
    network, optimizer = clone(learner)
    experience = Experience([0, 1, 2, 3], 3, 2, 0.5, [0, 1, 2, 2], 1)
    for n in range(6):
        assert learner.learning_rate() == pytest.approx(1e-3 * 4 / (4 + n))
        optimizer.param_groups[0]["lr"] = 1e-3 * 4 / (4 + n)
        reference_step(network, optimizer, [experience])
        learner.learn(experience, rng=None)
        assert_same_parameters(learner.network, network)
    assert learner.learning_rate() == pytest.approx(1e-3 * 0.4)  # after 6 updates: 4 / 10
    # Off (0, the default): every update at 1e-3, whatever the count.
    assert QLearner(4, seed=3).learning_rate() == 1e-3


def test_faithful_update_is_unchanged_by_the_new_path():
    # QLearner.update (the published agent's update) is learn() with next_layer = the decided layer, bit for bit.
    a, b = QLearner(4, seed=0), QLearner(4, seed=0)
    transition_state = ([0, 1, 2, 3], [0, 1, 0, 3])
    from tyingrun.policies.dynamic_q import Transition
    a.update(Transition(2, 1, *transition_state, loss_at_decision=2.0), -3.0)
    b.learn(Experience(transition_state[0], 2, 1, -3.0, transition_state[1], 2), rng=None)
    for x, y in zip(a.network.parameters(), b.network.parameters(), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("key", ["replay", "target_update", "q_lr_decay_updates"])
def test_negative_replay_or_target_update_is_bad_input(key):
    with pytest.raises(BadInput, match=key):
        preflight(small_lm_config(policy="dynamic_q", policy_keys={key: -1}))


# --- which policy reads which key ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, key, value", [
    ("random", "td_target", "next_decision"), ("bandit", "replay", 8), ("bandit", "epsilon_schedule", "decision"),
    ("dynamic_q", "bandit_algorithm", "thompson"), ("none", "reward_normalization", True),
])
def test_a_learning_option_the_policy_does_not_read_is_refused(name, key, value):
    cfg = small_lm_config(name, policy_keys={key: value, "n_sets": PolicyConfig().n_sets})
    with pytest.raises(BadInput, match=f"does not use policy.{key}"):
        check_policy(cfg)


# --- diagnostics --------------------------------------------------------------------------------------------


def test_greedy_record_fraction_and_stability():
    record = GreedyRecord(n_layer=4)
    # Episodes of layers 1..3; values whose first maximum is the greedy action.
    for episode in range(STABILITY_EPISODES + 1):
        for layer in (1, 2, 3):
            values = [0.0] * (layer + 1)
            greedy = 0 if layer != 3 else episode % 2  # layer 3's greedy action flips every episode
            values[greedy] = 1.0
            record.add(layer, greedy if layer != 2 else layer, values)
    assert len(record.greedy) == 18
    # The last ceil(0.2 * 18) = 4 decisions: layer 3 of the fifth episode, then layers 1 (greedy), 2 (not), 3.
    assert record.greedy_fraction_last20() == pytest.approx(3 / 4)
    assert record.greedy_map_stability() == pytest.approx(2 / 3)
    assert GreedyRecord(4).greedy_map_stability() is None and GreedyRecord(4).greedy_fraction_last20() is None
    assert first_argmax([1.0, 3.0, 3.0]) == 1


def test_random_reports_no_learning_diagnostics_and_learners_do():
    keys = {"q_spread_min", "q_spread_mean", "greedy_fraction_last20", "greedy_map_stability"}
    for name in ("dynamic_q", "bandit", "random"):
        policy = build_policy(policy_config(name, steps_per_decision=1), n_layer=3, seed=0)
        run_steps(policy, BatchContext(), 30)
        found = policy.diagnostics()
        assert (keys <= found.keys()) == (name != "random")
        if name != "random":
            slices = policy._value_slices()
            assert found["q_spread_min"] == pytest.approx(min(max(s) - min(s) for s in slices))


# --- the bandit ---------------------------------------------------------------------------------------------


class NoisyBatchContext(BatchContext):
    """Reward batches that each carry a Gaussian offset of ``noise_sd`` (drawn once, when the batch is drawn), which
    a paired reward cancels; subclasses add what the decisions change."""

    def __init__(self, noise_sd, seed=0):
        super().__init__()
        self.noise_sd, self.noise, self.offsets = noise_sd, random.Random(seed), {}

    def reward_batch(self):
        batch = super().reward_batch()
        self.offsets[int(batch["id"])] = self.noise.gauss(0.0, self.noise_sd)
        return batch

    def offset(self, batch=None):
        """The offset of ``batch``, or of a newly drawn batch."""
        return self.offsets[int((batch if batch is not None else self.reward_batch())["id"])]


class ArmContext(NoisyBatchContext):
    """Paired losses where the last decision's action changes the loss: ``good[layer]`` lowers it by 0.1, every
    other action raises it by 0.1, and batches add noise that the pairing cancels."""

    def __init__(self, good, seed=0):
        super().__init__(noise_sd=1.0, seed=seed)
        self.good, self.effect = good, 0.0

    def apply(self, decision):
        layer, action = decision.info["layer"], decision.info["action"]
        self.effect += -0.1 if action == self.good[layer] else 0.1

    def score_batch(self, batch=None):
        return 3.0 + self.offset(batch) + self.effect


def drive(policy, context, decisions):
    if context.trainable is None:
        follow(context, policy.start(policy.n_layer))
    taken = []
    while len(taken) < decisions:
        context.step += 1
        decision = policy.after_step(context)
        if decision is not None:
            follow(context, decision)
            context.apply(decision)
            taken.append(decision)
    return taken


@pytest.mark.parametrize("algorithm", ["ucb1", "thompson"])
def test_bandit_converges_to_the_one_clearly_best_action_within_150_decisions(algorithm):
    good = {1: 0, 2: 2, 3: 1}
    policy = build_policy(policy_config("bandit", reward="paired_improvement", bandit_algorithm=algorithm,
                                        steps_per_decision=1), n_layer=4, seed=0)
    taken = drive(policy, ArmContext(good), 150)
    last = taken[-30:]
    assert sum(d.info["action"] == good[d.info["layer"]] for d in last) >= 27
    assert [first_argmax(values) for values in policy._value_slices()] == [good[1], good[2], good[3]]
    found = policy.diagnostics()
    assert found["greedy_map_stability"] == 1.0 and found["q_spread_min"] > 0.1
    assert "final_epsilon" not in found and all(d.info["epsilon"] is None for d in taken)


def test_bandit_state_round_trip_repeats_every_later_decision():
    cfg = policy_config("bandit", reward="paired_improvement", bandit_algorithm="thompson",
                        reward_normalization=True, steps_per_decision=2)
    policy = build_policy(cfg, n_layer=4, seed=3)
    context = ArmContext({1: 1, 2: 0, 3: 3})
    drive(policy, context, 20)
    restored = build_policy(cfg, n_layer=4, seed=99)
    restored.load_state_dict(copy.deepcopy(policy.state_dict()))
    twin = copy.deepcopy(context)
    ours, theirs = drive(policy, context, 40), drive(restored, twin, 40)
    assert [(d.src, d.info) for d in ours] == [(d.src, d.info) for d in theirs]
    assert policy.diagnostics() == restored.diagnostics()


# --- a stub environment whose reward favours a known map -----------------------------------------------------

TARGET = [0, 0, 2, 2, 4, 4]


class MapContext(NoisyBatchContext):
    """The loss of the current map on batch b at step s: a falling trend, a batch offset that swamps the map's
    effect, and 0.1 per slot whose root differs from TARGET's."""

    def __init__(self, seed=0):
        super().__init__(noise_sd=0.5, seed=seed)
        self.src = maps.identity(len(TARGET))

    def apply(self, decision):
        self.src = decision.src

    def score_batch(self, batch=None):
        mismatched = sum(root != target for root, target in zip(self.src, TARGET, strict=True))
        return 3.0 + 2.0 / math.sqrt(1 + self.step) + self.offset(batch) + 0.1 * mismatched


def greedy_map(policy, src):
    """The map one greedy episode of ``policy``'s Q-network makes from ``src``."""
    for layer in range(1, policy.n_layer):
        src = maps.assign(src, layer, int(policy.learner.values(src, layer).argmax()))
    return src


@pytest.mark.slow
def test_the_best_option_set_finds_the_map_the_reward_favours():
    """400 decisions (80 episodes of 5) on three seeds: on every seed the agent ends on TARGET, its greedy map is a
    fixed point there (a greedy episode from it keeps it), and most layers kept their greedy action over the last
    episodes (all of them on two seeds)."""
    stabilities = []
    for seed in range(3):
        policy = build_policy(policy_config(steps_per_decision=2, **BEST), n_layer=len(TARGET), seed=seed)
        context = MapContext(seed)
        drive(policy, context, 400)
        assert context.src == TARGET
        assert greedy_map(policy, context.src) == context.src
        found = policy.diagnostics()
        assert found["final_epsilon"] == 0.01 and found["greedy_fraction_last20"] >= 0.95
        assert found["q_spread_min"] > 0.5
        stabilities.append(found["greedy_map_stability"])
    assert min(stabilities) >= 0.6 and stabilities.count(1.0) >= 2


@pytest.mark.slow
def test_the_paper_reward_on_the_same_stub_learns_nothing():
    # Almost every loss here is above ln 10, so almost every paper reward is the -10 floor: the greedy map never
    # settles.
    policy = build_policy(policy_config(steps_per_decision=2), n_layer=len(TARGET), seed=0)
    drive(policy, MapContext(), 400)
    found = policy.diagnostics()
    assert found["clipped_reward_fraction"] > 0.95 and found["greedy_map_stability"] < 0.5


# --- exact resume with every option on ----------------------------------------------------------------------

TIMING_KEYS = ("tokens_per_s", "samples_per_s", "wall_time_s", "peak_memory_bytes")


def rows(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in path.open()]


@pytest.mark.slow
def test_resume_with_every_option_on_is_bit_identical(tmp_path):
    # A small buffer and frequent syncs, so that the buffer fills and the target network syncs before the stop.
    policy_keys = {**BEST, "steps_per_decision": 2, "replay": 3, "target_update": 2, "n_sets": PolicyConfig().n_sets}
    cfg = small_lm_config("dynamic_q", max_steps=30, policy_keys=policy_keys,
                          train_keys={"checkpoint_interval": 9, "keep_checkpoints": 5, "log_interval": 3,
                                      "eval_interval": 10})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    summary = run_folder(cfg, whole)
    # Stopped after step 9, between two decisions (K = 2), with a paired batch waiting, a full replay buffer, a
    # target network synced once and reward statistics part-way.
    # What a run killed right after that checkpoint leaves: a decision's maps.jsonl row is written when its reward
    # is known (at reward_step), so the row of the decision at step 8 is not written yet.
    shutil.copytree(whole, resumed)
    for checkpoint in ("step_00000018", "step_00000027", "step_00000030"):
        shutil.rmtree(resumed / "checkpoints" / checkpoint)
    (resumed / "summary.json").unlink()
    for name, written_at in (("metrics.jsonl", "step"), ("maps.jsonl", "reward_step")):
        lines = (resumed / name).read_text().splitlines()
        kept = [line for line in lines if (json.loads(line).get(written_at) or json.loads(line)["step"]) <= 9]
        (resumed / name).write_text("".join(f"{line}\n" for line in kept))
    resumed_cfg = copy.deepcopy(cfg)
    resumed_cfg.train.resume = str(resumed)
    resumed_summary = run(resumed_cfg, resumed)

    for name in ("metrics.jsonl", "maps.jsonl"):
        assert rows(resumed / name) == rows(whole / name)
    for found in (summary, resumed_summary):
        for key in TIMING_KEYS:
            found.pop(key, None)
    assert resumed_summary == summary
    assert summary["decisions"] == 14 and summary["greedy_fraction_last20"] is not None
