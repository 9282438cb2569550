"""Crawl configuration: the defaults (this dataclass; ``configs/crawl/theplace.yaml`` states them with comments), their
validation, and the Scrapy settings and spider arguments they become.

:class:`CrawlConfig` has one field per YAML key; ``python -m crawler`` has one flag per field. Unknown keys and
out-of-range values raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from crawler.settings import CRAWL_MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class CrawlConfig:
    """All knobs of a crawl (the YAML keys; comments in ``configs/crawl/theplace.yaml``)."""

    base_url: str = "https://www.theplace.ru"
    out: str = "data/crawl"
    persons: list[str] = field(default_factory=list)
    persons_file: str | None = None
    min_width: int = 1000
    min_height: int = 1000
    min_photos: int = 100
    max_persons: int | None = None
    max_photos_per_person: int | None = None
    max_image_pixels: int = CRAWL_MAX_IMAGE_PIXELS
    max_response_size: int = 32 * 1024 * 1024
    max_page_size: int = 4 * 1024 * 1024
    user_agent: str = "BoLID-crawler/0.1 (research dataset crawler; obeys robots.txt; 1 request at a time)"
    download_delay: float = 1.0
    autothrottle: bool = True
    autothrottle_max_delay: float = 60.0
    autothrottle_target_concurrency: float = 1.0
    concurrent_requests: int = 16
    concurrent_requests_per_domain: int = 1
    retry_times: int = 5
    retry_backoff_base: float = 2.0
    retry_backoff_max: float = 120.0
    download_timeout: float = 60.0
    fsync: bool = True
    log_level: str = "INFO"
    log_file: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(
                f"base_url must be an http(s) site root like https://www.theplace.ru, got {self.base_url!r}"
            )
        if not self.out:
            raise ValueError("out must be a folder path")
        for name in (
            "min_width",
            "min_height",
            "max_image_pixels",
            "max_response_size",
            "max_page_size",
            "concurrent_requests",
            "concurrent_requests_per_domain",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("min_photos", "retry_times"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_persons", "max_photos_per_person"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null (no cap), got {getattr(self, name)}")
        for name in ("download_delay", "retry_backoff_base", "retry_backoff_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        for name in ("download_timeout", "autothrottle_max_delay", "autothrottle_target_concurrency"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.min_width * self.min_height > self.max_image_pixels:
            raise ValueError("max_image_pixels is below min_width * min_height: every image would be rejected")
        if not isinstance(logging.getLevelName(self.log_level), int):
            raise ValueError(f"log_level must be one of DEBUG, INFO, WARNING, ERROR, got {self.log_level!r}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> CrawlConfig:
        """Load a YAML file, then apply ``overrides`` (``None`` values are ignored)."""
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of keys to values")
        return cls.from_dict(data, source=str(path), **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config", **overrides: Any) -> CrawlConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known) + sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        if isinstance(merged.get("persons"), str):
            merged["persons"] = [s for s in merged["persons"].split(",") if s.strip()]
        return cls(**merged)

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


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """Check a value against the simple annotations used by CrawlConfig (``str``, ``int | None``, ...)."""
    spec = str(annotation)
    optional = spec.endswith("| None")
    base = spec.removesuffix(" | None")
    if value is None:
        if optional:
            return
        raise ValueError(f"{name} must not be null")
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }.get(base)
    assert ok is not None, f"unhandled annotation {spec} for {name}"
    if not ok:
        raise ValueError(f"{name} must be {base}{' or null' if optional else ''}, got {value!r}")
