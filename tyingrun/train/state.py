"""The training loop's own bookkeeping, as a checkpoint keeps it: running means, throughput, the last evaluation,
the losses not yet logged and the time spent before this process. (The step is the checkpoint's own; the RNGs
are tyingrun.seeding's rng_state.)

The training losses stay on the device until they are read (read_losses), at log points and checkpoints only, so
no step waits for the device; the non-finite check runs there, naming the step whose loss it was.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

from tyingrun.metrics.meters import RunningMean, Throughput
from tyingrun.train.distributed import SINGLE, Mesh, mean_over_ranks

MEANS = ("trainable_params", "independent_layers", "trainable_layers")


class NonFiniteLoss(RuntimeError):
    pass


class LoopState:
    def __init__(self, device: torch.device, mesh: Mesh = SINGLE) -> None:
        self.device, self.mesh = device, mesh
        self.means = {name: RunningMean() for name in MEANS}
        self.throughput = Throughput(device)
        self.last_eval: Dict[str, Any] = {}
        self.losses_since_log: List[torch.Tensor] = []
        self.last_train_loss = math.nan  # the newest loss read, for the progress line
        self.elapsed_before = 0.0

    def count(self, counts: Dict[str, int]) -> None:
        """One step trained under ``counts``: add it to the running means."""
        for name in MEANS:
            self.means[name].add(counts[name])

    def mean_counts(self) -> Dict[str, float]:
        return {f"{name}_mean": self.means[name].mean for name in MEANS}

    def read_losses(self, step: int) -> List[float]:
        """The training losses since the last log line (averaged over the ranks), in one host read, ``step`` being
        the number of steps trained; a non-finite one stops the run naming its step."""
        if not self.losses_since_log:
            return []
        losses = torch.stack(self.losses_since_log).float()
        if self.mesh.distributed:
            losses = mean_over_ranks(losses)
        values = losses.tolist()
        bad = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
        if bad is not None:
            raise NonFiniteLoss(f"training loss became {values[bad]} at step {step - len(values) + bad}")
        self.last_train_loss = values[-1]
        return values

    def progress(self) -> str:
        """The progress bar's status: the newest training loss read (nothing before the first log point)."""
        return "" if math.isnan(self.last_train_loss) else f"loss {self.last_train_loss:.3f}"

    def state_dict(self, elapsed: float, step: int) -> Dict[str, Any]:
        """``elapsed``: seconds this process has trained so far; ``step``: steps trained (reading the losses not yet
        logged stops the run here if one is non-finite)."""
        return {
            "means": {name: mean.state_dict() for name, mean in self.means.items()},
            "throughput": {"items": self.throughput.items, "seconds": self.throughput.seconds},
            "last_eval": self.last_eval, "losses_since_log": self.read_losses(step),
            "elapsed_s": self.elapsed_before + elapsed,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, mean in self.means.items():
            mean.load_state_dict(state["means"][name])
        self.throughput.items, self.throughput.seconds = state["throughput"]["items"], state["throughput"]["seconds"]
        self.last_eval, self.elapsed_before = state["last_eval"], state["elapsed_s"]
        self.losses_since_log = [torch.tensor(value, device=self.device) for value in state["losses_since_log"]]
