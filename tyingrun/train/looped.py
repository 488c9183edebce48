"""policy=looped in a run (docs/looped.md): the stack's loop control and per-loop tensors, and the loop count of each
training step.

``prepare`` gives a freshly built model what its policy=looped config asks for (called wherever a model is built, so
a checkpoint of it loads back). ``LoopCounts`` draws each step's loops: policy.loops every step (fixed), or a
log-normal-Poisson draw as recurrent-depth models train (poisson): ``n = min(max_loops, 1 + Poisson(lam))`` with
``log lam ~ Normal(log(loops - 1) - sigma^2 / 2, sigma)``, so ``E[lam] = loops - 1`` and ``E[n] = loops`` before the
cap. Its stream is the run's loop_counts seed stream alone, drawn once per step on every rank, so every rank runs the
same loops without a word exchanged; its state is in the checkpoint, so a resume draws what the run would have.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, ContextManager, Dict

import torch
from torch import nn

from tyingrun.config import Config
from tyingrun.policies.looped import later_loop_slots, loop_plan, max_loops
from tyingrun.seeding import derive_seed, rng_state, set_rng_state
from tyingrun.tying.flops import train_flops_per_token
from tyingrun.tying.loops import LoopControl
from tyingrun.tying.stack import TiedStack


def prepare(stack: TiedStack, cfg: Config) -> None:
    """The loop control (plan, injection, per-loop scales, truncated backprop) and, for loop_params=lora, each later
    loop's LoRA: A drawn as torch.nn.Linear draws its weights (from the run's init stream), B at 0."""
    policy = cfg.policy
    if policy.name != "looped":
        return
    plan = loop_plan(policy)
    if plan is not None:
        stack.looping = LoopControl(plan, cfg.model.d_model, policy.inject, policy.loop_params == "scale",
                                    policy.backprop_loops)
    if policy.loop_params == "lora":
        alpha = policy.lora_rank if policy.lora_alpha is None else policy.lora_alpha
        slots = later_loop_slots(policy)
        stack.add_lora(slots, policy.lora_rank, alpha)
        with torch.no_grad():
            for slot in slots:
                for correction in stack.corrections(slot).values():
                    nn.init.kaiming_uniform_(correction.A, a=math.sqrt(5))


class LoopCounts:
    """The loop count of every training step of a policy=looped run (of any other run: none, and no effect)."""

    def __init__(self, cfg: Config, stack: TiedStack):
        policy = cfg.policy
        self.cfg, self.control = cfg, stack.looping
        self.loops, self.sigma, self.poisson = policy.loops, policy.loop_sigma, policy.train_loops == "poisson"
        self.cap = max_loops(policy)
        self.generator = random.Random(derive_seed(cfg.train.seed, "loop_counts"))
        # steps[n]: the training steps that ran n loops so far.
        self.steps = [0] * (self.cap + 1)

    def training_step(self) -> ContextManager[None]:
        """The stack runs this step's loops inside the block."""
        if self.control is None:
            return contextlib.nullcontext()
        loops = self.next()
        return self.control.at(loops)

    def next(self) -> int:
        loops = self._draw() if self.poisson else self.loops
        self.steps[loops] += 1
        return loops

    def _draw(self) -> int:
        if self.loops == 1:
            return 1
        mean = self.loops - 1
        lam = self.generator.lognormvariate(math.log(mean) - self.sigma ** 2 / 2, self.sigma)
        return min(self.cap, 1 + self._poisson(lam))

    def _poisson(self, lam: float) -> int:
        """Knuth's product of uniforms (lam is a few loops here), from this stream alone."""
        threshold, count, product = math.exp(-lam), 0, self.generator.random()
        while product > threshold:
            count += 1
            product *= self.generator.random()
        return count

    def figures(self, model: nn.Module, seq_len: int) -> Dict[str, Any]:
        """summary.json's looped keys: the layout, the loops val/test were scored at, the mean loops per step and the
        training FLOPs per token, exactly as run (the mean over the steps' loop counts) and at each evaluated count."""
        policy, control = self.cfg.policy, self.control
        if policy.name != "looped":
            return {}
        layout = {key: getattr(policy, key) for key in ("prelude", "core", "coda", "loops", "counts", "train_loops",
                                                       "backprop_loops", "inject", "loop_params")}
        figures: Dict[str, Any] = {"looped": {**layout, "max_loops": self.cap}}
        if control is None:
            return figures
        batch = self.cfg.train.batch_size

        ran = {loops: steps for loops, steps in enumerate(self.steps) if steps}
        total = sum(ran.values())
        evaluated = sorted({self.loops, *self.cfg.train.eval_loops})
        flops = {}
        for loops in {*ran, *evaluated}:
            with control.at(loops):
                flops[loops] = train_flops_per_token(model, seq_len, batch)
        return {
            **figures, "loops": self.loops,
            "train_loops_mean": sum(loops * steps for loops, steps in ran.items()) / total if total else self.loops,
            "train_flops_per_token": round(sum(flops[loops] * steps for loops, steps in ran.items()) / total)
            if total else flops[self.loops],
            "train_flops_per_token_by_loops": {str(loops): flops[loops] for loops in evaluated},
        }

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": rng_state(self.generator), "steps": list(self.steps)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        set_rng_state(state["rng"], self.generator)
        self.steps = list(state["steps"])
