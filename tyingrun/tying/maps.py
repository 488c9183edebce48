"""Pure functions on tying maps (docs/method.md#tying-maps and #policies).

A map ``src`` has one entry per layer slot with ``src[i] <= i``: ``src[i] == i`` means slot i owns its
weights, ``src[i] == j < i`` means slot i computes with layer j's weights. Maps are kept resolved to
roots, so ``src[src[i]] == src[i]`` for every i.
"""

from __future__ import annotations

from typing import List, Sequence

from tyingrun.errors import BadInput

TyingMap = List[int]


def validate(src: Sequence[int], n_layer: int) -> None:
    """Raise BadInput unless ``src`` is a legal map for ``n_layer`` slots (chains allowed)."""
    if len(src) != n_layer:
        raise BadInput(f"tying map {list(src)} has {len(src)} entries but the model has {n_layer} layers")
    for i, j in enumerate(src):
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j <= i:
            raise BadInput(f"tying map {list(src)}: entry {i} is {j!r}; each entry must be an integer in [0, {i}]")


def resolve(src: Sequence[int]) -> TyingMap:
    """Follow every chain to its root: ``[0, 0, 1]`` becomes ``[0, 0, 0]``."""
    roots: TyingMap = []
    for i, j in enumerate(src):
        roots.append(i if j == i else roots[j])
    return roots


def identity(n_layer: int) -> TyingMap:
    return list(range(n_layer))


def roots_of(src: Sequence[int]) -> List[int]:
    """The independent layers of a resolved map."""
    return [i for i, j in enumerate(src) if i == j]


def _check_sets(n_layer: int, n_sets: int) -> None:
    if not 1 <= n_sets <= n_layer:
        raise ValueError(f"{n_sets} sets must be between 1 and the {n_layer} layers")


def sequential(n_layer: int, n_sets: int) -> TyingMap:
    """Takase's SEQUENCE: each of the N sets serves M/N consecutive layers."""
    _check_sets(n_layer, n_sets)
    if n_layer % n_sets:
        divisors = [n for n in range(1, n_layer + 1) if n_layer % n == 0]
        raise ValueError(f"{n_sets} sets do not divide {n_layer} layers; use one of {divisors}")
    width = n_layer // n_sets
    return [(i // width) * width for i in range(n_layer)]


def cyclic(n_layer: int, n_sets: int) -> TyingMap:
    """Takase's CYCLE: layer i uses set i mod N."""
    _check_sets(n_layer, n_sets)
    return [i % n_sets for i in range(n_layer)]


def cycle_rev(n_layer: int, n_sets: int) -> TyingMap:
    """Takase's CYCLE (REV): i mod N, then the last N layers use the sets in reverse order."""
    _check_sets(n_layer, n_sets)
    if 2 * n_sets > n_layer:
        raise ValueError(f"{n_sets} sets need at least {2 * n_sets} layers, not {n_layer}; use at most "
                         f"{n_layer // 2} sets")
    return [i % n_sets if i < n_layer - n_sets else n_layer - 1 - i for i in range(n_layer)]


def _check_middle(n_layer: int, n_sets: int) -> int:
    middle = n_layer - 2
    if middle < 1:
        raise ValueError(f"the middle patterns keep the first and last layers apart and need at least 3 layers, "
                         f"not {n_layer}")
    if not 1 <= n_sets <= middle:
        raise ValueError(f"{n_sets} sets must be between 1 and the {middle} middle layers")
    return middle


def middle_cycle(n_layer: int, n_sets: int) -> TyingMap:
    """First and last slots independent; the L-2 middle slots follow CYCLE over N unique middle blocks:
    slot 1 + k uses slot 1 + (k mod N)."""
    middle = _check_middle(n_layer, n_sets)
    return [0] + [1 + k % n_sets for k in range(middle)] + [n_layer - 1]


def middle_sequence(n_layer: int, n_sets: int) -> TyingMap:
    """First and last slots independent; the L-2 middle slots follow SEQUENCE over N unique middle blocks:
    each serves (L-2)/N consecutive middle slots (N must divide L-2)."""
    middle = _check_middle(n_layer, n_sets)
    if middle % n_sets:
        divisors = [n for n in range(1, middle + 1) if middle % n == 0]
        raise ValueError(f"{n_sets} sets do not divide the {middle} middle layers; use one of {divisors}")
    width = middle // n_sets
    return [0] + [1 + (k // width) * width for k in range(middle)] + [n_layer - 1]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def from_groups(groups: Sequence[Sequence[int]], n_layer: int) -> TyingMap:
    """The map in which the slots of each group share the weights of the group's first (lowest) slot; slots in no
    group are independent. Raises ValueError for a slot out of range or in two groups, or a non-integer."""
    if not isinstance(groups, (list, tuple)):
        raise ValueError(f"groups must be a list of lists of layer indices, not {groups!r}")
    src = identity(n_layer)
    seen = set()
    for group in groups:
        if not isinstance(group, (list, tuple)) or not group:
            raise ValueError(f"group {group!r} is not a non-empty list of layer indices")
        for slot in group:
            if not _is_int(slot):
                raise ValueError(f"group {list(group)}: {slot!r} is not a layer index (an integer)")
            if not 0 <= slot < n_layer:
                raise ValueError(f"group {list(group)}: there is no layer {slot}; the model has layers "
                                 f"0..{n_layer - 1}")
            if slot in seen:
                raise ValueError(f"layer {slot} is in two groups (or twice in one); a layer belongs to one group")
            seen.add(slot)
        root = min(group)
        for slot in group:
            src[slot] = root
    return src


def assign(src: Sequence[int], layer: int, target: int) -> TyingMap:
    """Tie ``layer`` to ``target`` (``target == layer``: make it independent) and return the resolved map.

    Layers that copied ``layer`` follow it: they now compute with whatever ``layer`` computes with.
    """
    if not 0 <= target <= layer < len(src):
        raise ValueError(f"cannot tie layer {layer} to {target} in a map of {len(src)} layers")
    new_root = layer if target == layer else src[target]
    return [new_root if (i == layer or j == layer) else j for i, j in enumerate(src)]
