"""Assigning identities to scale-out parts by photo count (datapipe/balance.py), checked by value."""

from __future__ import annotations

import itertools
import random

import pytest

from datapipe.balance import assign_parts, assign_sources, part_loads


def optimum(counts: dict[str, int], num_parts: int) -> int:
    """The smallest possible largest part, by trying every assignment (small inputs only)."""
    names = sorted(counts)
    best = sum(counts.values())
    for parts in itertools.product(range(num_parts), repeat=len(names)):
        loads = [0] * num_parts
        for name, part in zip(names, parts, strict=True):
            loads[part] += counts[name]
        best = min(best, max(loads))
    return best


def test_one_huge_gallery_gets_a_part_to_itself():
    counts = {"huge": 100} | {f"p{i:02d}": 10 for i in range(10)}
    assignment = assign_parts(counts, 2)
    assert part_loads(counts, assignment, 2) == [100, 100]
    assert {name for name, part in assignment.items() if part == assignment["huge"]} == {"huge"}


def test_textbook_case_and_every_part_used():
    # LPT on 5,5,4,4,3,3,3 over 3 parts: 5+3+3=11, 5+3=8, 4+4=8 (the optimum is 9: 5+4, 5+4, 3+3+3)
    counts = dict(zip("abcdefg", [5, 5, 4, 4, 3, 3, 3], strict=True))
    loads = part_loads(counts, assign_parts(counts, 3), 3)
    assert sorted(loads) == [8, 8, 11]
    assert optimum(counts, 3) == 9


@pytest.mark.parametrize("seed", range(30))
def test_within_the_lpt_bound_of_the_optimum(seed):
    rng = random.Random(seed)
    num_parts = rng.randint(2, 3)
    counts = {f"id{i}": rng.choice([1, 2, 3, 5, 8, 40, 200]) for i in range(rng.randint(3, 8))}
    assignment = assign_parts(counts, num_parts)
    assert set(assignment) == set(counts) and set(assignment.values()) <= set(range(num_parts))
    largest = max(part_loads(counts, assignment, num_parts))
    best = optimum(counts, num_parts)
    assert largest <= best * (4 / 3 - 1 / (3 * num_parts)) + 1e-9  # Graham's bound for LPT
    assert largest <= best + max(counts.values())


def test_deterministic_whatever_the_order_of_the_input():
    counts = {f"id{i}": (i * 7) % 11 + 1 for i in range(40)}
    shuffled = dict(sorted(counts.items(), key=lambda kv: random.Random(3).random()))
    assert assign_parts(counts, 4) == assign_parts(shuffled, 4)
    photos = [name for name, n in counts.items() for _ in range(n)]
    random.Random(4).shuffle(photos)
    assert assign_sources(photos, 4) == assign_parts(counts, 4)


def test_bad_part_count_is_named():
    with pytest.raises(ValueError, match="--num-parts"):
        assign_parts({"a": 1}, 0)
