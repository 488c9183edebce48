"""Evaluation: the mean loss (and accuracy) of a model over batches in eval mode, shared out over the
data-parallel ranks, and the val and test splits as periodic and final evaluations score them."""

from __future__ import annotations

import functools
from typing import Any, Dict, Iterable, Optional

import torch

from tyingrun.config import Config
from tyingrun.contracts import Batch, TiedModule, TrainingData, perplexity
from tyingrun.train.device import autocast, on_device
from tyingrun.train.distributed import Mesh, rank_share, sum_over_ranks
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
        for models that report it.

        ``shard``: under data parallelism each rank measures its share of the batches (rank_share) and the sums are
        reduced, so every rank gets the same result. Without it every rank measures every batch.
        """
        model = self.model if model is None else model
        model.eval()
        total, count, correct, has_accuracy = 0.0, 0.0, 0.0, False
        share = rank_share(batches, self.mesh) if shard else ((batch, True) for batch in batches)
        for batch, counted in share:
            with self.autocast():
                loss, n_items, n_correct = model.loss(on_device(batch, self.device))
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

    def evaluate(self, split: str, limit: Optional[int], model: Optional[TiedModule] = None) -> Dict[str, float]:
        """``{split}_loss`` and ``{split}_ppl`` (or ``{split}_acc``) over ``limit`` batches of the split (None: all),
        of the trained model or of another ``model`` on the same protocol."""
        batches = self.data.eval_batches(split, self.cfg.train.batch_size, limit)
        measured = self.measure(batches, shard=True, model=model)
        quality = {f"{split}_acc": measured["acc"]} if "acc" in measured else {
            f"{split}_ppl": perplexity(measured["loss"])}
        return {f"{split}_loss": measured["loss"], **quality}

    def periodic(self) -> Dict[str, Any]:
        """train.eval_batches batches of the val split."""
        return self.evaluate("val", eval_batch_limit(self.cfg))

    def final(self) -> Dict[str, Any]:
        """The whole val split and the whole test split, with the number of items each holds."""
        unit = self.data.unit
        return {
            **self.evaluate("val", None), f"val_{unit}": self.data.eval_items("val"),
            **self.evaluate("test", None), f"test_{unit}": self.data.eval_items("test"),
        }
