"""Measurements of a run: parameter counts, running means, throughput (memory: tyingrun.metrics.memory;
perplexity: tyingrun.contracts)."""

from __future__ import annotations

import time
from typing import Dict

from torch import nn

from tyingrun.tying import counts
from tyingrun.tying.stack import TiedStack


def model_counts(model: nn.Module, stack: TiedStack) -> Dict[str, int]:
    return {
        "trainable_params": counts.trainable_params(model),
        "stored_params": counts.stored_params(model),
        "independent_layers": stack.independent_layers,
        "trainable_layers": stack.trainable_layers,
    }


class RunningMean:
    """Mean of a quantity over training steps (trainable parameters, independent layers...)."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def state_dict(self) -> Dict[str, float]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.total, self.count = state["total"], state["count"]


class Throughput:
    """Items per second of training time (evaluation excluded)."""

    def __init__(self):
        self.items = 0
        self.seconds = 0.0
        self._started = None

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, items: int) -> None:
        self.seconds += time.perf_counter() - self._started
        self.items += items

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0
