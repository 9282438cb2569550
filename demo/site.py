"""A local fake ThePlace site: the real page layout, generated JPEGs, and the traps a real crawl meets.

Used by the crawler's end-to-end tests, its benchmark and the project demo. Pages follow the current theplace.ru
markup (the selectors in :mod:`crawler.layout`): index ``/photos/`` -> letter pages -> person galleries
``/photos/<slug>/`` and ``?page=N`` -> photo pages -> images under ``/archive/<slug>/img/``.

Build a site from your own images with :meth:`DemoSite.from_identities` (``{slug: (display name, [JPEG
bytes])}``), or a synthetic one with :meth:`DemoSite.synthetic`, whose ``traps=True`` adds, on top of the good
photos: a gallery spanning several pages, images under 1000 px (one too narrow, one too short), one image served
under two URLs (two persons), a truncated JPEG, a JPEG whose header claims 20000x20000 px, an image that answers
404, one that answers 503 once and then 200, one that answers an empty body once and one that is cut off once
(both whole on the next request), an image URL that redirects to another host, off-site links, and a person that
robots.txt disallows. Gallery traps: the second person is linked as ``/photos/<slug>`` and redirected to
``/photos/<slug>/`` (whose pagination uses the slash form); persons from the third on are in the older layout
``/photos/gallery.php?id=<ID>`` (identity ``gallery-<ID>``); the first person's pagination promises one page more
than exists (404); every gallery shows other people's photos in a "similar people" block and in the sidebar, with
the same card markup as its own. Every photo carries its ``kind`` and every person its ``identity``, so tests can
derive what a crawl must keep.

Serve it with :class:`DemoServer` (a stdlib ``ThreadingHTTPServer`` on 127.0.0.1, free port by default)::

    with DemoServer(DemoSite.synthetic(persons=3, photos=12)) as server:
        ...  # crawl server.base_url; server.requests counts hits per path

or from the shell: ``python -m demo.site --port 8765 --persons 3 --photos 12``. "Other hosts" are
``http://localhost:<port>/offsite/...``: the same server under another host name, so an off-site request that
slipped through would show up in ``server.requests``.
"""

from __future__ import annotations

import argparse
import functools
import html
import io
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image, ImageDraw

#: What a crawl must do with each photo kind ("duplicate": one copy of the content is kept, see DemoSite docs).
KEPT_KINDS = frozenset({"ok", "flaky", "empty_once", "truncated_once"})
_SLUG = re.compile(r"[a-z0-9](?:[a-z0-9_.-]*[a-z0-9])?")

_FIRST = [
    "Anna",
    "Boris",
    "Clara",
    "Denis",
    "Elena",
    "Fedor",
    "Galina",
    "Igor",
    "Kira",
    "Lev",
    "Maria",
    "Nikita",
    "Olga",
    "Pavel",
    "Roza",
    "Sergey",
    "Tamara",
    "Viktor",
    "Yana",
    "Zoya",
]
_LAST = ["Primerova", "Testov", "Demidova", "Obraztsov", "Fiktivnaya", "Shablonov", "Vymyslova", "Uslovny"]
_GOOD_SIZES = [(1000, 1000), (1200, 1500), (1500, 1100), (1024, 1365), (1365, 1024)]


@functools.cache
def synthetic_jpeg(width: int, height: int, seed: int, quality: int = 80) -> bytes:
    """A cheap, unique-per-seed JPEG: a solid background and a few shapes (a few ms at 1000 px; cached)."""
    rng = random.Random(seed)

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    image = Image.new("RGB", (width, height), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randrange(width // 2), rng.randrange(height // 2)
        x1, y1 = x0 + rng.randrange(width // 8, width // 2), y0 + rng.randrange(height // 8, height // 2)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour())
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def claimed_size_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A small valid JPEG whose header (SOF0) claims ``width`` x ``height``: a decompression-bomb stand-in."""
    data = bytearray(synthetic_jpeg(64, 64, seed))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@dataclass(frozen=True)
class DemoPhoto:
    """One photo page and the image it shows.

    Attributes:
        slug: The person's slug.
        number: Position in the person's gallery (1-based).
        kind: ``ok``, ``small``, ``duplicate``, ``corrupt``, ``bomb``, ``missing`` (404), ``flaky`` (503 once),
            ``empty_once`` (an empty 200 once), ``truncated_once`` (the first half of the bytes once),
            ``offsite_redirect`` (image redirects to another host) or ``offsite_link`` (the thumbnail links off-site).
        page_path: Path of the photo page (for ``offsite_link``: the off-site URL's path).
        image_path: Path of the full-size image.
        body: Bytes served at ``image_path`` (None when nothing is served there).
    """

    slug: str
    number: int
    kind: str
    page_path: str
    image_path: str
    body: bytes | None = field(default=None, repr=False)


@dataclass
class DemoPerson:
    """A person and their gallery.

    Attributes:
        layout: ``current`` (``/photos/<slug>/``), ``no_slash`` (linked as ``/photos/<slug>``, which redirects to
            the slash form) or ``legacy`` (``/photos/gallery.php?id=<legacy_id>``, pages ``&page=N``).
        phantom_pages: Extra gallery pages the pagination links to that do not exist (404).
    """

    slug: str
    name: str
    photos: list[DemoPhoto]
    robots_disallowed: bool = False
    layout: str = "current"
    legacy_id: int = 0
    phantom_pages: int = 0

    @property
    def identity(self) -> str:
        """The identity a crawl must file this person's photos under."""
        return f"gallery-{self.legacy_id}" if self.layout == "legacy" else self.slug

    def page_path(self, number: int) -> str:
        """Path (with query) of gallery page ``number`` as the site serves and paginates it."""
        if self.layout == "legacy":
            base = f"/photos/gallery.php?id={self.legacy_id}"
            return base if number == 1 else f"{base}&page={number}"
        return f"/photos/{self.slug}/" + (f"?page={number}" if number > 1 else "")

    @property
    def link_path(self) -> str:
        """Path the letter page links to."""
        return f"/photos/{self.slug}" if self.layout == "no_slash" else self.page_path(1)


@dataclass
class _Route:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    first: _Route | None = None  # answered once per DemoServer.reset() before this route (503, empty, cut off)


class DemoSite:
    """The pages and images of a fake ThePlace, independent of where it is served.

    Args:
        persons: Persons in gallery order; slugs must be lowercase URL-safe (``a-z0-9._-``).
        per_page: Thumbnails per gallery page.
        offsite_links: Put links to another host on a letter page and in a gallery.
        similar_people: Show other people's photos on every gallery page (a "similar people" block beside the
            gallery and a sidebar), with the same card markup as the person's own.
    """

    def __init__(
        self,
        persons: Sequence[DemoPerson],
        *,
        per_page: int = 24,
        offsite_links: bool = False,
        similar_people: bool = False,
    ) -> None:
        if per_page < 1:
            raise ValueError(f"per_page must be >= 1, got {per_page}")
        for person in persons:
            if not _SLUG.fullmatch(person.slug):
                raise ValueError(f"slug {person.slug!r} must match {_SLUG.pattern}")
            if person.layout not in ("current", "no_slash", "legacy"):
                raise ValueError(f"person {person.slug}: unknown layout {person.layout!r}")
        self.persons = {person.slug: person for person in persons}
        self.per_page = per_page
        self.offsite_links = offsite_links
        self.similar_people = similar_people

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_identities(cls, identities: Mapping[str, tuple[str, Sequence[bytes]]], *, per_page: int = 24) -> DemoSite:
        """A site serving the given images: ``{slug: (display name, [JPEG bytes, ...])}``; no traps."""
        persons = [
            DemoPerson(slug, name, [_photo(slug, n, "ok", body) for n, body in enumerate(images, 1)])
            for slug, (name, images) in identities.items()
        ]
        return cls(persons, per_page=per_page)

    @classmethod
    def synthetic(
        cls, persons: int = 3, photos: int = 12, *, per_page: int = 5, traps: bool = True, seed: int = 0
    ) -> DemoSite:
        """Generated persons with ``photos`` good images each (>= 1000 px), plus the traps if ``traps``."""
        if persons < (2 if traps else 1) or photos < 1:
            raise ValueError("need persons >= 1 (>= 2 with traps) and photos >= 1")
        people: list[DemoPerson] = []
        for p in range(persons):
            name = f"{_FIRST[p % len(_FIRST)]} {_LAST[p % len(_LAST)]}"
            if p >= len(_FIRST):
                name += f" {p // len(_FIRST) + 1}"
            slug = name.lower().replace(" ", "_")
            items = []
            for n in range(1, photos + 1):
                width, height = _GOOD_SIZES[(p + n) % len(_GOOD_SIZES)]
                items.append(_photo(slug, n, "ok", synthetic_jpeg(width, height, seed * 1_000_003 + p * 10_007 + n)))
            people.append(DemoPerson(slug, name, items))
        if traps:
            first, second = people[0], people[1]
            base = seed * 1_000_003 + 999_000
            trap_bodies: list[tuple[str, bytes | None]] = [
                ("small", synthetic_jpeg(800, 1200, base + 1)),
                ("small", synthetic_jpeg(1200, 999, base + 2)),
                ("duplicate", second.photos[0].body),
                ("corrupt", synthetic_jpeg(1200, 1200, base + 3)[:9000]),
                ("bomb", claimed_size_jpeg(20000, 20000, base + 4)),
                ("missing", None),
                ("flaky", synthetic_jpeg(1100, 1300, base + 5)),
                ("empty_once", synthetic_jpeg(1300, 1100, base + 6)),
                ("truncated_once", synthetic_jpeg(1000, 1200, base + 7)),
                ("offsite_redirect", None),
                ("offsite_link", None),
            ]
            for kind, body in trap_bodies:
                first.photos.insert(len(first.photos) // 2, _photo(first.slug, len(first.photos) + 1, kind, body))
            blocked = DemoPerson(
                "robots_blocked",
                "Robots Blocked",
                [_photo("robots_blocked", n, "ok", synthetic_jpeg(1000, 1000, base + 10 + n)) for n in (1, 2)],
                robots_disallowed=True,
            )
            people.append(blocked)
            first.phantom_pages = 1
            second.layout = "no_slash"
            for number, person in enumerate(people[2:-1], 2):
                person.layout, person.legacy_id = "legacy", 1000 + number
        return cls(people, per_page=per_page, offsite_links=traps, similar_people=traps)

    # ---------------------------------------------------------------- rendering

    def routes(self, offsite_origin: str) -> dict[str, _Route]:
        """Every servable path (with query) -> its response; ``offsite_origin`` is the "other host"."""
        routes: dict[str, _Route] = {}
        disallowed = [p for p in self.persons.values() if p.robots_disallowed]
        robots = "User-agent: *\n" + "".join(f"Disallow: /photos/{p.slug}/\n" for p in disallowed)
        routes["/robots.txt"] = _Route(200, "text/plain; charset=utf-8", (robots or "Disallow:\n").encode())
        letters: dict[str, list[DemoPerson]] = {}
        for person in self.persons.values():
            letters.setdefault(person.slug[0], []).append(person)
        letter_links = "".join(f'<a href="/photos/letter/{c}/">{c.upper()}</a> ' for c in sorted(letters))
        routes["/photos/"] = _html("Фотографии знаменитостей", f'<div class="letters-list">{letter_links}</div>')
        for number, (letter, people) in enumerate(sorted(letters.items())):
            links = "".join(
                f'<div class="model-item"><a class="model-link" href="{html.escape(p.link_path)}">'
                f"{html.escape(p.name)}</a>"
                "</div>"
                for p in people
            )
            if self.offsite_links and number == 0:
                away = f"{offsite_origin}/offsite/photos/elsewhere/"
                links += f'<div class="model-item"><a href="{away}">Elsewhere</a></div>'
            routes[f"/photos/letter/{letter}/"] = _html(
                f"Знаменитости на {letter.upper()}", f'<div class="models_list">{links}</div>'
            )
        for person in self.persons.values():
            self._person_routes(person, routes, offsite_origin)
        return routes

    def _similar(self, person: DemoPerson) -> tuple[str, str]:
        """A "similar people" block and a sidebar with photo cards of the next crawlable person, or ``("", "")``."""
        others = [p for p in self.persons.values() if p is not person and not p.robots_disallowed and p.photos]
        if not self.similar_people or not others:
            return "", ""
        after = [p for p in others if list(self.persons).index(p.slug) > list(self.persons).index(person.slug)]
        other = (after or others)[0]
        cards = [
            '<div class="photos-pic-card"><a class="photos-pic-card__link" '
            f'href="{html.escape(photo.page_path)}"><img src="{photo.image_path.removesuffix(".jpg")}_s.jpg" '
            f'alt="{html.escape(other.name)}"></a></div>'
            for photo in other.photos
            if photo.kind == "ok"
        ][:2]
        block = f'<div class="similar-models"><h3>Похожие знаменитости</h3><div class="row">{cards[0]}</div></div>'
        return block, "".join(cards[1:]) or cards[0]

    def _person_routes(self, person: DemoPerson, routes: dict[str, _Route], offsite_origin: str) -> None:
        name = html.escape(person.name)
        pages = [person.photos[i : i + self.per_page] for i in range(0, len(person.photos), self.per_page)] or [[]]
        similar, sidebar = self._similar(person)
        promised = len(pages) + person.phantom_pages
        for number, photos in enumerate(pages, 1):
            cards = []
            for photo in photos:
                href = offsite_origin + photo.page_path if photo.kind == "offsite_link" else photo.page_path
                thumb = photo.image_path.removesuffix(".jpg") + "_s.jpg"
                cards.append(
                    '<div class="col-6 col-sm-6 col-md-6 col-lg-4 col-xl-3 pb-3"><div class="photos-pic-card">'
                    f'<a class="photos-pic-card__link" href="{html.escape(href)}"><img src="{thumb}" alt="{name}"></a>'
                    "</div></div>"
                )
            listalka = " ".join(
                f"<span>{n}</span>" if n == number else f'<a href="{html.escape(person.page_path(n))}">{n}</a>'
                for n in range(1, promised + 1)
            )
            if number < promised:
                listalka += f' <a href="{html.escape(person.page_path(number + 1))}">&raquo;</a>'
            body = (
                f'<h1 class="my-3">{name}</h1>'
                f'<div class="gallery-pics-list photos-pics-list"><div class="row">{"".join(cards)}</div></div>'
                f'<div class="listalka">{listalka}</div>{similar}'
            )
            routes[person.page_path(number)] = _html(f"{person.name} — фото", body, sidebar)
        if person.layout == "no_slash":
            routes[person.link_path] = _Route(301, "text/html", b"", {"Location": person.page_path(1)})
        for photo in person.photos:
            if photo.kind == "offsite_link":
                continue
            routes[photo.page_path] = _html(
                f"{person.name} — фото {photo.number}",
                f'<h1 class="my-3">{name}</h1><div class="content-wrapper"><div class="pic-big-box">'
                '<div class="pic-big-box__main"><span class="s-pic">'
                f'<img class="pic big_pic" src="{photo.image_path}" alt="{name}"></span></div></div></div>',
            )
            if photo.kind == "offsite_redirect":
                routes[photo.image_path] = _Route(
                    302, "text/html", b"", {"Location": f"{offsite_origin}/offsite{photo.image_path}"}
                )
            elif photo.body is not None:
                first = {
                    "flaky": _Route(503, "text/plain", b"try again"),
                    "empty_once": _Route(200, "image/jpeg", b""),
                    "truncated_once": _Route(200, "image/jpeg", photo.body[: len(photo.body) // 2]),
                }.get(photo.kind)
                routes[photo.image_path] = _Route(200, "image/jpeg", photo.body, first=first)

    @property
    def photo_count(self) -> int:
        return sum(len(p.photos) for p in self.persons.values())


def _photo(slug: str, number: int, kind: str, body: bytes | None) -> DemoPhoto:
    file = f"{slug}_{number:04d}"
    page = f"/photos/{slug}/pic-{number}.html"
    if kind == "offsite_link":
        page = "/offsite" + page
    return DemoPhoto(slug, number, kind, page, f"/archive/{slug}/img/{file}.jpg", body)


def _html(title: str, main: str, sidebar: str = "") -> _Route:
    page = (
        '<!DOCTYPE html><html lang="ru"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)} | ThePlace (demo)</title></head><body>"
        '<div class="container-xl container-main"><div class="row">'
        f'<div class="col-xl-9 col-lg-8 col-md-7 col-sm-12 main-col-content">{main}</div>'
        f'<div class="col-xl-3 col-lg-4 col-md-5 sidebar"><a href="/photos/">Все фото</a>{sidebar}</div>'
        "</div></div></body></html>"
    )
    return _Route(200, "text/html; charset=utf-8", page.encode("utf-8"))


class DemoServer:
    """Serve a :class:`DemoSite` on ``host:port`` (port 0: a free one) from a background thread.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. ``requests`` counts hits per path (with
    query) since the last :meth:`reset`, which also re-arms the 503 of flaky images.

    Args:
        site: What to serve.
        host: Address to bind; keep 127.0.0.1.
        port: Port to bind, 0 for any free port.
        image_latency: Seconds to wait before answering each image request (to slow a crawl down in tests).
    """

    def __init__(self, site: DemoSite, host: str = "127.0.0.1", port: int = 0, *, image_latency: float = 0.0) -> None:
        self.site = site
        self.host = host
        self.port = port
        self.image_latency = image_latency
        self.requests: Counter[str] = Counter()
        self.user_agents: Counter[str] = Counter()
        self._flaky_served: set[str] = set()
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> DemoServer:
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._routes = self.site.routes(offsite_origin=f"http://localhost:{self.port}")
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="demo-site", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget the request and User-Agent counts and re-arm the images' first answers (503, empty, cut off)."""
        with self._lock:
            self.requests.clear()
            self.user_agents.clear()
            self._flaky_served.clear()

    def respond(self, path: str, user_agent: str = "") -> _Route:
        """The response for a request path (thread-safe; counts the hit and the User-Agent)."""
        with self._lock:
            self.requests[path] += 1
            self.user_agents[user_agent] += 1
            route = self._routes.get(path)
            if route is not None and route.first is not None and path not in self._flaky_served:
                self._flaky_served.add(path)
                return route.first
        return route or _Route(404, "text/html; charset=utf-8", b"<h1>404</h1>")


def _make_handler(server: DemoServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "DemoThePlace/1.0"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            route = server.respond(self.path, self.headers.get("User-Agent", ""))
            if server.image_latency and route.content_type == "image/jpeg":
                time.sleep(server.image_latency)
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(route.body)))
            for key, value in route.headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(route.body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
            return

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m demo.site",
        description="Serve a fake ThePlace site with generated photos on 127.0.0.1 until Ctrl-C.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="port, 0 for any free one (default: %(default)s)")
    parser.add_argument("--persons", type=int, default=3, help="generated persons (default: %(default)s)")
    parser.add_argument("--photos", type=int, default=12, help="good photos per person (default: %(default)s)")
    parser.add_argument("--per-page", type=int, default=5, help="thumbnails per gallery page (default: %(default)s)")
    parser.add_argument(
        "--no-traps",
        dest="traps",
        action="store_false",
        help="only good photos: no small/corrupt/duplicate images, 404/503, off-site links",
    )
    parser.add_argument("--seed", type=int, default=0, help="changes every generated image (default: %(default)s)")
    args = parser.parse_args(argv)
    site = DemoSite.synthetic(args.persons, args.photos, per_page=args.per_page, traps=args.traps, seed=args.seed)
    with DemoServer(site, host=args.host, port=args.port) as server:
        print(f"Demo ThePlace with {len(site.persons)} persons, {site.photo_count} photos at {server.base_url}/photos/")
        print(f"Crawl it: python -m crawler --base-url {server.base_url} --out /tmp/demo-crawl --no-polite", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopped")


if __name__ == "__main__":
    main()
