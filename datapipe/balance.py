"""Which part of a scale-out run builds which identity: balanced by photo count, not by name.

A part's work (decode, pose, captions, shards) grows with its photos, and one person's photos always stay in
one part (shards are identity-grouped). Hashing names into parts leaves the parts as uneven as the galleries:
one huge gallery plus a few others in the same part keeps one machine running alone long after the rest.
:func:`assign_parts` uses the longest-processing-time-first greedy rule instead: identities by decreasing photo
count, each to the part with the least photos so far (ties: the lower part number). Its largest part is at
most ``4/3`` of the best possible partition's (Graham, 1969), and never more than the optimum plus the largest
single gallery.

The assignment is a pure function of ``{identity: photos}`` and ``num_parts`` (ties broken by name), so every
machine of a run computes the same one from the same input folder, whatever executor started it.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable


def assign_parts(counts: dict[str, int], num_parts: int) -> dict[str, int]:
    """Identity -> part (``0 .. num_parts-1``), balancing the photos per part (module docstring)."""
    if num_parts < 1:
        raise ValueError(f"--num-parts must be >= 1, got {num_parts}")
    heap = [(0, part) for part in range(num_parts)]  # (photos so far, part)
    assignment: dict[str, int] = {}
    for identity in sorted(counts, key=lambda name: (-counts[name], name)):
        load, part = heapq.heappop(heap)
        assignment[identity] = part
        heapq.heappush(heap, (load + counts[identity], part))
    return assignment


def assign_sources(identities: Iterable[str], num_parts: int) -> dict[str, int]:
    """:func:`assign_parts` over the identities of every input photo (one entry per photo)."""
    return assign_parts(dict(Counter(identities)), num_parts)


def part_loads(counts: dict[str, int], assignment: dict[str, int], num_parts: int) -> list[int]:
    """Photos per part under ``assignment``."""
    loads = [0] * num_parts
    for identity, part in assignment.items():
        loads[part] += counts[identity]
    return loads
