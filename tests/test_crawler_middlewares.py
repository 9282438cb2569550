"""Staying on the site (the domain check, redirects), safe identity names and the retry backoff."""

from __future__ import annotations

import pytest
from crawler_helpers import BASE, make_spider
from scrapy import Request
from scrapy.exceptions import IgnoreRequest
from scrapy.http import Response

from crawler import layout
from crawler.middlewares import RETRY_AFTER_MAX, BackoffRetryMiddleware, StayOnSiteMiddleware
from crawler.store import safe_identity


def test_site_domain_and_on_site_urls():
    domain = layout.site_domain("https://www.theplace.ru")
    assert domain == "theplace.ru"
    assert layout.is_on_site("https://www.theplace.ru/photos/", domain)
    assert layout.is_on_site("http://img.theplace.ru/archive/x.jpg", domain)
    assert not layout.is_on_site("https://theplace.ru.evil.com/x", domain)
    assert not layout.is_on_site("https://eviltheplace.ru/x", domain)
    assert not layout.is_on_site("javascript:alert(1)", domain)
    assert not layout.is_on_site("ftp://www.theplace.ru/x", domain)


@pytest.mark.parametrize("raw", ["..", "../../etc", "%2e%2e", "a/../../b", "/abs", ".hidden", "Анна", "a b", "x" * 300])
def test_safe_identity_cannot_escape(raw, tmp_path):
    identity = safe_identity(raw)
    assert identity == safe_identity(identity)  # idempotent
    assert "/" not in identity and "\\" not in identity and not identity.startswith(".") and identity
    assert len(identity) <= 100
    resolved = (tmp_path / "images" / identity).resolve()
    assert resolved.parent == (tmp_path / "images").resolve()


def test_safe_identity_keeps_plain_slugs_and_separates_cleaned_ones():
    assert safe_identity("emma_watson") == "emma_watson"
    assert safe_identity("taraji_p._henson") == "taraji_p._henson"
    assert safe_identity("Priyanka%20Chopra") == safe_identity("Priyanka Chopra")
    assert safe_identity("a b") != safe_identity("a_b") == "a_b"


def test_stay_on_site_refuses_offsite_requests_and_redirects(tmp_path):
    spider = make_spider(tmp_path)
    middleware = StayOnSiteMiddleware.from_crawler(spider.crawler)
    assert middleware.process_request(Request(f"{BASE}/photos/")) is None
    with pytest.raises(IgnoreRequest):
        middleware.process_request(Request("http://elsewhere.example/photos/", dont_filter=True))
    redirected = Request("http://cdn.example/a.jpg", meta={"redirect_urls": [f"{BASE}/archive/a.jpg"]})
    with pytest.raises(IgnoreRequest):
        middleware.process_request(redirected)
    stats = spider.crawler.stats
    assert stats.get_value("stayonsite/refused") == 2 and stats.get_value("stayonsite/redirect_refused") == 1


def test_retry_backoff_grows_and_honours_retry_after(tmp_path):
    spider = make_spider(tmp_path, {"RETRY_BACKOFF_BASE": 2.0, "RETRY_BACKOFF_MAX": 30.0, "RETRY_TIMES": 5})
    middleware = BackoffRetryMiddleware.from_crawler(spider.crawler)
    assert [middleware.backoff(n) for n in (1, 2, 3, 5)] == [2.0, 4.0, 8.0, 30.0]
    assert middleware.backoff(1, b"10") == 10.0
    assert middleware.backoff(1, b"3600") == 3600.0  # the server's Retry-After wins over the backoff cap
    assert middleware.backoff(1, b"999999") == RETRY_AFTER_MAX  # but nonsense values are bounded
    request = Request(f"{BASE}/archive/a.jpg")
    retry = middleware.process_response(request, Response(request.url, status=503, request=request))
    assert isinstance(retry, Request) and retry.meta["retry_times"] == 1 and "retry_not_before" in retry.meta
    ok = Response(request.url, status=200, request=request)
    assert middleware.process_response(request, ok) is ok
