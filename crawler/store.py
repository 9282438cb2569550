"""The crawl's output folder (OUT) and its crash-safe bookkeeping.

Layout of OUT::

    images/<identity>/<sha256>.jpg   kept images, named by the SHA-256 of their bytes
    manifest.jsonl    one line per kept image: identity, name, image_url, page_url, path (relative to OUT),
                      width, height, sha256 -- sorted by (identity, image_url, page_url) once the crawl closes
    rejects.jsonl     one line per photo not kept: identity, name, image_url, page_url, reason, detail, sha256
    persons.jsonl     one line per person seen: identity, name, url, photos (kept), rejected (per reason),
                      min_photos, meets_min_photos -- persons below the target included
    failures.jsonl    one line per request that failed for good, appended by every run (a log, not state):
                      url, kind (image, photo, gallery, ...), status (HTTP status or null), reason (http_404,
                      ignored = off-site redirect or robots.txt, not_binary = HTML instead of an image, empty_body,
                      a network error's class name), detail, time (UTC), identity, page_url. A failed image is not
                      journaled as done, so the next run fetches it again; once kept it is in manifest.jsonl.
    .partial/         images being written; wiped when the store opens

Resume from disk, SIGKILL included (JOBDIR alone is not kill-safe). While crawling, ``manifest.jsonl`` and
``rejects.jsonl`` are append-only journals: each line goes out in one ``write`` on an ``O_APPEND`` descriptor,
then ``fsync``. An image is stored as bytes -> temp file in ``.partial/`` (fsync) -> manifest line ->
``os.replace`` into ``images/``. So ``images/`` only ever holds complete files and each of them has its line.
These disk steps run in order on one writer thread, so fsync never stalls the crawl; the in-memory indexes are
updated at once on the crawl's thread.
On open the journals are read back (a torn last line is skipped), lines whose file is missing are forgotten
(that photo is fetched again), copies of one content are resolved to the smallest
``(identity, image_url, page_url)``, and both files are rewritten sorted. Photo pages already kept or rejected
are not fetched again. Close writes the same compaction plus ``persons.jsonl``, each through a temp file and
``os.replace``. The final files depend only on the site, never on download order or on interruptions, so a
killed-and-restarted crawl ends with the same manifest as an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from crawler.items import PhotoItem

logger = logging.getLogger(__name__)

MANIFEST_FIELDS = ("identity", "name", "image_url", "page_url", "path", "width", "height", "sha256")
REJECT_FIELDS = ("identity", "name", "image_url", "page_url", "reason", "detail", "sha256")
#: Why an image is not kept (``rejects.jsonl`` ``reason`` and the ``images/rejected/<reason>`` stats).
REJECT_REASONS = ("not_an_image", "not_jpeg", "too_many_pixels", "too_small", "corrupt", "duplicate")

_SAFE_IDENTITY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_IDENTITY = 100


def safe_identity(raw: str) -> str:
    """Map a person slug taken from a URL to a folder name that cannot escape OUT.

    Slugs made of ASCII letters, digits, ``.``, ``_`` and ``-`` (not starting or ending with punctuation, at most
    100 characters) are kept as they are. Anything else (``..``, ``/``, percent-escapes, spaces, Cyrillic) is
    reduced to its safe characters plus a short hash of the original, so two different slugs never share a folder.
    The function is idempotent.
    """
    text = unquote(raw).strip()
    if len(text) <= _MAX_IDENTITY and _SAFE_IDENTITY.fullmatch(text):
        return text
    cleaned = _UNSAFE_CHARS.sub("_", text).strip("._-")[:80].rstrip("._-")
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    return f"{cleaned or 'person'}-{digest}"


def image_relpath(identity: str, sha256: str) -> str:
    """Where an image with this identity and content hash lives, relative to OUT."""
    assert _SAFE_IDENTITY.fullmatch(identity) and _SHA256.fullmatch(sha256), (identity, sha256)
    return f"images/{identity}/{sha256}.jpg"


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSON-lines file; a torn or invalid line (e.g. after a kill) is skipped."""
    if not path.exists():
        return
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                obj = json.loads(raw)
            except ValueError:
                logger.warning("%s:%d: skipping an unreadable line (interrupted write?)", path, number)
                continue
            if isinstance(obj, dict):
                yield obj


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON lines to a temp file beside ``path``, fsync it, then ``os.replace`` it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _manifest_key(record: dict[str, Any]) -> tuple[str, str, str]:
    return (record["identity"], record["image_url"], record["page_url"])


def _valid_manifest_record(record: dict[str, Any]) -> bool:
    if set(record) != set(MANIFEST_FIELDS):
        return False
    if not all(isinstance(record[k], str) for k in ("identity", "name", "image_url", "page_url", "path", "sha256")):
        return False
    if not all(isinstance(record[k], int) and record[k] > 0 for k in ("width", "height")):
        return False
    if not (_SAFE_IDENTITY.fullmatch(record["identity"]) and _SHA256.fullmatch(record["sha256"])):
        return False
    return record["path"] == image_relpath(record["identity"], record["sha256"])


def _valid_reject_record(record: dict[str, Any]) -> bool:
    return (
        set(record) == set(REJECT_FIELDS)
        and all(isinstance(record[k], str) for k in REJECT_FIELDS)
        and record["reason"] in REJECT_REASONS
        and bool(_SAFE_IDENTITY.fullmatch(record["identity"]))
    )


class Store:
    """OUT on disk plus the in-memory indexes the spider and pipelines consult (format in the module docstring).

    Args:
        out: The output folder; created if missing.
        min_photos: Target number of kept photos per person, reported in ``persons.jsonl``.
        fsync: fsync every journal line and image (off only for throwaway runs; a kill is safe either way,
            a power cut is only with it on).
    """

    def __init__(self, out: str | os.PathLike[str], *, min_photos: int = 100, fsync: bool = True) -> None:
        self.out = Path(out)
        self.min_photos = min_photos
        self.fsync = fsync
        self.images_dir = self.out / "images"
        self.partial_dir = self.out / ".partial"
        self.manifest_path = self.out / "manifest.jsonl"
        self.rejects_path = self.out / "rejects.jsonl"
        self.persons_path = self.out / "persons.jsonl"
        self.failures_path = self.out / "failures.jsonl"
        self._kept: dict[str, dict[str, Any]] = {}  # sha256 -> manifest record
        self._rejects: dict[tuple[str, str], dict[str, Any]] = {}  # (identity, page_url) -> reject record
        self._done: Counter[str] = Counter()  # identity -> photo pages kept or rejected
        self._done_pages: set[tuple[str, str]] = set()
        self._persons: dict[str, dict[str, Any]] = {}  # identity -> {"name", "url"}
        self._manifest_fd: int | None = None
        self._rejects_fd: int | None = None
        self._failures_fd: int | None = None
        self._lock_fd: int | None = None  # lock on OUT/.lock while open
        self._writer: ThreadPoolExecutor | None = None  # one thread: disk steps run in submission order
        self.write_error: OSError | None = None  # first failed disk step; nothing is written after it
        self.resumed_kept = 0
        self.resumed_rejected = 0

    # ---------------------------------------------------------------- open / close

    def open(self) -> None:
        """Create OUT, drop half-written files, rebuild the indexes from the journals and compact them.

        Raises:
            RuntimeError: another crawl holds OUT (two crawls appending to one manifest would lose lines).
        """
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.out / ".lock", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            # A POSIX record lock: held per process, so only another process (a second crawl) is refused.
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RuntimeError(f"{self.out} is in use by another crawl; wait for it or use another --out") from None
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.partial_dir.iterdir():
            leftover.unlink()
        for row in read_jsonl(self.persons_path):
            if isinstance(row.get("identity"), str) and _SAFE_IDENTITY.fullmatch(row["identity"]):
                self._persons[row["identity"]] = {"name": row.get("name") or "", "url": row.get("url") or ""}
        self._load_manifest()
        self._load_rejects()
        self._write_journals()
        self.resumed_kept, self.resumed_rejected = len(self._kept), len(self._rejects)
        if self.resumed_kept or self.resumed_rejected:
            logger.info(
                "Resuming in %s: %d images kept, %d photos rejected earlier; their pages are not fetched again",
                self.out,
                self.resumed_kept,
                self.resumed_rejected,
            )
        self._warn_orphans()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self._manifest_fd = os.open(self.manifest_path, flags, 0o644)
        self._rejects_fd = os.open(self.rejects_path, flags, 0o644)
        self._failures_fd = os.open(self.failures_path, flags, 0o644)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")

    def flush(self) -> None:
        """Wait until every submitted disk step has run."""
        if self._writer is not None:
            self._writer.submit(lambda: None).result()

    def close(self) -> None:
        """Finish pending writes, write the sorted manifest, rejects and ``persons.jsonl`` atomically."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        for fd in (self._manifest_fd, self._rejects_fd, self._failures_fd):
            if fd is not None:
                os.close(fd)
        self._manifest_fd = self._rejects_fd = self._failures_fd = None
        if self.write_error is not None:  # keep only what really reached the disk
            lost = [sha for sha, record in self._kept.items() if not (self.out / record["path"]).exists()]
            for sha in lost:
                del self._kept[sha]
            logger.error("%d images were not stored because writing failed: %s", len(lost), self.write_error)
        self._write_journals()
        write_jsonl_atomic(self.persons_path, self.person_rows())
        if self.partial_dir.is_dir() and not any(self.partial_dir.iterdir()):
            self.partial_dir.rmdir()
        if self._lock_fd is not None:  # closing the descriptor releases the lock
            os.close(self._lock_fd)
            self._lock_fd = None

    def _load_manifest(self) -> None:
        groups: dict[str, list[dict[str, Any]]] = {}
        bad = 0
        for record in read_jsonl(self.manifest_path):
            if not _valid_manifest_record(record):
                bad += 1
                continue
            groups.setdefault(record["sha256"], []).append(record)
        if bad:
            logger.warning("%s: ignored %d malformed manifest lines", self.manifest_path, bad)
        missing = 0
        for sha, records in groups.items():
            records = sorted({_manifest_key(r): r for r in records}.values(), key=_manifest_key)
            winner = records[0]
            target = self.out / winner["path"]
            existing = [self.out / r["path"] for r in records if (self.out / r["path"]).exists()]
            if not existing:
                missing += 1
                continue
            if target not in existing:  # interrupted while moving a copy to its new owner
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(existing[0], target)
            for stale in existing:
                if stale != target and stale.exists():
                    stale.unlink()
            self._kept[sha] = winner
            self._mark_done(winner["identity"], winner["page_url"])
            for loser in records[1:]:
                self._rejects[(loser["identity"], loser["page_url"])] = self._reject_row(
                    loser["identity"],
                    loser["name"],
                    loser["image_url"],
                    loser["page_url"],
                    "duplicate",
                    f"same content as {winner['image_url']}",
                    sha,
                )
        if missing:
            logger.info("%d manifest entries had no stored file (interrupted write); fetching them again", missing)

    def _load_rejects(self) -> None:
        for record in read_jsonl(self.rejects_path):
            if not _valid_reject_record(record):
                continue
            if record["reason"] == "duplicate" and record["sha256"] not in self._kept:
                continue  # the copy it duplicated is gone: fetch it again
            page = (record["identity"], record["page_url"])
            if page in self._done_pages and page not in self._rejects:
                continue  # kept after all
            self._rejects[page] = record
        for identity, page_url in self._rejects:
            self._mark_done(identity, page_url)

    def _write_journals(self) -> None:
        write_jsonl_atomic(self.manifest_path, sorted(self._kept.values(), key=_manifest_key))
        write_jsonl_atomic(
            self.rejects_path,
            sorted(self._rejects.values(), key=lambda r: (r["identity"], r["page_url"], r["image_url"])),
        )

    def _warn_orphans(self) -> None:
        known = {record["path"] for record in self._kept.values()}
        orphans = [path for path in self.images_dir.glob("*/*") if path.relative_to(self.out).as_posix() not in known]
        if orphans:
            logger.warning(
                "%d files under %s are not in the manifest (e.g. %s); left untouched",
                len(orphans),
                self.images_dir,
                orphans[0],
            )

    # ---------------------------------------------------------------- queries

    def is_done(self, identity: str, page_url: str) -> bool:
        """Whether this photo page already ended in a kept or rejected image."""
        return (identity, page_url) in self._done_pages

    def done_count(self, identity: str) -> int:
        """How many photo pages of this person already ended in a kept or rejected image."""
        return self._done[identity]

    def kept_for_hash(self, sha256: str) -> dict[str, Any] | None:
        """The manifest record holding this content, if any."""
        return self._kept.get(sha256)

    @property
    def kept_total(self) -> int:
        return len(self._kept)

    def rejected_by_reason(self) -> Counter[str]:
        return Counter(record["reason"] for record in self._rejects.values())

    def person_rows(self) -> list[dict[str, Any]]:
        """One ``persons.jsonl`` row per person seen or stored, sorted by identity."""
        kept = Counter(record["identity"] for record in self._kept.values())
        rejected: dict[str, Counter[str]] = {}
        names: dict[str, str] = {}
        for record in self._rejects.values():
            rejected.setdefault(record["identity"], Counter())[record["reason"]] += 1
            names.setdefault(record["identity"], record["name"])
        for record in self._kept.values():
            names[record["identity"]] = record["name"]
        rows = []
        for identity in sorted(set(self._persons) | set(kept) | set(rejected)):
            person = self._persons.get(identity, {})
            photos = kept[identity]
            rows.append(
                {
                    "identity": identity,
                    "name": person.get("name") or names.get(identity, ""),
                    "url": person.get("url", ""),
                    "photos": photos,
                    "rejected": dict(sorted(rejected.get(identity, Counter()).items())),
                    "min_photos": self.min_photos,
                    "meets_min_photos": photos >= self.min_photos,
                }
            )
        return rows

    # ---------------------------------------------------------------- updates

    def note_person(self, identity: str, name: str, url: str) -> None:
        """Record a person page (so persons with no kept photo still appear in ``persons.jsonl``)."""
        assert _SAFE_IDENTITY.fullmatch(identity), identity
        self._persons[identity] = {"name": name, "url": url}

    def reject(self, item: PhotoItem, reason: str, detail: str = "") -> Future[None]:
        """Journal that this photo is not kept, so a resumed crawl does not fetch it again."""
        assert reason in REJECT_REASONS, reason
        row = self._reject_row(item.identity, item.name, item.image_url, item.page_url, reason, detail, item.sha256)
        self._rejects[(item.identity, item.page_url)] = row
        self._mark_done(item.identity, item.page_url)
        return self._submit(self._append, self._rejects_fd, row)

    def failure(self, row: dict[str, Any]) -> Future[None]:
        """Append a failed request to ``failures.jsonl`` (format in the module docstring)."""
        return self._submit(self._append, self._failures_fd, row)

    def keep(self, item: PhotoItem) -> Future[None]:
        """Store a new content: temp file, manifest line, then rename into ``images/``.

        The indexes are updated now; the disk steps run on the writer thread. Wait for the returned future before
        dropping the bytes if memory must stay bounded (``StorePipeline`` does, so Scrapy's scraper backs off).
        """
        assert item.path == image_relpath(item.identity, item.sha256) and item.sha256 not in self._kept
        record = item.record()
        self._kept[item.sha256] = record
        self._mark_done(item.identity, item.page_url)
        return self._submit(self._write_image, item.body, record)

    def supersede(self, item: PhotoItem) -> Future[None]:
        """Make ``item`` the owner of content already stored under a larger key; the old owner becomes a duplicate.

        The new manifest line is journaled before the file moves; if a kill lands in between, ``open`` finishes
        the move.
        """
        old = self._kept[item.sha256]
        record = item.record()
        assert _manifest_key(record) < _manifest_key(old)
        self._kept[item.sha256] = record
        self._mark_done(item.identity, item.page_url)
        self._submit(self._move_image, old, record)
        loser = PhotoItem(old["identity"], old["name"], old["image_url"], old["page_url"], b"", sha256=item.sha256)
        return self.reject(loser, "duplicate", f"same content as {item.image_url}")

    # ---------------------------------------------------------------- helpers

    def _mark_done(self, identity: str, page_url: str) -> None:
        if (identity, page_url) not in self._done_pages:
            self._done_pages.add((identity, page_url))
            self._done[identity] += 1

    @staticmethod
    def _reject_row(
        identity: str, name: str, image_url: str, page_url: str, reason: str, detail: str, sha256: str
    ) -> dict[str, Any]:
        return {
            "identity": identity,
            "name": name,
            "image_url": image_url,
            "page_url": page_url,
            "reason": reason,
            "detail": detail,
            "sha256": sha256,
        }

    def _submit(self, step: Callable[..., None], *args: Any) -> Future[None]:
        if self._writer is None:
            raise RuntimeError("Store.open() was not called")
        if self.write_error is not None:
            raise self.write_error
        return self._writer.submit(self._run_step, step, *args)

    def _run_step(self, step: Callable[..., None], *args: Any) -> None:
        if self.write_error is not None:
            return  # after a failure, write nothing more: the files on disk stay a consistent prefix
        try:
            step(*args)
        except OSError as exc:
            self.write_error = exc
            logger.error("Writing to %s failed, nothing more will be stored: %s", self.out, exc)

    def _write_image(self, body: bytes, record: dict[str, Any]) -> None:
        tmp = self.partial_dir / f"{record['sha256']}.{os.getpid()}.tmp"
        with tmp.open("wb") as fh:
            fh.write(body)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        self._append(self._manifest_fd, record)
        final = self.out / record["path"]
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)

    def _move_image(self, old: dict[str, Any], record: dict[str, Any]) -> None:
        self._append(self._manifest_fd, record)
        if old["path"] != record["path"]:
            final = self.out / record["path"]
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.out / old["path"], final)

    def _append(self, fd: int | None, row: dict[str, Any]) -> None:
        assert fd is not None, "Store.open() was not called"
        os.write(fd, (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        if self.fsync:
            os.fsync(fd)
