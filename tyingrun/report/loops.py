"""What one loop is worth: each looped arm's test loss read off the untied arms' loss-against-depth curve as its
effective unique blocks, and phi = log(effective core blocks / core) / log(loops) per seed, with its interval over
seeds (docs/method.md#what-one-loop-is-worth). Beside it, quality at every evaluated loop count."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tyingrun.report.runs import Group
from tyingrun.report.stats import Estimate, estimate

# Schwethelm et al. 2026, "How Much Is One Recurrence Worth?": a block looped r times is worth r^0.46 unique blocks
# at language-model scale.
PUBLISHED_PHI = 0.46
# What may set a looped arm apart from the untied arms it is read against: the policy and the depth, and what only
# evaluation (the loop counts scored) or shared weights (their learning rate) use.
CURVE_FREE = ("policy.", "model.n_layer", "train.eval_loops", "train.tied_lr")
BISECTIONS = 100
NOT_FALLING = "the untied arms' test loss does not fall with depth"


@dataclass(frozen=True)
class Reading:
    """A number read off the untied curve: exact (``relation`` "="), only a bound on it (">" or "<", ``why`` says
    which untied arm bounds it), or none at all (``value`` None, ``why`` says why)."""

    value: Optional[float]
    relation: str = "="
    why: str = ""

    @property
    def exact(self) -> bool:
        return self.value is not None and self.relation == "="

    def text(self, digits: int = 3) -> str:
        if self.value is None:
            return self.why
        if self.relation == "=":
            return f"{self.value:.{digits}f}"
        return f"{self.relation} {self.value:.{digits}f} ({self.why})"


def blocks_text(blocks: float) -> str:
    return f"{blocks:g} block{'' if blocks == 1 else 's'}"


@dataclass(frozen=True)
class DepthCurve:
    """Test loss against unique blocks (ascending), interpolated by a monotone piecewise cubic (Hermite) in
    log(blocks): between two points it falls, so its inverse is one number per loss in the points' range."""

    blocks: Tuple[float, ...]
    losses: Tuple[float, ...]

    @property
    def problem(self) -> str:
        """Why no loss can be read off this curve; "" when it can."""
        if len(self.blocks) < 2:
            return "fewer than two untied depths to interpolate between"
        if any(deeper >= shallower for shallower, deeper in zip(self.losses, self.losses[1:], strict=False)):
            return NOT_FALLING
        return ""

    def _tangents(self) -> List[float]:
        """The slope dL/dlog(blocks) at each point: inside, the weighted harmonic mean of the secants beside it
        (zero where they differ in sign); at each end, the three-point estimate, kept within the end secant's sign
        and three times its size. Both keep every segment monotone (Fritsch and Carlson's condition)."""
        x = [math.log(blocks) for blocks in self.blocks]
        widths = [b - a for a, b in zip(x, x[1:], strict=False)]
        secants = [(self.losses[k + 1] - self.losses[k]) / widths[k] for k in range(len(widths))]
        if len(secants) == 1:
            return [secants[0], secants[0]]
        inside = []
        for k in range(1, len(secants)):
            left, right = secants[k - 1], secants[k]
            w_left, w_right = 2 * widths[k] + widths[k - 1], widths[k] + 2 * widths[k - 1]
            inside.append((w_left + w_right) / (w_left / left + w_right / right) if left * right > 0 else 0.0)
        return [self._end_tangent(widths[0], widths[1], secants[0], secants[1]), *inside,
                self._end_tangent(widths[-1], widths[-2], secants[-1], secants[-2])]

    @staticmethod
    def _end_tangent(width: float, next_width: float, secant: float, next_secant: float) -> float:
        tangent = ((2 * width + next_width) * secant - width * next_secant) / (width + next_width)
        if tangent * secant <= 0:
            return 0.0
        return 3 * secant if abs(tangent) > 3 * abs(secant) else tangent

    def _segment(self, k: int, t: float, tangents: Sequence[float]) -> float:
        width = math.log(self.blocks[k + 1]) - math.log(self.blocks[k])
        return ((2 * t**3 - 3 * t**2 + 1) * self.losses[k] + (t**3 - 2 * t**2 + t) * width * tangents[k]
                + (-2 * t**3 + 3 * t**2) * self.losses[k + 1] + (t**3 - t**2) * width * tangents[k + 1])

    def loss_at(self, blocks: float) -> float:
        """The interpolated loss at ``blocks`` unique blocks, within [blocks[0], blocks[-1]]."""
        k = max(index for index in range(len(self.blocks) - 1) if self.blocks[index] <= blocks)
        t = (math.log(blocks) - math.log(self.blocks[k])) / (math.log(self.blocks[k + 1]) - math.log(self.blocks[k]))
        return self._segment(k, t, self._tangents())

    def blocks_at(self, loss: float) -> Reading:
        """The unique blocks at which the curve reaches ``loss``; outside its range, the bound the end arm gives."""
        if self.problem:
            return Reading(None, why=self.problem)
        if loss < self.losses[-1]:
            return Reading(self.blocks[-1], ">", f"better than the deepest untied arm, {blocks_text(self.blocks[-1])}")
        if loss > self.losses[0]:
            return Reading(self.blocks[0], "<", f"worse than the shallowest untied arm, {blocks_text(self.blocks[0])}")
        k = next(index for index in range(len(self.blocks) - 1) if self.losses[index + 1] <= loss)
        tangents, low, high = self._tangents(), 0.0, 1.0
        for _ in range(BISECTIONS):  # the segment falls monotonically in t
            middle = (low + high) / 2
            low, high = (middle, high) if self._segment(k, middle, tangents) > loss else (low, middle)
        x = math.log(self.blocks[k]) + (low + high) / 2 * (math.log(self.blocks[k + 1]) - math.log(self.blocks[k]))
        return Reading(math.exp(x))


@dataclass(frozen=True)
class Shape:
    """A looped arm's layout, from its summary's "looped"."""

    prelude: int
    core: int
    coda: int
    loops: int
    counts: Optional[Tuple[int, ...]]
    train_loops: str
    inject: str
    loop_params: str

    @classmethod
    def of(cls, looped: Dict[str, Any]) -> Shape:
        counts = looped.get("counts")
        return cls(looped["prelude"], looped["core"], looped["coda"], looped["loops"],
                   None if counts is None else tuple(counts), looped.get("train_loops", "fixed"),
                   looped.get("inject", "none"), looped.get("loop_params", "none"))

    @property
    def layout(self) -> str:
        if self.counts is not None:
            return f"counts [{','.join(map(str, self.counts))}]"
        return f"{self.prelude}+{self.core}×{self.loops}+{self.coda}"

    def phi(self, effective: Reading, loops: int) -> Reading:
        """phi = log(effective core blocks / core) / log(loops): a bound where ``effective`` is one, none where the
        effective core is empty or there is no single loop count."""
        if self.counts is not None:
            return Reading(None, why="per-layer counts: no single loop count")
        if loops <= 1:
            return Reading(None, why="one loop: no φ")
        if effective.value is None:
            return effective
        core_blocks = effective.value - self.prelude - self.coda
        if core_blocks <= 0:
            if effective.relation == ">":
                return Reading(None, why=f"beyond the untied range ({effective.why})")
            return Reading(None, why=f"effective core blocks ≤ 0: effective unique blocks "
                                     f"{effective.relation} {effective.value:.3g} ≤ prelude + coda")
        return Reading(math.log(core_blocks / self.core) / math.log(loops), effective.relation, effective.why)


@dataclass
class Untied:
    """The untied arms a looped arm is read against: at each unique block count, test loss by seed."""

    losses: Dict[float, Dict[Any, float]] = field(default_factory=dict)

    def curve(self, seed: Any = None) -> DepthCurve:
        """The curve of ``seed``'s losses where a depth has that seed, the mean over seeds elsewhere (or everywhere
        without a seed)."""
        blocks = sorted(self.losses)
        return DepthCurve(tuple(blocks), tuple(
            self.losses[n][seed] if seed in self.losses[n] else statistics.fmean(self.losses[n].values())
            for n in blocks))


@dataclass(frozen=True)
class PhiResult:
    """phi of one looped arm at one loop count: per seed, over seeds, and from the mean loss on the mean curve."""

    by_seed: Dict[Any, Reading]
    over_seeds: Optional[Estimate]  # only when every seed reads exactly
    from_mean: Reading
    effective: Reading  # unique blocks at the mean loss on the mean curve


def phi_result(losses: Dict[Any, float], untied: Untied, shape: Shape, loops: int) -> PhiResult:
    """phi of the arm whose test loss at ``loops`` loops is ``losses`` (by seed), read against ``untied``."""
    by_seed = {seed: shape.phi(untied.curve(seed).blocks_at(loss), loops) for seed, loss in sorted(losses.items())}
    values = [reading.value for reading in by_seed.values() if reading.exact and reading.value is not None]
    effective = untied.curve().blocks_at(statistics.fmean(losses.values()))
    return PhiResult(by_seed, estimate(values) if len(values) == len(by_seed) else None,
                     shape.phi(effective, loops), effective)


def summary_of(run: Any) -> Dict[str, Any]:
    """A run's summary (the report groups completed runs only, which all have one)."""
    return run.summary or {}


def nested_by_seed(group: Group, *path: str) -> Dict[Any, float]:
    """``summary[path[0]][path[1]]...`` of each seed that has it; runs repeating a seed are averaged."""
    values: Dict[Any, List[float]] = defaultdict(list)
    for run in group.runs:
        node: Any = summary_of(run)
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            values[run.seed].append(node)
    return {seed: statistics.fmean(found) for seed, found in values.items()}


def keys_in_every_run(group: Group, key: str) -> List[int]:
    """The loop counts (or difficulties) under ``summary[key]`` that every run of the group has, ascending."""
    found = [set(map(int, summary_of(run)[key])) if isinstance(summary_of(run).get(key), dict) else set()
             for run in group.runs]
    return sorted(set.intersection(*found)) if found else []


@dataclass
class LoopedArm:
    """A looped group with its layout, the untied arms it is read against (None: there are none) and its φ."""

    group: Group
    shape: Shape
    untied: Optional[Untied]
    phi: Optional[PhiResult] = None
    phi_by_loops: Dict[int, PhiResult] = field(default_factory=dict)

    @property
    def evaluated_loops(self) -> List[int]:
        return keys_in_every_run(self.group, "test_loss_by_loops")

    @property
    def scored_at_several_loop_counts(self) -> bool:
        return len(self.evaluated_loops) > 1

    def quality_by_loops(self, metric: str) -> Dict[int, Estimate]:
        """``test_<metric>_by_loops`` at each loop count every seed scored, over seeds."""
        key = f"test_{metric}_by_loops"
        found = {loops: nested_by_seed(self.group, key, str(loops)) for loops in keys_in_every_run(self.group, key)}
        return {loops: estimate(list(values.values())) for loops, values in found.items() if values}

    def accuracy_by_difficulty_by_loops(self) -> Dict[int, Dict[int, Estimate]]:
        """Test accuracy per difficulty at each loop count, over seeds (where every seed has that cell)."""
        key = "test_acc_by_difficulty_by_loops"
        result = {}
        for loops in keys_in_every_run(self.group, key):
            levels = set.intersection(*(set(map(int, summary_of(run)[key][str(loops)])) for run in self.group.runs))
            result[loops] = {level: estimate(list(nested_by_seed(self.group, key, str(loops), str(level)).values()))
                             for level in sorted(levels)}
        return result


@dataclass
class LoopFamily:
    """Looped arms and the untied arms of the same settings (everything outside CURVE_FREE equal)."""

    untied: List[Group]
    looped: List[LoopedArm]

    @property
    def title(self) -> str:
        model, dataset = self.looped[0].group.family
        return f"{model} on {dataset}"


def _comparable(group: Group) -> Tuple[Tuple[str, Any], ...]:
    return tuple(sorted((key, value) for key, value in group.settings.items() if not key.startswith(CURVE_FREE)))


def unique_blocks(group: Group) -> float:
    return summary_of(group.runs[0]).get("unique_blocks", group.settings["model.n_layer"])


def untied_arms(groups: Sequence[Group]) -> Optional[Untied]:
    """The untied groups' test losses by unique block count and seed; None when none has a test loss."""
    losses: Dict[float, Dict[Any, float]] = defaultdict(dict)
    for group in groups:
        losses[unique_blocks(group)].update(group.values_by_seed("test_loss"))
    losses = {blocks: found for blocks, found in losses.items() if found}
    return Untied(losses) if losses else None


def loop_families(groups: Sequence[Group]) -> List[LoopFamily]:
    """The looped groups (summaries with "looped") with their untied arms and φ, in the order first seen."""
    families: Dict[Tuple, LoopFamily] = {}
    for group in groups:
        if summary_of(group.runs[0]).get("looped"):
            families.setdefault(_comparable(group), LoopFamily([], [])).looped.append(
                LoopedArm(group, Shape.of(summary_of(group.runs[0])["looped"]), None))
    for group in groups:
        if group.settings["policy.name"] == "none" and _comparable(group) in families:
            families[_comparable(group)].untied.append(group)
    for family in families.values():
        family.untied.sort(key=unique_blocks)
        untied = untied_arms(family.untied)
        for arm in family.looped:
            arm.untied = untied
            if untied is None:
                continue
            losses = arm.group.values_by_seed("test_loss")
            if losses:
                arm.phi = phi_result(losses, untied, arm.shape, arm.shape.loops)
            arm.phi_by_loops = {loops: phi_result(nested_by_seed(arm.group, "test_loss_by_loops", str(loops)),
                                                  untied, arm.shape, loops)
                                for loops in arm.evaluated_loops if loops > 1}
    return list(families.values())
