"""ThePlace page layout: every URL pattern and CSS selector the spider uses, in one place.

The site has changed its markup several times, so each field lists selectors newest layout first; the first one
that matches wins. When none matches, the spider logs an error and counts the page under
``theplace/pages_no_match`` (see :mod:`crawler.spiders.theplace`) instead of silently finishing with nothing.
Pinned copies of each page type live in ``tests/fixtures/crawler/``; ``demo.site`` renders the same markup.

Current layout (2025):
  index ``/photos/`` -> letter links -> letter page -> person links -> person page ``/photos/<slug>/``,
  more pages at ``?page=N`` -> thumbnail links to photo pages -> full-size ``<img class="pic big_pic">``,
  image files under ``/archive/<slug>/img/<file>.jpg``.
Older galleries: ``/photos/gallery.php?id=<ID>`` with pages at ``&page=N``; the id names the person
(identity ``gallery-<ID>``), and ``/photos/<Name>-mid<ID>.html``.

Photo links are read only inside the person's own gallery block (``div.gallery-pics-list``), never from a
sidebar or a "similar people" block, which show other people's photos with the same card markup. Gallery URLs
are compared with :func:`gallery_page`, which ignores a trailing slash (a person link that redirects to its
``/``-form keeps its later pages).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from parsel import Selector
from scrapy.http import TextResponse

INDEX_PATH = "/photos/"
PERSON_PATH = "/photos/{slug}/"
#: Person pages: ``/photos/<slug>/`` (current) or ``/photos/<Name>-mid<ID>.html`` (older).
PERSON_PATH_RE = re.compile(r"^/photos/(?P<slug>[^/?#]+?)(?:/|\.html)?$")
PAGE_PARAM = "page"
#: Older person galleries: ``/photos/gallery.php?id=<ID>&page=N``.
LEGACY_GALLERY_PATH = "/photos/gallery.php"
LEGACY_ID_PARAM = "id"
LEGACY_IDENTITY = "gallery-{id}"

LETTER_LINKS: Sequence[str] = ("div.letters-list a::attr(href)",)
PERSON_LINKS: Sequence[str] = ("div.models_list a::attr(href)",)
PERSON_NAME: Sequence[str] = ("div.main-col-content h1 ::text", "h1 ::text")
PAGINATION_LINKS: Sequence[str] = ("div.listalka a::attr(href)",)
#: Thumbnail links to photo pages, inside the person's own gallery block only.
PHOTO_PAGE_LINKS: Sequence[str] = (
    "div.gallery-pics-list a.photos-pic-card__link::attr(href)",
    "div.gallery-pics-list a::attr(href)",
)
FULL_IMAGE: Sequence[str] = (
    "div.pic-big-box__main span.s-pic img.pic.big_pic::attr(src)",
    "img.pic.big_pic::attr(src)",
)


def extract(selector: Selector | TextResponse, queries: Sequence[str]) -> list[str]:
    """Return the stripped, non-empty matches of the first query that matches anything, in document order."""
    for query in queries:
        found = [value.strip() for value in selector.css(query).getall()]
        found = [value for value in found if value]
        if found:
            return found
    return []


def extract_text(selector: Selector | TextResponse, queries: Sequence[str]) -> str:
    """Return the whitespace-normalised text of the first query that yields non-blank text, or ``""``."""
    for query in queries:
        text = " ".join(" ".join(selector.css(query).getall()).split())
        if text:
            return text
    return ""


def site_domain(base_url: str) -> str:
    """The domain a crawl may visit: the base URL's host without a leading ``www.`` (subdomains included)."""
    host = (urlsplit(base_url).hostname or "").lower()
    return host[4:] if host.startswith("www.") else host


def is_on_site(url: str, domain: str) -> bool:
    """Whether ``url`` is an http(s) URL on ``domain`` or one of its subdomains."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return parts.scheme in ("http", "https") and (host == domain or host.endswith("." + domain))


def _norm_path(path: str) -> str:
    """A URL path compared loosely: percent-escapes decoded, case folded, no trailing slash."""
    return unquote(path).rstrip("/").casefold() or "/"


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def _legacy_id(url: str) -> str | None:
    """The ``id`` of an older ``gallery.php?id=<ID>`` URL, else None."""
    parts = urlsplit(url)
    if _norm_path(parts.path) != _norm_path(LEGACY_GALLERY_PATH):
        return None
    ids = _query(url).get(LEGACY_ID_PARAM, [])
    return ids[0] if ids and ids[0].isdigit() else None


def gallery_of(url: str) -> tuple[str, str] | None:
    """``(raw identity, first-page URL)`` of a person gallery URL, or None when it is not one.

    ``/photos/<slug>/`` (also without the slash, or ``/photos/<Name>-mid<ID>.html``) gives the slug;
    ``/photos/gallery.php?id=<ID>`` gives ``gallery-<ID>``, so every older-layout person is its own identity.
    """
    parts = urlsplit(url)
    if _norm_path(parts.path) == _norm_path(LEGACY_GALLERY_PATH):
        legacy = _legacy_id(url)
        if legacy is None:
            return None
        first = urlunsplit((parts.scheme, parts.netloc, parts.path, f"{LEGACY_ID_PARAM}={legacy}", ""))
        return LEGACY_IDENTITY.format(id=legacy), first
    match = PERSON_PATH_RE.match(parts.path)
    if match is None:
        return None
    return match["slug"], urlunsplit(parts._replace(query="", fragment=""))


def gallery_slug(gallery_url: str) -> str | None:
    """The person slug in a current-layout gallery URL (None for the older ``gallery.php`` layout)."""
    if _legacy_id(gallery_url) is not None:
        return None
    match = PERSON_PATH_RE.match(urlsplit(gallery_url).path)
    return unquote(match["slug"]).casefold() if match else None


def photo_page_slug(url: str) -> str | None:
    """The person slug of a photo page ``/photos/<slug>/<page>``, or None when the path names no person."""
    parts = [p for p in urlsplit(url).path.split("/") if p]
    if len(parts) >= 3 and parts[0] == "photos":
        return unquote(parts[1]).casefold()
    return None


def gallery_page(url: str, gallery_url: str) -> tuple[int, str] | None:
    """``(page number, canonical URL)`` when ``url`` is a page of the gallery at ``gallery_url``, else None.

    Paths are compared without their trailing slash (a person link may redirect to the ``/``-form, and the
    site's own pagination then uses that form); an older-layout gallery must also have the same ``id``. The
    canonical URL keeps the link's own path: page 1 is the gallery URL itself, page N adds ``page=N``.
    """
    parts, base = urlsplit(url), urlsplit(gallery_url)
    if (parts.scheme, parts.netloc.lower()) != (base.scheme, base.netloc.lower()):
        return None
    if _norm_path(parts.path) != _norm_path(base.path) or _legacy_id(url) != _legacy_id(gallery_url):
        return None
    pages = _query(url).get(PAGE_PARAM, ["1"])
    if not pages[0].isdigit() or int(pages[0]) < 1:
        return None
    number = int(pages[0])
    legacy = _legacy_id(url)
    query = f"{LEGACY_ID_PARAM}={legacy}" if legacy is not None else ""
    if number > 1:
        query = f"{query}&{PAGE_PARAM}={number}" if query else f"{PAGE_PARAM}={number}"
    return number, urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
