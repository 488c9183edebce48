"""The training loop: optimizer steps, policy decisions, evaluation, and what goes to the sinks."""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from tyingrun.config import Config
from tyingrun.metrics.meters import RunningMean, Throughput, model_counts, perplexity
from tyingrun.metrics.sinks import RunSinks
from tyingrun.policies.base import Decision, Policy
from tyingrun.train.checkpoint import load_weights, read_state, save_checkpoint
from tyingrun.train.distributed import (
    SINGLE,
    Mesh,
    average_gradients,
    barrier,
    broadcast_object,
    local_rows,
    sum_over_ranks,
)
from tyingrun.train.freeze import freeze_tensors, frozen_layers
from tyingrun.train.optim import build_optimizer, optimizer_parameters, sync_optimizer
from tyingrun.train.signals import RunInterrupted, StopSignals
from tyingrun.tying.counts import train_state_bytes
from tyingrun.tying.stack import TiedStack

MEANS = ("trainable_params", "independent_layers", "trainable_layers")


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


class TrainerContext:
    """What a policy may ask at a decision point: score a training batch, read the counts."""

    def __init__(self, trainer: Trainer):
        self._trainer = trainer

    @property
    def step(self) -> int:
        return self._trainer.step

    def score_batch(self) -> float:
        return self._trainer.score_batch()

    def counts(self) -> Dict[str, int]:
        return dict(self._trainer.counts)


class Trainer:
    def __init__(self, cfg: Config, model: nn.Module, stack: TiedStack, data, policy: Policy,
                 device: torch.device, sinks: RunSinks, mesh: Mesh = SINGLE):
        self.cfg, self.model, self.stack, self.data, self.policy = cfg, model, stack, data, policy
        self.device, self.sinks, self.mesh = device, sinks, mesh
        freeze_tensors(model, cfg.model.freeze)
        self.frozen_layers = frozen_layers(cfg.model.freeze)
        self.optimizer = build_optimizer(model, cfg.train, cfg.hardware, device)
        self.sampler = data.train_sampler(cfg.train.batch_size, cfg.train.seed)
        # Policies score the model on their own stream of training batches, so the training stream is the
        # same whatever the policy.
        self.score_sampler = data.train_sampler(cfg.train.batch_size, cfg.train.seed + 1)
        # Dynamo guards on the map and on requires_grad, so each distinct map and trainable flags compile once
        # and revisits reuse the cached graph. Evaluation runs eager: in eval mode under no_grad every map
        # would compile a second graph.
        self.train_loss = torch.compile(model.loss) if cfg.hardware.compile else model.loss
        self.step = 0
        self.counts: Dict[str, int] = {}
        self.means = {name: RunningMean() for name in MEANS}
        self.throughput = Throughput()
        self.context = TrainerContext(self)
        self.last_eval: Dict[str, float] = {}
        self.elapsed_before = 0.0
        self.losses_since_log: List[float] = []

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.hardware.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def apply_decision(self, decision: Decision) -> None:
        """The only place the map changes: the stack obeys it (layers frozen by model.freeze stay frozen), the
        optimizer follows, the sinks record it."""
        trainable = [flag and slot not in self.frozen_layers for slot, flag in enumerate(decision.trainable)]
        self.stack.apply_map(decision.src, trainable)
        sync_optimizer(self.optimizer, self.model)
        self.counts = model_counts(self.model, self.stack)
        self.sinks.map_change({
            "step": self.step, "map": list(self.stack.src), "trainable": self.stack.effective_trainable,
            **self.counts, **decision.info,
        })

    def _train_step(self) -> float:
        global_batch = self.sampler.next_batch()
        batch = self._to_device(local_rows(global_batch, self.mesh))
        self.model.train()
        lr = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.throughput.start()
        with self.autocast():
            loss = self.train_loss(batch).loss
        loss.backward()
        if self.mesh.distributed:
            average_gradients(optimizer_parameters(self.optimizer), self.mesh)
        if self.cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(optimizer_parameters(self.optimizer), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if self.mesh.distributed:
            value = sum_over_ranks([value], self.device)[0] / self.mesh.world_size
        self.throughput.stop(self.data.items_in(global_batch))
        if not math.isfinite(value):
            raise NonFiniteLoss(f"training loss became {value} at step {self.step}")
        return value

    @torch.no_grad()
    def _measure(self, batches, shard: bool = False) -> Dict[str, float]:
        """Mean loss over the items of ``batches`` in eval mode; accuracy too for models that report it.

        ``shard``: under data parallelism each rank measures every world_size-th batch and the sums are
        reduced, so every rank gets the same result.
        """
        self.model.eval()
        total, count, correct, has_accuracy = 0.0, 0, 0, False
        for index, batch in enumerate(batches):
            if shard and index % self.mesh.world_size != self.mesh.rank:
                continue
            with self.autocast():
                loss, n_items, n_correct = self.model.loss(self._to_device(batch))
            total += loss.item() * n_items
            count += n_items
            if n_correct is not None:
                correct, has_accuracy = correct + int(n_correct), True
        if shard and self.mesh.distributed:
            total, count, correct = sum_over_ranks([total, count, correct], self.device)
        return {"loss": total / count, "acc": correct / count} if has_accuracy else {"loss": total / count}

    def score_batch(self) -> float:
        return self._measure([self.score_sampler.next_batch()])["loss"]

    def evaluate(self) -> Dict[str, float]:
        batches = self.data.val_batches(self.cfg.train.batch_size, self.cfg.train.eval_batches)
        measured = self._measure(batches, shard=True)
        if "acc" in measured:
            return {"val_loss": measured["loss"], "val_acc": measured["acc"]}
        return {"val_loss": measured["loss"], "val_ppl": perplexity(measured["loss"])}

    def _record_eval(self) -> Dict[str, float]:
        result = self.evaluate()
        self.sinks.metrics({"step": self.step, **result, **self.counts})
        quality = f"val_acc {result['val_acc']:.4f}" if "val_acc" in result else f"val_ppl {result['val_ppl']:.2f}"
        self.sinks.console.line(
            f"step {self.step:>6}  val_loss {result['val_loss']:.4f}  {quality}  "
            f"independent {self.counts['independent_layers']}/{len(self.stack)}  "
            f"trainable_params {self.counts['trainable_params']:,}"
        )
        return result

    def _record_train(self, losses: list) -> None:
        row = {
            "step": self.step, "train_loss": sum(losses) / len(losses), "lr": self.optimizer.param_groups[0]["lr"],
            f"{self.data.unit}_per_s": self.throughput.rate, **self.counts,
        }
        self.sinks.metrics(row)
        self.sinks.console.line(
            f"step {self.step:>6}/{self.cfg.train.max_steps}  train_loss {row['train_loss']:.4f}  "
            f"lr {row['lr']:.2e}  {self.data.unit}/s {self.throughput.rate:,.0f}",
            show=False,
        )

    def _checkpoint(self, elapsed: float) -> None:
        if self.mesh.is_main:
            state = {**self.state_dict(), "elapsed_s": self.elapsed_before + elapsed}
            save_checkpoint(self.sinks.out_dir, self.step, self.model, state, self.cfg.train.keep_checkpoints)
        barrier()

    def state_dict(self) -> Dict[str, Any]:
        """Everything but the weights that the next step depends on (the checkpoint stores the weights)."""
        _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
        _, python_state, python_gauss = random.getstate()
        return {
            "map": list(self.stack.src), "trainable": list(self.stack.trainable),
            "optimizer": self.optimizer.state_dict(), "policy": self.policy.state_dict(),
            "sampler": self.sampler.state_dict(), "score_sampler": self.score_sampler.state_dict(),
            "means": {name: mean.state_dict() for name, mean in self.means.items()},
            "throughput": {"items": self.throughput.items, "seconds": self.throughput.seconds},
            "last_eval": self.last_eval, "losses_since_log": self.losses_since_log,
            "rng": {
                "python": [list(python_state), python_gauss], "torch": torch.get_rng_state(),
                "numpy": [torch.from_numpy(numpy_keys.astype(np.int64)), numpy_pos, numpy_has_gauss, numpy_gauss],
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def restore(self, checkpoint: Path) -> None:
        """Continue exactly where ``checkpoint`` left off: weights, map, optimizer, policy, data and RNGs."""
        self.step, state = read_state(checkpoint)
        self.stack.apply_map(state["map"], state["trainable"])
        load_weights(self.model, checkpoint / "model.safetensors")
        sync_optimizer(self.optimizer, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.policy.load_state_dict(state["policy"])
        self.sampler.load_state_dict(state["sampler"])
        self.score_sampler.load_state_dict(state["score_sampler"])
        for name, mean in self.means.items():
            mean.load_state_dict(state["means"][name])
        self.throughput.items, self.throughput.seconds = state["throughput"]["items"], state["throughput"]["seconds"]
        self.last_eval, self.elapsed_before = state["last_eval"], state["elapsed_s"]
        self.losses_since_log = state["losses_since_log"]
        self.counts = model_counts(self.model, self.stack)
        rng = state["rng"]
        python_state, python_gauss = rng["python"]
        random.setstate((3, tuple(python_state), python_gauss))
        torch.set_rng_state(rng["torch"])
        numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = rng["numpy"]
        np.random.set_state(("MT19937", numpy_keys.numpy().astype(np.uint32), numpy_pos, numpy_has_gauss, numpy_gauss))
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])

    def run_step(self, stop_signal: Optional[int] = None) -> Optional[int]:
        """One optimizer step, then whatever falls due at this step: a decision, a log line, an evaluation.

        Returns the stop signal the run obeys: rank 0's, like the map, so every rank stops at the same step.
        """
        losses = self.losses_since_log
        losses.append(self._train_step())
        for name in MEANS:
            self.means[name].add(self.counts[name])
        self.step += 1
        decision = self.policy.after_step(self.context) if self.mesh.is_main else None
        if self.mesh.distributed:
            decision, stop_signal = broadcast_object((decision, stop_signal), self.device)
        if decision is not None:
            self.apply_decision(decision)
        self.sinks.console.progress(self.step, f"loss {losses[-1]:.3f}")
        train = self.cfg.train
        if self.step % train.log_interval == 0 or self.step == train.max_steps:
            self._record_train(losses)
            losses.clear()
        if self.step % train.eval_interval == 0 or self.step == train.max_steps:
            self.last_eval = self._record_eval()
        return stop_signal

    def fit(self, resume_from: Optional[Path] = None) -> Dict[str, Any]:
        """Train until train.max_steps (continuing from ``resume_from`` if given); return the measurements."""
        started = time.perf_counter()
        if resume_from is not None:
            self.restore(resume_from)
        else:
            self.apply_decision(self.policy.start(len(self.stack)))
            self.last_eval = self._record_eval()
        train = self.cfg.train
        with StopSignals() as signals:
            while self.step < train.max_steps:
                stop_signal = self.run_step(signals.received)
                due = train.checkpoint_interval > 0 and self.step % train.checkpoint_interval == 0
                if due or stop_signal or self.step == train.max_steps:
                    self._checkpoint(time.perf_counter() - started)
                if stop_signal:
                    raise RunInterrupted(stop_signal, self.step)
        return {
            **self.last_eval,
            "final_map": list(self.stack.src),
            "final_trainable": self.stack.effective_trainable,
            **self.counts,
            **{f"{name}_mean": self.means[name].mean for name in MEANS},
            "optimizer_params": sum(p.numel() for p in optimizer_parameters(self.optimizer)),
            "train_state_bytes": train_state_bytes(self.model, self.optimizer),
            "wall_time_s": self.elapsed_before + time.perf_counter() - started,
            f"{self.data.unit}_per_s": self.throughput.rate,
        }
