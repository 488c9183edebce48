"""The three memory figures of a run's summary, and which to compare when.

* ``train_state_bytes`` (with ``_per_rank`` and ``_total``): weights + gradients + optimizer state, counted from
  the tensors, each storage once, after the last step. Exact and the same on every device: compare it between
  maps, grad modes and policies for what tying saves in the state a run keeps between steps (and with the
  physical limit of benchmarks/bench.py).
* ``peak_tensor_bytes`` (split into ``peak_state_bytes`` + ``peak_other_bytes``): the most bytes that live tensors
  held at once during a training step, activations and temporaries included, counted the same way on every
  device (TensorMemoryTracker). Compare it between policies and maps for what a step needs; it is the figure
  that includes what tying cannot save (every slot still computes).
* ``peak_memory_bytes`` + ``peak_memory_kind``: what the device reports, ``cuda_max_allocated`` on a GPU (near
  ``peak_tensor_bytes`` plus kernel workspaces) or the process's peak resident set size, ``cpu_rss``, which the
  interpreter and torch dominate and which a sweep's later jobs inherit from the jobs before them. Compare it
  only between runs of one kind on one machine, to size jobs, never to rank policies.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Any, Callable, Dict, Iterator, List, Set, Tuple

import torch
from torch import nn

from tyingrun.contracts import TiedModule
from tyingrun.metrics.tensor_memory import TensorMemoryTracker, training_state
from tyingrun.tying.counts import train_state_bytes

PEAK_TENSOR_KEYS = ("peak_tensor_bytes", "peak_state_bytes", "peak_other_bytes")
# The map and the effective trainable flags a step trains under: what one peak measurement holds for.
Tying = Tuple[Tuple[int, ...], Tuple[bool, ...]]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> Tuple[int, str]:
    """CUDA: bytes allocated at peak by tensors; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "cpu_rss"


def train_state_figures(model: nn.Module, optimizer: torch.optim.Optimizer,
                        per_rank: Callable[[int], List[int]] = lambda held: [held]) -> Dict[str, Any]:
    """``train_state_bytes``: the most any rank holds, what each holds in rank order (its shards under FSDP,
    everything under DDP) and their total; ``per_rank`` gathers this process's figure from every rank (one
    process: itself alone, so all three are the whole state)."""
    held = [int(value) for value in per_rank(train_state_bytes(model, optimizer))]
    return {"train_state_bytes": max(held), "train_state_bytes_per_rank": held, "train_state_bytes_total": sum(held)}


class PeakTensorProbe:
    """``peak_tensor_bytes`` of a run: the highest peak over measured training steps, with its split.

    Steps under one tying (map and effective trainable flags) are measured until one is complete: a revisited
    tying peaks the same, and measuring slows a step. A step that creates optimizer state ran its forward and
    backward without that state, so it peaks below every later step under its tying: the next one is measured too.
    """

    def __init__(self, model: TiedModule, optimizer: torch.optim.Optimizer, device: torch.device):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.highest: Dict[str, int] = dict.fromkeys(PEAK_TENSOR_KEYS, 0)
        self.measured: Set[Tying] = set()

    def tying(self) -> Tying:
        """The tying the next step trains under."""
        stack = self.model.stack
        return tuple(stack.src), tuple(stack.effective_trainable)

    def reset(self) -> None:
        """Measure again from the next step on, as a run does at its start."""
        self.measured.clear()
        self.highest = dict.fromkeys(PEAK_TENSOR_KEYS, 0)

    @contextlib.contextmanager
    def measure(self) -> Iterator[bool]:
        """Around one training step: yields whether the step is measured. A measured step runs eagerly, compiled
        code included (``force_eager``): under a dispatch mode torch.compile runs eagerly anyway, and then never
        compiles that code again."""
        tying = self.tying()
        if tying in self.measured:
            yield False
            return
        states_before = len(self.optimizer.state)
        tracker = TensorMemoryTracker(lambda: training_state(self.model, self.optimizer), self.device)
        # zero_grad(set_to_none=True) frees the gradients before the region ends: mark them state while they live.
        hook = self.optimizer.register_step_post_hook(lambda *_: tracker.reclassify())
        try:
            with tracker, torch.compiler.set_stance("force_eager"):
                yield True
        finally:
            hook.remove()
        if tracker.peak_bytes > self.highest["peak_tensor_bytes"]:
            self.highest = tracker.summary()
        if len(self.optimizer.state) == states_before:
            self.measured.add(tying)

    def state_dict(self) -> Dict[str, Any]:
        return {"peak_tensors": self.highest,
                "measured_maps": sorted([list(src), list(trainable)] for src, trainable in self.measured)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.highest = state["peak_tensors"]
        self.measured = {(tuple(src), tuple(trainable)) for src, trainable in state["measured_maps"]}
