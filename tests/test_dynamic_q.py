"""dynamic_q and random: action slices, schedule, rewards, the Q update, legal maps, state round trips,
and the optimizer following the decisions on a real model."""

import copy
import io
import math

import pytest
import torch

from tyingrun.config import CHOICES, HardwareConfig, PolicyConfig, TrainConfig
from tyingrun.errors import BadInput
from tyingrun.metrics.meters import model_counts
from tyingrun.policies import build_policy
from tyingrun.policies.dynamic_q import (
    REWARDS,
    Outcome,
    QLearner,
    Transition,
    action_slice,
    n_actions,
    next_epsilon,
)
from tyingrun.preflight import preflight
from tyingrun.train.optim import build_optimizer, optimizer_parameters, sync_optimizer
from tyingrun.tying import maps
from tyingrun.tying.counts import trainable_parameters

from .helpers import lm_batch, run_steps, small_lm_config, tiny_gpt2


class ScriptedContext:
    """A DecisionContext whose loss is a fixed function of the step and whose counts are fixed; its map (``src``,
    ``trainable``: the model's, which the policy reads) follows the decisions run_steps applies."""

    def __init__(self, step=0, trainable_layers=2, src=None, trainable=None):
        self.step = step
        self.trainable_layers = trainable_layers
        self.scored_at = []
        self.src, self.trainable = src, trainable

    def score_batch(self):
        self.scored_at.append(self.step)
        return 2.0 + math.sin(self.step)

    def counts(self):
        return {"trainable_params": 100, "stored_params": 200, "independent_layers": 3,
                "trainable_layers": self.trainable_layers}


def policy_config(name="dynamic_q", **keys):
    return PolicyConfig(name=name, grad="frozen_copy", **keys)


@pytest.mark.parametrize("n_layer", range(1, 9))
def test_layer_slices_tile_the_action_vector(n_layer):
    covered = []
    for layer in range(n_layer):
        part = action_slice(layer)
        assert part.start == layer * (layer + 1) // 2 and part.stop - part.start == layer + 1
        covered.extend(range(part.start, part.stop))
    assert covered == list(range(n_actions(n_layer)))


def test_epsilon_decays_by_0_95_to_a_floor_of_0_01():
    epsilons = [1.0]
    for _ in range(120):
        epsilons.append(next_epsilon(epsilons[-1]))
    assert epsilons[:3] == pytest.approx([1.0, 0.95, 0.9025])
    assert epsilons == pytest.approx([max(0.95**k, 0.01) for k in range(121)])
    assert epsilons[-1] == 0.01


def test_schedule_decides_every_k_steps_and_decays_epsilon_per_episode():
    policy = build_policy(policy_config(steps_per_decision=3), n_layer=4, seed=0)
    start = policy.start(4)
    assert start.src == [0, 1, 2, 3] and start.trainable == [True, False, False, False]
    context = ScriptedContext()
    decisions = run_steps(policy, context, 3 * 7)
    assert context.scored_at == [3, 6, 9, 12, 15, 18, 21]
    assert [d.info["layer"] for d in decisions] == [1, 2, 3, 1, 2, 3, 1]
    assert [d.info["epsilon"] for d in decisions] == pytest.approx([1.0] * 3 + [0.95] * 3 + [0.9025])
    assert decisions[0].info["reward"] is None
    expected_rewards = [max(-math.exp(2.0 + math.sin(step)), -10.0) for step in context.scored_at[1:]]
    assert [d.info["reward"] for d in decisions[1:]] == pytest.approx(expected_rewards)
    for decision in decisions[:3]:
        layer = decision.info["layer"]
        assert decision.trainable == [True] * (layer + 1) + [False] * (3 - layer)
        assert len(decision.info["q_values"]) == layer + 1


def test_without_freezing_every_layer_trains_from_the_start():
    policy = build_policy(policy_config(freeze_at_init=False), n_layer=3, seed=0)
    assert policy.start(3).trainable == [True, True, True]


@pytest.mark.parametrize("name", ["dynamic_q", "random"])
def test_one_layer_model_has_nothing_to_decide(name):
    policy = build_policy(policy_config(name), n_layer=1, seed=0)
    assert policy.start(1).src == [0]
    context = ScriptedContext()
    assert run_steps(policy, context, 20) == []
    assert context.scored_at == []


def test_rewards_on_known_losses():
    def reward(name, loss, loss_at_decision=0.0, trainable_share=0.5, weight=1.0):
        cfg = policy_config(reward=name, param_penalty_weight=weight)
        return REWARDS[name](Outcome(loss_at_decision, loss, trainable_share), cfg)

    assert reward("paper", 1.0) == pytest.approx(-math.e)
    assert reward("paper", 3.0) == -10.0
    assert reward("paper", 1e4) == -10.0
    assert reward("paper", 1e-9) == pytest.approx(-1.0)
    assert reward("neg_loss", 2.5) == -2.5
    assert reward("improvement", 2.5, loss_at_decision=3.0) == pytest.approx(0.5)
    assert reward("improvement", 3.5, loss_at_decision=3.0) == pytest.approx(-0.5)
    assert reward("param_penalty", 2.0, trainable_share=0.25, weight=2.0) == pytest.approx(-2.5)


def test_reward_names_match_the_config_choices():
    assert CHOICES["policy.reward"] == tuple(REWARDS)


def test_improvement_and_param_penalty_read_the_context():
    policy = build_policy(policy_config(reward="improvement", steps_per_decision=2), n_layer=3, seed=0)
    context = ScriptedContext()
    first, second = run_steps(policy, context, 4)
    assert second.info["reward"] == pytest.approx(math.sin(2) - math.sin(4))
    policy = build_policy(policy_config(reward="param_penalty", param_penalty_weight=0.5), n_layer=4, seed=0)
    _, second = run_steps(policy, ScriptedContext(trainable_layers=3), 8)
    assert second.info["reward"] == pytest.approx(-(2.0 + math.sin(8)) - 0.5 * 3 / 4)


@pytest.mark.parametrize("keys", [{"reward": "ppl"}, {"steps_per_decision": 0}])
def test_bad_policy_keys_are_bad_input(keys):
    with pytest.raises(BadInput) as error:
        preflight(small_lm_config(policy="dynamic_q", policy_keys=keys))
    if "reward" in keys:
        assert all(name in str(error.value) for name in REWARDS)


def test_one_q_update_is_an_mse_adamw_step_toward_the_target():
    learner = QLearner(4, seed=0)
    reference = copy.deepcopy(learner.network)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01)
    transition = Transition(layer=2, action=1, state=[0, 1, 2, 3], next_state=[0, 1, 0, 3], loss_at_decision=2.0)
    reward = -3.0
    state, next_state = torch.tensor([0.0, 1, 2, 3]), torch.tensor([0.0, 1, 0, 3])
    with torch.no_grad():
        target = reward + 0.99 * reference(next_state)[3:6].max()
    predicted = reference(state)[3 + 1]
    error_before = (predicted - target).item() ** 2
    (predicted - target).pow(2).backward()
    reference_optimizer.step()

    learner.update(transition, reward)

    for ours, theirs in zip(learner.network.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-7)
    with torch.no_grad():
        error_after = (learner.network(state)[4] - target).item() ** 2
    assert error_after < error_before


def test_decisions_yield_legal_resolved_maps_that_apply_the_logged_action():
    n_layer = 6
    policy = build_policy(policy_config(steps_per_decision=1), n_layer, seed=1)
    src = policy.start(n_layer).src
    decisions = run_steps(policy, ScriptedContext(), 300)
    assert len(decisions) == 300
    last_visited = 0
    for decision in decisions:
        maps.validate(decision.src, n_layer)
        assert maps.resolve(decision.src) == decision.src
        assert decision.src == maps.assign(src, decision.info["layer"], decision.info["action"])
        last_visited = max(last_visited, decision.info["layer"])
        assert decision.trainable == [slot <= last_visited for slot in range(n_layer)]
        src = decision.src
    assert decisions[-1].info["epsilon"] == pytest.approx(0.95**59)


def test_random_policy_draws_every_legal_action():
    n_layer = 5
    policy = build_policy(policy_config("random", steps_per_decision=1), n_layer, seed=0)
    policy.start(n_layer)
    decisions = run_steps(policy, ScriptedContext(), 800)
    seen = {layer: set() for layer in range(1, n_layer)}
    for decision in decisions:
        seen[decision.info["layer"]].add(decision.info["action"])
        assert decision.info["q_values"] is None and decision.info["epsilon"] == 1.0
        maps.validate(decision.src, n_layer)
    assert seen == {layer: set(range(layer + 1)) for layer in range(1, n_layer)}


@pytest.mark.parametrize("name", ["dynamic_q", "random"])
def test_state_dict_round_trip_repeats_every_later_decision(name):
    cfg = policy_config(name, steps_per_decision=2)
    policy = build_policy(cfg, n_layer=5, seed=3)
    policy.start(5)
    first = ScriptedContext()
    run_steps(policy, first, 7)
    buffer = io.BytesIO()
    torch.save(policy.state_dict(), buffer)
    buffer.seek(0)
    restored = build_policy(cfg, n_layer=5, seed=99)
    restored.load_state_dict(torch.load(buffer))
    assert restored.start(5) == policy.start(5)
    # The map is the model's: a resumed run continues from the map its checkpoint saved.
    ours, theirs = (run_steps(agent, ScriptedContext(step=7, src=first.src, trainable=first.trainable), 300)
                    for agent in (policy, restored))
    assert [(d.src, d.trainable, d.info) for d in ours] == [(d.src, d.trainable, d.info) for d in theirs]
    if name == "dynamic_q":
        greedy = [d for d in ours if d.info["epsilon"] < 0.5]
        assert greedy, "the comparison should reach decisions that mostly follow the Q-network"


def test_policy_seed_overrides_the_train_seed():
    def decisions(cfg, seed):
        policy = build_policy(cfg, n_layer=4, seed=seed)
        return [d.src for d in run_steps(policy, ScriptedContext(), 100)]

    assert decisions(policy_config(seed=5), seed=0) == decisions(policy_config(), seed=5)
    assert decisions(policy_config(), seed=0) != decisions(policy_config(), seed=5)


class ModelContext:
    """Scores the real model on a fresh batch under no_grad, in eval mode, like the trainer."""

    def __init__(self, model):
        self.model, self.step = model, 0

    @property
    def src(self):
        return list(self.model.stack.src)

    @property
    def trainable(self):
        return list(self.model.stack.trainable)

    @torch.no_grad()
    def score_batch(self):
        self.model.eval()
        loss = self.model.loss(lm_batch(seed=1000 + self.step)).loss
        return loss.item()

    def counts(self):
        return model_counts(self.model, self.model.stack)


def assert_optimizer_holds_exactly_the_trainable_tensors(model, optimizer):
    wanted = {id(p) for p in trainable_parameters(model)}
    assert {id(p) for p in optimizer_parameters(optimizer)} == wanted
    assert {id(p) for p in optimizer.state} <= wanted
    for slot in range(len(model.stack)):
        if not model.stack.is_trainable(slot):
            for _, param in model.stack.slot_parameters(slot):
                assert param not in optimizer.state and param.grad is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dynamic_q", "random"])
def test_real_optimizer_follows_every_decision(name):
    n_layer = 4
    model = tiny_gpt2(n_layer=n_layer, grad_mode="frozen_copy")
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3), HardwareConfig(), torch.device("cpu"))
    policy = build_policy(policy_config(name, steps_per_decision=2), n_layer, seed=0)
    start = policy.start(n_layer)
    model.stack.apply_map(start.src, start.trainable)
    sync_optimizer(optimizer, model)
    context = ModelContext(model)
    tied_seen = False
    for step in range(1, 31):
        model.train()
        loss = model.loss(lm_batch(seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        context.step = step
        decision = policy.after_step(context)
        if decision is not None:
            model.stack.apply_map(decision.src, decision.trainable)
            sync_optimizer(optimizer, model)
            assert model.stack.src == decision.src
            assert_optimizer_holds_exactly_the_trainable_tensors(model, optimizer)
            tied_seen |= decision.src != maps.identity(n_layer)
    assert tied_seen
