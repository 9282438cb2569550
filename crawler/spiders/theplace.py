"""The ``theplace`` spider: person galleries -> photo pages -> full-size images.

Walks either the letter index (default) or an explicit list of person slugs (``-a persons=slug1,slug2``, or
``-a persons_file=path`` with one slug per line, ``#`` comments allowed). For each person it follows every gallery
page, opens each photo page and downloads the full-size image as a :class:`crawler.items.PhotoItem`; the
pipelines check, dedupe and store it. Selectors live in :mod:`crawler.layout`.

Spider arguments: ``base_url`` (default ``https://www.theplace.ru``; any http(s) URL, e.g. a local copy),
``persons``, ``persons_file``, ``max_persons``, ``max_photos_per_person`` (caps the photo pages opened per person,
counting those done by earlier runs into the same OUT; kept photos are at most that many; once reached, no further
gallery page of that person is requested). Settings it reads: ``CRAWL_OUT``, ``CRAWL_MIN_PHOTOS``, ``CRAWL_FSYNC``,
``CRAWL_MAX_PAGE_SIZE``, ``CRAWL_LAYOUT_ABORT_AFTER``, ``RETRY_TIMES``, ``RETRY_BACKOFF_BASE``/``_MAX``.

Photo links come only from the person's own gallery block; a link whose path names another person
(``/photos/<other>/...``) is dropped (``theplace/photo_links_other_person``). Gallery pages are matched to their
person with trailing slashes and redirects ignored (:func:`crawler.layout.gallery_page`). A person whose
pagination promised pages that never arrived (an error, or no photos on them) is counted in
``theplace/galleries_short`` (pages: ``theplace/gallery_pages_missing``) and named in a warning at the end.

Every request for an image (or page) that fails for good is journaled in ``failures.jsonl`` (url, status, reason,
time; see :mod:`crawler.store`). An empty image body, or a JPEG without its end marker (cut off in transit), is
requested again with backoff up to ``RETRY_TIMES`` times: an empty one that stays empty is a failure (fetched
again next run), a JPEG that stays cut off goes to the pipelines, which reject it as ``corrupt``.

Layout changes fail loudly: a page where the expected links or the image do not match is logged as an error
and counted in the stats (``theplace/pages_no_match``, and per page type); if the first
``CRAWL_LAYOUT_ABORT_AFTER`` parsed pages all fail that way, the crawl stops with reason ``layout_changed``.
Links that leave the base domain are never followed (``theplace/offsite_links``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

import scrapy
from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.exceptions import CloseSpider, IgnoreRequest
from scrapy.http import HtmlResponse, Response, TextResponse
from scrapy.spidermiddlewares.httperror import HttpError
from twisted.python.failure import Failure

from crawler import layout
from crawler import settings as defaults
from crawler.items import PhotoItem
from crawler.middlewares import backoff_seconds
from crawler.store import Store, safe_identity

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from typing_extensions import Self

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://www.theplace.ru"

# Scheduler priorities: finish what is in flight before discovering more (bounded memory, early results).
_PRIORITY = {"index": 0, "letter": 0, "gallery": 10, "photo": 20, "image": 30}


def _optional_positive_int(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def parse_slugs(persons: str | list[str] | None = None, persons_file: str | None = None) -> list[str]:
    """Person slugs from a comma-separated string or list and/or a file (one per line, ``#`` comments).

    Raises:
        ValueError: a slug is empty-looking, ``.``/``..`` or contains ``/``, ``?``, ``#`` or ``\\``.
    """
    raw: list[str] = []
    if persons:
        raw += persons.split(",") if isinstance(persons, str) else list(persons)
    if persons_file:
        path = Path(persons_file)
        if not path.is_file():
            raise ValueError(f"persons_file: no such file: {persons_file}")
        raw += [line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines()]
    slugs: list[str] = []
    for slug in (s.strip() for s in raw):
        if not slug:
            continue
        if slug in (".", "..") or any(c in slug for c in "/?#\\"):
            raise ValueError(f"persons: {slug!r} is not a person slug (the <slug> in /photos/<slug>/)")
        if slug not in slugs:
            slugs.append(slug)
    return slugs


class TheplaceSpider(scrapy.Spider):
    """Crawl ThePlace celebrity galleries (see the module docstring for arguments and behaviour)."""

    name = "theplace"
    store: Store  # set in from_crawler, like the four below
    max_page_size: int
    layout_abort_after: int
    retry_times: int
    retry_backoff: tuple[float, float]

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        persons: str | list[str] | None = None,
        persons_file: str | None = None,
        max_persons: int | str | None = None,
        max_photos_per_person: int | str | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"base_url must be an http(s) site root such as {DEFAULT_BASE_URL}, got {base_url!r}")
        self.base_url = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        self.site_domain = layout.site_domain(self.base_url)
        self.allowed_domains = [self.site_domain]
        self.person_slugs = parse_slugs(persons, persons_file)
        self.max_persons = _optional_positive_int("max_persons", max_persons)
        self.max_photos_per_person = _optional_positive_int("max_photos_per_person", max_photos_per_person)
        self._persons_scheduled: set[str] = set()
        self._photo_pages: set[tuple[str, str]] = set()
        self._photos_scheduled: Counter[str] = Counter()
        self._done_before: dict[str, int] = {}
        self._pages_promised: Counter[str] = Counter()  # identity -> highest gallery page its pagination linked
        self._pages_seen: defaultdict[str, set[int]] = defaultdict(set)  # identity -> gallery pages with photos
        self._capped: set[str] = set()
        self.pages_matched = 0
        self.pages_no_match = 0

    @classmethod
    def from_crawler(cls, crawler: Crawler, *args: Any, **kwargs: Any) -> Self:
        spider = super().from_crawler(crawler, *args, **kwargs)
        settings = crawler.settings
        spider.max_page_size = settings.getint("CRAWL_MAX_PAGE_SIZE", defaults.CRAWL_MAX_PAGE_SIZE)
        spider.layout_abort_after = settings.getint("CRAWL_LAYOUT_ABORT_AFTER", defaults.CRAWL_LAYOUT_ABORT_AFTER)
        spider.retry_times = settings.getint("RETRY_TIMES", defaults.RETRY_TIMES)
        spider.retry_backoff = (
            settings.getfloat("RETRY_BACKOFF_BASE", defaults.RETRY_BACKOFF_BASE),
            settings.getfloat("RETRY_BACKOFF_MAX", defaults.RETRY_BACKOFF_MAX),
        )
        spider.store = Store(
            settings.get("CRAWL_OUT", defaults.CRAWL_OUT),
            min_photos=settings.getint("CRAWL_MIN_PHOTOS", defaults.CRAWL_MIN_PHOTOS),
            fsync=settings.getbool("CRAWL_FSYNC", defaults.CRAWL_FSYNC),
        )
        spider.store.open()
        return spider

    # ---------------------------------------------------------------- requests

    def _request(self, url: str, kind: str, callback: Any, **cb_kwargs: Any) -> scrapy.Request:
        meta: dict[str, Any] = {"kind": kind}
        if kind != "image":
            meta["download_maxsize"] = self.max_page_size
        return scrapy.Request(
            url,
            callback=callback,
            errback=self.on_error,
            cb_kwargs=cb_kwargs,
            meta=meta,
            priority=_PRIORITY[kind],
            dont_filter=kind in ("photo", "image"),
        )

    def _follow(self, response: Response, href: str) -> str | None:
        """Absolute URL of a link if it stays on the site; off-site links are counted and dropped."""
        url = response.urljoin(href)
        if layout.is_on_site(url, self.site_domain):
            return url
        self.crawler.stats.inc_value("theplace/offsite_links")
        logger.debug("Not following off-site link %s on %s", url, response.url)
        return None

    def person_request(self, url: str) -> scrapy.Request | None:
        """Request for a person's first gallery page, or None (unrecognised link, already queued, or capped)."""
        gallery = layout.gallery_of(url)
        if gallery is None:
            self.crawler.stats.inc_value("theplace/person_links_unrecognised")
            logger.warning("Not a person page URL, skipped: %s", url)
            return None
        raw_identity, person_url = gallery
        identity = safe_identity(raw_identity)
        if identity in self._persons_scheduled:
            return None
        if self.max_persons is not None and len(self._persons_scheduled) >= self.max_persons:
            self.crawler.stats.inc_value("theplace/persons_capped")
            return None
        self._persons_scheduled.add(identity)
        return self._request(person_url, "gallery", self.parse_gallery, identity=identity, person_url=person_url)

    async def start(self) -> AsyncIterator[scrapy.Request]:
        if self.person_slugs:
            for slug in self.person_slugs:
                url = self.base_url + layout.PERSON_PATH.format(slug=quote(slug))
                if (request := self.person_request(url)) is not None:
                    yield request
        else:
            yield self._request(self.base_url + layout.INDEX_PATH, "index", self.parse_index)

    # ---------------------------------------------------------------- callbacks

    def parse_index(self, response: Response) -> Iterator[scrapy.Request]:
        """Letter index -> letter pages."""
        hrefs = self._extract(response, layout.LETTER_LINKS)
        if not hrefs:
            self._no_match(response, "index", "letter links")
            return
        self.pages_matched += 1
        for href in hrefs:
            if url := self._follow(response, href):
                yield self._request(url, "letter", self.parse_letter)

    def parse_letter(self, response: Response) -> Iterator[scrapy.Request]:
        """Letter page -> person pages."""
        hrefs = self._extract(response, layout.PERSON_LINKS)
        if not hrefs:
            self._no_match(response, "letter", "person links")
            return
        self.pages_matched += 1
        for href in hrefs:
            if (url := self._follow(response, href)) and (request := self.person_request(url)):
                yield request

    def parse_gallery(
        self, response: Response, identity: str, person_url: str, page: int = 1
    ) -> Iterator[scrapy.Request]:
        """A person's gallery page -> photo pages of not yet done photos, and the other gallery pages."""
        hrefs = self._extract(response, layout.PHOTO_PAGE_LINKS)
        if not hrefs:
            self._no_match(response, "gallery", "photo links")
            return
        self.pages_matched += 1
        self._pages_seen[identity].add(page)
        name = layout.extract_text(response, layout.PERSON_NAME) or identity
        self.store.note_person(identity, name, person_url)
        if identity not in self._done_before:
            self._done_before[identity] = self.store.done_count(identity)
        yield from self._photo_requests(response, hrefs, identity, name, person_url)
        # the gallery as served (after redirects) and as linked: the site's own page links use the served form
        galleries = (person_url, urlunsplit(urlsplit(response.url)._replace(fragment="")))
        pages: dict[str, int] = {}
        for href in layout.extract(response, layout.PAGINATION_LINKS):
            url = self._follow(response, href)
            found = next((p for g in galleries if url and (p := layout.gallery_page(url, g))), None)
            if found is not None:
                pages.setdefault(found[1], found[0])
        if pages:
            self._pages_promised[identity] = max(self._pages_promised[identity], *pages.values())
        if self._cap_reached(identity):
            self._capped.add(identity)
            self.crawler.stats.inc_value("theplace/gallery_pages_capped", len(pages))
            return
        for url, number in pages.items():
            yield self._request(
                url, "gallery", self.parse_gallery, identity=identity, person_url=person_url, page=number
            )

    def _photo_requests(
        self, response: Response, hrefs: list[str], identity: str, name: str, person_url: str
    ) -> Iterator[scrapy.Request]:
        """Photo-page requests for the thumbnails of one gallery page (skipping done, capped, other people's)."""
        stats = self.crawler.stats
        own_slug = layout.gallery_slug(person_url)
        for href in hrefs:
            page_url = self._follow(response, href)
            if page_url is None or (identity, page_url) in self._photo_pages:
                continue
            other = layout.photo_page_slug(page_url)
            if own_slug is not None and other is not None and other != own_slug:
                stats.inc_value("theplace/photo_links_other_person")
                logger.debug("Not filing %s under %s: the link names another person", page_url, identity)
                continue
            self._photo_pages.add((identity, page_url))
            if self.store.is_done(identity, page_url):
                stats.inc_value("theplace/photo_pages_done_before")
                continue
            if self._cap_reached(identity):
                stats.inc_value("theplace/photo_pages_capped")
                continue
            self._photos_scheduled[identity] += 1
            yield self._request(page_url, "photo", self.parse_photo, identity=identity, name=name, page_url=page_url)

    def _cap_reached(self, identity: str) -> bool:
        cap = self.max_photos_per_person
        return cap is not None and self._done_before.get(identity, 0) + self._photos_scheduled[identity] >= cap

    def parse_photo(self, response: Response, identity: str, name: str, page_url: str) -> Iterator[scrapy.Request]:
        """Photo page -> the full-size image."""
        srcs = self._extract(response, layout.FULL_IMAGE)
        if not srcs:
            self._no_match(response, "photo", "full-size image")
            return
        self.pages_matched += 1
        if image_url := self._follow(response, srcs[0]):
            yield self._request(
                image_url,
                "image",
                self.parse_image,
                identity=identity,
                name=name,
                page_url=page_url,
                image_url=image_url,
            )

    def parse_image(
        self, response: Response, identity: str, name: str, page_url: str, image_url: str
    ) -> Iterator[PhotoItem | scrapy.Request]:
        """Image bytes -> a PhotoItem for the pipelines (an empty or cut-off body is requested again first)."""
        if self.store.write_error is not None:
            raise CloseSpider("store_write_failed")
        stats = self.crawler.stats
        if isinstance(response, HtmlResponse):  # an HTML error page served with 200: try again next run
            stats.inc_value("theplace/failed/image/not_binary")
            logger.warning("Expected an image, got %s from %s", response.headers.get("Content-Type"), response.url)
            self._record_failure(response.request, response.status, "not_binary", identity, page_url)
            return
        incomplete = _incomplete_body(response.body)
        if incomplete is not None:
            retry = get_retry_request(
                response.request, spider=self, reason=incomplete, max_retry_times=self.retry_times
            )
            if retry is not None:
                retry.meta["retry_not_before"] = time.monotonic() + backoff_seconds(
                    retry.meta["retry_times"], *self.retry_backoff
                )
                yield retry
                return
            if incomplete == "empty_body":  # never a verdict on the photo: fetched again next run
                stats.inc_value("theplace/failed/image/empty_body")
                self._record_failure(response.request, response.status, incomplete, identity, page_url)
                return
        yield PhotoItem(identity=identity, name=name, image_url=image_url, page_url=page_url, body=response.body)

    # ---------------------------------------------------------------- failures and the end

    def on_error(self, failure: Failure) -> None:
        """Count and log a request that failed for good (HTTP error after retries, robots.txt, off-site, network)."""
        request = failure.request  # type: ignore[attr-defined]
        kind = request.meta.get("kind", "other")
        if failure.check(HttpError):
            reason = f"http_{failure.value.response.status}"
        elif failure.check(IgnoreRequest):
            reason = "ignored"
        else:
            reason = failure.type.__name__ if failure.type else "error"
        stats = self.crawler.stats
        stats.inc_value("theplace/failed")
        stats.inc_value(f"theplace/failed/{kind}/{reason}")
        level = logging.INFO if reason == "ignored" else logging.WARNING
        logger.log(level, "Failed %s %s: %s", kind, request.url, failure.getErrorMessage())
        status = failure.value.response.status if failure.check(HttpError) else None
        kwargs = request.cb_kwargs
        detail = failure.getErrorMessage()[:300]
        self._record_failure(request, status, reason, kwargs.get("identity", ""), kwargs.get("page_url"), detail)

    def _record_failure(
        self,
        request: scrapy.Request | None,
        status: int | None,
        reason: str,
        identity: str,
        page_url: str | None,
        detail: str = "",
    ) -> None:
        if request is None:
            return
        self.store.failure(
            {
                "url": request.url,
                "kind": request.meta.get("kind", "other"),
                "status": status,
                "reason": reason,
                "detail": detail,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "identity": identity,
                "page_url": page_url,
            }
        )

    def closed(self, reason: str) -> None:
        """Write the final manifest, rejects and persons files, and log a summary."""
        self._report_short_galleries()
        self.store.close()
        self.crawler.stats.set_value("theplace/kept_total", self.store.kept_total)
        stats = self.crawler.stats.get_stats()
        rejected = {k.rsplit("/", 1)[1]: v for k, v in stats.items() if k.startswith("images/rejected/")}
        persons = self.store.person_rows()
        meeting = sum(row["meets_min_photos"] for row in persons)
        logger.info(
            "Crawl summary (%s): kept %d new images; rejected %s; failed requests %d; pages with no match %d. "
            "%s now holds %d images of %d persons, %d with >= %d photos.",
            reason,
            stats.get("images/kept", 0),
            ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())) or "none",
            stats.get("theplace/failed", 0),
            self.pages_no_match,
            self.store.out,
            self.store.kept_total,
            len(persons),
            meeting,
            self.store.min_photos,
        )
        if not self.store.kept_total:
            logger.error("Nothing kept in %s: check base_url, persons and the log above", self.store.out)
        if self.pages_no_match:
            logger.error(
                "%d pages matched none of the selectors in crawler/layout.py: has the site layout changed?",
                self.pages_no_match,
            )

    # ---------------------------------------------------------------- helpers

    def _report_short_galleries(self) -> None:
        """Count and name the persons whose pagination promised pages that gave no photos (not when capped)."""
        stats = self.crawler.stats
        for identity in sorted(self._pages_promised):
            if identity in self._capped:
                continue
            missing = sorted(set(range(1, self._pages_promised[identity] + 1)) - self._pages_seen[identity])
            if missing:
                stats.inc_value("theplace/galleries_short")
                stats.inc_value("theplace/gallery_pages_missing", len(missing))
                logger.warning(
                    "Gallery of %s ended early: its pagination promised %d pages, pages %s gave no photos",
                    identity,
                    self._pages_promised[identity],
                    missing,
                )

    @staticmethod
    def _extract(response: Response, queries: Sequence[str]) -> list[str]:
        return layout.extract(response, queries) if isinstance(response, TextResponse) else []

    def _no_match(self, response: Response, page_type: str, what: str) -> None:
        self.pages_no_match += 1
        stats = self.crawler.stats
        stats.inc_value("theplace/pages_no_match")
        stats.inc_value(f"theplace/pages_no_match/{page_type}")
        logger.error(
            "Layout changed? No %s matched on %s page %s (selectors: crawler/layout.py)", what, page_type, response.url
        )
        if self.pages_matched == 0 and self.pages_no_match >= self.layout_abort_after:
            raise CloseSpider("layout_changed")


def _incomplete_body(body: bytes) -> str | None:
    """``empty_body`` or ``truncated_body`` (a JPEG without its end marker), else None."""
    if not body:
        return "empty_body"
    if body.startswith(b"\xff\xd8") and not body.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return "truncated_body"
    return None
