"""What the layers agree on: a batch, the label that is not predicted, what ``loss(batch)`` returns, perplexity,
the base class of every model (TiedModule), and the Protocols through which the trainer and ``run`` see the data
and the sinks.

The models (tyingrun.models) subclass TiedModule; the data (tyingrun.data) and the sinks (tyingrun.metrics.sinks)
satisfy the Protocols by their shape. This module imports none of them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, NamedTuple, Optional, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from tyingrun.tying.stack import TiedStack

# One batch: named tensors ("input_ids" and "labels" for language models, "images" and "labels" for images).
Batch = Dict[str, torch.Tensor]

# The label of a position that is not predicted (masked-LM batches); torch's cross_entropy skips it by default.
IGNORE_INDEX = -100

# The batch key of answer-only batches (reasoning tasks): each example's difficulty. Their labels are IGNORE_INDEX
# but on answer tokens, and a model scores them per answer (LossResult.exact).
DIFFICULTY = "difficulty"


class LossResult(NamedTuple):
    """What every model's ``loss(batch)`` returns, whatever its task."""

    loss: torch.Tensor  # mean over the predicted items, with a graph in training
    n_items: int  # predicted tokens (language models) or samples (classifiers)
    n_correct: Optional[torch.Tensor] = None  # correct predictions, for models that report accuracy
    exact: Optional[torch.Tensor] = None  # answer-only batches: bool [batch], each example's whole answer right


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped below float overflow."""
    return math.exp(min(loss, 700.0))


class TiedModule(nn.Module, ABC):
    """What every model is (GPT2, BERT, ViT): an ``nn.Module`` whose layer slots are one TiedStack, trained on
    ``task``'s data through ``loss``."""

    task: str  # the kind of data it trains on: "lm" (token blocks) or "vision" (labelled images)
    stack: TiedStack  # the only place the tying map is applied (TiedStack.apply_map)

    @abstractmethod
    def loss(self, batch: Batch) -> LossResult:
        """The batch's loss. Computed through the model's own call (``self(...)``), so that whatever hooks its
        forward (FSDP's gathers) sees all of it."""


class Sampler(Protocol):
    """An endless, resumable stream of training batches."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TrainingData(Protocol):
    """A dataset's three splits as the trainer and run use them (LMData, VisionData)."""

    unit: str  # what items_in counts, for throughput and split sizes: "tokens" or "samples"

    # What a token id means (text data; None for images): checkpoints record it.
    @property
    def tokenizer_sha256(self) -> Optional[str]: ...

    def train_sampler(self, batch_size: int, seed: int) -> Sampler: ...

    def eval_batches(self, split: str, batch_size: int, limit: Optional[int]) -> Iterator[Batch]: ...

    def eval_items(self, split: str) -> int: ...

    def items_in(self, batch: Batch) -> int: ...

    def describe(self) -> str: ...


class Console(Protocol):
    """Progress and log lines for the person watching the run (ConsoleSink)."""

    def line(self, text: str, show: bool = True) -> None: ...

    def progress(self, step: int, status: str) -> None: ...

    def table(self, title: str, values: Dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class Sink(Protocol):
    """Where a rank records its run (RunSinks on rank 0, RankSinks on the others)."""

    out_dir: Path  # the run folder, where checkpoints go too

    @property
    def console(self) -> Console: ...

    def metrics(self, row: Dict[str, Any]) -> None: ...

    def map_change(self, row: Dict[str, Any]) -> None: ...

    def summary(self, summary: Dict[str, Any]) -> None: ...

    def close(self) -> None: ...
