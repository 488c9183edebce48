"""Measurements of a run: parameter counts, running means, throughput (memory: tyingrun.metrics.memory;
perplexity: tyingrun.contracts)."""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch
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
    """Items per second of training time (evaluation excluded).

    On CUDA a step is timed by events on the device's stream, read only when the rate or the seconds are asked
    for (at log points), so timing never makes a step wait for the device; on the CPU by the wall clock."""

    def __init__(self, device: Optional[torch.device] = None):
        self.items = 0
        self._seconds = 0.0
        self._cuda = device is not None and device.type == "cuda"
        self._started_at = 0.0
        self._started_event: Optional[torch.cuda.Event] = None
        self._pending: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> None:
        if self._cuda:
            self._started_event = torch.cuda.Event(enable_timing=True)
            self._started_event.record()
        else:
            self._started_at = time.perf_counter()

    def stop(self, items: int) -> None:
        if self._started_event is not None:
            stopped = torch.cuda.Event(enable_timing=True)
            stopped.record()
            self._pending.append((self._started_event, stopped))
            self._started_event = None
        else:
            self._seconds += time.perf_counter() - self._started_at
        self.items += items

    @property
    def seconds(self) -> float:
        for started, stopped in self._pending:
            self._seconds += started.elapsed_time(stopped) / 1000.0  # waits for the step's events
        self._pending.clear()
        return self._seconds

    @seconds.setter
    def seconds(self, value: float) -> None:
        self._pending.clear()
        self._seconds = value

    @property
    def rate(self) -> float:
        seconds = self.seconds
        return self.items / seconds if seconds else 0.0
