"""The training loop's own bookkeeping, as a checkpoint keeps it: running means, throughput, the last evaluation,
the losses not yet logged and the time spent before this process. (The step is the checkpoint's own; the RNGs
are tyingrun.seeding's rng_state.)"""

from __future__ import annotations

from typing import Any, Dict, List

from tyingrun.metrics.meters import RunningMean, Throughput

MEANS = ("trainable_params", "independent_layers", "trainable_layers")


class LoopState:
    def __init__(self) -> None:
        self.means = {name: RunningMean() for name in MEANS}
        self.throughput = Throughput()
        self.last_eval: Dict[str, Any] = {}
        self.losses_since_log: List[float] = []
        self.elapsed_before = 0.0

    def count(self, counts: Dict[str, int]) -> None:
        """One step trained under ``counts``: add it to the running means."""
        for name in MEANS:
            self.means[name].add(counts[name])

    def mean_counts(self) -> Dict[str, float]:
        return {f"{name}_mean": self.means[name].mean for name in MEANS}

    def state_dict(self, elapsed: float) -> Dict[str, Any]:
        """``elapsed``: seconds this process has trained so far."""
        return {
            "means": {name: mean.state_dict() for name, mean in self.means.items()},
            "throughput": {"items": self.throughput.items, "seconds": self.throughput.seconds},
            "last_eval": self.last_eval, "losses_since_log": self.losses_since_log,
            "elapsed_s": self.elapsed_before + elapsed,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, mean in self.means.items():
            mean.load_state_dict(state["means"][name])
        self.throughput.items, self.throughput.seconds = state["throughput"]["items"], state["throughput"]["seconds"]
        self.last_eval, self.elapsed_before = state["last_eval"], state["elapsed_s"]
        self.losses_since_log = state["losses_since_log"]
