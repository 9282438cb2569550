"""End-to-end tests: the real spider, run as ``python -m crawler`` in a subprocess, against the fake ThePlace of
``demo.site`` served on 127.0.0.1 (several gallery pages, small images, a duplicate under two URLs, a
corrupt JPEG, a decompression bomb, a 404, a 503-then-200, an empty and a cut-off body that are whole the second
time, robots.txt, off-site links and redirects; a person link that redirects to its slash form, two persons in the
older ``gallery.php?id=`` layout, other people's photos beside every gallery, pagination promising a missing page).

Includes the resume test: a crawl killed with SIGKILL midway, restarted with the same command, must fetch no
stored image again and end with byte-identical manifest, rejects and persons files to an uninterrupted crawl.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from crawler.store import read_jsonl
from demo.site import KEPT_KINDS, DemoServer, DemoSite

ROOT = Path(__file__).resolve().parent.parent
SITE = DemoSite.synthetic(persons=4, photos=12, per_page=5)
FAST = ["--download-delay", "0", "--no-autothrottle", "--retry-backoff", "0.05", "--log-level", "INFO"]


def crawl_command(base_url: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "crawler", "--base-url", base_url, "--out", str(out), *FAST, *extra]


def crawl(base_url: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        crawl_command(base_url, out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def expected_manifest(site: DemoSite, base_url: str) -> list[dict]:
    """What the crawl must keep: every readable full-size photo of a crawlable person, each content once, the copy
    with the smallest (identity, image_url, page_url) winning."""
    kept: dict[str, dict] = {}
    for person in site.persons.values():
        if person.robots_disallowed:
            continue
        for photo in person.photos:
            if photo.kind not in KEPT_KINDS | {"duplicate"}:
                continue
            sha = hashlib.sha256(photo.body).hexdigest()
            with Image.open(io.BytesIO(photo.body)) as image:
                width, height = image.size
            record = {
                "identity": person.identity,
                "name": person.name,
                "image_url": base_url + photo.image_path,
                "page_url": base_url + photo.page_path,
                "path": f"images/{person.identity}/{sha}.jpg",
                "width": width,
                "height": height,
                "sha256": sha,
            }
            key = (record["identity"], record["image_url"], record["page_url"])
            if sha not in kept or key < (kept[sha]["identity"], kept[sha]["image_url"], kept[sha]["page_url"]):
                kept[sha] = record
    return sorted(kept.values(), key=lambda r: (r["identity"], r["image_url"], r["page_url"]))


@pytest.fixture(scope="module")
def server():
    with DemoServer(SITE) as running:
        yield running


@pytest.fixture(scope="module")
def clean_run(server, tmp_path_factory):
    """One uninterrupted crawl of the demo site: (OUT, finished process, requests the server saw)."""
    out = tmp_path_factory.mktemp("clean") / "out"
    server.reset()
    result = crawl(server.base_url, out, "--concurrency", "8")
    return out, result, Counter(server.requests), Counter(server.user_agents)


def test_crawl_keeps_exactly_the_expected_images(server, clean_run):
    out, result, _, _ = clean_run
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = list(read_jsonl(out / "manifest.jsonl"))
    assert manifest == expected_manifest(SITE, server.base_url)
    # the 503-then-200, empty-once and cut-off-once images are kept too; the duplicate is kept once
    assert len(manifest) == 4 * 12 + 3
    first, second, third, fourth = list(SITE.persons.values())[:4]
    assert second.layout == "no_slash" and third.layout == fourth.layout == "legacy"
    assert Counter(r["identity"] for r in manifest) == {
        first.slug: 16,  # 12 + 3 retried ones + the copy of a photo of second (its key sorts first)
        second.slug: 11,  # all pages, though the person link redirects to the slash form
        "gallery-1002": 12,  # older gallery.php?id= persons stay apart
        "gallery-1003": 12,
    }
    for record in manifest:
        assert hashlib.sha256((out / record["path"]).read_bytes()).hexdigest() == record["sha256"]
    stored = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()}
    assert stored == {record["path"] for record in manifest}
    assert not (out / ".partial").exists()


def test_crawl_counts_rejects_per_reason_and_lists_persons(clean_run):
    out, result, _, _ = clean_run
    rejects = Counter(r["reason"] for r in read_jsonl(out / "rejects.jsonl"))
    assert rejects == {"too_small": 2, "corrupt": 1, "too_many_pixels": 1, "duplicate": 1}
    assert "rejected corrupt=1, duplicate=1, too_many_pixels=1, too_small=2" in result.stderr
    persons = {row["identity"]: row for row in read_jsonl(out / "persons.jsonl")}
    first, second = (p.slug for p in list(SITE.persons.values())[:2])
    expected = {first: 13 + 1 + 2, second: 11, "gallery-1002": 12, "gallery-1003": 12}
    assert {k: v["photos"] for k, v in persons.items()} == expected
    assert persons[first]["rejected"] == {"corrupt": 1, "too_many_pixels": 1, "too_small": 2}
    assert persons[second]["rejected"] == {"duplicate": 1}
    assert all(row["min_photos"] == 100 and not row["meets_min_photos"] for row in persons.values())


def test_crawl_is_polite_and_stays_on_site(clean_run):
    _, result, requests, user_agents = clean_run
    assert requests["/robots.txt"] == 1
    assert not [path for path in requests if path.startswith("/offsite/")]  # links and a redirect to localhost
    assert not [path for path in requests if path.startswith(("/photos/robots_blocked/", "/archive/robots_blocked/"))]
    assert not [path for path in requests if path.endswith("_s.jpg")]  # thumbnails are never fetched
    first = next(iter(SITE.persons.values()))
    by_kind = {photo.kind: photo for photo in first.photos}
    assert requests[by_kind["flaky"].image_path] == 2  # 503, retried after a backoff, then 200
    assert requests[by_kind["empty_once"].image_path] == 2  # an empty body is asked again
    assert requests[by_kind["truncated_once"].image_path] == 2  # so is a JPEG without its end marker
    assert requests[by_kind["missing"].image_path] == 1  # a 404 is not retried
    photo_pages = [
        p.page_path
        for person in SITE.persons.values()
        if not person.robots_disallowed
        for p in person.photos
        if p.kind != "offsite_link"
    ]
    assert all(requests[path] == 1 for path in photo_pages)
    assert list(user_agents) == ["BoLID-crawler/0.1 (research dataset crawler; obeys robots.txt; 1 request at a time)"]
    assert "Forbidden by robots.txt" in result.stderr and "Refused redirect off" in result.stderr


def test_killed_crawl_resumes_to_the_same_result(server, clean_run, tmp_path):
    clean_out = clean_run[0]
    out = tmp_path / "out"
    server.reset()
    server.image_latency = 0.1  # slow enough to be killed midway
    process = subprocess.Popen(
        crawl_command(server.base_url, out, "--concurrency", "2"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while len(list((out / "images").glob("*/*.jpg"))) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "the crawl ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        server.image_latency = 0.0
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    stored = {p.relative_to(out).as_posix(): p for p in (out / "images").rglob("*") if p.is_file()}
    assert len(stored) >= 8
    for path in stored.values():  # no half-written image: every file is complete under its content hash
        assert path.suffix == ".jpg" and hashlib.sha256(path.read_bytes()).hexdigest() == path.stem
    journal = list(read_jsonl(out / "manifest.jsonl"))
    assert {r["path"] for r in journal} >= set(stored)  # every stored file has its manifest line
    stored_urls = {r["image_url"] for r in journal if r["path"] in stored}

    server.reset()
    result = crawl(server.base_url, out, "--concurrency", "8")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Resuming in" in result.stderr
    refetched = [url for url in stored_urls if server.requests[urlsplit(url).path]]
    assert refetched == []
    for name in ("manifest.jsonl", "rejects.jsonl", "persons.jsonl"):
        assert (out / name).read_bytes() == (clean_out / name).read_bytes(), name
    assert sorted(p.relative_to(out) for p in (out / "images").rglob("*.jpg")) == sorted(
        p.relative_to(clean_out) for p in (clean_out / "images").rglob("*.jpg")
    )


class RedesignedSite(DemoSite):
    """The demo site after a markup change: gallery cards and the big image have new class names."""

    def routes(self, offsite_origin: str):
        routes = super().routes(offsite_origin)
        for route in routes.values():
            if route.content_type.startswith("text/html"):
                route.body = (
                    route.body.replace(b"photos-pic-card__link", b"photo-grid__href")
                    .replace(b"gallery-pics-list", b"photo-grid")
                    .replace(b"pic big_pic", b"photo-full")
                )
        return routes


def test_layout_change_fails_loudly(tmp_path):
    site = RedesignedSite(list(DemoSite.synthetic(persons=2, photos=3).persons.values()), per_page=5)
    with DemoServer(site) as redesigned:
        result = crawl(redesigned.base_url, tmp_path / "out")
    assert result.returncode == 1
    assert "Layout changed? No photo links matched on gallery page" in result.stderr
    assert "'theplace/pages_no_match': 2" in result.stderr
    assert "Nothing kept" in result.stderr
    assert list(read_jsonl(tmp_path / "out" / "manifest.jsonl")) == []


def test_readme_flow_demo_site_cli_then_crawl_cli(tmp_path):
    demo = subprocess.Popen(
        [sys.executable, "-m", "demo.site", "--port", "0", "--persons", "2", "--photos", "3"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        banner = demo.stdout.readline()
        base_url = banner.split(" at ", 1)[1].removesuffix("/photos/\n")
        out = tmp_path / "out"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "crawler",
                "--base-url",
                base_url,
                "--out",
                str(out),
                "--no-polite",
                "--retry-backoff",
                "0.05",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        demo.terminate()
        demo.wait(timeout=30)
    assert result.returncode == 0, result.stderr[-4000:]
    expected = expected_manifest(DemoSite.synthetic(persons=2, photos=3), base_url)
    assert list(read_jsonl(out / "manifest.jsonl")) == expected


def test_cli_rejects_bad_arguments(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "crawler", "--out", str(tmp_path), "--persons", "../etc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "persons" in result.stderr


def test_response_size_cap_aborts_large_downloads(server, tmp_path):
    person = list(SITE.persons.values())[1]
    cap = 30_000
    small_enough = {server.base_url + p.image_path for p in person.photos if len(p.body) <= cap}
    assert 0 < len(small_enough) < len(person.photos)
    result = crawl(server.base_url, tmp_path / "out", "--persons", person.slug, "--max-response-size", str(cap))
    assert result.returncode == 0, result.stderr[-4000:]
    assert {r["image_url"] for r in read_jsonl(tmp_path / "out" / "manifest.jsonl")} == small_enough
    assert f"'theplace/failed': {len(person.photos) - len(small_enough)}" in result.stderr


def test_galleries_are_followed_through_redirects_and_older_urls(server, clean_run):
    _, result, requests, _ = clean_run
    first, second, third, fourth = list(SITE.persons.values())[:4]
    # /photos/<second> answers 301 to /photos/<second>/, whose pagination links use the slash form
    assert requests[second.link_path] == 1
    assert all(requests[second.page_path(n)] == 1 for n in (1, 2, 3))
    for person in (third, fourth):  # /photos/gallery.php?id=<ID>&page=N, one identity each
        assert all(requests[person.page_path(n)] == 1 for n in (1, 2, 3))
    assert "'theplace/person_links_unrecognised'" not in result.stderr


def test_failed_images_are_journaled_and_short_galleries_counted(server, clean_run):
    out, result, _, _ = clean_run
    failures = list(read_jsonl(out / "failures.jsonl"))
    first = next(iter(SITE.persons.values()))
    by_kind = {photo.kind: photo for photo in first.photos}
    found = {
        (urlsplit(f["url"]).path + (f"?{urlsplit(f['url']).query}" if urlsplit(f["url"]).query else "")): f
        for f in failures
    }
    assert found[by_kind["missing"].image_path] | {"time": ""} == {
        "url": server.base_url + by_kind["missing"].image_path,
        "kind": "image",
        "status": 404,
        "reason": "http_404",
        "detail": found[by_kind["missing"].image_path]["detail"],
        "time": "",
        "identity": first.identity,
        "page_url": server.base_url + by_kind["missing"].page_path,
    }
    assert found[by_kind["offsite_redirect"].image_path.replace("/archive", "/offsite/archive")]["reason"] == "ignored"
    phantom = first.page_path(len(first.photos) // SITE.per_page + 2)
    assert found[phantom]["kind"] == "gallery" and found[phantom]["status"] == 404
    assert all(f["time"].endswith("Z") for f in failures)
    # images whose first answer was 503, empty or cut off are kept, not failures
    assert not {by_kind[k].image_path for k in ("flaky", "empty_once", "truncated_once")} & set(found)
    assert "robots.txt" in found["/photos/robots_blocked/"]["detail"]
    assert len(failures) == 4
    assert "'theplace/galleries_short': 1" in result.stderr and "'theplace/gallery_pages_missing': 1" in result.stderr
    assert f"Gallery of {first.identity} ended early" in result.stderr


def test_max_photos_per_person_stops_paginating(server, tmp_path):
    person = list(SITE.persons.values())[1]
    server.reset()
    result = crawl(server.base_url, tmp_path / "out", "--persons", person.slug, "--max-photos-per-person", "3")
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list(read_jsonl(tmp_path / "out" / "manifest.jsonl"))) == 3
    assert server.requests[person.page_path(1)] == 1
    assert [path for path in server.requests if path.startswith(person.page_path(1) + "?page=")] == []
    assert "galleries_short" not in result.stderr
