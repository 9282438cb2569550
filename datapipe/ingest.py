"""Stage 1, ingest and validate: find the input images, check them, dedupe them, store them resized.

Two input layouts are read (:func:`discover`):

* the crawler's output (``crawler/store.py``): ``IN/manifest.jsonl`` with one line per image
  (identity, name, image_url, page_url, path relative to IN, width, height, sha256);
* any folder laid out as ``IN/<identity>/<image>`` (subfolders of an identity allowed), so
  users can bring their own photos; the folder name is the identity.

Each image goes through :func:`probe` in a worker process: the size check reads only the
header (EXIF orientation applied) and refuses more than ``ingest.max_pixels`` pixels from it (``too_large``;
Pillow's own limit is set to the same cap, so its ``DecompressionBombError`` is ``too_large`` too, never a
decode); then the bytes are hashed (SHA-256), decoded with the
JPEG draft to the stored size (a truncated or corrupt file fails here), hashed perceptually
and encoded as the stored JPEG (:mod:`datapipe.resize`). Probes are journalled by source
path, size and mtime, so a re-run probes only new or changed files. :func:`decide` then
rejects, in this order and deterministically: missing, unreadable, too large, too small,
corrupt; the same bytes under two or more identities (``multi_identity``: a group shot or a
wrong label, every copy dropped); exact duplicates within an identity (the first in path order
is kept); near-duplicates within an identity (pHash distance at most the threshold; the image
with more pixels is kept, ties broken by hash); then photos of different identities within that
pHash distance (``multi_identity`` again, both dropped, so a grey copy of a validation photo
cannot reach test). These rules are symmetric across identities, so their result does not
depend on the order of the input.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bolid.images import MAX_IMAGE_PIXELS, ImageError, ImageTooLarge, image_size, limit_pillow
from datapipe.cache import Journal, StoredImages
from datapipe.phash import from_hex, hamming, phash, to_hex
from datapipe.resize import encode_jpeg, resize_for_storage

log = logging.getLogger(__name__)

#: File name endings read as images in the folder layout (others are ignored, with a log line).
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass(frozen=True)
class Source:
    """One input image: where it is and whose it is."""

    identity: str
    name: str  # display name (the manifest's ``name``; the identity for folders)
    rel: str  # path relative to IN, POSIX style
    path: Path
    url: str | None = None
    page_url: str | None = None


@dataclass(frozen=True)
class Item:
    """An image that passed ingest."""

    source: Source
    sha256: str
    width: int  # original, upright
    height: int
    stored_width: int
    stored_height: int
    phash: int

    @property
    def identity(self) -> str:
        return self.source.identity


def discover(in_dir: Path) -> tuple[list[Source], str]:
    """All input images sorted by (identity, path), and the layout found (``manifest`` or ``folders``)."""
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise ValueError(f"--in {in_dir}: not a folder")
    manifest = in_dir / "manifest.jsonl"
    if manifest.is_file():
        sources = list(_from_manifest(in_dir, manifest))
        layout = "manifest"
    else:
        sources = list(_from_folders(in_dir))
        layout = "folders"
    sources.sort(key=lambda s: (s.identity, s.rel))
    return sources, layout


def _from_manifest(in_dir: Path, manifest: Path) -> Iterator[Source]:
    bad = 0
    seen: set[str] = set()
    with open(manifest, "rb") as fh:
        for raw in fh:
            try:
                rec = json.loads(raw)
                identity, rel = str(rec["identity"]), str(rec["path"])
            except (ValueError, KeyError, TypeError):
                bad += 1  # a torn line from an interrupted crawl, or not a manifest record
                continue
            if rel in seen or not identity or Path(rel).is_absolute() or ".." in Path(rel).parts:
                bad += 1
                continue
            seen.add(rel)
            yield Source(
                identity, str(rec.get("name") or identity), rel, in_dir / rel, rec.get("image_url"), rec.get("page_url")
            )
    if bad:
        log.warning("%s: ignored %d unreadable or invalid lines", manifest, bad)


def _utf8(name: str) -> bool:
    """Whether a file-system name is valid UTF-8 (names from e.g. cp1251 archives reach Python as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _from_folders(in_dir: Path) -> Iterator[Source]:
    ignored = 0
    bad_names: list[str] = []
    for entry in sorted(os.scandir(in_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            ignored += 1
            continue
        if not _utf8(entry.name):
            bad_names.append(ascii(entry.path))
            continue
        for root, dirs, files in os.walk(entry.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    ignored += 1
                    continue
                path = Path(root) / name
                rel = path.relative_to(in_dir).as_posix()
                if not _utf8(rel):
                    bad_names.append(ascii(str(path)))
                    continue
                yield Source(entry.name, entry.name, rel, path)
    if bad_names:
        log.warning(
            "%s: skipped %d files or folders whose names are not valid UTF-8 (e.g. %s); rename them to UTF-8 "
            "(for example `convmv -f cp1251 -t utf8 -r --notest %s`) and run again",
            in_dir,
            len(bad_names),
            ", ".join(bad_names[:3]),
            in_dir,
        )
    if ignored:
        log.info("%s: ignored %d files that are not images in an <identity>/ folder", in_dir, ignored)


@dataclass(frozen=True)
class ProbeTask:
    """What a worker needs to probe one source (plain data: it crosses process boundaries)."""

    path: str
    rel: str
    size: int
    mtime_ns: int
    min_size: int
    max_pixels: int
    stored_dir: str
    resolution: int
    quality: int
    resample: str


def probe(task: ProbeTask) -> dict:
    """Check one image and write its stored JPEG; returns the journal record (never raises on bad data).

    Record fields: ``path`` (relative), ``size``, ``mtime_ns``; then ``error`` (``unreadable``, ``too_large``,
    ``corrupt``) with ``detail``, or ``width``/``height`` (upright original), ``decoded`` (false when the
    header already showed it too small), ``sha256``, ``phash`` (16 hex) and ``stored_width``/``stored_height``.
    """
    rec: dict = {"path": task.rel, "size": task.size, "mtime_ns": task.mtime_ns}
    limit_pillow(task.max_pixels)  # Pillow itself refuses what the header check would let through
    try:
        w, h = image_size(task.path, max_pixels=task.max_pixels)
    except ImageTooLarge as e:
        return {**rec, "error": "too_large", "detail": str(e)[:300], "max_pixels": task.max_pixels}
    except ImageError as e:
        return {**rec, "error": "unreadable", "detail": str(e)[:300]}
    rec.update(width=w, height=h, decoded=False)
    if min(w, h) < task.min_size:
        return rec
    try:
        data = Path(task.path).read_bytes()
    except OSError as e:  # vanished or unreadable since the header was read
        return {**rec, "error": "unreadable", "detail": str(e)[:300]}
    sha = hashlib.sha256(data).hexdigest()
    rec["sha256"] = sha
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = resize_for_storage(img, task.resolution, task.resample)
    except Image.DecompressionBombError as e:  # cannot happen after the header check; kept as a second guard
        return {**rec, "error": "too_large", "detail": str(e)[:300]}
    except (ImageError, OSError, ValueError, SyntaxError) as e:
        return {**rec, "error": "corrupt", "detail": str(e)[:300]}
    stored = StoredImages(Path(task.stored_dir))
    if not stored.exists(sha):
        stored.write(sha, encode_jpeg(rgb, task.quality))
    rec.update(decoded=True, phash=to_hex(phash(rgb)), stored_width=rgb.width, stored_height=rgb.height)
    return rec


def _reusable(rec: dict | None, size: int, mtime_ns: int, min_size: int, max_pixels: int, stored: StoredImages) -> bool:
    if rec is None or rec.get("size") != size or rec.get("mtime_ns") != mtime_ns:
        return False
    if rec.get("error") == "too_large":
        return rec.get("max_pixels") == max_pixels  # judged under another cap: probe again
    if "error" in rec:
        return True
    if rec.get("decoded"):
        return stored.exists(rec["sha256"])
    return min(rec["width"], rec["height"]) < min_size  # header-only record: still too small?


def run_probes(
    sources: list[Source],
    min_size: int,
    stored: StoredImages,
    journal: Journal,
    settings: tuple[int, int, str],
    map_ordered: Callable,
    progress: Callable,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> dict[str, dict]:
    """Probe every source not already in the journal; returns ``rel -> record`` (missing files absent)."""
    known = journal.load()
    records: dict[str, dict] = {}
    todo: list[ProbeTask] = []
    for src in sources:
        try:
            st = os.stat(src.path)
        except OSError:
            continue
        rec = known.get(src.rel)
        if _reusable(rec, st.st_size, st.st_mtime_ns, min_size, max_pixels, stored):
            records[src.rel] = rec
        else:
            todo.append(
                ProbeTask(
                    str(src.path),
                    src.rel,
                    st.st_size,
                    st.st_mtime_ns,
                    min_size,
                    max_pixels,
                    str(stored.directory),
                    *settings,
                )
            )
    if len(records):
        log.info("ingest: %d of %d images already probed", len(records), len(sources))
    batch: list[dict] = []
    with progress(total=len(todo), desc="ingest") as bar:
        for rec in map_ordered(probe, todo):
            records[rec["path"]] = rec
            batch.append(rec)
            if len(batch) >= 64:
                journal.append(batch)
                batch = []
            bar.update(1)
    journal.append(batch)
    return records


def decide(
    sources: list[Source],
    records: dict[str, dict],
    min_size: int,
    near_duplicate_distance: int,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[list[Item], list[dict]]:
    """Apply the ingest rules (see the module docstring) to probed sources.

    Returns:
        The accepted items sorted by (identity, sha256), and one reject record per rejected source:
        ``{stage, reason, identity, path, detail}``.
    """
    rejects: list[dict] = []

    def reject(src: Source, reason: str, detail: str = "") -> None:
        rejects.append(
            {"stage": "ingest", "reason": reason, "identity": src.identity, "path": src.rel, "detail": detail}
        )

    valid: list[tuple[Source, dict]] = []
    for src in sources:
        rec = records.get(src.rel)
        if rec is None:
            reject(src, "missing", "file not found")
        elif "error" in rec:
            reject(src, rec["error"], rec.get("detail", ""))
        elif rec["width"] * rec["height"] > max_pixels:  # probed under a larger cap
            reject(src, "too_large", f"{rec['width']}x{rec['height']} exceeds {max_pixels} pixels")
        elif min(rec["width"], rec["height"]) < min_size:
            reject(src, "too_small", f"{rec['width']}x{rec['height']} < {min_size}")
        else:
            valid.append((src, rec))
    owners: dict[str, set[str]] = defaultdict(set)
    for src, rec in valid:
        owners[rec["sha256"]].add(src.identity)
    first_of: dict[str, Source] = {}
    candidates: dict[str, list[Item]] = defaultdict(list)
    for src, rec in valid:
        sha = rec["sha256"]
        if len(owners[sha]) > 1:
            reject(src, "multi_identity", f"same bytes under {', '.join(sorted(owners[sha]))}")
        elif sha in first_of:
            reject(src, "duplicate", f"same bytes as {first_of[sha].rel}")
        else:
            first_of[sha] = src
            candidates[src.identity].append(
                Item(
                    src,
                    sha,
                    rec["width"],
                    rec["height"],
                    rec["stored_width"],
                    rec["stored_height"],
                    from_hex(rec["phash"]),
                )
            )
    accepted: list[Item] = []
    for identity in sorted(candidates):
        kept: list[Item] = []
        for item in sorted(candidates[identity], key=lambda it: (-it.width * it.height, it.sha256)):
            twin = next((k for k in kept if hamming(k.phash, item.phash) <= near_duplicate_distance), None)
            if twin is not None:
                reject(
                    item.source,
                    "near_duplicate",
                    f"pHash distance {hamming(twin.phash, item.phash)} to {twin.source.rel}",
                )
            else:
                kept.append(item)
        accepted.extend(sorted(kept, key=lambda it: it.sha256))
    shared = near_copies_across_identities(accepted, near_duplicate_distance)
    for item in accepted:
        if item.sha256 in shared:
            reject(item.source, "multi_identity", f"pHash within {near_duplicate_distance} of {shared[item.sha256]}")
    accepted = [item for item in accepted if item.sha256 not in shared]
    return accepted, rejects


def near_copies_across_identities(items: list[Item], distance: int) -> dict[str, str]:
    """``sha256 -> a photo of another identity`` for every item whose pHash is within ``distance`` of one.

    The rule is symmetric (both photos are dropped, never one of them chosen), so its result depends only on the
    set of items, not on their order or on how they were split into parts. Candidate pairs come from
    multi-index hashing: for ``distance < 8``, two 64-bit hashes that close agree on at least one of their 8 bytes
    (pigeonhole), so only items sharing a byte value at some position are compared (about n^2 / 32 pairs
    instead of n^2 / 2); larger distances compare every pair.
    """
    if distance < 0 or len(items) < 2:
        return {}
    hashes = np.array([it.phash for it in items], dtype=np.uint64)
    _, owner = np.unique(np.array([it.identity for it in items]), return_inverse=True)
    groups: list[np.ndarray] = [np.arange(len(items))]
    if distance < 8:
        groups = []
        for block in range(8):
            values = (hashes >> np.uint64(8 * block)) & np.uint64(0xFF)
            order = np.argsort(values, kind="stable")
            cuts = np.flatnonzero(np.diff(values[order])) + 1
            groups += [g for g in np.split(order, cuts) if len(g) > 1]
    found: dict[str, str] = {}
    for group in groups:
        step = max(1, min(512, (1 << 22) // len(group)))  # (rows, group) blocks of <= 4M distances (32 MB)
        for start in range(0, len(group), step):
            rows = group[start : start + step]
            near = np.bitwise_count(hashes[rows, None] ^ hashes[None, group]) <= distance
            near &= owner[rows, None] != owner[None, group]
            for a, b in zip(*np.nonzero(near), strict=True):
                i, j = rows[a], group[b]
                found.setdefault(items[i].sha256, items[j].source.rel)
    return dict(sorted(found.items()))
