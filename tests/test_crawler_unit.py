"""Offline tests of the crawler: spider callbacks on pinned HTML (tests/fixtures/crawler/), the image checks,
the content-hash dedupe, the crash-safe store, the middlewares, the YAML config and the demo site's content."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from scrapy import Request
from scrapy.exceptions import CloseSpider, DropItem, IgnoreRequest
from scrapy.http import HtmlResponse, Response
from scrapy.utils.test import get_crawler

from crawler import layout
from crawler.__main__ import build_parser, config_from_args
from crawler.config import DEFAULT_CONFIG, CrawlConfig
from crawler.items import PhotoItem
from crawler.middlewares import RETRY_AFTER_MAX, BackoffRetryMiddleware, StayOnSiteMiddleware
from crawler.pipelines import DedupPipeline, ImageCheckPipeline, ImageRejected, StorePipeline, inspect_image
from crawler.spiders.theplace import TheplaceSpider, parse_slugs
from crawler.store import Store, read_jsonl, safe_identity
from demo.site import DemoSite, claimed_size_jpeg, synthetic_jpeg

FIXTURES = Path(__file__).parent / "fixtures" / "crawler"
BASE = "https://www.theplace.ru"


def html_response(name: str, url: str, **cb_kwargs: object) -> HtmlResponse:
    request = Request(url, cb_kwargs=dict(cb_kwargs))
    return HtmlResponse(url=url, body=(FIXTURES / name).read_bytes(), encoding="utf-8", request=request)


def make_spider(tmp_path: Path, settings: dict | None = None, **kwargs: object) -> TheplaceSpider:
    base = {"CRAWL_OUT": str(tmp_path / "out"), "CRAWL_FSYNC": False}
    crawler = get_crawler(TheplaceSpider, {**base, **(settings or {})})
    spider = TheplaceSpider.from_crawler(crawler, **kwargs)
    crawler.spider = spider
    return spider


def jpeg(width: int, height: int, seed: int = 1, exif_orientation: int | None = None) -> bytes:
    if exif_orientation is None:
        return synthetic_jpeg(width, height, seed)
    image = Image.open(io.BytesIO(synthetic_jpeg(width, height, seed)))
    exif = Image.Exif()
    exif[0x0112] = exif_orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80, exif=exif.tobytes())
    return out.getvalue()


# ------------------------------------------------------------------ spider callbacks on pinned HTML


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
    # page 1 is the person URL itself; page 3 is linked twice; the other person's page is not followed
    assert [r.url for r in pages] == [person_url, f"{person_url}?page=3", f"{person_url}?page=3"]
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


# ------------------------------------------------------------------ staying on the site, safe names


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


# ------------------------------------------------------------------ image checks


def test_inspect_image_accepts_full_size_jpegs():
    limits = {"min_width": 1000, "min_height": 1000, "max_pixels": 50_000_000}
    assert inspect_image(jpeg(1000, 1000), **limits) == (1000, 1000)
    assert inspect_image(jpeg(1500, 1100), **limits) == (1500, 1100)
    assert inspect_image(jpeg(1100, 1400, exif_orientation=6), **limits) == (1400, 1100)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (synthetic_jpeg(999, 1200, 2), "too_small"),
        (synthetic_jpeg(1200, 800, 3), "too_small"),
        (synthetic_jpeg(1200, 1200, 4)[:9000], "corrupt"),
        (claimed_size_jpeg(20000, 20000), "too_many_pixels"),
        (claimed_size_jpeg(8000, 8000), "too_many_pixels"),
        (b"<html>not an image</html>", "not_an_image"),
        (b"", "not_an_image"),
    ],
)
def test_inspect_image_rejects(body, reason):
    with pytest.raises(ImageRejected) as caught:
        inspect_image(body, min_width=1000, min_height=1000, max_pixels=50_000_000)
    assert caught.value.reason == reason


def test_inspect_image_rejects_png_and_rotated_small():
    png = io.BytesIO()
    Image.new("RGB", (1200, 1200)).save(png, "PNG")
    with pytest.raises(ImageRejected, match="not_jpeg"):
        inspect_image(png.getvalue(), min_width=1000, min_height=1000, max_pixels=50_000_000)
    with pytest.raises(ImageRejected, match="too_small"):  # stored 1200x900, displayed 900x1200
        inspect_image(jpeg(1200, 900, exif_orientation=6), min_width=1000, min_height=900, max_pixels=10**8)


# ------------------------------------------------------------------ pipelines and the store


def run_pipelines(spider: TheplaceSpider, item: PhotoItem) -> PhotoItem:
    for cls in (ImageCheckPipeline, DedupPipeline):
        item = cls.from_crawler(spider.crawler).process_item(item)
    return asyncio.run(StorePipeline.from_crawler(spider.crawler).process_item(item))  # returns once written


def photo(identity: str, n: int, body: bytes) -> PhotoItem:
    return PhotoItem(
        identity,
        identity.title(),
        f"{BASE}/archive/{identity}/img/{n}.jpg",
        f"{BASE}/photos/{identity}/pic-{n}.html",
        body,
    )


def test_pipelines_store_check_and_dedupe(tmp_path):
    spider = make_spider(tmp_path)
    good, other = jpeg(1000, 1200, 10), jpeg(1300, 1000, 11)
    kept = run_pipelines(spider, photo("bob", 1, good))
    assert kept.body == b"" and kept.width == 1000 and kept.height == 1200
    out = tmp_path / "out"
    assert (out / kept.path).read_bytes() == good
    run_pipelines(spider, photo("bob", 2, other))
    with pytest.raises(DropItem, match="too_small"):
        run_pipelines(spider, photo("bob", 3, jpeg(900, 1200, 12)))
    with pytest.raises(DropItem, match="duplicate"):  # same bytes, larger key ("bob", .../4.jpg)
        run_pipelines(spider, photo("bob", 4, good))
    spider.closed("finished")
    manifest = list(read_jsonl(out / "manifest.jsonl"))
    assert [(m["image_url"], m["width"], m["height"]) for m in manifest] == [
        (f"{BASE}/archive/bob/img/1.jpg", 1000, 1200),
        (f"{BASE}/archive/bob/img/2.jpg", 1300, 1000),
    ]
    assert [(r["page_url"].rsplit("/", 1)[1], r["reason"]) for r in read_jsonl(out / "rejects.jsonl")] == [
        ("pic-3.html", "too_small"),
        ("pic-4.html", "duplicate"),
    ]
    (person,) = read_jsonl(out / "persons.jsonl")
    assert person["photos"] == 2 and person["rejected"] == {"duplicate": 1, "too_small": 1}
    stats = spider.crawler.stats
    assert stats.get_value("images/kept") == 2
    assert stats.get_value("images/rejected/too_small") == 1 and stats.get_value("images/rejected/duplicate") == 1


def test_duplicate_with_smaller_key_takes_over_the_stored_file(tmp_path):
    spider = make_spider(tmp_path)
    body = jpeg(1000, 1000, 20)
    later = run_pipelines(spider, photo("zoe", 1, body))  # arrives first, but sorts after "anna"
    run_pipelines(spider, photo("anna", 7, body))
    out = tmp_path / "out"
    assert not (out / later.path).exists()
    spider.closed("finished")
    (record,) = read_jsonl(out / "manifest.jsonl")
    assert record["identity"] == "anna" and (out / record["path"]).read_bytes() == body
    (reject,) = read_jsonl(out / "rejects.jsonl")
    assert reject["identity"] == "zoe" and reject["reason"] == "duplicate"


def test_store_resumes_from_a_killed_run(tmp_path):
    out = tmp_path / "out"
    store = Store(out, fsync=False)
    store.open()
    first, second = photo("bob", 1, jpeg(1000, 1000, 30)), photo("bob", 2, jpeg(1000, 1000, 31))
    for item in (first, second):  # the fields ImageCheckPipeline and DedupPipeline fill in
        item.width = item.height = 1000
        item.sha256 = hashlib.sha256(item.body).hexdigest()
        item.path = f"images/bob/{item.sha256}.jpg"
    store.keep(first)
    store.flush()
    # Simulate a SIGKILL while storing the second image: its manifest line is out, the rename never happened,
    # a temp file is left over, and the journal ends in a torn line.
    (out / ".partial" / "leftover.tmp").write_bytes(second.body[:100])
    with (out / "manifest.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(second.record()) + "\n" + '{"identity": "bob", "na')
    resumed = Store(out, fsync=False)
    resumed.open()
    assert resumed.is_done("bob", first.page_url) and not resumed.is_done("bob", second.page_url)
    assert resumed.kept_total == 1 and not (out / ".partial" / "leftover.tmp").exists()
    assert [m["sha256"] for m in read_jsonl(out / "manifest.jsonl")] == [first.sha256]
    resumed.keep(second)
    resumed.close()
    assert len(list(read_jsonl(out / "manifest.jsonl"))) == 2


def test_store_finishes_an_interrupted_takeover(tmp_path):
    out = tmp_path / "out"
    body = jpeg(1000, 1000, 40)
    sha = hashlib.sha256(body).hexdigest()
    old, new = photo("zoe", 1, body), photo("anna", 1, body)
    for item in (old, new):
        item.sha256, item.width, item.height = sha, 1000, 1000
        item.path = f"images/{item.identity}/{sha}.jpg"
    store = Store(out, fsync=False)
    store.open()
    store.keep(old)
    store.close()
    with (out / "manifest.jsonl").open("a", encoding="utf-8") as fh:  # killed after journaling the takeover
        fh.write(json.dumps(new.record()) + "\n")
    resumed = Store(out, fsync=False)
    resumed.open()
    resumed.close()
    assert (out / new.path).read_bytes() == body and not (out / old.path).exists()
    assert [m["identity"] for m in read_jsonl(out / "manifest.jsonl")] == ["anna"]
    assert [(r["identity"], r["reason"]) for r in read_jsonl(out / "rejects.jsonl")] == [("zoe", "duplicate")]


def test_store_stops_writing_after_a_disk_error(tmp_path):
    out = tmp_path / "out"
    store = Store(out, fsync=False)
    store.open()
    (out / "images" / "bob").write_bytes(b"a file where the folder should be")  # makes the rename fail
    item = photo("bob", 1, jpeg(1000, 1000, 60))
    item.sha256, item.width, item.height = hashlib.sha256(item.body).hexdigest(), 1000, 1000
    item.path = f"images/bob/{item.sha256}.jpg"
    store.keep(item)
    store.flush()
    assert isinstance(store.write_error, OSError)
    with pytest.raises(OSError):
        store.reject(photo("bob", 2, b""), "too_small")
    store.close()
    assert list(read_jsonl(out / "manifest.jsonl")) == []


def test_persons_file_lists_persons_without_photos(tmp_path):
    store = Store(tmp_path / "out", min_photos=1, fsync=False)
    store.open()
    store.note_person("nobody", "No Photos", f"{BASE}/photos/nobody/")
    store.close()
    assert list(read_jsonl(tmp_path / "out" / "persons.jsonl")) == [
        {
            "identity": "nobody",
            "name": "No Photos",
            "url": f"{BASE}/photos/nobody/",
            "photos": 0,
            "rejected": {},
            "min_photos": 1,
            "meets_min_photos": False,
        }
    ]


# ------------------------------------------------------------------ config and command line


def test_every_crawl_yaml_parses():
    config = CrawlConfig.from_yaml(DEFAULT_CONFIG)
    assert config == CrawlConfig()  # the YAML states the dataclass defaults
    impolite = config.impolite()
    assert impolite.download_delay == 0 and not impolite.autothrottle and impolite.concurrent_requests_per_domain == 16


def test_defaults_are_polite_and_the_yaml_agrees_with_the_settings_module():
    from crawler import settings

    assert settings.ROBOTSTXT_OBEY and settings.AUTOTHROTTLE_ENABLED
    assert settings.CONCURRENT_REQUESTS_PER_DOMAIN == 1 and settings.DOWNLOAD_DELAY >= 1
    assert 429 in settings.RETRY_HTTP_CODES and 503 in settings.RETRY_HTTP_CODES
    assert "BoLID" in settings.USER_AGENT
    from_yaml = CrawlConfig.from_yaml(DEFAULT_CONFIG).scrapy_settings()
    for key, value in from_yaml.items():
        if key not in ("AUTOTHROTTLE_START_DELAY", "DOWNLOAD_WARNSIZE", "CRAWL_OUT"):
            assert getattr(settings, key) == value, key


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"min_widht": 10}, "unknown key"),
        ({"base_url": "www.theplace.ru"}, "base_url"),
        ({"min_width": 0}, "min_width"),
        ({"min_width": "1000"}, "min_width must be int"),
        ({"max_persons": 0}, "max_persons"),
        ({"download_delay": -1}, "download_delay"),
        ({"autothrottle": "yes"}, "autothrottle"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"max_image_pixels": 10}, "max_image_pixels"),
    ],
)
def test_bad_config_values_name_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        CrawlConfig.from_dict(data)


def test_flags_override_the_yaml():
    args = build_parser().parse_args(
        [
            "--out",
            "/tmp/x",
            "--base-url",
            "http://127.0.0.1:8765",
            "--persons",
            "a,b",
            "--min-size",
            "512",
            "--min-height",
            "600",
            "--no-polite",
            "--max-photos-per-person",
            "5",
            "--no-fsync",
        ]
    )
    config = config_from_args(args)
    assert (config.out, config.persons, config.min_width, config.min_height) == ("/tmp/x", ["a", "b"], 512, 600)
    assert config.download_delay == 0 and not config.autothrottle and not config.fsync
    assert config.spider_kwargs()["max_photos_per_person"] == 5
    settings = config.scrapy_settings()
    assert settings["CRAWL_OUT"] == "/tmp/x" and settings["CRAWL_MIN_HEIGHT"] == 600


# ------------------------------------------------------------------ demo site content


def test_demo_site_has_every_trap_and_real_layout():
    site = DemoSite.synthetic(persons=3, photos=12, per_page=5)
    kinds = [p.kind for person in site.persons.values() for p in person.photos]
    for kind in ("small", "duplicate", "corrupt", "bomb", "missing", "flaky", "offsite_redirect", "offsite_link"):
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


def test_a_second_crawl_cannot_open_the_same_out(tmp_path):
    import subprocess
    import sys

    from crawler.store import Store

    probe = f"from crawler.store import Store; Store({str(tmp_path / 'out')!r}).open()"
    first = Store(tmp_path / "out")
    first.open()
    try:  # another process (a second crawl) is refused while the first holds OUT
        other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert other.returncode != 0 and "in use by another crawl" in other.stderr
    finally:
        first.close()
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0  # released


def test_no_polite_is_refused_for_a_remote_site(capsys):
    from crawler.__main__ import main as crawl_main

    with pytest.raises(SystemExit) as info:
        crawl_main(["--base-url", "https://www.theplace.ru", "--no-polite", "--out", "/tmp/never-used"])
    assert info.value.code == 2 and "only for a site served from this machine" in capsys.readouterr().err
