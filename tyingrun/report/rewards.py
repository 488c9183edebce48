"""Whether a run's rewards told its actions apart (docs/method.md#reward-separation), from the decisions it logged in
maps.jsonl, so every run that logged rewards has it, runs from before this measure included.

Each rewarded decision is centred on its episode (one decision for each of the layers 1..L-1, a few optimizer
steps apart): its reward minus the mean reward of the episode's rewarded decisions. That takes out the drift of the
reward over training (the loss falls more slowly later), which would otherwise credit the actions taken early.
Per layer, the action with the highest mean centred reward, among those taken at least twice, is *separated* when
its Welch t-statistic against every other such action is at least SEPARATION_T. ``separable_layers`` is the share
of the layers 1..L-1 that are.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Optional, Sequence

from tyingrun.report.stats import welch_t

SEPARATION_T = 2.0
# Fewer samples of an action than this give it no standard error.
MIN_SAMPLES = 2


def episodes(rows: Sequence[Dict[str, Any]]) -> Iterator[List[Dict[str, Any]]]:
    """The decision rows (those naming a layer) cut into episodes: a new one starts where the layer does not rise."""
    episode: List[Dict[str, Any]] = []
    for row in rows:
        if row.get("layer") is None:
            continue
        if episode and row["layer"] <= episode[-1]["layer"]:
            yield episode
            episode = []
        episode.append(row)
    if episode:
        yield episode


def centred_rewards(rows: Sequence[Dict[str, Any]]) -> Dict[int, Dict[int, List[float]]]:
    """Per layer and action, the centred reward of each decision, from episodes with at least two rewards."""
    found: Dict[int, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    for episode in episodes(rows):
        rewarded = [row for row in episode if row.get("reward") is not None]
        if len(rewarded) < 2:
            continue
        centre = statistics.fmean(row["reward"] for row in rewarded)
        for row in rewarded:
            found[row["layer"]][row["action"]].append(row["reward"] - centre)
    return found


def layer_separation(by_action: Dict[int, List[float]]) -> Optional[float]:
    """The smallest Welch t of the best action (highest mean, among those with MIN_SAMPLES) against each other such
    action; None with fewer than two such actions or where the rewards do not vary at all."""
    sampled = {action: rewards for action, rewards in by_action.items() if len(rewards) >= MIN_SAMPLES}
    if len(sampled) < 2:
        return None
    best = max(sorted(sampled), key=lambda action: statistics.fmean(sampled[action]))
    found = [welch_t(sampled[best], rewards) for action, rewards in sampled.items() if action != best]
    return None if any(t is None for t in found) else min(found)


def reward_separation(rows: Sequence[Dict[str, Any]], n_layer: int) -> Dict[str, float]:
    """``{"separable_layers": share}`` for a run whose maps.jsonl holds rewarded decisions; ``{}`` otherwise."""
    by_layer = centred_rewards(rows)
    if n_layer < 2 or not by_layer:
        return {}
    separations = [layer_separation(by_layer.get(layer, {})) for layer in range(1, n_layer)]
    separated = sum(t is not None and t >= SEPARATION_T for t in separations)
    return {"separable_layers": separated / (n_layer - 1)}
