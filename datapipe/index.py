"""Part indexes, the identity split, and the merge that writes ``index.json``, ``stats.json``,
``samples.parquet`` (:mod:`datapipe.table`) and ``DATASET_CARD.md`` (:mod:`datapipe.card`).

Every build run writes the index of its part (``OUT/parts/part-<p>-of-<N>.json``: its shards,
identities and stats; ``.rejects.jsonl`` beside it) after all its shards are in place. The
merge reads the parts of an N-part run, checks they are all there and agree, assigns each
identity to train, validation or test (:func:`assign_splits`) and writes ``index.json``,
``stats.json`` and ``rejects.jsonl`` (format: :mod:`bolid.shards`). A single-part build
merges by itself; after a scale-out run (``--num-parts N --part i`` on N machines) run
``python -m datapipe merge OUT`` once all parts have finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from bolid.files import atomic_write
from bolid.shards import FORMAT, FORMAT_VERSION, SPLITS
from datapipe.card import write_card
from datapipe.stats import Stats
from datapipe.table import write_parquet

log = logging.getLogger(__name__)

_PART_FILE = re.compile(r"part-(\d{4})-of-(\d{4})\.json")


def part_tag(part: int, num_parts: int) -> str:
    return f"part-{part:04d}-of-{num_parts:04d}"


def part_path(out: Path, part: int, num_parts: int) -> Path:
    return Path(out) / "parts" / f"{part_tag(part, num_parts)}.json"


def split_point(identity: str) -> float:
    """A stable pseudo-random number in [0, 1) for an identity (independent of the scale-out partition)."""
    return int(hashlib.sha256(f"split:{identity}".encode()).hexdigest()[:16], 16) / 2**64


def assign_splits(identities: list[str], validation: float, test: float) -> dict[str, str]:
    """Identity -> ``train``/``validation``/``test`` by :func:`split_point` (rules in :mod:`bolid.shards`)."""
    bounds = {
        "validation": (0.0, validation),
        "test": (validation, validation + test),
        "train": (validation + test, 1.0),
    }
    fraction = {"train": 1.0 - validation - test, "validation": validation, "test": test}
    u = {name: split_point(name) for name in identities}
    split = {
        name: next(s for s in ("validation", "test", "train") if bounds[s][0] <= u[name] < bounds[s][1])
        for name in identities
    }
    if len(identities) >= 3:
        for target in ("validation", "test", "train"):
            members = {s: [n for n in identities if split[n] == s] for s in SPLITS}
            if fraction[target] <= 0 or members[target]:
                continue
            donor = max((s for s in SPLITS if s != target), key=lambda s: (len(members[s]), s == "train"))
            if len(members[donor]) < 2:
                continue
            lo, hi = bounds[target]
            mid = (lo + hi) / 2
            pick = min(members[donor], key=lambda n: (abs(u[n] - mid), n))
            split[pick] = target
    return split


def write_part(out: Path, part: int, num_parts: int, content: dict[str, Any], rejects: list[dict]) -> None:
    """Write a part's index and rejects (after its shards are complete)."""
    path = part_path(out, part, num_parts)
    lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rejects)
    atomic_write(path.with_suffix(".rejects.jsonl"), lines)
    atomic_write(path, json.dumps(content, ensure_ascii=False, indent=1, sort_keys=True) + "\n")


def find_parts(out: Path, num_parts: int | None = None) -> tuple[int, list[Path]]:
    """The part files of an N-part run in ``out``; ``num_parts`` is inferred when only one N is present."""
    found: dict[int, dict[int, Path]] = {}
    for path in sorted((Path(out) / "parts").glob("part-*-of-*.json")):
        m = _PART_FILE.fullmatch(path.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
    if num_parts is None:
        if not found:
            raise FileNotFoundError(f"{out}: no part indexes under parts/; run `python -m datapipe build` first")
        if len(found) > 1:
            raise ValueError(f"{out}: parts of runs with --num-parts {sorted(found)}; pass --num-parts to choose")
        num_parts = next(iter(found))
    parts = found.get(num_parts, {})
    missing = [i for i in range(num_parts) if i not in parts]
    if missing:
        raise FileNotFoundError(
            f"{out}: parts {missing} of {num_parts} have not finished (no parts/{part_tag(missing[0], num_parts)}.json)"
        )
    return num_parts, [parts[i] for i in range(num_parts)]


def cross_part_duplicates(parts: list[dict], split: dict[str, str]) -> list[dict]:
    """Photos (by SHA-256) that more than one part kept: ``[{sha256, identities, splits}]``, sorted."""
    owners: dict[str, set[str]] = {}
    for p in parts:
        for identity, hashes in p.get("hashes", {}).items():
            for sha in hashes:
                owners.setdefault(sha, set()).add(identity)
    return [
        {"sha256": sha, "identities": sorted(ids), "splits": sorted({split[i] for i in ids})}
        for sha, ids in sorted(owners.items())
        if len(ids) > 1
    ]


def merge(out: Path, num_parts: int | None = None, validation: float | None = None, test: float | None = None) -> dict:
    """Combine the part indexes of ``out`` into ``index.json``, ``stats.json`` and ``rejects.jsonl``.

    Args:
        out: the output folder.
        num_parts: which run's parts to merge (needed only when parts of several ``--num-parts`` are present).
        validation: fraction of identities for validation (default: as recorded by the build).
        test: fraction of identities for test (default: as recorded by the build).

    Returns:
        The written index.
    """
    out = Path(out)
    num_parts, paths = find_parts(out, num_parts)
    parts = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    settings = parts[0]["settings"]
    for path, p in zip(paths, parts, strict=True):
        if p["settings"] != settings:
            raise ValueError(f"{path}: built with other settings than part 0 ({p['settings']} vs {settings})")
    shards: list[dict] = []
    identities: dict[str, dict] = {}
    for path, p in zip(paths, parts, strict=True):
        for shard in p["shards"]:
            if not (out / shard["name"]).is_file():
                raise FileNotFoundError(f"{out / shard['name']}: listed in {path} but missing")
            shards.append(shard)
        for name, info in p["identities"].items():
            if name in identities:
                raise ValueError(f"identity {name!r} is in two parts (a different partition wrote {path}?)")
            identities[name] = dict(info)
    fractions = {
        "validation": settings["split"]["validation"] if validation is None else validation,
        "test": settings["split"]["test"] if test is None else test,
    }
    split = assign_splits(sorted(identities), fractions["validation"], fractions["test"])
    splits: dict[str, dict] = {}
    for s in SPLITS:
        members = sorted(n for n in identities if split[n] == s)
        held = {sh for n in members for sh in identities[n]["shards"]}
        splits[s] = {
            "identities": members,
            "samples": sum(identities[n]["count"] for n in members),
            "shards": [sh["name"] for sh in shards if sh["name"] in held],
        }
    for name in identities:
        identities[name]["split"] = split[name]
    duplicates = cross_part_duplicates(parts, split)
    if duplicates:
        leaks = [d for d in duplicates if len(d["splits"]) > 1]
        log.warning(
            "%d photos were kept by two parts under different identities (exact dedupe runs within a part), %d of "
            "them across splits, e.g. %s: listed in index.json 'duplicates'; dedupe the input and rebuild to drop them",
            len(duplicates),
            len(leaks),
            duplicates[0]["identities"],
        )
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "resolution": settings["shards"]["resolution"],
        "samples_per_shard": settings["shards"]["samples_per_shard"],
        "num_parts": num_parts,
        "split_fractions": fractions,
        "shards": shards,
        "identities": {n: identities[n] for n in sorted(identities)},
        "splits": splits,
        "totals": {"samples": sum(s["count"] for s in shards), "identities": len(identities), "shards": len(shards)},
        "duplicates": duplicates,
    }
    stats = Stats.sum([Stats.from_dict(p["stats"]) for p in parts])
    rejects: list[str] = []
    for path in paths:
        rej = path.with_suffix(".rejects.jsonl")
        if rej.is_file():
            rejects.extend(line for line in rej.read_text(encoding="utf-8").splitlines() if line)
    atomic_write(out / "rejects.jsonl", "".join(line + "\n" for line in rejects))
    rows = write_parquet(out, [path.with_suffix(".samples.jsonl") for path in paths], split)
    atomic_write(out / "stats.json", json.dumps(stats.to_dict(), indent=1) + "\n")
    atomic_write(out / "index.json", json.dumps(index, ensure_ascii=False, indent=1) + "\n")
    write_card(out, index, stats.to_dict(), rows, parts[0].get("layout", "unknown"))
    log.info(
        "merged %d part(s): %d samples of %d identities in %d shards (train/validation/test identities: %s)",
        num_parts,
        index["totals"]["samples"],
        len(identities),
        len(shards),
        "/".join(str(len(splits[s]["identities"])) for s in SPLITS),
    )
    return index
