"""The BoLID demo: the whole system offline on the tiny kit (``python -m demo``, ``make demo``).

It sits on top of everything else and nothing imports it except tests and benchmarks:

* :mod:`demo.site`: a local look-alike of the photo site, served on 127.0.0.1 (``python -m demo.site``);
* :mod:`demo.people`: drawn people whose body proportions differ from person to person;
* :mod:`demo.synthetic`: photo-like synthetic images (tests and benchmarks use them too);
* :mod:`demo.__main__`: demo site -> crawl -> shards -> train -> eval.
"""
