"""Crash-safe caches under ``OUT/cache/``: journals of per-image results and the stored JPEGs.

Everything a stage computes is saved as soon as it is computed, keyed by what determines it,
so a re-run (after a crash, a SIGKILL, or after images were added) redoes no work:

``<stem>.<part>.jsonl`` (:class:`Journal`)
    Append-only JSON lines of per-image records: ingest probes keyed by source path (with
    its size and mtime), pose and caption outputs keyed by the image's SHA-256 (a model batch
    is one line holding a list, so a batch is cached whole or not at all). The stem of
    a model cache carries the model's fingerprint (weights, settings, input resolution), so
    changing any of them starts a new cache instead of reusing stale outputs. Each part of
    a scale-out run appends only to its own file and reads every part's file, so a cache is
    shared by all parts and survives a change of ``--num-parts``. A line is written with one
    ``write`` call; a line torn by a kill is cut off when its writer next opens the file and
    skipped by readers meanwhile.
``stored-<settings>/<sha[:2]>/<sha>.jpg`` (:class:`StoredImages`)
    The re-encoded JPEG that goes into the shards, written to a temporary name and renamed,
    so a file that exists is complete.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bolid.files import atomic_write

log = logging.getLogger(__name__)


def _truncate_torn_tail(path: Path) -> None:
    """Cut a partial last line (a write interrupted by a kill) so the next append starts on a fresh line."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        pos = size
        while pos > 0:
            step = min(65536, pos)
            fh.seek(pos - step)
            chunk = fh.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                end = pos - step + nl + 1
                break
            pos -= step
        else:
            end = 0
        if end != size:
            log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, size - end)
            fh.truncate(end)


class Journal:
    """Append-only JSON-lines records, one file per writer, read back from all writers.

    Args:
        directory: where the files live.
        stem: file name prefix; files are ``<stem>.<tag>.jsonl``.
        tag: this writer's name (the part, e.g. ``part-0000-of-0001``).
        key: the record field records are keyed by.
    """

    def __init__(self, directory: Path, stem: str, tag: str, key: str):
        self.directory = Path(directory)
        self.stem = stem
        self.key = key
        self.path = self.directory / f"{stem}.{tag}.jsonl"
        self._fh = None

    def load(self) -> dict[str, dict[str, Any]]:
        """All records of every writer, keyed by ``key`` (a later line wins over an earlier one)."""
        if self.path.exists():
            _truncate_torn_tail(self.path)
        records: dict[str, dict[str, Any]] = {}
        for path in sorted(self.directory.glob(f"{self.stem}.*.jsonl")):
            with open(path, "rb") as fh:
                for raw in fh:
                    if not raw.endswith(b"\n"):
                        continue  # another writer's line still being written, or torn
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        log.warning("%s: skipping an unreadable line", path)
                        continue
                    for r in rec if isinstance(rec, list) else [rec]:  # a list: a group written at once
                        if isinstance(r, dict) and isinstance(r.get(self.key), str):
                            records[r[self.key]] = r
        return records

    def append(self, records: Iterable[dict[str, Any]], fsync: bool = False) -> None:
        """Append records, each as one line, in a single ``write`` (kill-safe; ``fsync`` also power-safe)."""
        lines = b"".join(json.dumps(r, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n" for r in records)
        self._write(lines, fsync)

    def append_group(self, records: list[dict[str, Any]], fsync: bool = False) -> None:
        """Append records as one line (a JSON list): after a kill, either all of them are there or none is."""
        if records:
            self._write(json.dumps(records, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n", fsync)

    def _write(self, data: bytes, fsync: bool) -> None:
        if not data:
            return
        if self._fh is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                _truncate_torn_tail(self.path)
            self._fh = open(self.path, "ab", buffering=0)  # held open across appends
        self._fh.write(data)
        if fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


class StoredImages:
    """The stored (resized, re-encoded) JPEG of each source image, by SHA-256, under ``directory``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def path(self, sha256: str) -> Path:
        return self.directory / sha256[:2] / f"{sha256}.jpg"

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def write(self, sha256: str, data: bytes) -> None:
        atomic_write(self.path(sha256), data, fsync=False)


class PartLock:
    """An exclusive ``flock`` on a file, released on exit or when the process dies (SIGKILL included)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> PartLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise RuntimeError(f"{self.path}: another build of this part is running on this output folder") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
