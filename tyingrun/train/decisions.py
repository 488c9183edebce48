"""A decision point: what a policy may ask while it decides, and how every rank comes to apply the same decision.

Under data parallelism rank 0's policy decides alone. Each batch it scores is broadcast first, so that the other
ranks run the same forward (under FSDP a forward gathers weights from every rank); then the decision itself is
broadcast, and every rank applies it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, cast

from tyingrun.contracts import Batch
from tyingrun.policies.base import Decision
from tyingrun.train.distributed import broadcast_object

if TYPE_CHECKING:
    from tyingrun.train.trainer import Trainer

# What rank 0 broadcasts while its policy decides: a batch to score, then the decision.
SCORE, DECIDED = "score", "decided"


class DecisionPoint:
    """The trainer as a policy sees it (a DecisionContext): the step, the map the model trains under (the
    stack's: the policy keeps no copy), batches of the reward stream, scores and counts."""

    def __init__(self, trainer: Trainer):
        self._trainer = trainer

    @property
    def step(self) -> int:
        return self._trainer.step

    @property
    def src(self) -> List[int]:
        return list(self._trainer.stack.src)

    @property
    def trainable(self) -> List[bool]:
        return list(self._trainer.stack.trainable)

    def reward_batch(self) -> Batch:
        return self._trainer.score_sampler.next_batch()

    def score_batch(self, batch: Optional[Batch] = None) -> float:
        """The loss on ``batch`` (one the policy kept from the reward stream), or on the reward stream's next batch;
        under data parallelism the other ranks run the same forward (see decide)."""
        trainer = self._trainer
        batch = trainer.score_sampler.next_batch() if batch is None else batch
        if trainer.mesh.distributed:
            broadcast_object((SCORE, batch), trainer.device)
        return trainer.evaluator.measure([batch])["loss"]

    def counts(self) -> Dict[str, int]:
        return dict(self._trainer.counts)

    def decide(self) -> Optional[Decision]:
        """Rank 0: its policy's decision after this step, broadcast. The other ranks: each scoring forward rank 0
        runs, until its decision arrives."""
        trainer = self._trainer
        if not trainer.mesh.is_main:
            while True:
                kind, payload = cast(Tuple[str, Any], broadcast_object(None, trainer.device))
                if kind == DECIDED:
                    return payload
                trainer.evaluator.measure([payload])
        decision = trainer.policy.after_step(self)
        if trainer.mesh.distributed:
            broadcast_object((DECIDED, decision), trainer.device)
        return decision
