"""``datapipe remove OUT --identity NAME --sha256 HASH``: take people or photos out of a built dataset.

Records the request in ``OUT/removed.json`` (:mod:`datapipe.removals`, so later builds leave them out too),
rewrites only the shards that held a removed sample (with the same deterministic writer, so the bytes equal
what a rebuild would write; a shard left empty is deleted), marks the samples ``removed`` in the part's rejects
and rows, and merges again: ``index.json`` (with new sizes and checksums), ``stats.json``, ``rejects.jsonl``,
``samples.parquet`` and ``DATASET_CARD.md`` are rewritten. Every other shard is left untouched.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bolid.shards import ShardSample
from datapipe.cache import Journal, PartLock
from datapipe.config import ShardsConfig
from datapipe.index import find_parts, merge, part_tag, write_part
from datapipe.removals import Removals
from datapipe.table import write_rows
from datapipe.writer import file_sha256, read_shard, shard_digest, write_shard

log = logging.getLogger(__name__)


def remove(out: str | Path, identities: list[str] = (), sha256s: list[str] = ()) -> list[str]:
    """Remove identities and photos (by SHA-256 of the source file) from ``out``; returns the rewritten shards.

    Raises:
        ValueError: nothing to remove was given, or nothing in the dataset matches it.
    """
    out = Path(out)
    if not identities and not sha256s:
        raise ValueError("remove: give at least one --identity or --sha256")
    num_parts, paths = find_parts(out)
    removals = Removals.load(out)
    removals.add(list(identities), list(sha256s))
    touched: list[str] = []
    for path in paths:
        content = json.loads(path.read_text(encoding="utf-8"))
        part = content["part"]
        with PartLock(out / "parts" / f"{part_tag(part, num_parts)}.lock"):
            touched += _remove_from_part(out, path, content, removals, num_parts)
    if not touched:
        raise ValueError(f"remove: no sample in {out} matches identities {list(identities)} / sha256 {list(sha256s)}")
    removals.save(out)
    merge(out, num_parts)
    log.info("removed from %d shards: %s", len(touched), ", ".join(touched))
    return touched


def _remove_from_part(out: Path, path: Path, content: dict, request: Removals, num_parts: int) -> list[str]:
    part = content["part"]
    tag = ShardsConfig(**content["settings"]["shards"]).tag
    journal = Journal(out / "cache", "shards", part_tag(part, num_parts), key="name")
    rejects_path = path.with_suffix(".rejects.jsonl")
    rejects = [json.loads(line) for line in rejects_path.read_text(encoding="utf-8").splitlines() if line]
    gone: dict[str, dict] = {}  # key -> sample json
    shards, touched = [], []
    for shard in content["shards"]:
        samples = read_shard(out / shard["name"])
        metas = {key: json.loads(meta) for key, _, meta in samples}
        keep = [s for s in samples if not request.covers(metas[s[0]]["identity"], metas[s[0]]["sha256"])]
        if len(keep) == len(samples):
            shards.append(shard)
            continue
        touched.append(shard["name"])
        gone.update({key: metas[key] for key, _, _ in samples if key not in {k for k, _, _ in keep}})
        if not keep:
            (out / shard["name"]).unlink()
            continue
        size = write_shard(out / shard["name"], keep)
        counts: dict[str, int] = {}
        for key, _, _ in keep:
            counts[metas[key]["identity"]] = counts.get(metas[key]["identity"], 0) + 1
        digest = shard_digest(tag, [(key, meta) for key, _, meta in keep])
        sha = file_sha256(out / shard["name"])
        journal.append([{"name": shard["name"], "digest": digest, "bytes": size, "sha256": sha}], fsync=True)
        shards.append(shard | {"count": len(keep), "bytes": size, "sha256": sha, "identities": counts})
    journal.close()
    if not gone:
        return []
    for meta in gone.values():
        sample = ShardSample.from_json(meta)
        rejects.append(
            {
                "stage": "shards",
                "reason": "removed",
                "identity": sample.identity,
                "path": sample.source,
                "detail": request.why(sample.identity, sample.sha256),
            }
        )
    rejects.sort(key=lambda r: (r["identity"], r["path"], r["stage"]))
    _update_content(content, shards, {meta["sha256"] for meta in gone.values()})
    write_part(out, part, num_parts, content, rejects)
    rows_path = path.with_suffix(".samples.jsonl")
    rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line]
    for row in rows:
        if row["key"] in gone and row["status"] == "kept":
            row.update(status="rejected", stage="shards", reason="removed", shard=None, split=None)
            row["detail"] = request.why(row["identity"], row["sha256"])
    write_rows(rows_path, rows)
    return touched


def _update_content(content: dict, shards: list[dict], gone: set[str]) -> None:
    """A part index after a removal: its shards, identities, hashes and counts."""
    names = {i: info["name"] for i, info in content["identities"].items()}
    identities: dict[str, dict] = {}
    for shard in shards:
        for identity, n in shard["identities"].items():
            info = identities.setdefault(identity, {"name": names[identity], "count": 0, "shards": []})
            info["count"] += n
            info["shards"].append(shard["name"])
    content["shards"] = shards
    content["identities"] = identities
    content["hashes"] = {i: [h for h in hs if h not in gone] for i, hs in content["hashes"].items() if i in identities}
    removed = len(gone)
    stage = content["stats"]["stages"]["shards"]
    stage["out"] -= removed
    stage["rejected"]["removed"] = stage["rejected"].get("removed", 0) + removed
    content["stats"]["identities"]["kept"] = len(identities)
    content["stats"]["shards"] = len(shards)
