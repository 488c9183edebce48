"""The training loop: optimizer steps, policy decisions, evaluations and checkpoints, in their order.

What the loop hands off, each to its own module: the decision point a policy sees (train.decisions), evaluation
(train.evaluation), the loop's bookkeeping (train.state) and the RNGs (seeding.rng_state), the peak-memory probe
(metrics.memory), maps.jsonl's held reward rows and the console lines (metrics.sinks), loading a checkpoint into
the model (train.checkpoint.restore_model) and the summary (train.summary).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from tyingrun.config import Config
from tyingrun.contracts import Batch, Sink, TiedModule, TrainingData
from tyingrun.metrics.memory import PeakTensorProbe
from tyingrun.metrics.meters import model_counts
from tyingrun.metrics.sinks import RewardedMapRows, evaluation_line, training_line
from tyingrun.policies.base import Decision, Policy
from tyingrun.seeding import derive_seed, rng_state, set_rng_state
from tyingrun.train.checkpoint import read_state, restore_model, save_checkpoint
from tyingrun.train.decisions import DecisionPoint
from tyingrun.train.device import on_device
from tyingrun.train.distributed import (
    SINGLE,
    Mesh,
    agreed_stop_signal,
    average_gradients,
    barrier,
    local_rows,
    sum_over_ranks,
)
from tyingrun.train.evaluation import Evaluator
from tyingrun.train.freeze import freeze_tensors, frozen_layers
from tyingrun.train.fsdp import placed_optimizer_state, whole_tensors
from tyingrun.train.optim import build_optimizer, optimizer_parameters, sync_optimizer
from tyingrun.train.signals import RunInterrupted, StopSignals
from tyingrun.train.state import LoopState
from tyingrun.train.summary import measurements
from tyingrun.tying.stack import TiedStack
from tyingrun.tying.weights import unique_weights


class NonFiniteLoss(RuntimeError):
    pass


def learning_rate(step: int, cfg: Config) -> float:
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    floor = t.min_lr_ratio * t.lr
    return floor + 0.5 * (t.lr - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class Trainer:
    def __init__(self, cfg: Config, model: TiedModule, stack: TiedStack, data: TrainingData, policy: Policy,
                 device: torch.device, sinks: Sink, mesh: Mesh = SINGLE):
        self.cfg, self.model, self.stack, self.data, self.policy = cfg, model, stack, data, policy
        self.device, self.sinks, self.mesh = device, sinks, mesh
        freeze_tensors(model, cfg.model.freeze)
        self.frozen_layers = frozen_layers(cfg.model.freeze)
        self.optimizer = build_optimizer(model, cfg.train, cfg.hardware, device)
        self.sampler = data.train_sampler(cfg.train.batch_size, cfg.train.seed)
        # Policies score the model on their own stream of training batches, so the training stream is the
        # same whatever the policy; the stream is derived, so it is no other seed's training stream either.
        self.score_sampler = data.train_sampler(cfg.train.batch_size, derive_seed(cfg.train.seed, "reward_batches"))
        # Dynamo guards on the map and on requires_grad, so each distinct map and trainable flags compile once
        # and revisits reuse the cached graph. Evaluation runs eager: in eval mode under no_grad every map
        # would compile a second graph.
        self.train_loss = torch.compile(model.loss) if cfg.hardware.compile else model.loss
        self.evaluator = Evaluator(cfg, model, data, mesh, device)
        self.autocast = self.evaluator.autocast
        self.step = 0
        self.counts: Dict[str, int] = {}
        self.loop = LoopState()
        self.peak = PeakTensorProbe(model, self.optimizer, device)
        self.map_rows = RewardedMapRows(sinks)
        self.decision_point = DecisionPoint(self)

    def apply_decision(self, decision: Decision) -> None:
        """Apply a policy's decision: the stack obeys it (layers frozen by model.freeze stay frozen), the optimizer
        follows, the sinks record it. Every map a run trains under comes through here, or from its checkpoint on a
        resume (restore); the stack's apply_map has other callers that build or load models outside a run."""
        trainable = [flag and slot not in self.frozen_layers for slot, flag in enumerate(decision.trainable)]
        self.stack.apply_map(decision.src, trainable)
        sync_optimizer(self.optimizer, self.model)
        self.counts = model_counts(self.model, self.stack)
        self.map_rows.record({
            "step": self.step, "map": list(self.stack.src), "trainable": self.stack.effective_trainable,
            **self.counts, **decision.info,
        }, self.step)

    def _optimizer_step(self) -> float:
        with self.peak.measure() as measured:
            loss_of: Callable[[Batch], Any] = self.model.loss if measured else self.train_loss
            global_batch = self.sampler.next_batch()
            batch = on_device(local_rows(global_batch, self.mesh), self.device)
            self.model.train()
            lr = learning_rate(self.step, self.cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.loop.throughput.start()
            with self.autocast():
                loss = loss_of(batch).loss
            loss.backward()
            if self.mesh.distributed and not self.cfg.hardware.fsdp:  # FSDP has reduce-scattered them in the backward
                average_gradients(optimizer_parameters(self.optimizer), self.mesh)
            if self.cfg.train.grad_clip > 0:
                nn.utils.clip_grad_norm_(optimizer_parameters(self.optimizer), self.cfg.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            if self.mesh.distributed:
                value = sum_over_ranks([value], self.device)[0] / self.mesh.world_size
            self.loop.throughput.stop(self.data.items_in(global_batch))
            if not math.isfinite(value):
                raise NonFiniteLoss(f"training loss became {value} at step {self.step}")
            return value

    def _record_eval(self, final: bool = False) -> Dict[str, Any]:
        """Evaluate the model as it trained up to this step, under the map it trained with (recorded)."""
        result = self.evaluator.final() if final else self.evaluator.periodic()
        self.sinks.metrics({"step": self.step, **result, "map": list(self.stack.src), **self.counts})
        self.sinks.console.line(evaluation_line(self.step, result, self.counts, len(self.stack)))
        return result

    def _record_train(self, losses: list) -> None:
        unit = self.data.unit
        row = {
            "step": self.step, "train_loss": sum(losses) / len(losses), "lr": self.optimizer.param_groups[0]["lr"],
            f"{unit}_per_s": self.loop.throughput.rate, **self.counts,
        }
        self.sinks.metrics(row)
        self.sinks.console.line(training_line(self.step, self.cfg.train.max_steps, row, unit), show=False)

    def _checkpoint(self, elapsed: float) -> None:
        """Rank 0 writes the checkpoint; under FSDP every rank first takes part in gathering the whole tensors."""
        keep = self.mesh.is_main
        weights = whole_tensors(unique_weights(self.model), keep)
        state = whole_tensors(self.state_dict(elapsed), keep)
        if keep:
            save_checkpoint(self.sinks.out_dir, self.step, weights, state, self.cfg.train.keep_checkpoints)
        barrier()

    def state_dict(self, elapsed: float = 0.0) -> Dict[str, Any]:
        """Everything but the weights that the next step depends on (the checkpoint stores the weights);
        ``elapsed``: seconds this process has trained."""
        return {
            "map": list(self.stack.src), "trainable": list(self.stack.trainable), "sharing": self.stack.sharing,
            "data": {"dataset": self.cfg.dataset.name, "tokenizer_sha256": self.data.tokenizer_sha256},
            "optimizer": self.optimizer.state_dict(), "policy": self.policy.state_dict(),
            "sampler": self.sampler.state_dict(), "score_sampler": self.score_sampler.state_dict(),
            **self.loop.state_dict(elapsed), **self.map_rows.state_dict(), **self.peak.state_dict(),
            "rng": rng_state(),
        }

    def restore(self, checkpoint: Path) -> None:
        """Continue exactly where ``checkpoint`` left off: weights, map, optimizer, policy, data and RNGs."""
        self.step, state = read_state(checkpoint)
        restore_model(self.model, checkpoint, state)
        sync_optimizer(self.optimizer, self.model)
        self.optimizer.load_state_dict(placed_optimizer_state(self.optimizer, state["optimizer"]))
        self.policy.load_state_dict(state["policy"])
        self.sampler.load_state_dict(state["sampler"])
        self.score_sampler.load_state_dict(state["score_sampler"])
        for part in (self.loop, self.map_rows, self.peak):
            part.load_state_dict(state)
        self.counts = model_counts(self.model, self.stack)
        set_rng_state(state["rng"])

    def run_step(self, stop_signal: Optional[int] = None) -> Optional[int]:
        """The decision due after the previous step, one optimizer step, then its log line and evaluation.

        A decision is taken after an evaluation of the same step, never at the run's last step, and applied
        before the next optimizer step: every evaluated map has trained, and the final evaluation scores the
        map the run ends with. Returns the stop signal the run obeys: any rank's, agreed by all, so every rank
        stops at the same step.
        """
        decision = self.decision_point.decide() if self.step > 0 else None
        if decision is not None:
            self.apply_decision(decision)
        losses = self.loop.losses_since_log
        losses.append(self._optimizer_step())
        self.loop.count(self.counts)
        self.step += 1
        if self.mesh.distributed:
            stop_signal = agreed_stop_signal(stop_signal, self.device)
        self.sinks.console.progress(self.step, f"loss {losses[-1]:.3f}")
        train = self.cfg.train
        last = self.step == train.max_steps
        if self.step % train.log_interval == 0 or last:
            self._record_train(losses)
            losses.clear()
        if self.step % train.eval_interval == 0 or last:
            self.loop.last_eval = self._record_eval(final=last)
        if last:
            self.map_rows.flush()
        return stop_signal

    def fit(self, resume_from: Optional[Path] = None, signals: Optional[StopSignals] = None) -> Dict[str, Any]:
        """Train until train.max_steps (continuing from ``resume_from`` if given); return the measurements.
        ``signals``: the caller's active StopSignals, when it began listening before (else fit listens itself)."""
        started = time.perf_counter()
        if resume_from is not None:
            self.restore(resume_from)
        else:
            self.apply_decision(self.policy.start(len(self.stack)))
            self.loop.last_eval = self._record_eval()
        train = self.cfg.train
        with contextlib.nullcontext(signals) if signals is not None else StopSignals() as signals:
            while self.step < train.max_steps:
                stop_signal = self.run_step(signals.received)
                due = train.checkpoint_interval > 0 and self.step % train.checkpoint_interval == 0
                if due or stop_signal or self.step == train.max_steps:
                    self._checkpoint(time.perf_counter() - started)
                if stop_signal:
                    raise RunInterrupted(stop_signal, self.step)
        return measurements(self, self.loop.elapsed_before + time.perf_counter() - started)
