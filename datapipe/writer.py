"""The shard writer: which identities go into which shard, and one tar written atomically.

The format it writes is documented once, in :mod:`bolid.shards` (training and evaluation read it there).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

#: Every tar member gets this mtime (and fixed owner and mode), so equal content gives equal bytes.
SHARD_MTIME = 0


def plan_shards(counts: list[tuple[str, int]], samples_per_shard: int) -> list[list[tuple[str, int, int]]]:
    """Assign identities, in the given order, to shards.

    Args:
        counts: ``(identity, number of samples)`` in write order.
        samples_per_shard: maximum samples in a shard.

    Returns:
        Per shard, the ``(identity, start, stop)`` slices of each identity's samples it holds. An identity that
        fits in the current shard goes there; one that does not starts a new shard unless it is larger than a
        shard and starting here costs no extra shard. So each identity spans the fewest shards possible.
    """
    shards: list[list[tuple[str, int, int]]] = []
    used = samples_per_shard  # no open shard yet
    for identity, n in counts:
        if n <= 0:
            continue
        free = samples_per_shard - used
        fits = n <= free
        fill_here = free > 0 and 1 + math.ceil((n - free) / samples_per_shard) == math.ceil(n / samples_per_shard)
        if not (fits or (n > samples_per_shard and fill_here)):
            shards.append([])
            used = 0
        start = 0
        while start < n:
            if used == samples_per_shard:
                shards.append([])
                used = 0
            take = min(n - start, samples_per_shard - used)
            shards[-1].append((identity, start, start + take))
            used += take
            start += take
    return shards


def write_shard(path: Path, samples: Iterable[tuple[str, bytes, bytes]]) -> int:
    """Write ``(key, jpg, json)`` samples as a tar with webdataset's writer, atomically; returns its size.

    The tar goes to a hidden temporary name beside ``path`` and is renamed when complete, so a
    shard that exists is whole. Member metadata is fixed (:data:`SHARD_MTIME`, owner, mode), so
    the same samples always give the same bytes.
    """
    import webdataset as wds

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            writer = wds.TarWriter(fh, user="bolid", group="bolid", mode=0o444, mtime=SHARD_MTIME, encoder=False)
            for key, jpg, meta in samples:
                if "." in key:
                    raise ValueError(f"sample key {key!r} contains a dot")
                writer.write({"__key__": key, "jpg": jpg, "json": meta})
            writer.close()
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path.stat().st_size
