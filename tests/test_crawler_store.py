"""The image checks, the check / dedupe / store pipelines and the crash-safe store."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json

import pytest
from crawler_helpers import BASE, jpeg, make_spider
from PIL import Image
from scrapy.exceptions import DropItem

from crawler.items import PhotoItem
from crawler.pipelines import DedupPipeline, ImageCheckPipeline, ImageRejected, StorePipeline, inspect_image
from crawler.spiders.theplace import TheplaceSpider
from crawler.store import Store, read_jsonl
from demo.site import claimed_size_jpeg, synthetic_jpeg

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
