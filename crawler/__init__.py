"""BoLID's crawler: a Scrapy project that collects multi-angle celebrity galleries from ThePlace.

Layout follows ``scrapy startproject``: ``scrapy.cfg``, :mod:`crawler.settings`, :mod:`crawler.items`,
:mod:`crawler.pipelines`, :mod:`crawler.middlewares` and :mod:`crawler.spiders`. Around it: every CSS selector
lives in :mod:`crawler.layout`, the output folder (images, manifest, crash-safe resume) in :mod:`crawler.store`,
the YAML defaults in :mod:`crawler.config`, the command line in :mod:`crawler.__main__`, and a local fake site for
tests, benchmarks and demos in :mod:`demo.site`.
"""
