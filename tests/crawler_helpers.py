"""Helpers shared by the crawler's offline tests: pinned HTML responses, a spider, and test JPEGs."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from scrapy import Request
from scrapy.http import HtmlResponse
from scrapy.utils.test import get_crawler

from crawler.spiders.theplace import TheplaceSpider
from demo.site import synthetic_jpeg

ROOT = Path(__file__).resolve().parents[1]
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
