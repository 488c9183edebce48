"""The training loop: optimizer steps, policy decisions, evaluations and checkpoints, in their order.

What the loop hands off, each to its own module: the decision point a policy sees (train.decisions), evaluation
(train.evaluation), the loop's bookkeeping (train.state) and the RNGs (seeding.rng_state), the peak-memory probe
(metrics.memory), maps.jsonl's held reward rows and the console lines (metrics.sinks), loading a checkpoint into
the model (train.checkpoint.restore_model), the summary (train.summary), hardware.compile's regional compile
(train.compile) and hardware=ddp's gradient averaging during the backward (train.grad_sync).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from tyingrun.config import Config, TrainConfig
from tyingrun.contracts import Batch, Sink, TiedModule, TrainingData
from tyingrun.metrics.memory import PeakTensorProbe
from tyingrun.metrics.meters import model_counts
from tyingrun.metrics.sinks import RewardedMapRows, evaluation_line, training_line
from tyingrun.policies.base import Decision, Policy
from tyingrun.seeding import derive_seed, rng_state, set_rng_state
from tyingrun.train.checkpoint import read_state, restore_model, save_checkpoint
from tyingrun.train.compile import RegionalCompile
from tyingrun.train.decisions import DecisionPoint
from tyingrun.train.device import on_device
from tyingrun.train.distributed import (
    SINGLE,
    Mesh,
    agreed_stop_signal,
    barrier,
    local_rows,
)
from tyingrun.train.evaluation import Evaluator
from tyingrun.train.freeze import freeze_tensors, frozen_layers
from tyingrun.train.fsdp import placed_optimizer_state, whole_tensors
from tyingrun.train.grad_sync import OverlappedGradientAverage
from tyingrun.train.looped import LoopCounts
from tyingrun.train.optim import build_optimizer, optimizer_parameters, set_learning_rate, sync_optimizer
from tyingrun.train.signals import RunInterrupted, StopSignals
from tyingrun.train.state import LoopState, NonFiniteLoss
from tyingrun.train.summary import measurements
from tyingrun.tying.counts import trainable_parameters
from tyingrun.tying.stack import TiedStack
from tyingrun.tying.weights import unique_weights


def learning_rate(step: int, cfg: Config) -> float:
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    floor = t.min_lr_ratio * t.lr
    return floor + 0.5 * (t.lr - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def checkpoint_due(step: int, train: TrainConfig) -> bool:
    """Whether train.checkpoint_interval asks for a checkpoint after ``step`` steps (the end and a stop always do)."""
    return train.checkpoint_interval > 0 and step % train.checkpoint_interval == 0


class Trainer:
    def __init__(self, cfg: Config, model: TiedModule, stack: TiedStack, data: TrainingData, policy: Policy,
                 device: torch.device, sinks: Sink, mesh: Mesh = SINGLE):
        self.cfg, self.model, self.stack, self.data, self.policy = cfg, model, stack, data, policy
        self.device, self.sinks, self.mesh = device, sinks, mesh
        freeze_tensors(model, cfg.model.freeze)
        self.frozen_layers = frozen_layers(cfg.model.freeze)
        self.optimizer = build_optimizer(model, cfg.train, cfg.hardware, device)
        # hardware=ddp: gradients averaged in buckets during the backward (FSDP reduce-scatters them itself).
        self.grad_sync = (OverlappedGradientAverage(mesh.world_size)
                          if mesh.distributed and not cfg.hardware.fsdp else None)
        self.sampler = data.train_sampler(cfg.train.batch_size, cfg.train.seed)
        # Policies score the model on their own stream of training batches, so the training stream is the
        # same whatever the policy; the stream is derived, so it is no other seed's training stream either.
        self.score_sampler = data.train_sampler(cfg.train.batch_size, derive_seed(cfg.train.seed, "reward_batches"))
        self.loop_counts = LoopCounts(cfg, stack)
        # Each block kind compiles once and every map reuses it (tyingrun.train.compile); evaluation runs eager.
        self.regional_compile = RegionalCompile(model) if cfg.hardware.compile else None
        self.train_loss = self.regional_compile.loss if self.regional_compile else model.loss
        self.evaluator = Evaluator(cfg, model, data, mesh, device)
        self.autocast = self.evaluator.autocast
        self.step = 0
        self.counts: Dict[str, int] = {}
        self.loop = LoopState(device, mesh)
        self.peak = PeakTensorProbe(model, self.optimizer, device)
        self.map_rows = RewardedMapRows(sinks)
        self.decision_point = DecisionPoint(self)

    def apply_decision(self, decision: Decision) -> None:
        """Apply a policy's decision: the stack obeys it (layers frozen by model.freeze stay frozen), the optimizer
        follows, the sinks record it. Every map a run trains under comes through here, or from its checkpoint on a
        resume (restore); the stack's apply_map has other callers that build or load models outside a run."""
        trainable = [flag and slot not in self.frozen_layers for slot, flag in enumerate(decision.trainable)]
        self.stack.apply_map(decision.src, trainable)
        self._sync_trainable_set()
        self.counts = model_counts(self.model, self.stack)
        self.map_rows.record({
            "step": self.step, "map": list(self.stack.src), "trainable": self.stack.effective_trainable,
            **self.counts, **decision.info,
        }, self.step)

    def _sync_trainable_set(self) -> None:
        """The optimizer, and under DDP the gradient hooks, follow the tensors that train now."""
        sync_optimizer(self.optimizer, self.model)
        if self.grad_sync is not None:
            self.grad_sync.arm(trainable_parameters(self.model))

    def _optimizer_step(self) -> torch.Tensor:
        """One optimizer step; its loss stays on the device (the step never waits to read it: LoopState.read_losses)."""
        with self.peak.measure() as measured:
            loss_of: Callable[[Batch], Any] = self.model.loss if measured else self.train_loss
            global_batch = self.sampler.next_batch()
            batch = on_device(local_rows(global_batch, self.mesh), self.device)
            self.model.train()
            set_learning_rate(self.optimizer, learning_rate(self.step, self.cfg))
            self.loop.throughput.start()
            with self.autocast(), self.loop_counts.training_step():
                loss = loss_of(batch).loss
            loss.backward()
            if self.grad_sync is not None:
                self.grad_sync.finish()
            if self.cfg.train.grad_clip > 0:
                nn.utils.clip_grad_norm_(optimizer_parameters(self.optimizer), self.cfg.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.loop.throughput.stop(self.data.items_in(global_batch))
            return loss.detach()

    def _record_eval(self, final: bool = False) -> Dict[str, Any]:
        """Evaluate the model as it trained up to this step, under the map it trained with (recorded)."""
        result = self.evaluator.final() if final else self.evaluator.periodic()
        self.sinks.metrics({"step": self.step, **result, "map": list(self.stack.src), **self.counts})
        self.sinks.console.line(evaluation_line(self.step, result, self.counts, len(self.stack)))
        return result

    def _record_train(self, losses: List[float]) -> None:
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
        state = self.state_dict(elapsed)  # reads the losses not yet logged: a non-finite one stops the run here
        weights = whole_tensors(unique_weights(self.model), keep)
        if keep and not all(bool(torch.isfinite(tensor).all()) for tensor in weights.values()):
            raise NonFiniteLoss(f"the weights became non-finite by step {self.step}; no checkpoint was written")
        state = whole_tensors(state, keep)
        if keep:
            save_checkpoint(self.sinks.out_dir, self.step, weights, state, self.cfg.train.keep_checkpoints)
        barrier()

    def state_dict(self, elapsed: float = 0.0) -> Dict[str, Any]:
        """Everything but the weights that the next step depends on (the checkpoint stores the weights);
        ``elapsed``: seconds this process has trained."""
        return {
            "map": list(self.stack.src), "trainable": list(self.stack.trainable), "sharing": self.stack.sharing,
            # The vocabulary without model.pad_vocab_to's padding rows, which the stored weights include.
            "vocab_size": getattr(getattr(self.model, "tokens", None), "vocab_size", None),
            "data": {"dataset": self.cfg.dataset.name, "tokenizer_sha256": self.data.tokenizer_sha256},
            "optimizer": self.optimizer.state_dict(), "policy": self.policy.state_dict(),
            "sampler": self.sampler.state_dict(), "score_sampler": self.score_sampler.state_dict(),
            "loop_counts": self.loop_counts.state_dict(),
            **self.loop.state_dict(elapsed, self.step), **self.map_rows.state_dict(), **self.peak.state_dict(),
            "rng": rng_state(),
        }

    def restore(self, checkpoint: Path) -> None:
        """Continue exactly where ``checkpoint`` left off: weights, map, optimizer, policy, data and RNGs."""
        self.step, state = read_state(checkpoint)
        restore_model(self.model, checkpoint, state)
        self._sync_trainable_set()
        self.optimizer.load_state_dict(placed_optimizer_state(self.optimizer, state["optimizer"]))
        self.policy.load_state_dict(state["policy"])
        self.sampler.load_state_dict(state["sampler"])
        self.score_sampler.load_state_dict(state["score_sampler"])
        if "loop_counts" in state:
            self.loop_counts.load_state_dict(state["loop_counts"])
        for part in (self.loop, self.map_rows, self.peak):
            part.load_state_dict(state)
        self.counts = model_counts(self.model, self.stack)
        set_rng_state(state["rng"])

    def run_step(self, stop_signal: Optional[int] = None) -> Optional[int]:
        """The decision due after the previous step, one optimizer step, then its log line and evaluation.

        A decision is taken after an evaluation of the same step, never at the run's last step, and applied
        before the next optimizer step: every evaluated map has trained, and the final evaluation scores the
        map the run ends with. Returns the stop signal the run obeys: any rank's, agreed by all, so every rank
        stops at the same step; under data parallelism the ranks agree at log points and checkpoints only (an
        all-reduce waits for the device), so a run stops within train.log_interval steps of the signal.
        """
        decision = self.decision_point.decide() if self.step > 0 else None
        if decision is not None:
            self.apply_decision(decision)
        losses = self.loop.losses_since_log
        losses.append(self._optimizer_step())
        self.loop.count(self.counts)
        self.step += 1
        train = self.cfg.train
        last = self.step == train.max_steps
        logged = self.step % train.log_interval == 0 or last
        if self.mesh.distributed:
            agreed = logged or checkpoint_due(self.step, train)
            stop_signal = agreed_stop_signal(stop_signal, self.device) if agreed else None
        if logged:
            self._record_train(self.loop.read_losses(self.step))
            losses.clear()
        self.sinks.console.progress(self.step, self.loop.progress())
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
                if checkpoint_due(self.step, train) or stop_signal or self.step == train.max_steps:
                    self._checkpoint(time.perf_counter() - started)
                if stop_signal:
                    raise RunInterrupted(stop_signal, self.step)
        return measurements(self, self.loop.elapsed_before + time.perf_counter() - started)
