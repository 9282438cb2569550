"""The shard writer: which identities go into which shard, and one tar written atomically.

The format it writes is documented once, in :mod:`bolid.shards` (training and evaluation read it there).
"""

from __future__ import annotations

import hashlib
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


def plan_stable(
    previous: list[dict], counts: list[tuple[str, int]], samples_per_shard: int
) -> list[tuple[int, list[tuple[str, int, int]]]]:
    """Like :func:`plan_shards`, but keep what the last complete build wrote: ``(shard number, slices)`` per shard.

    Args:
        previous: the last build's shards (``index.json`` entries: ``number``, ``identities`` in order), or [].
        counts: ``(identity, number of samples)`` now, in write order.
        samples_per_shard: maximum samples in a new shard.

    An identity with as many samples as before stays in the same shards, at the same place; a shard whose
    identities all stayed (with the same samples) is not rewritten. New identities, and identities whose number
    of samples changed, go into new shards numbered after the last one, packed by :func:`plan_shards`; shards
    left without identities disappear. So adding one person writes only the shards that hold it, and removing
    one rewrites only the shards that held it. With no previous build this is :func:`plan_shards`.
    """
    now = dict(counts)
    before: dict[str, int] = {}
    for shard in previous:
        for identity, n in shard["identities"].items():
            before[identity] = before.get(identity, 0) + n
    stable = {identity for identity, n in now.items() if n > 0 and before.get(identity) == n}
    plan: list[tuple[int, list[tuple[str, int, int]]]] = []
    offset: dict[str, int] = {}
    for shard in previous:
        slices = []
        for identity, n in shard["identities"].items():
            if identity in stable:
                start = offset.get(identity, 0)
                slices.append((identity, start, start + n))
                offset[identity] = start + n
        if slices:
            plan.append((shard["number"], slices))
    first = max((shard["number"] for shard in previous), default=-1) + 1
    fresh = [(identity, n) for identity, n in counts if identity not in stable]
    plan += [(first + k, slices) for k, slices in enumerate(plan_shards(fresh, samples_per_shard))]
    return plan


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


def shard_digest(tag: str, metas: list[tuple[str, bytes]]) -> str:
    """What a shard's content is, for the build journal: the storage settings' tag and every (key, json)."""
    digest = hashlib.sha256(tag.encode())
    for key, meta in metas:
        digest.update(key.encode() + b"\0" + meta + b"\0")
    return digest.hexdigest()


def read_shard(path: Path) -> list[tuple[str, bytes, bytes]]:
    """The ``(key, jpg, json)`` samples of a shard, in order (the inverse of :func:`write_shard`)."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            fh = tar.extractfile(member)
            if fh is not None:
                samples.setdefault(key, {})[ext] = fh.read()
    return [(key, parts["jpg"], parts["json"]) for key, parts in samples.items()]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
