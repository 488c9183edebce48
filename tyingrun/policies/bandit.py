"""bandit: dynamic_q's schedule and rewards, learned by one multi-armed bandit per layer (docs/method.md#bandit).

Layer ``l``'s bandit has ``l + 1`` arms, the actions of its slice, and keeps each arm's pull count and mean
reward. There is no state and no bootstrapping: an action is credited with its own reward only, never with what
the map it leaves does to later decisions. If this does as well as the Q-network, the Q-network's sequential
credit assignment buys nothing on the task.

Choosing for layer ``l`` (``n_a`` pulls and mean ``m_a`` of arm ``a``, ``n`` pulls of the layer in all, ``s`` the
sample standard deviation of every reward learned so far, or 1 while it is undefined or 0):

* an arm never pulled comes first (uniformly among those, drawn from the policy's exploration stream);
* ``ucb1``: ``argmax_a m_a + sqrt(2) * s * sqrt(ln n / n_a)``;
* ``thompson``: ``argmax_a m_a + s * z_a / sqrt(n_a)``, ``z_a`` standard normal from the exploration stream
  (a Gaussian posterior of each arm's mean under a flat prior).

Ties go to the first maximum. The logged ``q_values`` of a decision are its layer's means ``m_a``; their first
maximum is its greedy action.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from tyingrun.config import PolicyConfig
from tyingrun.policies.dynamic_q import EpisodicPolicy, Transition
from tyingrun.policies.learning import RunningStats, first_argmax

UCB_C = math.sqrt(2.0)


class BanditPolicy(EpisodicPolicy):
    name = "bandit"
    # No epsilon: a bandit explores through its confidence bonus (ucb1) or its posterior draws (thompson).
    epsilon = None

    def __init__(self, cfg: PolicyConfig, n_layer: int, seed: int):
        super().__init__(cfg, n_layer, seed)
        self.pulls: List[List[int]] = [[0] * (layer + 1) for layer in range(n_layer)]
        self.means: List[List[float]] = [[0.0] * (layer + 1) for layer in range(n_layer)]
        # The rewards as learned from (normalised when policy.reward_normalization is on): the exploration's scale.
        self.learned = RunningStats()

    def _scale(self) -> float:
        std = self.learned.std
        return std if std > 0 else 1.0

    def _choose(self, layer: int, src: List[int]) -> Tuple[int, Optional[List[float]]]:
        pulls, means = self.pulls[layer], self.means[layer]
        untried = [action for action, count in enumerate(pulls) if count == 0]
        if untried:
            action = untried[self.rng.randrange(len(untried))]
        elif self.cfg.bandit_algorithm == "ucb1":
            bonus = UCB_C * self._scale() * math.sqrt(math.log(sum(pulls)))
            action = first_argmax([mean + bonus / math.sqrt(count) for mean, count in zip(means, pulls, strict=True)])
        else:
            scale = self._scale()
            action = first_argmax([mean + scale * self.rng.gauss(0.0, 1.0) / math.sqrt(count)
                                   for mean, count in zip(means, pulls, strict=True)])
        return action, list(means)

    def _learn(self, transition: Transition, reward: float) -> None:
        self.learned.add(reward)
        layer, action = transition.layer, transition.action
        self.pulls[layer][action] += 1
        self.means[layer][action] += (reward - self.means[layer][action]) / self.pulls[layer][action]

    def _value_slices(self) -> List[List[float]]:
        return [list(self.means[layer]) for layer in range(1, self.n_layer)]

    def diagnostics(self) -> Dict[str, Any]:
        return {**super().diagnostics(), **self.learning_diagnostics()}

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "pulls": [list(row) for row in self.pulls],
                "means": [list(row) for row in self.means], "learned": self.learned.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pulls = [[int(count) for count in row] for row in state["pulls"]]
        self.means = [[float(mean) for mean in row] for row in state["means"]]
        self.learned.load_state_dict(state["learned"])
