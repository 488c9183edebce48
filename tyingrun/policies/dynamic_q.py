"""dynamic_q: Q-learning driven dynamic layer tying (docs/method.md#dynamic_q), and the decision schedule it shares
with the ``random`` control.

Schedule. ``start`` returns the policy's current state without deciding anything: for a fresh policy the
identity map with layer 0 trainable and layers 1..L-1 frozen at their initial weights
(``policy.freeze_at_init``; all trainable without it). ``after_step`` runs after every optimizer step;
every ``policy.steps_per_decision`` (K) steps, i.e. at steps K, 2K, 3K, ..., is a decision point:

1. score one training batch (``context.score_batch()``);
2. if a decision is pending, that score ends its K steps: compute its reward and learn from it once;
   after the transition of layer L-1 (the end of an episode) epsilon decays;
3. decide for the next layer of the episode (1, 2, ..., L-1, then 1 again) and return the new map.

With ``policy.reward=paired_improvement`` step 1 scores two things on the same model: the batch drawn at the
pending decision's own point, again (its loss after the K steps), and a newly drawn reward batch (the loss at
this decision, kept with the decision to be scored again K steps later). The options of
docs/method.md#learning-options (epsilon per decision, reward normalisation, the next-decision TD target,
replay and a target network) are off by default: ``policy=dynamic_q`` alone is the published agent.

So the first K steps train the initial state, and every decision is followed by exactly K optimizer
steps before it is rewarded. The score taken at a decision point is also the "loss at the decision" of
the ``improvement`` reward: it is measured just before the trainer applies the action, so the
improvement includes the action's immediate effect on the loss. A one-layer model has nothing to decide.

The map itself is the model's: its TiedStack owns it, and the policy reads it at each decision point
(``context.src``, ``context.trainable``); ``start`` returns the initial map of a new run, and a resumed run gets
its map back from the checkpoint.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from tyingrun.config import PolicyConfig, registry_of
from tyingrun.contracts import perplexity
from tyingrun.policies.base import Decision, DecisionContext, Policy
from tyingrun.policies.learning import GreedyRecord, RunningStats, spread_diagnostics
from tyingrun.seeding import derive_seed, rng_state, set_rng_state
from tyingrun.tying import maps

HIDDEN = 128
GAMMA = 0.99
Q_LR = 1e-3
Q_WEIGHT_DECAY = 0.01
EPSILON_START = 1.0
EPSILON_DECAY = 0.95
EPSILON_FLOOR = 0.01
PAPER_REWARD_FLOOR = -10.0
# policy.replay: transitions sampled (uniformly, with replacement) per update, at most.
REPLAY_BATCH = 32


def n_actions(n_layer: int) -> int:
    return n_layer * (n_layer + 1) // 2


def action_slice(layer: int) -> slice:
    """Layer l's entries of the Q-vector: entry a < l ties it to layer a, entry l trains it independently."""
    start = layer * (layer + 1) // 2
    return slice(start, start + layer + 1)


def next_epsilon(epsilon: float, decay: float = EPSILON_DECAY) -> float:
    return max(epsilon * decay, EPSILON_FLOOR)


@dataclass
class Outcome:
    """What one decision led to, measured after the K optimizer steps that followed it."""

    # CE on a reward batch at the decision point, before the action took effect (paired_improvement: the batch
    # that ``loss`` is measured on too)
    loss_at_decision: float
    loss: float  # CE on a reward batch after the K steps
    trainable_share: float  # trainable layer slots / all layer slots after the K steps


# Rewards clipped at a floor, and the floor: a reward at it carried no information about the action.
REWARD_FLOORS = {"paper": PAPER_REWARD_FLOOR}

REWARDS: Dict[str, Callable[[Outcome, PolicyConfig], float]] = registry_of("policy.reward", {
    # The paper's clip(-exp(CE), -10, 10); minus a perplexity is never positive, so only -10 binds.
    "paper": lambda outcome, cfg: max(-perplexity(outcome.loss), PAPER_REWARD_FLOOR),
    "neg_loss": lambda outcome, cfg: -outcome.loss,
    "improvement": lambda outcome, cfg: outcome.loss_at_decision - outcome.loss,
    "param_penalty": lambda outcome, cfg: -outcome.loss - cfg.param_penalty_weight * outcome.trainable_share,
    # The same formula as improvement, but both losses are measured on the same reward batch (see after_step), so
    # the difference between two batches' losses does not enter it.
    "paired_improvement": lambda outcome, cfg: outcome.loss_at_decision - outcome.loss,
})


@dataclass
class Transition:
    """A decision waiting for its reward."""

    layer: int
    action: int
    state: List[int]  # the map before the action
    next_state: List[int]  # the map after it
    loss_at_decision: float
    # paired_improvement: the reward batch loss_at_decision was measured on, to be scored again K steps later
    batch: Optional[Dict[str, torch.Tensor]] = None


@dataclass
class Experience:
    """A rewarded transition as the Q-learner learns from it: the bootstrap term reads ``next_layer``'s slice at
    ``next_state`` (the decided layer itself for td_target=same_layer, the layer decided next for next_decision)."""

    state: List[int]
    layer: int
    action: int
    reward: float  # as learned from (normalised when policy.reward_normalization is on)
    next_state: List[int]
    next_layer: int


def _map_vector(src: List[int]) -> torch.Tensor:
    return torch.tensor(src, dtype=torch.float32)


class QLearner:
    """The Q-network over maps (L -> 128 -> L(L+1)/2, fp32, CPU), its AdamW optimizer and the TD update.

    ``replay`` > 0 keeps the last ``replay`` experiences and learns from a uniform sample of them at each update;
    ``target_update`` > 0 bootstraps from a target network, a copy of the Q-network synced (copied) after every
    ``target_update`` updates. Both 0 (the default): one update on the newest experience, bootstrapping from the
    Q-network itself, as the authors' code does. ``lr_decay_updates`` = tau > 0 takes update n + 1 (n = 0, 1, ...)
    at the learning rate ``Q_LR * tau / (tau + n)``; 0 keeps ``Q_LR``.
    """

    def __init__(self, n_layer: int, seed: int, replay: int = 0, target_update: int = 0, lr_decay_updates: int = 0):
        # Initialise from the policy's own stream without drawing from (or disturbing) the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "q_init"))
            self.network = nn.Sequential(nn.Linear(n_layer, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, n_actions(n_layer)))
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=Q_LR, weight_decay=Q_WEIGHT_DECAY)
        self.replay, self.target_update, self.lr_decay_updates = replay, target_update, lr_decay_updates
        self.buffer: List[Experience] = []
        self.target = copy.deepcopy(self.network) if target_update > 0 else None
        self.updates = 0

    @torch.no_grad()
    def values(self, src: List[int], layer: int) -> torch.Tensor:
        return self.network(_map_vector(src))[action_slice(layer)]

    def update(self, transition: Transition, reward: float) -> None:
        """One AdamW step on the squared error of Q(s)[a] to r + gamma * max Q(s') over the layer's slice."""
        self.learn(Experience(transition.state, transition.layer, transition.action, reward, transition.next_state,
                              transition.layer), rng=None)

    def learn(self, experience: Experience, rng: Optional[random.Random]) -> None:
        """Store ``experience`` (with replay) and take one AdamW step on the mean squared TD error of a batch: the
        experience itself, or up to REPLAY_BATCH experiences drawn uniformly (with replacement) from the buffer by
        ``rng``. Then count the update and sync the target network when it is due."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        if self.replay > 0:
            if rng is None:
                raise ValueError("a learner with replay draws its batches with rng; pass one")
            self.buffer = [*self.buffer, experience][-self.replay:]
            batch = [self.buffer[rng.randrange(len(self.buffer))] for _ in range(min(REPLAY_BATCH, len(self.buffer)))]
            self._step_batch(batch)
        else:
            self._step_one(experience)
        self.updates += 1
        if self.target is not None and self.updates % self.target_update == 0:
            self.target.load_state_dict(self.network.state_dict())

    def learning_rate(self) -> float:
        """The learning rate of the next update (from the count of updates, so it resumes exactly)."""
        if self.lr_decay_updates == 0:
            return Q_LR
        return Q_LR * self.lr_decay_updates / (self.lr_decay_updates + self.updates)

    def _bootstrap(self) -> nn.Module:
        return self.target if self.target is not None else self.network

    def _step_one(self, experience: Experience) -> None:
        with torch.no_grad():
            next_values = self._bootstrap()(_map_vector(experience.next_state))[action_slice(experience.next_layer)]
        target = experience.reward + GAMMA * next_values.max()
        predicted = self.network(_map_vector(experience.state))[action_slice(experience.layer)][experience.action]
        self.optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(predicted, target).backward()
        self.optimizer.step()

    def _step_batch(self, batch: Sequence[Experience]) -> None:
        with torch.no_grad():
            next_values = self._bootstrap()(torch.stack([_map_vector(e.next_state) for e in batch]))
            best_next = torch.stack([row[action_slice(e.next_layer)].max()
                                     for row, e in zip(next_values, batch, strict=True)])
        targets = torch.tensor([e.reward for e in batch], dtype=torch.float32) + GAMMA * best_next
        outputs = self.network(torch.stack([_map_vector(e.state) for e in batch]))
        columns = torch.tensor([action_slice(e.layer).start + e.action for e in batch])
        predicted = outputs.gather(1, columns.unsqueeze(1)).squeeze(1)
        self.optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(predicted, targets).backward()
        self.optimizer.step()

    def state_dict(self) -> Dict[str, Any]:
        # Copies: the optimizer would otherwise keep updating, in place, the tensors of a saved state.
        state = {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "updates": self.updates, "buffer": [asdict(experience) for experience in self.buffer]}
        if self.target is not None:
            state["target"] = self.target.state_dict()
        return copy.deepcopy(state)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.updates = int(state.get("updates", 0))
        self.buffer = [Experience(**experience) for experience in state.get("buffer", [])]
        if self.target is not None:
            self.target.load_state_dict(state["target"])


class EpisodicPolicy(Policy):
    """Episodes over layers 1..L-1, one decision every K optimizer steps; subclasses choose the actions."""

    epsilon: Optional[float]  # the probability that a decision is a uniformly random action; logged with each decision

    def __init__(self, cfg: PolicyConfig, n_layer: int, seed: int):
        self.cfg, self.n_layer = cfg, n_layer
        self.rng = random.Random(derive_seed(seed, "exploration"))
        self.next_layer = 1
        self.steps_since_decision = 0
        self.pending: Optional[Transition] = None
        self.decisions = 0
        self.rewards = 0
        self.clipped_rewards = 0
        # Every reward so far (as measured, before any normalisation): policy.reward_normalization standardises by it.
        self.reward_stats = RunningStats()
        self.greedy_record = GreedyRecord(n_layer)

    def start(self, n_layer: int) -> Decision:
        if n_layer != self.n_layer:
            raise ValueError(f"policy {self.name} was built for {self.n_layer} layers, started with {n_layer}")
        return Decision(maps.identity(n_layer), [True] + [not self.cfg.freeze_at_init] * (n_layer - 1))

    def after_step(self, context: DecisionContext) -> Optional[Decision]:
        if self.n_layer < 2:
            return None
        self.steps_since_decision += 1
        if self.steps_since_decision < self.cfg.steps_per_decision:
            return None
        self.steps_since_decision = 0
        if self.cfg.reward == "paired_improvement":
            # The pending decision's own batch again, then a new batch for the decision about to be taken; both on
            # the model as it is now, before the new action.
            reward = None
            if self.pending is not None:
                reward = self._reward_pending(self.pending, context.score_batch(self.pending.batch), context.counts())
            batch = context.reward_batch()
            return self._decide(context, context.score_batch(batch), reward, batch)
        loss = context.score_batch()
        reward = self._reward_pending(self.pending, loss, context.counts()) if self.pending is not None else None
        return self._decide(context, loss, reward)

    def _reward_pending(self, pending: Transition, loss: float, counts: Dict[str, int]) -> float:
        outcome = Outcome(pending.loss_at_decision, loss, counts["trainable_layers"] / self.n_layer)
        reward = REWARDS[self.cfg.reward](outcome, self.cfg)
        self.rewards += 1
        self.clipped_rewards += int(reward <= REWARD_FLOORS.get(self.cfg.reward, float("-inf")))
        if self.cfg.reward_normalization:
            learned = self.reward_stats.normalize(reward)
        else:
            self.reward_stats.add(reward)
            learned = reward
        self._learn(pending, learned)
        return reward

    def _decide(self, context: DecisionContext, loss: float, reward: Optional[float],
                batch: Optional[Dict[str, torch.Tensor]] = None) -> Decision:
        """The next layer's action at the map the model trains under now, and the map and flags it leads to."""
        layer, before, trainable = self.next_layer, list(context.src), list(context.trainable)
        action, q_values = self._choose(layer, before)
        if q_values is not None:
            self.greedy_record.add(layer, action, q_values)
        src = maps.assign(before, layer, action)
        trainable[layer] = True
        self.pending = Transition(layer, action, before, list(src), loss, batch)
        self.next_layer = layer % (self.n_layer - 1) + 1
        self.decisions += 1
        info = {"layer": layer, "action": action, "reward": reward, "epsilon": self.epsilon, "q_values": q_values}
        return Decision(src, trainable, info)

    def _decided_map(self) -> List[int]:
        """The map the last decision led to (the initial identity before the first): the run's map now, since only
        decisions change it."""
        return list(self.pending.next_state) if self.pending is not None else maps.identity(self.n_layer)

    def _uniform_action(self, layer: int) -> int:
        return self.rng.randrange(layer + 1)

    def _choose(self, layer: int, src: List[int]) -> Tuple[int, Optional[List[float]]]:
        """The action for ``layer`` (an index in its slice) at the map ``src`` and the values it was chosen from, if
        any (the Q-values, or a bandit's mean rewards): their first maximum is the layer's greedy action."""
        raise NotImplementedError

    def _learn(self, transition: Transition, reward: float) -> None:
        """A policy that does not learn ignores its rewards."""

    def _value_slices(self) -> List[List[float]]:
        """The values of every layer 1..L-1 over its actions now (at the map of the last decision), for q_spread_*."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {
            "next_layer": self.next_layer,
            "steps_since_decision": self.steps_since_decision,
            "pending": asdict(self.pending) if self.pending is not None else None,
            "rng": rng_state(self.rng),
            "decisions": self.decisions, "rewards": self.rewards, "clipped_rewards": self.clipped_rewards,
            "reward_stats": self.reward_stats.state_dict(), "greedy_record": self.greedy_record.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.next_layer, self.steps_since_decision = state["next_layer"], state["steps_since_decision"]
        self.pending = Transition(**state["pending"]) if state["pending"] is not None else None
        # Checkpoints written before rng_state held the bare state.
        rng = state["rng"] if isinstance(state["rng"], dict) else {"python": state["rng"]}
        set_rng_state(rng, self.rng)
        self.decisions, self.rewards = state["decisions"], state["rewards"]
        self.clipped_rewards = state["clipped_rewards"]
        # Checkpoints written before these existed start them afresh.
        if "reward_stats" in state:
            self.reward_stats.load_state_dict(state["reward_stats"])
        if "greedy_record" in state:
            self.greedy_record.load_state_dict(state["greedy_record"])

    def diagnostics(self) -> Dict[str, Any]:
        return {"decisions": self.decisions}

    def learning_diagnostics(self) -> Dict[str, Any]:
        """The share of clipped rewards, and the evidence of learning (docs/method.md#learning-diagnostics): the
        spread of each layer's values at the end, the share of greedy decisions among the last 20%, and how many
        layers kept their greedy action over the last STABILITY_EPISODES episodes."""
        found: Dict[str, Any] = {
            "clipped_reward_fraction": self.clipped_rewards / self.rewards if self.rewards else 0.0}
        if self.n_layer > 1:
            found.update(spread_diagnostics(self._value_slices()))
        found["greedy_fraction_last20"] = self.greedy_record.greedy_fraction_last20()
        found["greedy_map_stability"] = self.greedy_record.greedy_map_stability()
        return found


class DynamicQPolicy(EpisodicPolicy):
    """Epsilon-greedy on a Q-network over maps, one TD update per rewarded decision (docs/method.md#dynamic_q), with
    the options of docs/method.md#learning-options."""

    name = "dynamic_q"
    epsilon: float

    def __init__(self, cfg: PolicyConfig, n_layer: int, seed: int):
        super().__init__(cfg, n_layer, seed)
        self.epsilon = EPSILON_START
        self.learner = QLearner(n_layer, seed, cfg.replay, cfg.target_update, cfg.q_lr_decay_updates)

    def _choose(self, layer: int, src: List[int]) -> Tuple[int, Optional[List[float]]]:
        q_values = self.learner.values(src, layer)
        explore = self.rng.random() < self.epsilon
        action = self._uniform_action(layer) if explore else int(q_values.argmax())
        return action, q_values.tolist()

    def _learn(self, transition: Transition, reward: float) -> None:
        # next_decision: the decision that follows is about self.next_layer, taken at transition.next_state.
        next_layer = self.next_layer if self.cfg.td_target == "next_decision" else transition.layer
        experience = Experience(transition.state, transition.layer, transition.action, reward, transition.next_state,
                                next_layer)
        self.learner.learn(experience, self.rng)
        if self.cfg.epsilon_schedule == "decision":
            self.epsilon = next_epsilon(self.epsilon, self.cfg.epsilon_decay_per_decision)
        elif transition.layer == self.n_layer - 1:
            self.epsilon = next_epsilon(self.epsilon)

    def _value_slices(self) -> List[List[float]]:
        src = self._decided_map()
        return [self.learner.values(src, layer).tolist() for layer in range(1, self.n_layer)]

    def diagnostics(self) -> Dict[str, Any]:
        """Whether the agent could have learned (the last, lowest, epsilon and the share of clipped rewards) and
        whether it did (learning_diagnostics)."""
        learning = self.learning_diagnostics()
        return {
            **super().diagnostics(), "final_epsilon": self.epsilon,
            "clipped_reward_fraction": learning.pop("clipped_reward_fraction"), **learning,
        }

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "epsilon": self.epsilon, "q_learner": self.learner.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.epsilon = state["epsilon"]
        self.learner.load_state_dict(state["q_learner"])
