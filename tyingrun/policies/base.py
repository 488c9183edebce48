"""The policy interface: an initial map, then (for learned policies) decisions as training goes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol


@dataclass
class Decision:
    """A map (resolved to roots), per-slot trainable flags, and what to log about how it was chosen."""

    src: List[int]
    trainable: List[bool]
    info: Dict[str, Any] = field(default_factory=dict)


class DecisionContext(Protocol):
    """What the trainer lends a policy at a decision point; the policy never touches the model itself."""

    @property
    def step(self) -> int: ...

    # The map the model trains under now and its trainable flags: the model's TiedStack owns them, the policy
    # reads them here and keeps no copy.
    @property
    def src(self) -> List[int]: ...

    @property
    def trainable(self) -> List[bool]: ...

    def score_batch(self, batch: Optional[Dict[str, Any]] = None) -> float:
        """Cross-entropy of the current model (eval mode, no graph) on ``batch``, a batch that ``reward_batch``
        returned earlier, or without one on the next batch of the trainer's reward stream."""

    def reward_batch(self) -> Dict[str, Any]:
        """The next batch of the trainer's reward stream (training split, never the training stream), to be scored
        now and again later: a policy that keeps one keeps it in its state_dict, so it survives a resume."""

    def counts(self) -> Dict[str, int]:
        """trainable_params, stored_params, independent_layers, trainable_layers now."""


class Policy:
    name: str

    def start(self, n_layer: int) -> Decision:
        raise NotImplementedError

    def after_step(self, context: DecisionContext) -> Optional[Decision]:
        """Called after every optimizer step but the run's last, once that step's evaluation is recorded; a
        returned Decision is applied before the next step (so every evaluated map has trained)."""
        return None

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def diagnostics(self) -> Dict[str, Any]:
        """Summary keys that tell whether a learned policy could have learned; fixed policies have none."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Fixed policies have no state to restore."""
