"""The crawl config (YAML keys, defaults, validation) and the command line."""

from __future__ import annotations

import pytest
from crawler_helpers import ROOT

from crawler.__main__ import build_parser, config_from_args
from crawler.config import CrawlConfig


def test_every_crawl_yaml_parses():
    config = CrawlConfig.from_yaml(ROOT / "configs" / "crawl" / "theplace.yaml")
    assert config == CrawlConfig()  # the YAML states the dataclass defaults
    impolite = config.impolite()
    assert impolite.download_delay == 0 and not impolite.autothrottle and impolite.concurrent_requests_per_domain == 16


def test_defaults_are_polite_and_the_yaml_agrees_with_the_settings_module():
    from crawler import settings

    assert settings.ROBOTSTXT_OBEY and settings.AUTOTHROTTLE_ENABLED
    assert settings.CONCURRENT_REQUESTS_PER_DOMAIN == 1 and settings.DOWNLOAD_DELAY >= 1
    assert 429 in settings.RETRY_HTTP_CODES and 503 in settings.RETRY_HTTP_CODES
    assert "BoLID" in settings.USER_AGENT
    from_yaml = CrawlConfig.from_yaml(ROOT / "configs" / "crawl" / "theplace.yaml").scrapy_settings()
    for key, value in from_yaml.items():
        if key not in ("AUTOTHROTTLE_START_DELAY", "DOWNLOAD_WARNSIZE", "CRAWL_OUT"):
            assert getattr(settings, key) == value, key


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"min_widht": 10}, r"config: unknown config key\(s\): min_widht \(did you mean min_width\?\)"),
        ({"base_url": "www.theplace.ru"}, "base_url"),
        ({"min_width": 0}, "min_width"),
        ({"min_width": "1000"}, "min_width must be an int > 0, got '1000'"),
        ({"persons": 3}, "persons must be a list of strings"),
        ({"max_persons": 0}, "max_persons"),
        ({"download_delay": -1}, "download_delay"),
        ({"autothrottle": "yes"}, "autothrottle must be true or false"),
        ({"log_level": "LOUD"}, "log_level must be one of 'DEBUG'"),
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


def test_no_polite_is_refused_for_a_remote_site(capsys):
    from crawler.__main__ import main as crawl_main

    with pytest.raises(SystemExit) as info:
        crawl_main(["--base-url", "https://www.theplace.ru", "--no-polite", "--out", "/tmp/never-used"])
    assert info.value.code == 2 and "only for a site served from this machine" in capsys.readouterr().err
