"""policy=looped's layout (docs/looped.md): a prelude, a core looped policy.loops times and a coda, or per-layer
repeat counts (policy.counts); its map is fixed for the whole run."""

from __future__ import annotations

from typing import List, Optional

from tyingrun.config import PolicyConfig
from tyingrun.tying.loops import LoopPlan, counts_map
from tyingrun.tying.maps import TyingMap


def loop_plan(cfg: PolicyConfig) -> Optional[LoopPlan]:
    """The prelude/core/coda plan of policy=looped; None for any other policy and for the policy.counts form."""
    if cfg.name != "looped" or cfg.counts is not None:
        return None
    return LoopPlan(cfg.prelude, cfg.core, cfg.coda, cfg.loops)


def looped_map(cfg: PolicyConfig) -> TyingMap:
    plan = loop_plan(cfg)
    return plan.tying_map() if plan is not None else counts_map(list(cfg.counts or []))


def later_loop_slots(cfg: PolicyConfig) -> List[int]:
    """The slots that repeat an earlier slot's block (every loop after the first): those policy.loop_params=lora
    gives their own correction."""
    return [slot for slot, root in enumerate(looped_map(cfg)) if root != slot]


def max_loops(cfg: PolicyConfig) -> int:
    """The most loops a training step draws: policy.max_loops, or (null) twice policy.loops. Only training reads it:
    train.eval_loops may go beyond (they must stay within it only where policy.max_loops is set)."""
    return 2 * cfg.loops if cfg.max_loops is None else cfg.max_loops
