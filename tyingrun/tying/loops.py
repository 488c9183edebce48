"""Looped depth (docs/looped.md): a prelude of unique blocks, a core of blocks run several times, a coda.

``LoopPlan`` is the layout: slot order prelude, then the core's blocks once per loop, then the coda, the core's slots
tied across the loops (``tying_map``). The stack runs a plan at any loop count (``schedule``): loops within the
trained ones use their own slots, loops beyond them reuse the last loop's slots (its per-loop parameters too), so the
same weights evaluate at more loops than they trained with. ``LoopControl`` is what the stack reads while it runs a
plan: the loop count of this forward, which loops carry gradients (truncated backprop), the input injection and the
per-loop output scales.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from tyingrun.tying.maps import TyingMap


@dataclass(frozen=True)
class LoopPlan:
    prelude: int
    core: int
    coda: int
    loops: int

    @property
    def slots(self) -> int:
        return self.prelude + self.core * self.loops + self.coda

    def tying_map(self) -> TyingMap:
        """Prelude and coda slots independent; core slot j of every loop tied to core slot j of the first."""
        core = [self.prelude + j for _ in range(self.loops) for j in range(self.core)]
        coda = list(range(self.prelude + self.core * self.loops, self.slots))
        return [*range(self.prelude), *core, *coda]

    def core_slot(self, loop: int, block: int) -> int:
        """The slot that runs core block ``block`` at loop ``loop`` (from 0): beyond the trained loops, the last's."""
        return self.prelude + min(loop, self.loops - 1) * self.core + block

    def parts(self) -> Dict[str, List[int]]:
        """Each part's slots, as tyingrun-inspect shows them."""
        first_coda = self.prelude + self.core * self.loops
        return {"prelude": list(range(self.prelude)), "core": list(range(self.prelude, first_coda)),
                "coda": list(range(first_coda, self.slots))}


def counts_map(counts: Sequence[int]) -> TyingMap:
    """Intra-layer recurrence: layer i runs ``counts[i]`` times in a row, its slots tied to the first of them."""
    src: TyingMap = []
    for count in counts:
        src.extend([len(src)] * count)
    return src


class Injection(nn.Module):
    """The prelude's output ``e`` fed into a later loop's input ``h``: ``h + e`` (add) or ``W [h; e]`` (concat, one
    matrix shared by every loop, initialised to ``[I I]`` so it starts as add)."""

    def __init__(self, mode: str, width: int):
        super().__init__()
        self.project = None
        if mode == "concat":
            self.project = nn.Linear(2 * width, width, bias=False)
            with torch.no_grad():
                self.project.weight.copy_(torch.cat([torch.eye(width), torch.eye(width)], dim=1))

    def forward(self, state: torch.Tensor, prelude_output: torch.Tensor) -> torch.Tensor:
        if self.project is None:
            return state + prelude_output
        return self.project(torch.cat([state, prelude_output], dim=-1))


class LoopControl(nn.Module):
    """A plan's run-time knobs and its per-loop tensors (they live in the stack's state dict under ``looping.``)."""

    def __init__(self, plan: LoopPlan, width: int, inject: str = "none", scale: bool = False,
                 backprop_loops: Optional[int] = None):
        super().__init__()
        self.plan = plan
        self.backprop_loops = backprop_loops
        self.injection = Injection(inject, width) if inject != "none" else None
        # One per-channel output scale per core slot (policy.loop_params=scale), at 1.
        self.scales = nn.ParameterList(
            [nn.Parameter(torch.ones(width)) for _ in range(plan.core * plan.loops)] if scale else [])
        self.loops_now = plan.loops

    @contextlib.contextmanager
    def at(self, loops: int) -> Iterator[None]:
        """Run the plan at ``loops`` loops inside the block (the trained weights, nothing copied)."""
        before, self.loops_now = self.loops_now, int(loops)
        try:
            yield
        finally:
            self.loops_now = before

    def loop_grads(self, training: bool) -> List[bool]:
        """For each loop of this forward, whether it builds a graph: under truncated backprop only the last
        ``backprop_loops`` do in training; every loop does otherwise."""
        loops = self.loops_now
        with_grad = loops if not training or self.backprop_loops is None else min(loops, self.backprop_loops)
        return [loop >= loops - with_grad for loop in range(loops)]

    def core_runs(self, training: bool) -> List[Tuple[bool, List[int]]]:
        """For each loop of this forward: whether it builds a graph, and the core slots it runs, in order."""
        plan = self.plan
        return [(grad, [plan.core_slot(loop, block) for block in range(plan.core)])
                for loop, grad in enumerate(self.loop_grads(training))]

    def executed_slots(self) -> List[Tuple[int, bool]]:
        """The slots a training forward runs, in order, each with whether its backward runs: a loop without a graph
        has none, nor has the prelude when nothing that carries a graph reads its output (truncated, no injection)."""
        parts, runs = self.plan.parts(), self.core_runs(training=True)
        prelude_backward = runs[0][0] or self.injection is not None
        executed = [(slot, prelude_backward) for slot in parts["prelude"]]
        for grad, slots in runs:
            executed += [(slot, grad) for slot in slots]
        return executed + [(slot, True) for slot in parts["coda"]]

    def scale(self, slot: int) -> Optional[torch.Tensor]:
        """The output scale of core slot ``slot``, if the plan has them."""
        if len(self.scales) == 0:
            return None
        return self.scales[slot - self.plan.prelude]
