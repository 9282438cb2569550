"""``samples.parquet``: one row per input photo, kept or not, for querying the dataset with any parquet reader.

Each build part writes its rows to ``parts/<part>.samples.jsonl``; the merge adds the split and writes
``OUT/samples.parquet`` with pyarrow (as img2dataset writes a parquet per shard). Columns (:data:`SCHEMA`):

=====================  ==================================================================================
``key``                WebDataset key of the sample (``null`` when the photo was never hashed)
``identity``, ``name`` the person
``path``               source path relative to the input folder; ``url``: where the crawler found it
``split``              train / validation / test of the identity (``null`` when the identity is not kept)
``shard``              shard holding the sample (``null`` when rejected)
``status``             ``kept`` or ``rejected``; ``stage``, ``reason``, ``detail``: why (see ``rejects.jsonl``)
``bytes``              source file size; ``width``, ``height``: original size (upright)
``stored_width/height`` size in the shard; ``sha256``, ``phash`` (16 hex): content and perceptual hashes
``person_score``       detector score of the main person (kept samples); ``caption``: the BLIP-2 caption
``file_date``          UTC date the source file was last modified (for the crawler: when it was stored)
=====================  ==================================================================================

Rows are sorted by (identity, path), so the file is the same whatever the number of parts.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bolid.files import atomic_write
from bolid.shards import sample_key

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("identity", pa.string()),
        ("name", pa.string()),
        ("path", pa.string()),
        ("url", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("stored_width", pa.int32()),
        ("stored_height", pa.int32()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("person_score", pa.float32()),
        ("caption", pa.string()),
        ("file_date", pa.string()),
    ]
)


def shard_of_keys(samples: list, shards: list[dict]) -> dict[str, str]:
    """Key -> shard name, from the samples in write order and the shards' per-identity counts."""
    queues: dict[str, list[str]] = {}
    for item, _ in samples:
        queues.setdefault(item.identity, []).append(sample_key(item.identity, item.sha256))
    where: dict[str, str] = {}
    for shard in shards:
        for identity, n in shard["identities"].items():
            taken, queues[identity] = queues[identity][:n], queues[identity][n:]
            where.update(dict.fromkeys(taken, shard["name"]))
    return where


def sample_rows(sources: list, records: dict[str, dict], rejects: list[dict], samples: list, shards: list[dict]):
    """One row per source of this part (the split is filled in by the merge)."""
    rejected = {r["path"]: r for r in rejects}
    kept = {item.source.rel: sample for item, sample in samples}
    shard_of = shard_of_keys(samples, shards)
    rows = []
    for src in sources:
        rec = records.get(src.rel, {})
        sha = rec.get("sha256")
        sample, why = kept.get(src.rel), rejected.get(src.rel, {})
        key = sample_key(src.identity, sha) if sha else None
        rows.append(
            {
                "key": key,
                "identity": src.identity,
                "name": src.name,
                "path": src.rel,
                "url": src.url,
                "split": None,
                "shard": shard_of.get(key) if sample is not None else None,
                "status": "kept" if sample is not None else "rejected",
                "stage": why.get("stage"),
                "reason": why.get("reason") if sample is None else None,
                "detail": why.get("detail"),
                "bytes": rec.get("size"),
                "width": rec.get("width"),
                "height": rec.get("height"),
                "stored_width": rec.get("stored_width"),
                "stored_height": rec.get("stored_height"),
                "sha256": sha,
                "phash": rec.get("phash"),
                "person_score": sample.score if sample is not None else None,
                "caption": sample.caption if sample is not None else None,
                "file_date": _date(rec.get("mtime_ns")),
            }
        )
    return rows


def _date(mtime_ns: int | None) -> str | None:
    if mtime_ns is None:
        return None
    return datetime.fromtimestamp(mtime_ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d")


def write_rows(path: Path, rows: list[dict]) -> None:
    """A part's rows as JSON lines (atomically)."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def write_parquet(out: Path, row_files: list[Path], split: dict[str, str]) -> list[dict]:
    """Merge the parts' rows into ``out/samples.parquet`` with each identity's split; returns the rows."""
    rows = []
    for path in row_files:
        if path.is_file():
            rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    rows.sort(key=lambda r: (r["identity"], r["path"]))
    for row in rows:
        row["split"] = split.get(row["identity"]) if row["status"] == "kept" else None
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write(Path(out) / "samples.parquet", sink.getvalue().to_pybytes())
    return rows
