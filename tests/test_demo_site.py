"""The demo site's content: every trap a real crawl meets, on the real page layout."""

from __future__ import annotations

import io

import pytest
from crawler_helpers import BASE, jpeg
from PIL import Image
from scrapy.http import HtmlResponse

from crawler import layout
from demo.site import DemoSite


def test_demo_site_has_every_trap_and_real_layout():
    site = DemoSite.synthetic(persons=3, photos=12, per_page=5)
    kinds = [p.kind for person in site.persons.values() for p in person.photos]
    kinds_wanted = ("small", "duplicate", "corrupt", "bomb", "missing", "flaky", "empty_once", "truncated_once")
    for kind in (*kinds_wanted, "offsite_redirect", "offsite_link"):
        assert kind in kinds
    routes = site.routes(offsite_origin="http://localhost:1")
    assert "Disallow: /photos/robots_blocked/" in routes["/robots.txt"].body.decode()
    first = next(iter(site.persons.values()))
    gallery = HtmlResponse(url=f"{BASE}/photos/{first.slug}/", body=routes[f"/photos/{first.slug}/"].body)
    assert len(layout.extract(gallery, layout.PHOTO_PAGE_LINKS)) == 5
    assert len(layout.extract(gallery, layout.PAGINATION_LINKS)) >= 3
    page = first.photos[0].page_path
    photo_page = HtmlResponse(url=BASE + page, body=routes[page].body)
    assert layout.extract(photo_page, layout.FULL_IMAGE) == [first.photos[0].image_path]
    with Image.open(io.BytesIO(first.photos[0].body)) as image:
        assert min(image.size) >= 1000


def test_demo_site_from_identities_serves_given_images():
    body = jpeg(1000, 1000, 50)
    site = DemoSite.from_identities({"ivan_test": ("Иван Тест", [body, body])}, per_page=24)
    routes = site.routes(offsite_origin="http://localhost:1")
    assert routes["/archive/ivan_test/img/ivan_test_0002.jpg"].body == body
    assert "Иван Тест" in routes["/photos/ivan_test/"].body.decode()
    with pytest.raises(ValueError, match="slug"):
        DemoSite.from_identities({"../x": ("X", [body])})
