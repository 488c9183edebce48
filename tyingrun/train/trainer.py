"""The training loop: optimizer steps, policy decisions, evaluation, and what goes to the sinks."""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
from torch import nn

from tyingrun.config import Config
from tyingrun.contracts import Batch, Sink, TiedModule, TrainingData, perplexity
from tyingrun.files import WEIGHTS_FILE
from tyingrun.metrics.meters import RunningMean, Throughput, model_counts
from tyingrun.metrics.mfu import mfu, peak_flops
from tyingrun.metrics.tensor_memory import TensorMemoryTracker, training_state
from tyingrun.policies.base import Decision, Policy
from tyingrun.seeding import derive_seed
from tyingrun.train.checkpoint import load_weights, read_state, save_checkpoint
from tyingrun.train.compile import RegionalCompile
from tyingrun.train.distributed import (
    SINGLE,
    Mesh,
    barrier,
    broadcast_object,
    local_rows,
    mean_over_ranks,
    rank_share,
    sum_over_ranks,
    values_of_ranks,
)
from tyingrun.train.freeze import freeze_tensors, frozen_layers
from tyingrun.train.fsdp import placed_optimizer_state, reshard, whole_tensors
from tyingrun.train.grad_sync import OverlappedGradientAverage
from tyingrun.train.optim import build_optimizer, optimizer_parameters, sync_optimizer
from tyingrun.train.signals import RunInterrupted, StopSignals
from tyingrun.tying.counts import train_state_bytes, trainable_parameters
from tyingrun.tying.flops import sequence_length, train_flops_per_token, unique_blocks
from tyingrun.tying.stack import TiedStack
from tyingrun.tying.weights import unique_weights

MEANS = ("trainable_params", "independent_layers", "trainable_layers")
# What rank 0 broadcasts to the other ranks while its policy decides: a batch to score, then the decision.
SCORE, DECIDED = "score", "decided"
PEAK_TENSOR_KEYS = ("peak_tensor_bytes", "peak_state_bytes", "peak_other_bytes")


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


def eval_batch_limit(cfg: Config) -> Optional[int]:
    """Batches per periodic evaluation: train.eval_batches, or None for the whole val split ("all")."""
    limit = cfg.train.eval_batches
    return None if limit in (None, "all") else int(limit)


class TrainerContext:
    """What a policy may ask at a decision point: draw a batch of the reward stream, score one (drawn now or kept
    from an earlier decision point), read the counts."""

    def __init__(self, trainer: Trainer):
        self._trainer = trainer

    @property
    def step(self) -> int:
        return self._trainer.step

    def score_batch(self, batch: Optional[Batch] = None) -> float:
        return self._trainer.score_batch(batch)

    def reward_batch(self) -> Batch:
        return self._trainer.score_sampler.next_batch()

    def counts(self) -> Dict[str, int]:
        return dict(self._trainer.counts)


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
        # Each block kind compiles once and every map reuses it (tyingrun.train.compile); evaluation runs eager.
        self.regional_compile = RegionalCompile(model) if cfg.hardware.compile else None
        self.train_loss = self.regional_compile.loss if self.regional_compile else model.loss
        self.step = 0
        self.counts: Dict[str, int] = {}
        self.means = {name: RunningMean() for name in MEANS}
        self.throughput = Throughput(device)
        self.context = TrainerContext(self)
        self.last_eval: Dict[str, Any] = {}
        # A learned decision's maps.jsonl row waits here until the reward that judges it is known.
        self.unrewarded_row: Optional[Dict[str, Any]] = None
        self.elapsed_before = 0.0
        # The training losses since the last log line, on the device: read at log points, evaluations and
        # checkpoints only (read_losses), so no step waits for the device.
        self.losses_since_log: List[torch.Tensor] = []
        self.last_train_loss = math.nan
        # The highest peak of tensor bytes over measured steps, with its split. Steps under a (map, trainable
        # flags) are measured until one is complete: a revisited map peaks the same, and measuring slows a step.
        self.peak_tensors: Dict[str, int] = dict.fromkeys(PEAK_TENSOR_KEYS, 0)
        self.measured_maps: Set[Tuple[Tuple[int, ...], Tuple[bool, ...]]] = set()

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.hardware.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def apply_decision(self, decision: Decision) -> None:
        """The only place the map changes: the stack obeys it (layers frozen by model.freeze stay frozen), the
        optimizer follows, the sinks record it."""
        trainable = [flag and slot not in self.frozen_layers for slot, flag in enumerate(decision.trainable)]
        self.stack.apply_map(decision.src, trainable)
        self._sync_trainable_set()
        self.counts = model_counts(self.model, self.stack)
        self._record_map({
            "step": self.step, "map": list(self.stack.src), "trainable": self.stack.effective_trainable,
            **self.counts, **decision.info,
        })

    def _sync_trainable_set(self) -> None:
        """The optimizer, and under DDP the gradient hooks, follow the tensors that train now."""
        sync_optimizer(self.optimizer, self.model)
        if self.grad_sync is not None:
            self.grad_sync.arm(trainable_parameters(self.model))

    def _record_map(self, row: Dict[str, Any]) -> None:
        """Write a map change to maps.jsonl with the reward of its own decision.

        A learned decision's ``reward`` is measured K steps later and arrives with the next decision (as
        ``Decision.info["reward"]``), so each such row is held until then; the run's last decision is
        never rewarded and is written with ``reward: null`` when the run ends.
        """
        if "reward" not in row:
            self.sinks.map_change(row)
            return
        reward_of_previous = row.pop("reward")
        if self.unrewarded_row is not None:
            self.sinks.map_change({**self.unrewarded_row, "reward": reward_of_previous, "reward_step": self.step})
        self.unrewarded_row = row

    def _flush_unrewarded_row(self) -> None:
        if self.unrewarded_row is not None:
            self.sinks.map_change({**self.unrewarded_row, "reward": None, "reward_step": None})

    def current_tying(self) -> Tuple[Tuple[int, ...], Tuple[bool, ...]]:
        """The (map, effective trainable flags) the next step trains under: what a memory measurement holds for."""
        return tuple(self.stack.src), tuple(self.stack.effective_trainable)

    def _train_step(self) -> torch.Tensor:
        tying = self.current_tying()
        if tying in self.measured_maps:
            return self._optimizer_step(self.train_loss)
        states_before = len(self.optimizer.state)
        with self._tensor_memory_tracker() as tracker, torch.compiler.set_stance("force_eager"):
            # Eager: under a dispatch mode torch.compile runs eagerly anyway, and then never compiles that code again.
            value = self._optimizer_step(self.model.loss)
        if tracker.peak_bytes > self.peak_tensors["peak_tensor_bytes"]:
            self.peak_tensors = tracker.summary()
        # A step that creates optimizer state ran its forward and backward without that state, so it peaks
        # below every later step under this map: the next step under it is measured too.
        if len(self.optimizer.state) == states_before:
            self.measured_maps.add(tying)
        return value

    @contextlib.contextmanager
    def _tensor_memory_tracker(self):
        tracker = TensorMemoryTracker(lambda: training_state(self.model, self.optimizer), self.device)
        # zero_grad(set_to_none=True) frees the gradients before the region ends: mark them state while they live.
        hook = self.optimizer.register_step_post_hook(lambda *_: tracker.reclassify())
        try:
            with tracker:
                yield tracker
        finally:
            hook.remove()

    def _optimizer_step(self, loss_of: Callable[[Batch], Any]) -> torch.Tensor:
        """One optimizer step; its loss stays on the device (the step never waits to read it)."""
        global_batch = self.sampler.next_batch()
        batch = self._to_device(local_rows(global_batch, self.mesh))
        self.model.train()
        lr = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.throughput.start()
        with self.autocast():
            loss = loss_of(batch).loss
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync.finish()
        if self.cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(optimizer_parameters(self.optimizer), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.throughput.stop(self.data.items_in(global_batch))
        return loss.detach()

    def read_losses(self) -> List[float]:
        """The training losses since the last log line (averaged over the ranks), in one host read; a non-finite
        one stops the run naming its step."""
        if not self.losses_since_log:
            return []
        losses = torch.stack(self.losses_since_log).float()
        if self.mesh.distributed:
            losses = mean_over_ranks(losses)
        values = losses.tolist()
        bad = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
        if bad is not None:
            step = self.step - len(values) + bad
            raise NonFiniteLoss(f"training loss became {values[bad]} at step {step}")
        self.last_train_loss = values[-1]
        return values

    @torch.no_grad()
    def _measure(self, batches, shard: bool = False, model: Optional[TiedModule] = None) -> Dict[str, float]:
        """Mean loss over the items of ``batches`` in eval mode, of the trained model or of ``model``; accuracy too
        for models that report it.

        ``shard``: under data parallelism each rank measures its share of the batches (rank_share) and the sums are
        reduced, so every rank gets the same result. Without it every rank measures every batch.
        """
        model = self.model if model is None else model
        model.eval()
        total, count, correct, has_accuracy = 0.0, 0, 0, False
        share = rank_share(batches, self.mesh) if shard else ((batch, True) for batch in batches)
        for batch, counted in share:
            with self.autocast():
                loss, n_items, n_correct = model.loss(self._to_device(batch))
            if not counted:
                continue
            total += loss.item() * n_items
            count += n_items
            if n_correct is not None:
                correct, has_accuracy = correct + int(n_correct), True
        reshard(self.model)
        if shard and self.mesh.distributed:
            total, count, correct = sum_over_ranks([total, count, correct], self.device)
        return {"loss": total / count, "acc": correct / count} if has_accuracy else {"loss": total / count}

    def score_batch(self, batch: Optional[Batch] = None) -> float:
        """The loss on ``batch`` (one the policy kept from the reward stream), or on the reward stream's next batch.

        Rank 0's policy asks; under data parallelism the other ranks run the same forward (see _serve_scores)."""
        batch = self.score_sampler.next_batch() if batch is None else batch
        if self.mesh.distributed:
            broadcast_object((SCORE, batch), self.device)
        return self._measure([batch])["loss"]

    def evaluate(self, split: str, limit: Optional[int], model: Optional[TiedModule] = None) -> Dict[str, float]:
        """``{split}_loss`` and ``{split}_ppl`` (or ``{split}_acc``) over ``limit`` batches of the split (None: all),
        of the trained model or of another ``model`` on the same protocol."""
        batches = self.data.eval_batches(split, self.cfg.train.batch_size, limit)
        measured = self._measure(batches, shard=True, model=model)
        quality = {f"{split}_acc": measured["acc"]} if "acc" in measured else {
            f"{split}_ppl": perplexity(measured["loss"])}
        return {f"{split}_loss": measured["loss"], **quality}

    def _final_evaluation(self) -> Dict[str, Any]:
        """The whole val split and the whole test split, with the number of items each holds."""
        unit = self.data.unit
        return {
            **self.evaluate("val", None), f"val_{unit}": self.data.eval_items("val"),
            **self.evaluate("test", None), f"test_{unit}": self.data.eval_items("test"),
        }

    def _record_eval(self, final: bool = False) -> Dict[str, Any]:
        """Evaluate the model as it trained up to this step, under the map it trained with (recorded)."""
        result = self._final_evaluation() if final else self.evaluate("val", eval_batch_limit(self.cfg))
        self.sinks.metrics({"step": self.step, **result, "map": list(self.stack.src), **self.counts})
        shown = [f"{key} {result[key]:.4f}" for key in
                  ("val_loss", "val_acc", "test_loss", "test_acc") if key in result]
        shown += [f"{key} {result[key]:.2f}" for key in ("val_ppl", "test_ppl") if key in result]
        self.sinks.console.line(
            f"step {self.step:>6}  {'  '.join(shown)}  "
            f"independent {self.counts['independent_layers']}/{len(self.stack)}  "
            f"trainable_params {self.counts['trainable_params']:,}"
        )
        return result

    def _record_train(self, losses: List[float]) -> None:
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
        """Rank 0 writes the checkpoint; under FSDP every rank first takes part in gathering the whole tensors."""
        keep = self.mesh.is_main
        state = self.state_dict()  # reads the losses since the last log line: a non-finite one stops the run here
        weights = whole_tensors(unique_weights(self.model), keep)
        if keep and not all(bool(torch.isfinite(tensor).all()) for tensor in weights.values()):
            raise NonFiniteLoss(f"the weights became non-finite by step {self.step}; no checkpoint was written")
        state = whole_tensors({**state, "elapsed_s": self.elapsed_before + elapsed}, keep)
        if keep:
            save_checkpoint(self.sinks.out_dir, self.step, weights, state, self.cfg.train.keep_checkpoints)
        barrier()

    def state_dict(self) -> Dict[str, Any]:
        """Everything but the weights that the next step depends on (the checkpoint stores the weights)."""
        _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
        _, python_state, python_gauss = random.getstate()
        return {
            "map": list(self.stack.src), "trainable": list(self.stack.trainable), "sharing": self.stack.sharing,
            # The vocabulary without model.pad_vocab_to's padding rows, which the stored weights include.
            "vocab_size": getattr(getattr(self.model, "tokens", None), "vocab_size", None),
            "optimizer": self.optimizer.state_dict(), "policy": self.policy.state_dict(),
            "sampler": self.sampler.state_dict(), "score_sampler": self.score_sampler.state_dict(),
            "means": {name: mean.state_dict() for name, mean in self.means.items()},
            "throughput": {"items": self.throughput.items, "seconds": self.throughput.seconds},
            "last_eval": self.last_eval, "losses_since_log": self.read_losses(),
            "unrewarded_row": self.unrewarded_row,
            "peak_tensors": self.peak_tensors,
            "measured_maps": sorted([list(src), list(trainable)] for src, trainable in self.measured_maps),
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
        load_weights(self.model, checkpoint / WEIGHTS_FILE)
        self._sync_trainable_set()
        self.optimizer.load_state_dict(placed_optimizer_state(self.optimizer, state["optimizer"]))
        self.policy.load_state_dict(state["policy"])
        self.sampler.load_state_dict(state["sampler"])
        self.score_sampler.load_state_dict(state["score_sampler"])
        for name, mean in self.means.items():
            mean.load_state_dict(state["means"][name])
        self.throughput.items, self.throughput.seconds = state["throughput"]["items"], state["throughput"]["seconds"]
        self.last_eval, self.elapsed_before = state["last_eval"], state["elapsed_s"]
        self.losses_since_log = [torch.tensor(value, device=self.device) for value in state["losses_since_log"]]
        self.unrewarded_row = state["unrewarded_row"]
        self.peak_tensors = state["peak_tensors"]
        self.measured_maps = {(tuple(src), tuple(trainable)) for src, trainable in state["measured_maps"]}
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
        """The decision due after the previous step, one optimizer step, then its log line and evaluation.

        A decision is taken after an evaluation of the same step, never at the run's last step, and applied
        before the next optimizer step: every evaluated map has trained, and the final evaluation scores the
        map the run ends with. Returns the stop signal the run obeys: rank 0's, like the map, so every rank
        stops at the same step; under data parallelism it reaches the other ranks at log points only (a broadcast
        waits for the device), so a run stops within train.log_interval steps of the signal.
        """
        if self.step > 0:
            self._decide()
        self.losses_since_log.append(self._train_step())
        for name in MEANS:
            self.means[name].add(self.counts[name])
        self.step += 1
        train = self.cfg.train
        last = self.step == train.max_steps
        logged = self.step % train.log_interval == 0 or last
        if self.mesh.distributed:
            stop_signal = broadcast_object(stop_signal, self.device) if logged else None
        self.sinks.console.progress(self.step, f"loss {self.last_train_loss:.3f}")
        if logged:
            self._record_train(self.read_losses())
            self.losses_since_log.clear()
        if self.step % train.eval_interval == 0 or last:
            self.last_eval = self._record_eval(final=last)
        if last:
            self._flush_unrewarded_row()
        return stop_signal

    def _decide(self) -> None:
        if not self.mesh.is_main:
            decision = self._serve_scores()
        else:
            decision = self.policy.after_step(self.context)
            if self.mesh.distributed:
                broadcast_object((DECIDED, decision), self.device)
        if decision is not None:
            self.apply_decision(decision)

    def _serve_scores(self) -> Optional[Decision]:
        """The ranks but 0, while rank 0's policy decides: run each scoring forward that rank 0 runs (under FSDP a
        forward gathers weights from every rank) until rank 0's decision arrives, and return it."""
        while True:
            kind, payload = broadcast_object(None, self.device)
            if kind == DECIDED:
                return payload
            self._measure([payload])

    def _train_state_bytes(self) -> Dict[str, Any]:
        """Weights + gradients + optimizer state: the most any rank holds, what each rank holds (its shards under
        FSDP, everything under DDP) in rank order, and their total; in one process all three are the whole state."""
        held = train_state_bytes(self.model, self.optimizer)
        per_rank = [int(v) for v in values_of_ranks(held, self.device)] if self.mesh.distributed else [held]
        return {"train_state_bytes": max(per_rank), "train_state_bytes_per_rank": per_rank,
                "train_state_bytes_total": sum(per_rank)}

    def _tokens_per_s(self) -> float:
        """Training tokens per second: the throughput in tokens (a vision sample is its sequence of patches)."""
        per_item = 1 if self.data.unit == "tokens" else sequence_length(self.model, self.cfg.dataset.block_size)
        return self.throughput.rate * per_item

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
        flops_per_token = train_flops_per_token(
            self.model, sequence_length(self.model, self.cfg.dataset.block_size), self.cfg.train.batch_size)
        return {
            **self.last_eval,
            "final_map": list(self.stack.src),
            "final_trainable": self.stack.effective_trainable,
            **self.counts,
            **{f"{name}_mean": self.means[name].mean for name in MEANS},
            "optimizer_params": sum(p.numel() for p in optimizer_parameters(self.optimizer)),
            **self._train_state_bytes(),
            "unique_blocks": unique_blocks(self.model),
            "train_flops_per_token": flops_per_token,
            **self.peak_tensors,
            "wall_time_s": self.elapsed_before + time.perf_counter() - started,
            f"{self.data.unit}_per_s": self.throughput.rate,
            "mfu": mfu(flops_per_token, self._tokens_per_s(), peak_flops(self.device, self.cfg.hardware.peak_flops)),
            "compile_graphs": self.regional_compile.graphs if self.regional_compile else None,
            "compile_recompiles": self.regional_compile.recompiles if self.regional_compile else None,
            **self.policy.diagnostics(),
        }
