"""Pure functions on tying maps (METHOD.md §1-2).

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


def _check_sets(pattern: str, n_layer: int, n_sets: int) -> None:
    if not 1 <= n_sets <= n_layer:
        raise BadInput(f"policy={pattern}: policy.n_sets={n_sets} must be between 1 and model.n_layer={n_layer}")


def sequential(n_layer: int, n_sets: int) -> TyingMap:
    """Takase's SEQUENCE: each of the N sets serves M/N consecutive layers."""
    _check_sets("sequential", n_layer, n_sets)
    if n_layer % n_sets:
        divisors = [n for n in range(1, n_layer + 1) if n_layer % n == 0]
        raise BadInput(
            f"policy=sequential: policy.n_sets={n_sets} does not divide model.n_layer={n_layer}; "
            f"use one of {divisors}"
        )
    width = n_layer // n_sets
    return [(i // width) * width for i in range(n_layer)]


def cyclic(n_layer: int, n_sets: int) -> TyingMap:
    """Takase's CYCLE: layer i uses set i mod N."""
    _check_sets("cyclic", n_layer, n_sets)
    return [i % n_sets for i in range(n_layer)]


def cycle_rev(n_layer: int, n_sets: int) -> TyingMap:
    """Takase's CYCLE (REV): i mod N, then the last N layers use the sets in reverse order."""
    _check_sets("cycle_rev", n_layer, n_sets)
    if 2 * n_sets > n_layer:
        raise BadInput(
            f"policy=cycle_rev: policy.n_sets={n_sets} needs at least {2 * n_sets} layers "
            f"(model.n_layer={n_layer}); use policy.n_sets <= {n_layer // 2}"
        )
    return [i % n_sets if i < n_layer - n_sets else n_layer - 1 - i for i in range(n_layer)]


def assign(src: Sequence[int], layer: int, target: int) -> TyingMap:
    """Tie ``layer`` to ``target`` (``target == layer``: make it independent) and return the resolved map.

    Layers that copied ``layer`` follow it: they now compute with whatever ``layer`` computes with.
    """
    if not 0 <= target <= layer < len(src):
        raise ValueError(f"cannot tie layer {layer} to {target} in a map of {len(src)} layers")
    new_root = layer if target == layer else src[target]
    return [new_root if (i == layer or j == layer) else j for i, j in enumerate(src)]
