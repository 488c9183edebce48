"""dynamic_q: Q-learning driven dynamic layer tying (METHOD.md §3), and the decision schedule it shares
with the ``random`` control.

Schedule. ``start`` returns the policy's current state without deciding anything: for a fresh policy the
identity map with layer 0 trainable and layers 1..L-1 frozen at their initial weights
(``policy.freeze_at_init``; all trainable without it). ``after_step`` runs after every optimizer step;
every ``policy.steps_per_decision`` (K) steps, i.e. at steps K, 2K, 3K, ..., is a decision point:

1. score one training batch (``context.score_batch()``);
2. if a decision is pending, that score ends its K steps: compute its reward and learn from it once;
   after the transition of layer L-1 (the end of an episode) epsilon decays;
3. decide for the next layer of the episode (1, 2, ..., L-1, then 1 again) and return the new map.

So the first K steps train the initial state, and every decision is followed by exactly K optimizer
steps before it is rewarded. The score taken at a decision point is also the "loss at the decision" of
the ``improvement`` reward: it is measured just before the trainer applies the action, so the
improvement includes the action's immediate effect on the loss. A one-layer model has nothing to decide.

Because ``start`` returns the current state, a policy restored by ``load_state_dict`` returns the
restored map from ``start`` too.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from tyingrun.config import PolicyConfig
from tyingrun.errors import BadInput
from tyingrun.metrics.meters import perplexity
from tyingrun.policies.base import Decision, DecisionContext, Policy
from tyingrun.tying import maps

HIDDEN = 128
GAMMA = 0.99
Q_LR = 1e-3
Q_WEIGHT_DECAY = 0.01
EPSILON_START = 1.0
EPSILON_DECAY = 0.95
EPSILON_FLOOR = 0.01
PAPER_REWARD_FLOOR = -10.0


def n_actions(n_layer: int) -> int:
    return n_layer * (n_layer + 1) // 2


def action_slice(layer: int) -> slice:
    """Layer l's entries of the Q-vector: entry a < l ties it to layer a, entry l trains it independently."""
    start = layer * (layer + 1) // 2
    return slice(start, start + layer + 1)


def next_epsilon(epsilon: float) -> float:
    return max(epsilon * EPSILON_DECAY, EPSILON_FLOOR)


@dataclass
class Outcome:
    """What one decision led to, measured after the K optimizer steps that followed it."""

    loss_at_decision: float  # CE on a training batch at the decision point, before the action took effect
    loss: float  # CE on a training batch after the K steps
    trainable_share: float  # trainable layer slots / all layer slots after the K steps


REWARDS: Dict[str, Callable[[Outcome, PolicyConfig], float]] = {
    # The paper's clip(-exp(CE), -10, 10); minus a perplexity is never positive, so only -10 binds.
    "paper": lambda outcome, cfg: max(-perplexity(outcome.loss), PAPER_REWARD_FLOOR),
    "neg_loss": lambda outcome, cfg: -outcome.loss,
    "improvement": lambda outcome, cfg: outcome.loss_at_decision - outcome.loss,
    "param_penalty": lambda outcome, cfg: -outcome.loss - cfg.param_penalty_weight * outcome.trainable_share,
}


@dataclass
class Transition:
    """A decision waiting for its reward."""

    layer: int
    action: int
    state: List[int]  # the map before the action
    next_state: List[int]  # the map after it
    loss_at_decision: float


def _map_vector(src: List[int]) -> torch.Tensor:
    return torch.tensor(src, dtype=torch.float32)


class QLearner:
    """The Q-network over maps (L -> 128 -> L(L+1)/2, fp32, CPU), its AdamW optimizer and the TD update."""

    def __init__(self, n_layer: int, seed: int):
        # Initialise from the policy's seed without drawing from (or disturbing) the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = nn.Sequential(nn.Linear(n_layer, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, n_actions(n_layer)))
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=Q_LR, weight_decay=Q_WEIGHT_DECAY)

    @torch.no_grad()
    def values(self, src: List[int], layer: int) -> torch.Tensor:
        return self.network(_map_vector(src))[action_slice(layer)]

    def update(self, transition: Transition, reward: float) -> None:
        """One AdamW step on the squared error of Q(s)[a] to r + gamma * max Q(s') over the layer's slice."""
        target = reward + GAMMA * self.values(transition.next_state, transition.layer).max()
        predicted = self.network(_map_vector(transition.state))[action_slice(transition.layer)][transition.action]
        self.optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(predicted, target).backward()
        self.optimizer.step()

    def state_dict(self) -> Dict[str, Any]:
        # Copies: the optimizer would otherwise keep updating, in place, the tensors of a saved state.
        return copy.deepcopy({"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))


class EpisodicPolicy(Policy):
    """Episodes over layers 1..L-1, one decision every K optimizer steps; subclasses choose the actions."""

    epsilon: float  # the probability that a decision is a uniformly random action; logged with each decision

    def __init__(self, cfg: PolicyConfig, n_layer: int, seed: int):
        if cfg.reward not in REWARDS:
            raise BadInput(f"policy.reward={cfg.reward!r} is not a reward; choose one of: {', '.join(REWARDS)}")
        if cfg.steps_per_decision < 1:
            raise BadInput(f"policy.steps_per_decision={cfg.steps_per_decision} must be at least 1")
        self.cfg, self.n_layer = cfg, n_layer
        self.rng = random.Random(seed)
        self.src = maps.identity(n_layer)
        self.trainable = [True] + [not cfg.freeze_at_init] * (n_layer - 1)
        self.next_layer = 1
        self.steps_since_decision = 0
        self.pending: Optional[Transition] = None

    def start(self, n_layer: int) -> Decision:
        if n_layer != self.n_layer:
            raise ValueError(f"policy {self.name} was built for {self.n_layer} layers, started with {n_layer}")
        return Decision(list(self.src), list(self.trainable))

    def after_step(self, context: DecisionContext) -> Optional[Decision]:
        if self.n_layer < 2:
            return None
        self.steps_since_decision += 1
        if self.steps_since_decision < self.cfg.steps_per_decision:
            return None
        self.steps_since_decision = 0
        loss = context.score_batch()
        reward = self._reward_pending(loss, context.counts()) if self.pending is not None else None
        return self._decide(loss, reward)

    def _reward_pending(self, loss: float, counts: Dict[str, int]) -> float:
        outcome = Outcome(self.pending.loss_at_decision, loss, counts["trainable_layers"] / self.n_layer)
        reward = REWARDS[self.cfg.reward](outcome, self.cfg)
        self._learn(self.pending, reward)
        return reward

    def _decide(self, loss: float, reward: Optional[float]) -> Decision:
        layer = self.next_layer
        action, q_values = self._choose(layer)
        before = self.src
        self.src = maps.assign(before, layer, action)
        self.trainable[layer] = True
        self.pending = Transition(layer, action, before, list(self.src), loss)
        self.next_layer = layer % (self.n_layer - 1) + 1
        info = {"layer": layer, "action": action, "reward": reward, "epsilon": self.epsilon, "q_values": q_values}
        return Decision(list(self.src), list(self.trainable), info)

    def _uniform_action(self, layer: int) -> int:
        return self.rng.randrange(layer + 1)

    def _choose(self, layer: int) -> Tuple[int, Optional[List[float]]]:
        """The action for ``layer`` (an index in its slice) and the Q-values it was chosen from, if any."""
        raise NotImplementedError

    def _learn(self, transition: Transition, reward: float) -> None:
        """A policy that does not learn ignores its rewards."""

    def state_dict(self) -> Dict[str, Any]:
        version, internal, gauss_next = self.rng.getstate()
        return {
            "src": list(self.src), "trainable": list(self.trainable), "next_layer": self.next_layer,
            "steps_since_decision": self.steps_since_decision,
            "pending": asdict(self.pending) if self.pending is not None else None,
            "rng": [version, list(internal), gauss_next],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        maps.validate(state["src"], self.n_layer)
        self.src, self.trainable = list(state["src"]), list(state["trainable"])
        self.next_layer, self.steps_since_decision = state["next_layer"], state["steps_since_decision"]
        self.pending = Transition(**state["pending"]) if state["pending"] is not None else None
        version, internal, gauss_next = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss_next))


class DynamicQPolicy(EpisodicPolicy):
    """Epsilon-greedy on a Q-network over maps, one TD update per rewarded decision (METHOD.md §3)."""

    name = "dynamic_q"

    def __init__(self, cfg: PolicyConfig, n_layer: int, seed: int):
        super().__init__(cfg, n_layer, seed)
        self.epsilon = EPSILON_START
        self.learner = QLearner(n_layer, seed)

    def _choose(self, layer: int) -> Tuple[int, Optional[List[float]]]:
        q_values = self.learner.values(self.src, layer)
        explore = self.rng.random() < self.epsilon
        action = self._uniform_action(layer) if explore else int(q_values.argmax())
        return action, q_values.tolist()

    def _learn(self, transition: Transition, reward: float) -> None:
        self.learner.update(transition, reward)
        if transition.layer == self.n_layer - 1:
            self.epsilon = next_epsilon(self.epsilon)

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "epsilon": self.epsilon, "q_learner": self.learner.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.epsilon = state["epsilon"]
        self.learner.load_state_dict(state["q_learner"])
