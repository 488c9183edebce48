"""Who decides the tying map, and when: the registry of policies and the config keys each one uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from tyingrun.config import PolicyConfig
from tyingrun.policies.bandit import BanditPolicy
from tyingrun.policies.base import Policy
from tyingrun.policies.dynamic_q import DynamicQPolicy
from tyingrun.policies.fixed import FIXED_PATTERNS, RECURSIVE_PATTERNS, FixedPolicy, given_map
from tyingrun.policies.looped import looped_map
from tyingrun.policies.random import RandomPolicy
from tyingrun.tying.maps import TyingMap

# What a tie shares: every policy that ties reads these (docs/method.md#what-a-tie-shares).
SHARE_KEYS = ("share", "share_norms")
EPISODIC_KEYS = (*SHARE_KEYS, "grad", "steps_per_decision", "freeze_at_init", "reward", "param_penalty_weight", "seed")
# The learning options (docs/method.md#learning-options): each learned policy reads those that apply to it.
DYNAMIC_Q_KEYS = (*EPISODIC_KEYS, "epsilon_schedule", "epsilon_decay_per_decision", "reward_normalization",
                  "td_target", "replay", "target_update", "q_lr_decay_updates")
BANDIT_KEYS = (*EPISODIC_KEYS, "reward_normalization", "bandit_algorithm")
# policy=recursive (docs/method.md#recursive-conversion): what the conversion reads, and the grad mode of the ties.
RECURSIVE_KEYS = ("pattern", "n_sets", "init", "lora_rank", "lora_alpha", "grad")
# policy=looped (docs/looped.md): the layout, how many loops train and evaluate, and what each loop adds.
LOOPED_KEYS = ("prelude", "core", "coda", "loops", "counts", "train_loops", "loop_sigma", "max_loops", "backprop_loops",
               "inject", "loop_params", "lora_rank", "lora_alpha", "grad")


@dataclass(frozen=True)
class PolicySpec:
    """How a policy is built from its config section and the run's layer count and seed, and the keys it reads."""

    build: Callable[[PolicyConfig, int, int], Policy]
    keys: Tuple[str, ...]
    pattern: Optional[Callable[[int, int], TyingMap]] = None  # the map of a fixed pattern, from (n_layer, n_sets)


def _pattern(name: str) -> PolicySpec:
    pattern = FIXED_PATTERNS[name]
    keys = () if name == "none" else ("n_sets", "grad", *SHARE_KEYS)
    return PolicySpec(lambda cfg, n_layer, seed: FixedPolicy(name, pattern(n_layer, cfg.n_sets)), keys, pattern)


def _episodic(policy_class, keys: Tuple[str, ...] = EPISODIC_KEYS) -> PolicySpec:
    return PolicySpec(lambda cfg, n_layer, seed: policy_class(cfg, n_layer, seed), keys)


POLICIES = {
    **{name: _pattern(name) for name in FIXED_PATTERNS},
    "from_file": PolicySpec(
        lambda cfg, n_layer, seed: FixedPolicy("from_file", given_map(cfg.path, cfg.map, cfg.groups, n_layer)),
        ("path", "map", "groups", "grad", *SHARE_KEYS)),
    "recursive": PolicySpec(
        lambda cfg, n_layer, seed: FixedPolicy("recursive", RECURSIVE_PATTERNS[cfg.pattern](n_layer, cfg.n_sets)),
        RECURSIVE_KEYS),
    "looped": PolicySpec(lambda cfg, n_layer, seed: FixedPolicy("looped", looped_map(cfg)), LOOPED_KEYS),
    "random": _episodic(RandomPolicy),
    "dynamic_q": _episodic(DynamicQPolicy, DYNAMIC_Q_KEYS),
    "bandit": _episodic(BanditPolicy, BANDIT_KEYS),
}


def build_policy(cfg: PolicyConfig, n_layer: int, seed: int = 0) -> Policy:
    """``seed`` (the run's train.seed) seeds the learned policies unless policy.seed is set; the name is checked
    by the preflight."""
    return POLICIES[cfg.name].build(cfg, n_layer, seed if cfg.seed is None else cfg.seed)


def recursive_map(cfg: PolicyConfig, n_layer: int) -> TyingMap:
    """policy=recursive's map: policy.pattern with policy.n_sets unique blocks (ValueError when they do not fit)."""
    return RECURSIVE_PATTERNS[cfg.pattern](n_layer, cfg.n_sets)


def stack_sharing(cfg: PolicyConfig) -> Tuple[str, bool]:
    """What a tie shares in the model's stack: policy.share, except under policy=recursive with LoRA, where the
    ties share the weight matrices and every slot keeps its own biases and layer norms, and under policy=looped with
    loop_params=adaln, where every slot keeps its block's own norms."""
    if cfg.name == "recursive" and cfg.lora_rank > 0:
        return "matrices", False
    if cfg.name == "looped" and cfg.loop_params == "adaln":
        return "all_but_norms", False
    return cfg.share, cfg.share_norms
