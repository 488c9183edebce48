"""What one evaluation adds up over its batches: the loss per predicted item, accuracy where the model reports it,
and for answer-only batches (reasoning tasks) the exact-answer accuracy overall and per difficulty."""

from __future__ import annotations

from typing import Any, Dict, List

from tyingrun.contracts import DIFFICULTY, Batch, LossResult


class EvalTally:
    """Sums over batches; ``merged`` adds another rank's, ``metrics`` reads them.

    ``acc`` is the share of correct items (ViT: images) or, for answer-only batches, of examples whose whole answer
    is right; there ``token_acc`` is the share of answer tokens right and ``acc_by_difficulty`` maps each difficulty
    (as a string, a JSON key) to its exact-answer accuracy.
    """

    def __init__(self) -> None:
        self.loss_sum, self.items, self.correct = 0.0, 0, 0
        self.has_accuracy = False
        self.by_difficulty: Dict[int, List[int]] = {}  # difficulty -> [examples, exactly right]

    def add(self, batch: Batch, result: LossResult) -> None:
        self.loss_sum += result.loss.item() * result.n_items
        self.items += result.n_items
        if result.n_correct is not None:
            self.correct, self.has_accuracy = self.correct + int(result.n_correct), True
        if result.exact is not None:
            for level, exact in zip(batch[DIFFICULTY].tolist(), result.exact.tolist(), strict=True):
                counts = self.by_difficulty.setdefault(int(level), [0, 0])
                counts[0] += 1
                counts[1] += int(exact)

    def state(self) -> Dict[str, Any]:
        return {"loss_sum": self.loss_sum, "items": self.items, "correct": self.correct,
                "has_accuracy": self.has_accuracy, "by_difficulty": self.by_difficulty}

    def merged(self, states: List[Dict[str, Any]]) -> EvalTally:
        """The tally of every rank, from each rank's ``state()``."""
        total = EvalTally()
        for state in states:
            total.loss_sum += state["loss_sum"]
            total.items += state["items"]
            total.correct += state["correct"]
            total.has_accuracy |= state["has_accuracy"]
            for level, (examples, exact) in state["by_difficulty"].items():
                counts = total.by_difficulty.setdefault(int(level), [0, 0])
                counts[0] += examples
                counts[1] += exact
        return total

    def metrics(self) -> Dict[str, Any]:
        measured: Dict[str, Any] = {"loss": self.loss_sum / self.items}
        if not self.has_accuracy:
            return measured
        if not self.by_difficulty:
            return {**measured, "acc": self.correct / self.items}
        examples = sum(counts[0] for counts in self.by_difficulty.values())
        exact = sum(counts[1] for counts in self.by_difficulty.values())
        return {**measured, "acc": exact / examples, "token_acc": self.correct / self.items,
                "acc_by_difficulty": {str(level): right / count
                                      for level, (count, right) in sorted(self.by_difficulty.items())}}
