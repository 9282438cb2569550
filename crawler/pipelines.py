"""Item pipelines for downloaded images, one job each, in this order (see ``ITEM_PIPELINES`` in settings):

1. ``ImageCheckPipeline`` -- keeps only readable JPEGs of at least ``CRAWL_MIN_WIDTH`` x ``CRAWL_MIN_HEIGHT`` and
   at most ``CRAWL_MAX_IMAGE_PIXELS`` pixels. The size comes from the header alone (``Image.open`` decodes
   nothing), so a decompression bomb is refused before any pixel is decoded; the survivors are then decoded at
   1/8 scale (``Image.draft``), which still walks all the compressed data and so catches truncated or corrupt files.
2. ``DedupPipeline`` -- content hash (SHA-256): exact duplicates are stored once, whatever their URLs. Of several
   copies the one with the smallest ``(identity, image_url, page_url)`` is kept, so the result does not depend on
   download order.
3. ``StorePipeline`` -- writes the image and its manifest line through :class:`crawler.store.Store`, and waits
   for the write (on the store's thread) before letting the response go.

Every reject is journaled in the store (a resumed crawl does not fetch it again), counted as the stat
``images/rejected/<reason>`` and raised as ``DropItem(reason)``. Reasons are listed in ``store.REJECT_REASONS``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import warnings
from concurrent.futures import Future
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError
from scrapy.exceptions import DropItem
from scrapy.utils.asyncio import is_asyncio_available
from twisted.internet.defer import Deferred

from crawler import settings as defaults
from crawler.items import PhotoItem
from crawler.store import Store, image_relpath

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from typing_extensions import Self

_EXIF_ORIENTATION = 0x0112
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class ImageRejected(Exception):
    """An image fails a check; ``reason`` is one of ``store.REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def inspect_image(body: bytes, *, min_width: int, min_height: int, max_pixels: int) -> tuple[int, int]:
    """Return the displayed ``(width, height)`` of a JPEG that passes every check, else raise ``ImageRejected``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("not_an_image", type(exc).__name__) from exc
    with image:
        if image.format != "JPEG":
            raise ImageRejected("not_jpeg", str(image.format))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageRejected("too_many_pixels", f"{width}x{height}")
        try:
            if image.getexif().get(_EXIF_ORIENTATION) in _ROTATED:
                width, height = height, width
        except (OSError, SyntaxError, ValueError):
            pass  # unreadable EXIF: keep the stored orientation
        if width < min_width or height < min_height:
            raise ImageRejected("too_small", f"{width}x{height}")
        try:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageRejected("corrupt", str(exc)) from exc
    return width, height


class _StorePipeline:
    """Shared plumbing: the crawler, the spider's store and the reject path."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler

    @property
    def store(self) -> Store:
        return self.crawler.spider.store  # type: ignore[union-attr]

    def reject(self, item: PhotoItem, reason: str, detail: str = "") -> DropItem:
        self.store.reject(item, reason, detail)
        self.crawler.stats.inc_value(f"images/rejected/{reason}")  # type: ignore[union-attr]
        return DropItem(
            f"{reason} ({detail}): {item.image_url}" if detail else f"{reason}: {item.image_url}", log_level="DEBUG"
        )


class ImageCheckPipeline(_StorePipeline):
    """Reject images that are not JPEG, too small, too many pixels, or corrupt; record width and height."""

    def __init__(self, crawler: Crawler, *, min_width: int, min_height: int, max_pixels: int) -> None:
        super().__init__(crawler)
        self.min_width = min_width
        self.min_height = min_height
        self.max_pixels = max_pixels
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow itself refuses to open past 2x the cap, whoever decodes

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        settings = crawler.settings
        return cls(
            crawler,
            min_width=settings.getint("CRAWL_MIN_WIDTH", defaults.CRAWL_MIN_WIDTH),
            min_height=settings.getint("CRAWL_MIN_HEIGHT", defaults.CRAWL_MIN_HEIGHT),
            max_pixels=settings.getint("CRAWL_MAX_IMAGE_PIXELS", defaults.CRAWL_MAX_IMAGE_PIXELS),
        )

    def process_item(self, item: PhotoItem) -> PhotoItem:
        try:
            item.width, item.height = inspect_image(
                item.body, min_width=self.min_width, min_height=self.min_height, max_pixels=self.max_pixels
            )
        except ImageRejected as rejected:
            raise self.reject(item, rejected.reason, rejected.detail) from None
        return item


class DedupPipeline(_StorePipeline):
    """Hash the bytes; drop exact duplicates of stored content unless this copy's key sorts first."""

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def process_item(self, item: PhotoItem) -> PhotoItem:
        item.sha256 = hashlib.sha256(item.body).hexdigest()
        item.path = image_relpath(item.identity, item.sha256)
        owner = self.store.kept_for_hash(item.sha256)
        if owner is None:
            return item
        owner_key = (owner["identity"], owner["image_url"], owner["page_url"])
        if owner_key == item.key:
            self.crawler.stats.inc_value("images/already_stored")  # type: ignore[union-attr]
            raise DropItem(f"already stored: {item.image_url}", log_level="DEBUG")
        if owner_key < item.key:
            raise self.reject(item, "duplicate", f"same content as {owner['image_url']}")
        return item  # this copy sorts first: StorePipeline moves the stored file to it


class StorePipeline(_StorePipeline):
    """Write the image and its manifest line (or hand stored content to a copy that sorts first).

    The store updates its indexes at once and writes on its own thread; this waits for the write, so the
    response stays counted in Scrapy's scraper slot (``SCRAPER_SLOT_MAX_ACTIVE_SIZE``) until its bytes are on
    disk: a slow disk slows the downloads down instead of filling memory.
    """

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    async def process_item(self, item: PhotoItem) -> PhotoItem:
        stats = self.crawler.stats
        assert stats is not None
        if self.store.kept_for_hash(item.sha256) is None:
            written = self.store.keep(item)
            stats.inc_value("images/kept")
        else:
            written = self.store.supersede(item)
            stats.inc_value("images/rejected/duplicate")
        item.body = b""
        await _wait_for(written)
        return item


async def _wait_for(future: Future[None]) -> None:
    """Wait for a thread's future without blocking the event loop (asyncio, or any other Twisted reactor)."""
    if is_asyncio_available():
        await asyncio.wrap_future(future)
        return
    from twisted.internet import reactor  # the non-asyncio reactor Scrapy installed

    done: Deferred[None] = Deferred()
    future.add_done_callback(lambda _: reactor.callFromThread(done.callback, None))  # type: ignore[attr-defined]
    await done
