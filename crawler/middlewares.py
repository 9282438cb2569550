"""Downloader middlewares: keep every request on the crawled site, and retry with backoff.

``StayOnSiteMiddleware`` (priority 40) runs before Scrapy's own OffsiteMiddleware (50), which lets
``dont_filter`` requests through, and before robots.txt handling (100). Redirects come back through the scheduler
as new requests, so a redirect to another host is refused here too.

``BackoffRetryMiddleware`` replaces Scrapy's RetryMiddleware (550): same retry rules (``RETRY_TIMES``,
``RETRY_HTTP_CODES``, e.g. 429 and 5xx), but a retried request waits ``RETRY_BACKOFF_BASE * 2**(n-1)`` seconds
(capped at ``RETRY_BACKOFF_MAX``), or the server's ``Retry-After`` if that is longer, before it is sent again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

from scrapy import Request
from scrapy.downloadermiddlewares.retry import RetryMiddleware
from scrapy.exceptions import IgnoreRequest
from scrapy.http import Response
from scrapy.utils.asyncio import is_asyncio_available
from twisted.internet.task import deferLater

from crawler.layout import is_on_site

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings
    from typing_extensions import Self

logger = logging.getLogger(__name__)


class StayOnSiteMiddleware:
    """Refuse any request whose host is not the spider's ``site_domain`` (or a subdomain of it).

    Spiders without a ``site_domain`` attribute are not restricted. Refusals are counted as
    ``stayonsite/refused``; the subset that were redirect targets also as ``stayonsite/redirect_refused``.
    """

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def process_request(self, request: Request) -> None:
        domain = getattr(self.crawler.spider, "site_domain", None)
        if not domain or is_on_site(request.url, domain):
            return None
        stats = self.crawler.stats
        assert stats is not None
        stats.inc_value("stayonsite/refused")
        redirected_from = request.meta.get("redirect_urls")
        if redirected_from:
            stats.inc_value("stayonsite/redirect_refused")
            logger.warning("Refused redirect off %s: %s -> %s", domain, redirected_from[-1], request.url)
        else:
            logger.info("Refused off-site request to %s", request.url)
        raise IgnoreRequest(f"off-site: {request.url}")


#: The longest server-requested Retry-After honoured, in seconds.
RETRY_AFTER_MAX = 3600.0


class BackoffRetryMiddleware(RetryMiddleware):
    """Scrapy's RetryMiddleware plus a growing wait before each retry (see the module docstring)."""

    def __init__(self, settings: BaseSettings) -> None:
        super().__init__(settings)
        self.backoff_base = settings.getfloat("RETRY_BACKOFF_BASE", 2.0)
        self.backoff_max = settings.getfloat("RETRY_BACKOFF_MAX", 120.0)

    def backoff(self, retry_times: int, retry_after: bytes | None = None) -> float:
        """Seconds to wait before retry number ``retry_times`` (1-based)."""
        delay = backoff_seconds(retry_times, self.backoff_base, self.backoff_max)
        if retry_after:  # the server's own Retry-After wins when longer (bounded to an hour against nonsense dates)
            delay = max(delay, min(_parse_retry_after(retry_after.decode("latin-1")), RETRY_AFTER_MAX))
        return delay

    async def process_request(self, request: Request) -> None:
        wait = request.meta.get("retry_not_before", 0.0) - time.monotonic()
        if wait > 0:
            if is_asyncio_available():
                await asyncio.sleep(wait)
            else:
                from twisted.internet import reactor  # the non-asyncio reactor Scrapy installed

                await deferLater(reactor, wait, lambda: None)
        return None

    def process_response(self, request: Request, response: Response) -> Request | Response:  # type: ignore[override]
        result = super().process_response(request, response)
        if isinstance(result, Request):
            delay = self.backoff(result.meta["retry_times"], response.headers.get(b"Retry-After"))
            result.meta["retry_not_before"] = time.monotonic() + delay
        return result

    def process_exception(self, request: Request, exception: Exception) -> Request | Response | None:  # type: ignore[override]
        result = super().process_exception(request, exception)
        if isinstance(result, Request):
            result.meta["retry_not_before"] = time.monotonic() + self.backoff(result.meta["retry_times"])
        return result


def backoff_seconds(retry_times: int, base: float, cap: float) -> float:
    """The wait before retry number ``retry_times`` (1-based): ``base * 2**(n-1)``, at most ``cap``."""
    return min(base * 2 ** (retry_times - 1), cap)


def _parse_retry_after(value: str) -> float:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date); 0 when unreadable."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, moment.timestamp() - time.time())
