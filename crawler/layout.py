"""ThePlace page layout: every URL pattern and CSS selector the spider uses, in one place.

The site has changed its markup several times, so each field lists selectors newest layout first; the first one
that matches wins. When none matches, the spider logs an error and counts the page under
``theplace/pages_no_match`` (see :mod:`crawler.spiders.theplace`) instead of silently finishing with nothing.
Pinned copies of each page type live in ``tests/fixtures/crawler/``; ``demo.site`` renders the same markup.

Current layout (2025):
  index ``/photos/`` -> letter links -> letter page -> person links -> person page ``/photos/<slug>/``,
  more pages at ``?page=N`` -> thumbnail links to photo pages -> full-size ``<img class="pic big_pic">``,
  image files under ``/archive/<slug>/img/<file>.jpg``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from parsel import Selector
from scrapy.http import TextResponse

INDEX_PATH = "/photos/"
PERSON_PATH = "/photos/{slug}/"
#: Person pages: ``/photos/<slug>/`` (current) or ``/photos/<Name>-mid<ID>.html`` (older).
PERSON_PATH_RE = re.compile(r"^/photos/(?P<slug>[^/?#]+?)(?:/|\.html)?$")
PAGE_PARAM = "page"

LETTER_LINKS: Sequence[str] = ("div.letters-list a::attr(href)",)
PERSON_LINKS: Sequence[str] = ("div.models_list a::attr(href)",)
PERSON_NAME: Sequence[str] = ("div.main-col-content h1 ::text", "h1 ::text")
PAGINATION_LINKS: Sequence[str] = ("div.listalka a::attr(href)",)
PHOTO_PAGE_LINKS: Sequence[str] = (
    "a.photos-pic-card__link::attr(href)",
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
