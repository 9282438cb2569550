"""Crawl configuration: the defaults (this dataclass; ``configs/crawl/theplace.yaml`` states them with comments), their
validation (:mod:`configkit`), and the Scrapy settings and spider arguments they become.

:class:`CrawlConfig` has one field per YAML key; ``python -m crawler`` has one flag per field. Unknown keys
(with "did you mean") and out-of-range values raise ``ValueError`` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

import configkit
from crawler import settings

LogLevel = Literal["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET"]


@dataclass(frozen=True)
class CrawlConfig:
    """All knobs of a crawl (the YAML keys; comments in ``configs/crawl/theplace.yaml``). Types and ranges are the
    annotations; :func:`configkit.parse` checks them."""

    base_url: str = "https://www.theplace.ru"
    out: str = settings.CRAWL_OUT
    persons: list[str] = field(default_factory=list)
    persons_file: str | None = None
    min_width: PositiveInt = settings.CRAWL_MIN_WIDTH
    min_height: PositiveInt = settings.CRAWL_MIN_HEIGHT
    min_photos: NonNegativeInt = settings.CRAWL_MIN_PHOTOS
    max_persons: PositiveInt | None = None
    max_photos_per_person: PositiveInt | None = None
    max_image_pixels: PositiveInt = settings.CRAWL_MAX_IMAGE_PIXELS
    max_response_size: PositiveInt = settings.DOWNLOAD_MAXSIZE
    max_page_size: PositiveInt = settings.CRAWL_MAX_PAGE_SIZE
    user_agent: str = settings.USER_AGENT
    download_delay: NonNegativeFloat = settings.DOWNLOAD_DELAY
    autothrottle: bool = settings.AUTOTHROTTLE_ENABLED
    autothrottle_max_delay: PositiveFloat = settings.AUTOTHROTTLE_MAX_DELAY
    autothrottle_target_concurrency: PositiveFloat = settings.AUTOTHROTTLE_TARGET_CONCURRENCY
    concurrent_requests: PositiveInt = settings.CONCURRENT_REQUESTS
    concurrent_requests_per_domain: PositiveInt = settings.CONCURRENT_REQUESTS_PER_DOMAIN
    retry_times: NonNegativeInt = settings.RETRY_TIMES
    retry_backoff_base: NonNegativeFloat = settings.RETRY_BACKOFF_BASE
    retry_backoff_max: NonNegativeFloat = settings.RETRY_BACKOFF_MAX
    download_timeout: PositiveFloat = float(settings.DOWNLOAD_TIMEOUT)
    fsync: bool = settings.CRAWL_FSYNC
    log_level: LogLevel = settings.LOG_LEVEL
    log_file: str | None = None

    def __post_init__(self) -> None:
        """Rules across fields or beyond a type (the types and ranges are checked by :func:`configkit.parse`)."""
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(
                f"base_url must be an http(s) site root like https://www.theplace.ru, got {self.base_url!r}"
            )
        if not self.out:
            raise ValueError("out must be a folder path")
        if self.min_width * self.min_height > self.max_image_pixels:
            raise ValueError("max_image_pixels is below min_width * min_height: every image would be rejected")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> CrawlConfig:
        """Load a YAML file, then apply ``overrides`` (``None`` values are ignored)."""
        return cls.from_dict(configkit.load_yaml(path), source=str(path), **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config", **overrides: Any) -> CrawlConfig:
        """Check and build; errors are ``ValueError`` naming ``source`` and the key ("did you mean" for typos)."""
        merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        if isinstance(merged.get("persons"), str):
            merged["persons"] = [s for s in merged["persons"].split(",") if s.strip()]
        try:
            return configkit.parse(cls, merged)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def impolite(self) -> CrawlConfig:
        """The same crawl without delays or AutoThrottle, many requests at once: only for your own local site."""
        return dataclasses.replace(
            self, download_delay=0.0, autothrottle=False, concurrent_requests_per_domain=self.concurrent_requests
        )

    def scrapy_settings(self) -> dict[str, Any]:
        """Scrapy settings for this crawl (applied over ``crawler.settings``)."""
        settings: dict[str, Any] = {
            "CRAWL_OUT": self.out,
            "CRAWL_MIN_WIDTH": self.min_width,
            "CRAWL_MIN_HEIGHT": self.min_height,
            "CRAWL_MIN_PHOTOS": self.min_photos,
            "CRAWL_MAX_IMAGE_PIXELS": self.max_image_pixels,
            "CRAWL_MAX_PAGE_SIZE": self.max_page_size,
            "CRAWL_FSYNC": self.fsync,
            "DOWNLOAD_MAXSIZE": self.max_response_size,
            "DOWNLOAD_WARNSIZE": min(self.max_response_size, 16 * 1024 * 1024),
            "USER_AGENT": self.user_agent,
            "DOWNLOAD_DELAY": self.download_delay,
            "AUTOTHROTTLE_ENABLED": self.autothrottle,
            "AUTOTHROTTLE_START_DELAY": max(self.download_delay, 0.1),
            "AUTOTHROTTLE_MAX_DELAY": self.autothrottle_max_delay,
            "AUTOTHROTTLE_TARGET_CONCURRENCY": self.autothrottle_target_concurrency,
            "CONCURRENT_REQUESTS": self.concurrent_requests,
            "CONCURRENT_REQUESTS_PER_DOMAIN": self.concurrent_requests_per_domain,
            "RETRY_TIMES": self.retry_times,
            "RETRY_BACKOFF_BASE": self.retry_backoff_base,
            "RETRY_BACKOFF_MAX": self.retry_backoff_max,
            "DOWNLOAD_TIMEOUT": self.download_timeout,
            "LOG_LEVEL": self.log_level,
        }
        if self.log_file:
            settings["LOG_FILE"] = self.log_file
        return settings

    def spider_kwargs(self) -> dict[str, Any]:
        """Arguments for ``TheplaceSpider`` (the same as its ``-a`` options)."""
        return {
            "base_url": self.base_url,
            "persons": list(self.persons),
            "persons_file": self.persons_file,
            "max_persons": self.max_persons,
            "max_photos_per_person": self.max_photos_per_person,
        }
