"""Spider callbacks on pinned HTML (tests/fixtures/crawler/): discovery, pagination, layout changes, arguments."""

from __future__ import annotations

import asyncio
import logging

import pytest
from crawler_helpers import BASE, FIXTURES, html_response, jpeg, make_spider
from scrapy import Request
from scrapy.exceptions import CloseSpider
from scrapy.http import HtmlResponse, Response

from crawler.items import PhotoItem
from crawler.spiders.theplace import parse_slugs
from crawler.store import Store, read_jsonl


def test_index_page_yields_on_site_letter_pages(tmp_path):
    spider = make_spider(tmp_path)
    requests = list(spider.parse_index(html_response("index.html", f"{BASE}/photos/")))
    assert [r.url for r in requests] == [
        f"{BASE}/photos/letter/a/",
        f"{BASE}/photos/letter/b/",
        f"{BASE}/photos/letter/c/",
        f"{BASE}/photos/letter/e/",
        f"{BASE}/photos/letter/%D0%90/",
    ]
    assert all(r.callback == spider.parse_letter and r.errback == spider.on_error for r in requests)


def test_letter_page_yields_person_galleries_and_skips_offsite(tmp_path):
    spider = make_spider(tmp_path)
    requests = list(spider.parse_letter(html_response("letter.html", f"{BASE}/photos/letter/e/")))
    assert [(r.url, r.cb_kwargs["identity"]) for r in requests] == [
        (f"{BASE}/photos/emma_watson/", "emma_watson"),
        (f"{BASE}/photos/emma_stone/", "emma_stone"),
        (f"{BASE}/photos/eva_green/", "eva_green"),
    ]  # the ?page=2 link is the same person; the example.com link is off-site
    assert spider.crawler.stats.get_value("theplace/offsite_links") == 1
    assert all(r.callback == spider.parse_gallery for r in requests)


def test_max_persons_caps_discovered_persons(tmp_path):
    spider = make_spider(tmp_path, max_persons=2)
    requests = list(spider.parse_letter(html_response("letter.html", f"{BASE}/photos/letter/e/")))
    assert [r.cb_kwargs["identity"] for r in requests] == ["emma_watson", "emma_stone"]
    assert spider.crawler.stats.get_value("theplace/persons_capped") == 1


def test_gallery_page_yields_photo_pages_and_canonical_pagination(tmp_path):
    spider = make_spider(tmp_path)
    person_url = f"{BASE}/photos/emma_watson/"
    response = html_response("person.html", f"{person_url}?page=2", identity="emma_watson", person_url=person_url)
    requests = list(spider.parse_gallery(response, identity="emma_watson", person_url=person_url))
    photos = [r for r in requests if r.callback == spider.parse_photo]
    pages = [r for r in requests if r.callback == spider.parse_gallery]
    assert [r.url for r in photos] == [
        f"{BASE}/photos/emma_watson/pic-1118523.html",
        f"{BASE}/photos/emma_watson/pic-1118524.html",
        f"{BASE}/photos/emma_watson/pic-1118525.html",
    ]
    assert photos[0].cb_kwargs == {
        "identity": "emma_watson",
        "name": "Эмма Уотсон / Emma Watson",
        "page_url": f"{BASE}/photos/emma_watson/pic-1118523.html",
    }
    # page 1 is the person URL itself; page 3 is linked twice, asked once; the other person's page is not followed
    assert [r.url for r in pages] == [person_url, f"{person_url}?page=3"]
    assert [r.cb_kwargs["page"] for r in pages] == [1, 3]
    assert spider.crawler.stats.get_value("theplace/offsite_links") == 1
    assert spider.store.person_rows() == [
        {
            "identity": "emma_watson",
            "name": "Эмма Уотсон / Emma Watson",
            "url": person_url,
            "photos": 0,
            "rejected": {},
            "min_photos": 100,
            "meets_min_photos": False,
        }
    ]


def test_gallery_skips_photo_pages_done_before_and_caps_per_person(tmp_path):
    person_url = f"{BASE}/photos/emma_watson/"
    done = PhotoItem("emma_watson", "Emma", f"{BASE}/a.jpg", f"{BASE}/photos/emma_watson/pic-1118523.html", b"")
    store = Store(tmp_path / "out", fsync=False)
    store.open()
    store.reject(done, "too_small", "10x10")
    store.close()
    spider = make_spider(tmp_path, max_photos_per_person=2)
    response = html_response("person.html", f"{person_url}?page=2")
    requests = list(spider.parse_gallery(response, identity="emma_watson", person_url=person_url))
    photos = [r.url for r in requests if r.callback == spider.parse_photo]
    # pic-1118523 was rejected by the earlier run (counts toward the cap of 2): one more page is opened
    assert photos == [f"{BASE}/photos/emma_watson/pic-1118524.html"]
    stats = spider.crawler.stats
    assert stats.get_value("theplace/photo_pages_done_before") == 1
    assert stats.get_value("theplace/photo_pages_capped") == 1


def test_gallery_takes_photos_only_from_its_own_block(tmp_path):
    spider = make_spider(tmp_path)
    person_url = f"{BASE}/photos/emma_watson/"
    response = html_response("person_sidebar.html", person_url)
    requests = list(spider.parse_gallery(response, identity="emma_watson", person_url=person_url))
    photos = [r.url for r in requests if r.callback == spider.parse_photo]
    # the "similar people" block and the sidebar are ignored; a link inside the gallery naming another person too
    assert photos == [f"{BASE}/photos/emma_watson/pic-1118523.html"]
    assert spider.crawler.stats.get_value("theplace/photo_links_other_person") == 1


def test_redirected_person_link_keeps_the_later_gallery_pages(tmp_path):
    spider = make_spider(tmp_path)
    linked = f"{BASE}/photos/emma_watson"  # the letter page's link; the site redirects it to the slash form
    (request,) = [r for r in [spider.person_request(linked)] if r is not None]
    assert request.url == linked and request.cb_kwargs["identity"] == "emma_watson"
    response = html_response("person.html", f"{BASE}/photos/emma_watson/?page=2")
    requests = list(spider.parse_gallery(response, identity="emma_watson", person_url=linked, page=2))
    pages = [r.url for r in requests if r.callback == spider.parse_gallery]
    assert pages == [f"{BASE}/photos/emma_watson/", f"{BASE}/photos/emma_watson/?page=3"]


def test_older_gallery_php_person_is_its_own_identity(tmp_path):
    spider = make_spider(tmp_path)
    first = spider.person_request(f"{BASE}/photos/gallery.php?id=5")
    second = spider.person_request(f"{BASE}/photos/gallery.php?page=2&id=6")
    assert spider.person_request(f"{BASE}/photos/gallery.php?id=5&page=3") is None  # already queued
    assert spider.person_request(f"{BASE}/photos/gallery.php") is None  # no id: not a person
    assert [(r.url, r.cb_kwargs["identity"]) for r in (first, second)] == [
        (f"{BASE}/photos/gallery.php?id=5", "gallery-5"),
        (f"{BASE}/photos/gallery.php?id=6", "gallery-6"),
    ]
    url = f"{BASE}/photos/gallery.php?id=5"
    body = (FIXTURES / "person_legacy.html").read_bytes()
    response = HtmlResponse(url=url, body=body, request=Request(url))
    requests = list(spider.parse_gallery(response, identity="gallery-5", person_url=url))
    assert [r.url for r in requests if r.callback == spider.parse_photo] == [
        f"{BASE}/photos/pic.php?id=5&pic=1",
        f"{BASE}/photos/pic.php?id=5&pic=2",
    ]
    assert [r.url for r in requests if r.callback == spider.parse_gallery] == [f"{url}&page=2"]
    assert requests[0].cb_kwargs["name"] == "Эмма Уотсон"  # cp1251 page


def test_cap_per_person_stops_paginating(tmp_path):
    spider = make_spider(tmp_path, max_photos_per_person=2)
    person_url = f"{BASE}/photos/emma_watson/"
    requests = list(spider.parse_gallery(html_response("person.html", person_url), "emma_watson", person_url))
    assert [r.callback for r in requests] == [spider.parse_photo, spider.parse_photo]
    assert spider.crawler.stats.get_value("theplace/gallery_pages_capped") == 2  # page 1 and page 3 not asked


def test_gallery_shorter_than_its_pagination_is_counted(tmp_path, caplog):
    spider = make_spider(tmp_path)
    person_url = f"{BASE}/photos/emma_watson/"
    response = html_response("person.html", f"{person_url}?page=2")
    list(spider.parse_gallery(response, "emma_watson", person_url, page=2))
    list(spider.parse_gallery(html_response("person.html", person_url), "emma_watson", person_url, page=1))
    with caplog.at_level(logging.WARNING):
        spider._report_short_galleries()  # page 3 was promised but never gave photos
    assert spider.crawler.stats.get_value("theplace/galleries_short") == 1
    assert spider.crawler.stats.get_value("theplace/gallery_pages_missing") == 1
    assert "Gallery of emma_watson ended early: its pagination promised 3 pages, pages [3]" in caplog.text


def test_empty_or_cut_off_image_is_requested_again_then_journaled(tmp_path):
    spider = make_spider(tmp_path, {"RETRY_TIMES": 2, "RETRY_BACKOFF_BASE": 0.0})
    kwargs = {"identity": "emma_watson", "name": "Emma", "page_url": f"{BASE}/p.html", "image_url": f"{BASE}/a.jpg"}
    request = Request(f"{BASE}/a.jpg", meta={"kind": "image"}, cb_kwargs=kwargs)
    whole = jpeg(1000, 1000)
    for body, reason in ((b"", "empty_body"), (whole[: len(whole) // 2], "truncated_body")):
        (retry,) = spider.parse_image(Response(request.url, body=body, request=request), **kwargs)
        assert isinstance(retry, Request) and retry.url == request.url and retry.meta["retry_times"] == 1
        assert retry.dont_filter and spider.crawler.stats.get_value(f"retry/reason_count/{reason}") == 1
    spent = request.replace(meta={"kind": "image", "retry_times": 2})
    assert list(spider.parse_image(Response(request.url, body=b"", request=spent), **kwargs)) == []
    (item,) = spider.parse_image(Response(request.url, body=whole[:5000], request=spent), **kwargs)
    assert isinstance(item, PhotoItem)  # still cut off after every retry: the pipelines judge it (corrupt)
    (padded,) = spider.parse_image(Response(request.url, body=whole + b"\0\0", request=request), **kwargs)
    assert isinstance(padded, PhotoItem)
    spider.store.close()
    (failure,) = read_jsonl(tmp_path / "out" / "failures.jsonl")
    assert failure | {"time": ""} == {
        "url": f"{BASE}/a.jpg",
        "kind": "image",
        "status": 200,
        "reason": "empty_body",
        "detail": "",
        "time": "",
        "identity": "emma_watson",
        "page_url": f"{BASE}/p.html",
    }


def test_photo_page_yields_the_full_size_image(tmp_path):
    spider = make_spider(tmp_path)
    page_url = f"{BASE}/photos/emma_watson/pic-1118523.html"
    response = html_response("photo.html", page_url)
    (request,) = spider.parse_photo(response, identity="emma_watson", name="Emma", page_url=page_url)
    assert request.url == f"{BASE}/archive/emma_watson/img/emma_watson_1118523.jpg"
    assert request.callback == spider.parse_image and request.dont_filter
    assert request.cb_kwargs == {
        "identity": "emma_watson",
        "name": "Emma",
        "page_url": page_url,
        "image_url": request.url,
    }


def test_older_gallery_markup_still_matches(tmp_path):
    spider = make_spider(tmp_path)
    person_url = f"{BASE}/photos/emma_watson/"
    requests = list(spider.parse_gallery(html_response("person_older.html", person_url), "emma_watson", person_url))
    assert [r.url for r in requests] == [
        f"{BASE}/photos/emma_watson/pic-1000001.html",
        f"{BASE}/photos/emma_watson/pic-1000002.html",
    ]
    assert requests[0].cb_kwargs["name"] == "Эмма Уотсон"


def test_changed_layout_is_logged_and_counted(tmp_path, caplog):
    spider = make_spider(tmp_path)
    person_url = f"{BASE}/photos/emma_watson/"
    response = html_response("changed_layout.html", person_url)
    with caplog.at_level(logging.ERROR):
        assert list(spider.parse_gallery(response, "emma_watson", person_url)) == []
        assert list(spider.parse_photo(response, "emma_watson", "Emma", person_url)) == []
        assert list(spider.parse_index(response)) == []
    stats = spider.crawler.stats
    assert stats.get_value("theplace/pages_no_match") == 3
    assert stats.get_value("theplace/pages_no_match/gallery") == 1
    assert stats.get_value("theplace/pages_no_match/photo") == 1
    assert sum("Layout changed?" in r.message for r in caplog.records if r.levelno == logging.ERROR) == 3


def test_layout_change_from_the_start_stops_the_crawl(tmp_path):
    spider = make_spider(tmp_path, {"CRAWL_LAYOUT_ABORT_AFTER": 3})
    person_url = f"{BASE}/photos/emma_watson/"
    response = html_response("changed_layout.html", person_url)
    for _ in range(2):
        list(spider.parse_gallery(response, "emma_watson", person_url))
    with pytest.raises(CloseSpider) as closed:
        list(spider.parse_gallery(response, "emma_watson", person_url))
    assert closed.value.reason == "layout_changed"


def test_image_callback_yields_bytes_but_not_html(tmp_path):
    spider = make_spider(tmp_path)
    kwargs = {"identity": "emma_watson", "name": "Emma", "page_url": f"{BASE}/p.html", "image_url": f"{BASE}/a.jpg"}
    body = jpeg(1000, 1000)
    (item,) = spider.parse_image(Response(f"{BASE}/a.jpg", body=body), **kwargs)
    assert item == PhotoItem("emma_watson", "Emma", f"{BASE}/a.jpg", f"{BASE}/p.html", body)
    assert "body" not in repr(item)
    assert list(spider.parse_image(HtmlResponse(f"{BASE}/a.jpg", body=b"<html>busy</html>"), **kwargs)) == []
    assert spider.crawler.stats.get_value("theplace/failed/image/not_binary") == 1


def collect(agen) -> list:
    async def run() -> list:
        return [x async for x in agen]

    return asyncio.run(run())


def test_start_walks_the_index_or_the_given_persons(tmp_path):
    (index,) = collect(make_spider(tmp_path, base_url="http://127.0.0.1:8765/").start())
    assert index.url == "http://127.0.0.1:8765/photos/" and index.meta["kind"] == "index"
    slugs = tmp_path / "slugs.txt"
    slugs.write_text("# wanted\nemma_stone\nemma_watson  # again\n\n", encoding="utf-8")
    spider = make_spider(tmp_path, persons="emma_watson,eva_green", persons_file=str(slugs))
    assert [r.url for r in collect(spider.start())] == [
        f"{BASE}/photos/emma_watson/",
        f"{BASE}/photos/eva_green/",
        f"{BASE}/photos/emma_stone/",
    ]


def test_spider_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="base_url"):
        make_spider(tmp_path, base_url="ftp://www.theplace.ru")
    with pytest.raises(ValueError, match="site root"):
        make_spider(tmp_path, base_url="http://127.0.0.1:8765/mirror/")
    with pytest.raises(ValueError, match="persons"):
        parse_slugs("emma_watson,../../etc")
    with pytest.raises(ValueError, match="persons_file"):
        parse_slugs(None, str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="max_persons"):
        make_spider(tmp_path, max_persons="0")
