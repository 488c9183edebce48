"""Evaluation: the mean loss (and accuracy) of a model over batches in eval mode, shared out over the
data-parallel ranks, and the val and test splits as periodic and final evaluations score them."""

from __future__ import annotations

import functools
from typing import Any, Dict, Iterable, List, Optional, cast

import torch

from tyingrun.config import Config
from tyingrun.contracts import Batch, TiedModule, TrainingData, perplexity
from tyingrun.metrics.evaluation import EvalTally
from tyingrun.train.device import autocast, on_device
from tyingrun.train.distributed import Mesh, objects_of_ranks, rank_share
from tyingrun.train.fsdp import reshard


def eval_batch_limit(cfg: Config) -> Optional[int]:
    """Batches per periodic evaluation: train.eval_batches, or None for the whole val split ("all")."""
    limit = cfg.train.eval_batches
    return None if limit in (None, "all") else int(limit)


class Evaluator:
    """Scores the trained ``model`` (or another model on the same protocol) on ``data``'s splits."""

    def __init__(self, cfg: Config, model: TiedModule, data: TrainingData, mesh: Mesh, device: torch.device):
        self.cfg, self.model, self.data, self.mesh, self.device = cfg, model, data, mesh, device
        self.autocast = functools.partial(autocast, device, cfg.hardware.precision)

    @torch.no_grad()
    def measure(self, batches: Iterable[Batch], shard: bool = False,
                model: Optional[TiedModule] = None) -> Dict[str, float]:
        """Mean loss over the items of ``batches`` in eval mode, of the trained model or of ``model``; accuracy too
        for models that report it, and for answer-only batches the exact answers (metrics.evaluation.EvalTally).

        ``shard``: under data parallelism each rank measures its share of the batches (rank_share) and the sums are
        reduced, so every rank gets the same result. Without it every rank measures every batch.
        """
        model = self.model if model is None else model
        model.eval()
        tally = EvalTally()
        share = rank_share(batches, self.mesh) if shard else ((batch, True) for batch in batches)
        for batch, counted in share:
            batch = on_device(batch, self.device)
            with self.autocast():
                result = model.loss(batch)
            if counted:
                tally.add(batch, result)
        reshard(self.model)
        if shard and self.mesh.distributed:
            tally = tally.merged(cast(List[Dict[str, Any]], objects_of_ranks(tally.state())))
        return tally.metrics()

    def evaluate(self, split: str, limit: Optional[int], model: Optional[TiedModule] = None) -> Dict[str, float]:
        """``{split}_loss`` and ``{split}_ppl`` (or ``{split}_acc``, and for answer-only data ``{split}_token_acc``
        and ``{split}_acc_by_difficulty``) over ``limit`` batches of the split (None: all), of the trained model or
        of another ``model`` on the same protocol."""
        batches = self.data.eval_batches(split, self.cfg.train.batch_size, limit)
        measured = self.measure(batches, shard=True, model=model)
        if "acc" not in measured:
            return {f"{split}_loss": measured["loss"], f"{split}_ppl": perplexity(measured["loss"])}
        return {f"{split}_{key}": value for key, value in measured.items()}

    def periodic(self) -> Dict[str, Any]:
        """train.eval_batches batches of the val split."""
        return self.evaluate("val", eval_batch_limit(self.cfg))

    def final(self) -> Dict[str, Any]:
        """The whole val split and the whole test split, with the number of items each holds; a looped model's test
        split at each loop count too (by_loops)."""
        unit = self.data.unit
        return {
            **self.evaluate("val", None), f"val_{unit}": self.data.eval_items("val"),
            **self.evaluate("test", None), f"test_{unit}": self.data.eval_items("test"),
            **self.by_loops(),
        }

    def by_loops(self) -> Dict[str, Dict[str, Any]]:
        """policy=looped with train.eval_loops: the whole test split scored again at policy.loops and at each of
        train.eval_loops, the same weights run at that many loops: ``test_<metric>_by_loops`` = {loops: value}."""
        control = self.model.stack.looping
        if control is None or not self.cfg.train.eval_loops:
            return {}
        by_loops: Dict[str, Dict[str, Any]] = {}
        for loops in sorted({control.plan.loops, *self.cfg.train.eval_loops}):
            with control.at(loops):
                for key, value in self.evaluate("test", None).items():
                    by_loops.setdefault(f"{key}_by_loops", {})[str(loops)] = value
        return by_loops
