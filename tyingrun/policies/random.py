"""random: the no-learning control for dynamic_q - the same schedule, uniformly random legal actions."""

from __future__ import annotations

from typing import List, Optional, Tuple

from tyingrun.policies.dynamic_q import EpisodicPolicy


class RandomPolicy(EpisodicPolicy):
    name = "random"
    # Every decision explores: what dynamic_q would do with epsilon fixed at 1.
    epsilon = 1.0

    def _choose(self, layer: int, src: List[int]) -> Tuple[int, Optional[List[float]]]:
        return self._uniform_action(layer), None
