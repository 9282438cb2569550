"""The ``theplace`` spider: person galleries -> photo pages -> full-size images.

Walks either the letter index (default) or an explicit list of person slugs (``-a persons=slug1,slug2``, or
``-a persons_file=path`` with one slug per line, ``#`` comments allowed). For each person it follows every gallery
page, opens each photo page and downloads the full-size image as a :class:`crawler.items.PhotoItem`; the
pipelines check, dedupe and store it. Selectors live in :mod:`crawler.layout`.

Spider arguments: ``base_url`` (default ``https://www.theplace.ru``; any http(s) URL, e.g. a local copy),
``persons``, ``persons_file``, ``max_persons``, ``max_photos_per_person`` (caps the photo pages opened per person,
counting those done by earlier runs into the same OUT; kept photos are at most that many). Settings it reads:
``CRAWL_OUT``, ``CRAWL_MIN_PHOTOS``, ``CRAWL_FSYNC``, ``CRAWL_MAX_PAGE_SIZE``, ``CRAWL_LAYOUT_ABORT_AFTER``.

Layout changes fail loudly: a page where the expected links or the image do not match is logged as an error
and counted in the stats (``theplace/pages_no_match``, and per page type); if the first
``CRAWL_LAYOUT_ABORT_AFTER`` parsed pages all fail that way, the crawl stops with reason ``layout_changed``.
Links that leave the base domain are never followed (``theplace/offsite_links``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

import scrapy
from scrapy.exceptions import CloseSpider, IgnoreRequest
from scrapy.http import HtmlResponse, Response, TextResponse
from scrapy.spidermiddlewares.httperror import HttpError
from twisted.python.failure import Failure

from crawler import layout
from crawler import settings as defaults
from crawler.items import PhotoItem
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
    store: Store  # set in from_crawler, like the two below
    max_page_size: int
    layout_abort_after: int

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
        self.pages_matched = 0
        self.pages_no_match = 0

    @classmethod
    def from_crawler(cls, crawler: Crawler, *args: Any, **kwargs: Any) -> Self:
        spider = super().from_crawler(crawler, *args, **kwargs)
        settings = crawler.settings
        spider.max_page_size = settings.getint("CRAWL_MAX_PAGE_SIZE", defaults.CRAWL_MAX_PAGE_SIZE)
        spider.layout_abort_after = settings.getint("CRAWL_LAYOUT_ABORT_AFTER", defaults.CRAWL_LAYOUT_ABORT_AFTER)
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
        match = layout.PERSON_PATH_RE.match(urlsplit(url).path)
        if match is None:
            self.crawler.stats.inc_value("theplace/person_links_unrecognised")
            logger.warning("Not a person page URL, skipped: %s", url)
            return None
        identity = safe_identity(match["slug"])
        if identity in self._persons_scheduled:
            return None
        if self.max_persons is not None and len(self._persons_scheduled) >= self.max_persons:
            self.crawler.stats.inc_value("theplace/persons_capped")
            return None
        self._persons_scheduled.add(identity)
        person_url = urlunsplit(urlsplit(url)._replace(query="", fragment=""))
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

    def parse_gallery(self, response: Response, identity: str, person_url: str) -> Iterator[scrapy.Request]:
        """A person's gallery page -> photo pages of not yet done photos, and the other gallery pages."""
        hrefs = self._extract(response, layout.PHOTO_PAGE_LINKS)
        if not hrefs:
            self._no_match(response, "gallery", "photo links")
            return
        self.pages_matched += 1
        name = layout.extract_text(response, layout.PERSON_NAME) or identity
        self.store.note_person(identity, name, person_url)
        if identity not in self._done_before:
            self._done_before[identity] = self.store.done_count(identity)
        stats = self.crawler.stats
        for href in hrefs:
            page_url = self._follow(response, href)
            if page_url is None or (identity, page_url) in self._photo_pages:
                continue
            self._photo_pages.add((identity, page_url))
            if self.store.is_done(identity, page_url):
                stats.inc_value("theplace/photo_pages_done_before")
                continue
            cap = self.max_photos_per_person
            if cap is not None and self._done_before[identity] + self._photos_scheduled[identity] >= cap:
                stats.inc_value("theplace/photo_pages_capped")
                continue
            self._photos_scheduled[identity] += 1
            yield self._request(page_url, "photo", self.parse_photo, identity=identity, name=name, page_url=page_url)
        for href in layout.extract(response, layout.PAGINATION_LINKS):
            url = self._follow(response, href)
            if url and (page := self._gallery_page_url(url, person_url)):
                yield self._request(page, "gallery", self.parse_gallery, identity=identity, person_url=person_url)

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
    ) -> Iterator[PhotoItem]:
        """Image bytes -> a PhotoItem for the pipelines."""
        if self.store.write_error is not None:
            raise CloseSpider("store_write_failed")
        if isinstance(response, HtmlResponse):  # an HTML error page served with 200: try again next run
            self.crawler.stats.inc_value("theplace/failed/image/not_binary")
            logger.warning("Expected an image, got %s from %s", response.headers.get("Content-Type"), response.url)
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

    def closed(self, reason: str) -> None:
        """Write the final manifest, rejects and persons files, and log a summary."""
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

    def _gallery_page_url(self, url: str, person_url: str) -> str | None:
        """Canonical URL of another gallery page of the same person (``?page=N``), else None."""
        parts = urlsplit(url)
        if parts.path != urlsplit(person_url).path:
            return None
        pages = parse_qs(parts.query).get(layout.PAGE_PARAM, [])
        if not pages or not pages[0].isdigit() or int(pages[0]) < 1:
            return None
        number = int(pages[0])
        return person_url if number == 1 else f"{person_url}?{layout.PAGE_PARAM}={number}"

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
