"""What the learned policies share beyond the schedule: running reward statistics (Welford), the record of greedy
choices behind the learning diagnostics, and a few small pure helpers (docs/method.md#learning-diagnostics).

Everything here is plain Python numbers and lists, so a policy's state_dict round-trips through a checkpoint's
JSON exactly.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

# The greedy map is "stable" over this many complete episodes (docs/method.md#learning-diagnostics).
STABILITY_EPISODES = 5
# greedy_fraction_last20 looks at this share of the decisions, the last ones.
LAST_SHARE = 0.2


def first_argmax(values: Sequence[float]) -> int:
    """The index of the first maximum (as torch.argmax and the Q-network's greedy choice break ties)."""
    return max(range(len(values)), key=lambda index: (values[index], -index))


class RunningStats:
    """Welford's running mean and variance of the rewards a policy has seen.

    After ``n`` values, ``mean`` is their mean and ``std`` their sample standard deviation
    (``sqrt(M2 / (n - 1))``; 0 for fewer than two values).
    """

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, value: float) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def normalize(self, value: float) -> float:
        """Add ``value``, then return it standardised by the statistics that include it: ``(r - mean) / std``,
        0 while there is no spread (fewer than two values, or all equal)."""
        self.add(value)
        std = self.std
        return (value - self.mean) / std if std > 0 else 0.0

    def state_dict(self) -> Dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class GreedyRecord:
    """Per decision, whether its action was the greedy one (the first maximum of the values it was chosen from),
    and per complete episode, each layer's greedy action: what greedy_fraction_last20 and greedy_map_stability
    are computed from."""

    def __init__(self, n_layer: int) -> None:
        self.n_layer = n_layer
        self.greedy: List[bool] = []
        self.episode: List[int] = []  # the greedy actions of layers 1.. of the episode under way
        self.episodes: List[List[int]] = []  # the last STABILITY_EPISODES complete episodes, oldest first

    def add(self, layer: int, action: int, values: Sequence[float]) -> None:
        greedy = first_argmax(values)
        self.greedy.append(action == greedy)
        if layer == 1:
            self.episode = []
        self.episode.append(greedy)
        if layer == self.n_layer - 1 and len(self.episode) == self.n_layer - 1:
            self.episodes = [*self.episodes, list(self.episode)][-STABILITY_EPISODES:]

    def greedy_fraction_last20(self) -> Optional[float]:
        if not self.greedy:
            return None
        last = self.greedy[len(self.greedy) - math.ceil(LAST_SHARE * len(self.greedy)):]
        return sum(last) / len(last)

    def greedy_map_stability(self) -> Optional[float]:
        """The share of layers whose greedy action was the same in each of the last STABILITY_EPISODES complete
        episodes; None before that many episodes are complete."""
        if len(self.episodes) < STABILITY_EPISODES:
            return None
        stable = sum(len({episode[index] for episode in self.episodes}) == 1 for index in range(self.n_layer - 1))
        return stable / (self.n_layer - 1)

    def state_dict(self) -> Dict[str, Any]:
        return {"greedy": list(self.greedy), "episode": list(self.episode),
                "episodes": [list(episode) for episode in self.episodes]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.greedy = [bool(flag) for flag in state["greedy"]]
        self.episode = [int(action) for action in state["episode"]]
        self.episodes = [[int(action) for action in episode] for episode in state["episodes"]]


def spread_diagnostics(slices: Sequence[Sequence[float]]) -> Dict[str, float]:
    """q_spread_min / q_spread_mean: over layers 1..L-1, the spread (max - min) of each layer's values."""
    spreads = [max(values) - min(values) for values in slices]
    return {"q_spread_min": min(spreads), "q_spread_mean": sum(spreads) / len(spreads)}
