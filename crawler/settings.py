"""Scrapy settings of the crawler project: polite defaults, the middlewares and pipelines, and ``CRAWL_*`` knobs.

These are the defaults of a bare ``scrapy crawl theplace``; ``python -m crawler`` overrides them from its
config and flags (see :mod:`crawler.config`). Politeness is on by default: robots.txt obeyed,
one request at a time per domain, a delay between requests plus AutoThrottle, an honest User-Agent, and retries of
429/5xx with exponential backoff.
"""

BOT_NAME = "bolid-crawler"
SPIDER_MODULES = ["crawler.spiders"]
NEWSPIDER_MODULE = "crawler.spiders"

# ---- politeness
USER_AGENT = "BoLID-crawler/0.1 (research dataset crawler; obeys robots.txt; 1 request at a time)"
ROBOTSTXT_OBEY = True
CONCURRENT_REQUESTS = 16
CONCURRENT_REQUESTS_PER_DOMAIN = 1
DOWNLOAD_DELAY = 1.0
DOWNLOAD_DELAY_JITTER = 0.5  # each delay is 0.5x-1.5x DOWNLOAD_DELAY
AUTOTHROTTLE_ENABLED = True
AUTOTHROTTLE_START_DELAY = 1.0
AUTOTHROTTLE_MAX_DELAY = 60.0
AUTOTHROTTLE_TARGET_CONCURRENCY = 1.0
COOKIES_ENABLED = False
TELNETCONSOLE_ENABLED = False
REMOTE_CONTROL_ENABLED = False  # no listening control port during a days-long crawl

# ---- retries: RETRY_TIMES attempts more, waiting RETRY_BACKOFF_BASE * 2**(n-1) s (capped), or Retry-After
RETRY_ENABLED = True
RETRY_TIMES = 5
RETRY_HTTP_CODES = [408, 429, 500, 502, 503, 504, 522, 524]
RETRY_BACKOFF_BASE = 2.0
RETRY_BACKOFF_MAX = 120.0
DOWNLOAD_TIMEOUT = 60

# ---- staying safe: response size cap (pages get CRAWL_MAX_PAGE_SIZE), redirects checked by StayOnSiteMiddleware
DOWNLOAD_MAXSIZE = 32 * 1024 * 1024
DOWNLOAD_WARNSIZE = 16 * 1024 * 1024
REDIRECT_MAX_TIMES = 5

DOWNLOADER_MIDDLEWARES = {
    "crawler.middlewares.StayOnSiteMiddleware": 40,
    "scrapy.downloadermiddlewares.retry.RetryMiddleware": None,
    "crawler.middlewares.BackoffRetryMiddleware": 550,
}
ITEM_PIPELINES = {
    "crawler.pipelines.ImageCheckPipeline": 100,
    "crawler.pipelines.DedupPipeline": 200,
    "crawler.pipelines.StorePipeline": 300,
}

# ---- the crawl's own settings (read by the spider and the pipelines)
CRAWL_OUT = "data/crawl"  # output folder, layout in crawler/store.py
CRAWL_MIN_WIDTH = 1000
CRAWL_MIN_HEIGHT = 1000
CRAWL_MIN_PHOTOS = 100  # target per person, reported in persons.jsonl
# refuse more pixels from the header alone: the datapipe's cap too (bolid.images.MAX_IMAGE_PIXELS; a test checks)
CRAWL_MAX_IMAGE_PIXELS = 50_000_000
CRAWL_MAX_PAGE_SIZE = 4 * 1024 * 1024  # byte cap for HTML pages
CRAWL_LAYOUT_ABORT_AFTER = 20  # stop if this many pages in a row, from the start, match no selector
CRAWL_FSYNC = True  # fsync images and journal lines (power-cut safety; kills are safe either way)

# Items per response processed concurrently: the pipelines are synchronous, and Scrapy starts this many asyncio
# workers for every callback's output, so the default of 100 only costs CPU.
CONCURRENT_ITEMS = 8

LOG_LEVEL = "INFO"
FEED_EXPORT_ENCODING = "utf-8"
