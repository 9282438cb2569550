"""Command line: ``python -m crawler`` runs the ``theplace`` spider (defaults: :class:`crawler.config.CrawlConfig`).

Flags override the YAML (each flag is a YAML key; ``--help`` lists them). Exit status: 0 when the crawl finished,
every page matched the layout and OUT holds at least one image; 1 when it stopped early, some page matched no
selector, or nothing was kept; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from urllib.parse import urlsplit

from crawler.config import CrawlConfig

DEFAULTS = CrawlConfig()  # one source of the defaults (crawler.settings), quoted in --help

EPILOG = """\
examples:
  python -m crawler --out data/crawl --persons emma_watson,johnny_depp
  python -m crawler --out data/crawl --persons-file persons.txt --max-photos-per-person 300
  python -m demo.site --port 8765 &   # a local fake site, then:
  python -m crawler --base-url http://127.0.0.1:8765 --out /tmp/demo-crawl --no-polite

Output (OUT): images/<identity>/<sha256>.jpg, manifest.jsonl, rejects.jsonl, persons.jsonl, failures.jsonl.
A killed crawl resumes from OUT when started again with the same command.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m crawler",
        description="Crawl ThePlace celebrity galleries into OUT: full-size photos (>= min size), deduplicated by "
        "content, with a manifest. Polite by default (robots.txt, 1 request at a time, delay + AutoThrottle).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", help="YAML of settings (keys as configs/crawl/theplace.yaml); default: the built-in defaults"
    )
    what = p.add_argument_group("what to crawl")
    what.add_argument(
        "--base-url", help="site root, e.g. https://www.theplace.ru or a local copy http://127.0.0.1:8765"
    )
    what.add_argument("--persons", help="comma-separated person slugs (/photos/<slug>/); default: the letter index")
    what.add_argument("--persons-file", help="file with one person slug per line (# comments allowed)")
    what.add_argument("--max-persons", type=int, help="stop discovering persons after N")
    what.add_argument(
        "--max-photos-per-person", type=int, help="open at most N photo pages per person, then stop paginating"
    )
    keep = p.add_argument_group("what to keep")
    keep.add_argument("--out", help="output folder")
    keep.add_argument("--min-size", type=int, metavar="PX", help="minimum width and height in pixels")
    keep.add_argument(
        "--min-width", type=int, metavar="PX", help=f"minimum width in pixels (default {DEFAULTS.min_width})"
    )
    keep.add_argument(
        "--min-height", type=int, metavar="PX", help=f"minimum height in pixels (default {DEFAULTS.min_height})"
    )
    keep.add_argument(
        "--min-photos", type=int, help=f"per-person target reported in persons.jsonl (default {DEFAULTS.min_photos})"
    )
    keep.add_argument(
        "--max-image-pixels",
        type=int,
        help=f"reject images with more pixels, from the header (default {DEFAULTS.max_image_pixels})",
    )
    keep.add_argument("--max-response-size", type=int, metavar="BYTES", help="abort larger responses")
    polite = p.add_argument_group("politeness")
    polite.add_argument("--user-agent", help="User-Agent header (say who you are)")
    polite.add_argument("--download-delay", type=float, metavar="S", help="seconds between requests to the site")
    polite.add_argument(
        "--autothrottle",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="adapt the delay to the server's latency",
    )
    polite.add_argument(
        "--concurrency",
        type=int,
        dest="concurrent_requests_per_domain",
        metavar="N",
        help=f"requests in flight to the site at once (default {DEFAULTS.concurrent_requests_per_domain})",
    )
    polite.add_argument("--retry-times", type=int, help="retries of 429/5xx/timeouts")
    polite.add_argument(
        "--retry-backoff",
        type=float,
        dest="retry_backoff_base",
        metavar="S",
        help="first retry waits S seconds, doubling each time",
    )
    polite.add_argument(
        "--no-polite",
        action="store_true",
        help="no delay, no AutoThrottle, 16 requests at once (robots.txt still obeyed): "
        "refused for any host but this machine (127.0.0.1, localhost), e.g. demo.site",
    )
    misc = p.add_argument_group("bookkeeping")
    misc.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_false",
        default=None,
        help="do not fsync images and manifest lines (kills stay safe, power cuts do not)",
    )
    misc.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    misc.add_argument("--log-file", help="write the log here instead of stderr")
    return p


def config_from_args(args: argparse.Namespace) -> CrawlConfig:
    """The YAML config with the flags that were given applied on top."""
    overrides = {
        key: getattr(args, key)
        for key in (
            "base_url",
            "out",
            "persons",
            "persons_file",
            "max_persons",
            "max_photos_per_person",
            "min_width",
            "min_height",
            "min_photos",
            "max_image_pixels",
            "max_response_size",
            "user_agent",
            "download_delay",
            "autothrottle",
            "concurrent_requests_per_domain",
            "retry_times",
            "retry_backoff_base",
            "fsync",
            "log_level",
            "log_file",
        )
    }
    if args.min_size is not None:
        overrides["min_width"] = overrides["min_width"] or args.min_size
        overrides["min_height"] = overrides["min_height"] or args.min_size
    if args.config is None:
        config = CrawlConfig.from_dict({}, source="flags", **overrides)
    else:
        config = CrawlConfig.from_yaml(args.config, **overrides)
    if args.no_polite:
        host = (urlsplit(config.base_url).hostname or "").lower()
        if host != "localhost" and not host.startswith("127.") and host != "::1":
            raise ValueError(
                f"--no-polite is only for a site served from this machine (127.0.0.1, localhost), not {host!r}; "
                "for a mirror you run elsewhere, set --download-delay 0 --no-autothrottle --concurrency N explicitly"
            )
        return config.impolite()
    return config


def run(config: CrawlConfig) -> int:
    """Run one crawl in this process (blocks until it ends) and return the exit status."""
    from scrapy.crawler import CrawlerProcess
    from scrapy.settings import Settings

    from crawler.spiders.theplace import TheplaceSpider, parse_slugs

    parse_slugs(config.persons, config.persons_file)  # fail before starting Scrapy
    settings = Settings()
    settings.setmodule("crawler.settings", priority="project")
    settings.setdict(config.scrapy_settings(), priority="cmdline")
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(TheplaceSpider)
    process.crawl(crawler, **config.spider_kwargs())
    process.start()
    stats = crawler.stats.get_stats() if crawler.stats else {}
    finished = stats.get("finish_reason") == "finished"
    ok = finished and not stats.get("theplace/pages_no_match") and stats.get("theplace/kept_total", 0) > 0
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        from crawler.spiders.theplace import parse_slugs

        parse_slugs(config.persons, config.persons_file)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
