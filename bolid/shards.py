"""The BoLID shard format: identity-grouped WebDataset shards with ``index.json`` and ``stats.json``.

This docstring is the one place the format is documented (also exported as
:data:`SHARD_FORMAT`). The writer (``python -m datapipe build``, :func:`datapipe.writer.write_shard`) and the
training loader (:func:`read_index`, :meth:`ShardSample.from_json`) both cite it.

Output folder (``OUT``)::

    shard-00000.tar ...      the shards (part p of an N-part run: shard-p0003of0008-00000.tar ...)
    index.json               shards, identities, splits, totals (below)
    stats.json               images in, out and rejected per stage and reason (datapipe.stats)
    rejects.jsonl            one line per rejected image: stage, reason, identity, path, detail
    parts/                   one index per part, merged into index.json; build locks
    cache/                   resumable build state (datapipe.cache); training never reads it

**Samples.** A shard is a POSIX tar in WebDataset layout: the two members of a sample share a
key, ``<key>.jpg`` and ``<key>.json``. The key is the identity with every character outside
``[A-Za-z0-9_-]`` replaced by ``-``, then ``_`` and the first 16 hex digits of the source's
SHA-256 (:func:`sample_key`). Keys contain no dots (WebDataset cuts the key at the first dot)
and are unique in the dataset.

``jpg``: the photo, upright (EXIF orientation applied) RGB JPEG, aspect ratio kept, short side
scaled down to at most ``resolution`` (never up; see :mod:`datapipe.resize`).

``json``: UTF-8 JSON of :class:`ShardSample`. Coordinates are in the stored image's pixels
(x right, y down, origin top-left); the models ran on exactly these pixels.

=================================  ===========================================================
``identity``                       the person: crawler identity or ``<identity>/`` folder name
``name``                           display name (the crawler's; else the identity)
``caption``                        BLIP-2 caption (continuation of ``caption.prompt``)
``width``, ``height``              stored image size
``original_width/height``          source size after EXIF orientation
``box``                            ``[x0, y0, x1, y1]`` of the main (largest) person
``score``                          detector score of that box
``keypoints``                      17 x ``[x, y, score]`` in COCO-17 order (:data:`bolid.body.COCO_KEYPOINTS`);
                                   indices 5..16 are the 12 body points BoLID conditions on
``face_box``                       ``[x0, y0, x1, y1]`` from the face keypoints (:func:`bolid.body.face_box`),
                                   or ``null`` when fewer than 2 face points are visible
``num_persons``                    person boxes found in the image (at most one was prominent)
``sha256``                         SHA-256 of the source file's bytes
``url``, ``page_url``              where the crawler found the image (``null`` for folder input)
``source``                         source path relative to the input folder
=================================  ===========================================================

**Order.** Within a part, samples are sorted by (identity, sha256). An identity's samples are
contiguous and lie in as few shards as possible: one shard if it has at most
``samples_per_shard`` samples, else ``ceil(n / samples_per_shard)``; so a loader can draw a
reference and a target photo of one person from a single shard. Identities of different
splits can share a shard: select by identity with ``index.json``.

**Stable shards.** A rebuild into the same OUT keeps every identity whose number of samples did
not change in the shard (name and place) it had; new or changed identities go into new shards
numbered after the last, and shards left empty are deleted (``datapipe.writer.plan_stable``).
A shard whose samples did not change keeps its bytes and sha256, so synced copies stay valid;
a build into an empty OUT packs everything afresh.

**index.json**::

    format: "bolid-shards", format_version: 1, resolution, samples_per_shard, num_parts
    shards:     [{name, number, count, bytes, sha256, identities: {identity: count}}]   in write order;
                sha256 of the tar's bytes (``python -m datapipe verify OUT`` re-checks them)
    identities: {identity: {name, count, shards: [name, ...], split}}
    splits:     {train | validation | test: {identities: [...], samples, shards: [name, ...]}}
    totals:     {samples, identities, shards}
    duplicates: [{sha256, identities, splits}]   photos two scale-out parts both kept (normally empty)

A split's ``shards`` are those holding at least one of its identities. The split is by
identity (held-out people, not held-out photos): ``u = int(sha256("split:" + identity)[:16],
16) / 2**64``; validation if ``u < split.validation``, test if ``u < split.validation +
split.test``, else train. With 3 or more identities, a split with a non-zero fraction that
came out empty takes the identity nearest its range from the largest split. Adding people
never moves an existing person to another split, except through that rule.

**stats.json**: ``{stages: {<stage>: {in, out, rejected: {<reason>: n}}}, identities: {found,
kept}, shards}`` with the stages and reasons of :data:`datapipe.stats.STAGES`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

SHARD_FORMAT: str = __doc__ or ""
FORMAT = "bolid-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")

_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(identity: str, sha256: str) -> str:
    """The WebDataset key of a sample (no dots)."""
    return f"{_UNSAFE_KEY.sub('-', identity)}_{sha256[:16]}"


def shard_name(index: int, part: int = 0, num_parts: int = 1) -> str:
    """File name of the ``index``-th shard written by ``part`` of ``num_parts``."""
    if num_parts == 1:
        return f"shard-{index:05d}.tar"
    return f"shard-p{part:04d}of{num_parts:04d}-{index:05d}.tar"


def shard_pattern(part: int = 0, num_parts: int = 1) -> re.Pattern:
    """Matches the names :func:`shard_name` gives the shards of ``part`` of ``num_parts``."""
    if num_parts == 1:
        return re.compile(r"shard-\d{5}\.tar")
    return re.compile(rf"shard-p{part:04d}of{num_parts:04d}-\d{{5}}\.tar")


def _box(value: Any, name: str) -> tuple[float, float, float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 4):
        raise ValueError(f"{name} must be [x0, y0, x1, y1], got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


@dataclass(frozen=True)
class ShardSample:
    """The ``json`` member of a sample, typed (fields as in :data:`SHARD_FORMAT`)."""

    identity: str
    name: str
    caption: str
    width: int
    height: int
    original_width: int
    original_height: int
    box: tuple[float, float, float, float]
    score: float
    keypoints: tuple[tuple[float, float, float], ...]  # 17 x (x, y, score)
    face_box: tuple[float, float, float, float] | None
    num_persons: int
    sha256: str
    url: str | None
    page_url: str | None
    source: str

    @property
    def key(self) -> str:
        return sample_key(self.identity, self.sha256)

    def keypoints_array(self) -> np.ndarray:
        """Keypoints as a ``(17, 3)`` float32 array of ``x, y, score``."""
        return np.asarray(self.keypoints, dtype=np.float32).reshape(17, 3)

    def to_json(self) -> bytes:
        """The exact bytes stored in a shard (field order fixed, compact, UTF-8)."""
        d = asdict(self)
        d["box"], d["keypoints"] = list(self.box), [list(k) for k in self.keypoints]
        d["face_box"] = None if self.face_box is None else list(self.face_box)
        return json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str | dict) -> ShardSample:
        """Parse and check a sample's ``json`` (bytes from the tar, or the dict WebDataset already decoded).

        Raises:
            ValueError: a field is missing, unknown or malformed.
        """
        d = json.loads(data) if isinstance(data, (bytes, bytearray, str)) else dict(data)
        names = {f.name for f in fields(cls)}
        missing, extra = names - set(d), set(d) - names
        if missing or extra:
            raise ValueError(f"sample json: missing fields {sorted(missing)}, unknown fields {sorted(extra)}")
        kps = d["keypoints"]
        if not (isinstance(kps, list) and len(kps) == 17 and all(isinstance(k, list) and len(k) == 3 for k in kps)):
            raise ValueError("sample json: keypoints must be 17 x [x, y, score]")
        for key in ("width", "height", "original_width", "original_height", "num_persons"):
            if not isinstance(d[key], int) or d[key] < 0:
                raise ValueError(f"sample json: {key} must be a non-negative int, got {d[key]!r}")
        return cls(
            identity=str(d["identity"]),
            name=str(d["name"]),
            caption=str(d["caption"]),
            width=d["width"],
            height=d["height"],
            original_width=d["original_width"],
            original_height=d["original_height"],
            box=_box(d["box"], "box"),
            score=float(d["score"]),
            keypoints=tuple((float(x), float(y), float(s)) for x, y, s in kps),
            face_box=None if d["face_box"] is None else _box(d["face_box"], "face_box"),
            num_persons=d["num_persons"],
            sha256=str(d["sha256"]),
            url=d["url"],
            page_url=d["page_url"],
            source=str(d["source"]),
        )


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ShardIndex:
    """``index.json`` with paths resolved against its folder."""

    root: Path
    data: dict[str, Any]

    @property
    def resolution(self) -> int:
        return int(self.data["resolution"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.data["shards"]

    @property
    def identities(self) -> dict[str, dict[str, Any]]:
        return self.data["identities"]

    @property
    def totals(self) -> dict[str, int]:
        return self.data["totals"]

    def split_of(self, identity: str) -> str:
        return self.identities[identity]["split"]

    def identities_in(self, split: str) -> list[str]:
        """Sorted identities of a split (``train``, ``validation`` or ``test``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return list(self.data["splits"][split]["identities"])

    def shard_paths(self, split: str | None = None) -> list[str]:
        """Paths of all shards, or of those holding at least one identity of ``split``; filter samples by
        :meth:`identities_in` too, since identities of several splits can share a shard."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        names = [s["name"] for s in self.shards] if split is None else self.data["splits"][split]["shards"]
        return [str(self.root / n) for n in names]


def read_index(path: str | Path) -> ShardIndex:
    """Read ``index.json`` (``path`` is the file or the folder holding it) and check its format version.

    Raises:
        FileNotFoundError: no index (for a scale-out run: ``python -m datapipe merge OUT`` writes it).
        ValueError: not a BoLID shard index, or a newer format version.
    """
    path = Path(path)
    file = path / "index.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no shard index (after a scale-out build run: python -m datapipe merge OUT)")
    data = json.loads(file.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file}: expected format {FORMAT!r} version {FORMAT_VERSION}, "
            f"got {data.get('format')!r} version {data.get('format_version')!r}"
        )
    return ShardIndex(file.parent, data)
