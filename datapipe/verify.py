"""``datapipe verify OUT``: re-check every shard against ``index.json`` (format: :mod:`bolid.shards`).

For each shard listed: the file exists, its size and SHA-256 are the recorded ones, and it holds the recorded
number of samples, each with its ``.jpg`` and ``.json``. A ``shard-*.tar`` in OUT that the index does not list is
reported too (left by another run, or copied in by hand). Nothing is changed: run ``build`` again to repair.
"""

from __future__ import annotations

import tarfile
from collections import defaultdict
from pathlib import Path

from bolid.shards import read_index
from datapipe.writer import file_sha256


def shard_problems(path: Path, entry: dict) -> list[str]:
    """What is wrong with one shard file compared with its ``index.json`` entry (empty: nothing)."""
    name = entry["name"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    if path.stat().st_size != entry["bytes"]:
        problems.append(f"{name}: {path.stat().st_size} bytes, index says {entry['bytes']}")
    if "sha256" not in entry:
        problems.append(f"{name}: no sha256 in index.json (built by an older version: run build again)")
    elif file_sha256(path) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from index.json (changed or damaged)")
    members: dict[str, set[str]] = defaultdict(set)
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                members[key].add(ext)
    except (tarfile.TarError, OSError) as e:
        return [*problems, f"{name}: not a readable tar ({e})"]
    incomplete = sorted(k for k, exts in members.items() if not {"jpg", "json"} <= exts)
    if incomplete:
        problems.append(f"{name}: samples without both .jpg and .json: {incomplete[:3]}")
    if len(members) != entry["count"]:
        problems.append(f"{name}: {len(members)} samples, index says {entry['count']}")
    return problems


def verify(out: str | Path) -> list[str]:
    """Every problem found in ``out`` (see the module docstring); an empty list means the shards are intact."""
    index = read_index(out)
    problems = []
    for entry in index.shards:
        problems += shard_problems(index.root / entry["name"], entry)
    listed = {entry["name"] for entry in index.shards}
    problems += [f"{p.name}: not listed in index.json" for p in sorted(index.root.glob("shard-*.tar"))
                 if p.name not in listed]  # fmt: skip
    return problems
