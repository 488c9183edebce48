"""Who decides the tying map, and when."""

from __future__ import annotations

from tyingrun.config import PolicyConfig
from tyingrun.errors import BadInput
from tyingrun.policies.base import Policy
from tyingrun.policies.dynamic_q import DynamicQPolicy
from tyingrun.policies.fixed import FIXED_PATTERNS, FixedPolicy, map_from_file
from tyingrun.policies.random import RandomPolicy

EPISODIC = {"random": RandomPolicy, "dynamic_q": DynamicQPolicy}
POLICIES = ("none", "sequential", "cyclic", "cycle_rev", "from_file", *EPISODIC)


def build_policy(cfg: PolicyConfig, n_layer: int, seed: int = 0) -> Policy:
    """``seed`` (the run's train.seed) seeds the learned policies unless policy.seed is set."""
    if cfg.name in FIXED_PATTERNS:
        return FixedPolicy(cfg.name, FIXED_PATTERNS[cfg.name](n_layer, cfg.n_sets))
    if cfg.name == "from_file":
        return FixedPolicy(cfg.name, map_from_file(cfg.path, n_layer))
    if cfg.name in EPISODIC:
        return EPISODIC[cfg.name](cfg, n_layer, seed if cfg.seed is None else cfg.seed)
    raise BadInput(f"policy.name={cfg.name!r} is not a policy; choose one of: {', '.join(POLICIES)}")
