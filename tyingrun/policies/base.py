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

    step: int

    def score_batch(self) -> float:
        """Cross-entropy of the current model on one random training batch (eval mode, no graph)."""

    def counts(self) -> Dict[str, int]:
        """trainable_params, stored_params, independent_layers, trainable_layers now."""


class Policy:
    name: str

    def start(self, n_layer: int) -> Decision:
        raise NotImplementedError

    def after_step(self, context: DecisionContext) -> Optional[Decision]:
        """Called after every optimizer step; a returned Decision is applied before the next step."""
        return None

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Fixed policies have no state to restore."""
