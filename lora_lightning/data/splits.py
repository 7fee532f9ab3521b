"""Deterministic, seeded selection of examples: train/validation splits and subsampling."""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_indices(n: int, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint ``(train, validation)`` index lists covering ``range(n)``, the same for the same seed."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_validation = max(1, round(n * validation_fraction)) if n > 1 else 0
    return sorted(order[n_validation:]), sorted(order[:n_validation])


def subsample(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """At most ``limit`` items, chosen by a seeded draw and kept in their original order."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"Sample limits must be at least 1, got {limit}.")
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]
