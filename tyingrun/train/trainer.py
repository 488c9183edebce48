"""The training loop: optimizer steps, policy decisions, evaluation, and what goes to the sinks."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Dict, Optional

import torch
from torch import nn

from tyingrun.config import Config
from tyingrun.metrics.meters import RunningMean, Throughput, model_counts, perplexity
from tyingrun.metrics.sinks import RunSinks
from tyingrun.policies.base import Decision, Policy
from tyingrun.train.optim import build_optimizer, optimizer_parameters, sync_optimizer
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
                 device: torch.device, sinks: RunSinks):
        self.cfg, self.model, self.stack, self.data, self.policy = cfg, model, stack, data, policy
        self.device, self.sinks = device, sinks
        self.optimizer = build_optimizer(model, cfg.train, cfg.hardware, device)
        self.sampler = data.train_sampler(cfg.train.batch_size, cfg.train.seed)
        # Policies score the model on their own stream of training batches, so the training stream is the
        # same whatever the policy.
        self.score_sampler = data.train_sampler(cfg.train.batch_size, cfg.train.seed + 1)
        self.loss_fn = torch.compile(model.loss) if cfg.hardware.compile else model.loss
        self.step = 0
        self.counts: Dict[str, int] = {}
        self.means = {name: RunningMean() for name in MEANS}
        self.throughput = Throughput()
        self.context = TrainerContext(self)

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.hardware.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def apply_decision(self, decision: Decision) -> None:
        """The only place the map changes: the stack obeys it, the optimizer follows, the sinks record it."""
        self.stack.apply_map(decision.src, decision.trainable)
        sync_optimizer(self.optimizer, self.model)
        self.counts = model_counts(self.model, self.stack)
        self.sinks.map_change({
            "step": self.step, "map": list(self.stack.src), "trainable": self.stack.effective_trainable,
            **self.counts, **decision.info,
        })

    def _train_step(self) -> float:
        batch = self._to_device(self.sampler.next_batch())
        self.model.train()
        lr = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.throughput.start()
        with self._autocast():
            loss, n_items, _ = self.loss_fn(batch)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(optimizer_parameters(self.optimizer), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        self.throughput.stop(n_items)
        if not math.isfinite(value):
            raise NonFiniteLoss(f"training loss became {value} at step {self.step}")
        return value

    @torch.no_grad()
    def _measure(self, batches) -> Dict[str, float]:
        """Mean loss over the items of ``batches`` in eval mode; accuracy too for models that report it."""
        self.model.eval()
        total, count, correct = 0.0, 0, None
        for batch in batches:
            with self._autocast():
                loss, n_items, n_correct = self.loss_fn(self._to_device(batch))
            total += loss.item() * n_items
            count += n_items
            if n_correct is not None:
                correct = (correct or 0) + int(n_correct)
        return {"loss": total / count} if correct is None else {"loss": total / count, "acc": correct / count}

    def score_batch(self) -> float:
        return self._measure([self.score_sampler.next_batch()])["loss"]

    def evaluate(self) -> Dict[str, float]:
        measured = self._measure(self.data.val_batches(self.cfg.train.batch_size, self.cfg.train.eval_batches))
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

    def fit(self) -> Dict[str, Any]:
        """Train for train.max_steps; return the measurements the summary reports."""
        started = time.perf_counter()
        self.apply_decision(self.policy.start(len(self.stack)))
        result: Optional[Dict[str, float]] = self._record_eval()
        losses = []
        while self.step < self.cfg.train.max_steps:
            losses.append(self._train_step())
            for name in MEANS:
                self.means[name].add(self.counts[name])
            self.step += 1
            decision = self.policy.after_step(self.context)
            if decision is not None:
                self.apply_decision(decision)
            self.sinks.console.progress(self.step, f"loss {losses[-1]:.3f}")
            if self.step % self.cfg.train.log_interval == 0 or self.step == self.cfg.train.max_steps:
                self._record_train(losses)
                losses = []
            if self.step % self.cfg.train.eval_interval == 0 or self.step == self.cfg.train.max_steps:
                result = self._record_eval()
        return {
            **result,
            "final_map": list(self.stack.src),
            "final_trainable": self.stack.effective_trainable,
            **self.counts,
            **{f"{name}_mean": self.means[name].mean for name in MEANS},
            "optimizer_params": sum(p.numel() for p in optimizer_parameters(self.optimizer)),
            "train_state_bytes": train_state_bytes(self.model, self.optimizer),
            "wall_time_s": time.perf_counter() - started,
            f"{self.data.unit}_per_s": self.throughput.rate,
        }
