"""Crawl benchmark: the real ``theplace`` spider against the local fake site, politeness off.

Serves ``demo.site`` (``--persons`` x ``--photos`` generated JPEGs of 1000-1500 px, no traps) from this
process, runs ``python -m crawler --no-polite`` as a child process, and every 50 ms samples the child's RSS and
peak RSS (``VmRSS``/``VmHWM`` in ``/proc/<pid>/status``) and the number of stored images. Reports images/s, peak
RSS and the RSS growth from the 200th stored image to the last, against the goal: >= 30 images/s on 2 cores with
RSS growth under 50 MB. Prints a Markdown table; ``--write BENCHMARKS.md`` also replaces the section between
``<!-- bench:crawl:start -->`` and ``<!-- bench:crawl:end -->`` in that file (appending it if absent).

    python -m bench.bench_crawl --persons 10 --photos 110 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import scrapy

from bench.report import command, machine, write_section
from crawler.store import read_jsonl
from demo.site import DemoServer, DemoSite

ROOT = Path(__file__).resolve().parents[1]

GOAL_IMAGES_PER_S = 30.0
GOAL_RSS_GROWTH_MB = 50.0


@dataclass
class Sample:
    t: float  # seconds since the crawl started
    images: int
    rss_mb: float
    peak_mb: float  # the kernel's high-water mark of the process's RSS so far (VmHWM)


def memory_mb(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of a process in MB, or None once it is gone."""
    values: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    values[line[:5]] = int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    if len(values) < 2:
        return None
    return values["VmRSS"], values["VmHWM"]


def count_images(images_dir: Path) -> int:
    if not images_dir.is_dir():
        return 0
    total = 0
    with os.scandir(images_dir) as persons:
        for person in persons:
            if person.is_dir():
                with os.scandir(person.path) as files:
                    total += sum(1 for f in files if f.name.endswith(".jpg"))
    return total


def sample_until_exit(process: subprocess.Popen, images_dir: Path, t0: float, every: float = 0.05) -> list[Sample]:
    samples: list[Sample] = []
    while process.poll() is None:
        memory = memory_mb(process.pid)
        if memory is not None:
            samples.append(Sample(time.perf_counter() - t0, count_images(images_dir), *memory))
        time.sleep(every)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--persons", type=int, default=10, help="generated persons (default: %(default)s)")
    parser.add_argument("--photos", type=int, default=110, help="photos per person (default: %(default)s)")
    parser.add_argument("--per-page", type=int, default=24, help="thumbnails per gallery page (default: %(default)s)")
    parser.add_argument("--out", help="crawl output folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace the bench:crawl section of this file")
    args = parser.parse_args(argv)
    if args.persons * args.photos < 1000:
        parser.error("measure over at least 1,000 images (persons * photos >= 1000)")

    load = os.getloadavg()[0]  # other work on the machine skews the numbers: report it
    t = time.perf_counter()
    site = DemoSite.synthetic(args.persons, args.photos, per_page=args.per_page, traps=False)
    generate_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="bench-crawl-") as tmp, DemoServer(site) as server:
        out = Path(args.out) if args.out else Path(tmp) / "out"
        cmd = [
            sys.executable,
            "-m",
            "crawler",
            "--base-url",
            server.base_url,
            "--out",
            str(out),
            "--no-polite",
            "--log-level",
            "WARNING",
        ]
        t0 = time.perf_counter()
        process = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        stderr_lines: list[str] = []
        reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True)
        reader.start()
        samples = sample_until_exit(process, out / "images", t0)
        wall = time.perf_counter() - t0
        reader.join(timeout=10)
        kept = len(list(read_jsonl(out / "manifest.jsonl")))
    if process.returncode != 0 or kept != site.photo_count:
        sys.stderr.write("".join(stderr_lines[-40:]))
        print(f"crawl failed: exit {process.returncode}, kept {kept} of {site.photo_count}", file=sys.stderr)
        return 1

    with_images = [s for s in samples if s.images >= 1]
    at_200 = next(s for s in samples if s.images >= 200)
    after_200 = [s for s in samples if s.t >= at_200.t and s.images <= kept]
    last = next((s for s in samples if s.images >= kept), samples[-1])  # when the last image was stored
    growth = max(s.rss_mb for s in after_200) - at_200.rss_mb
    # VmHWM, not getrusage(RUSAGE_CHILDREN): the latter also counts this process's pages shared at fork time.
    peak_mb = max(s.peak_mb for s in samples)
    first_to_last = last.t - with_images[0].t
    overall = kept / wall
    steady = (kept - with_images[0].images) / first_to_last if first_to_last > 0 else float("nan")
    ok = overall >= GOAL_IMAGES_PER_S and growth < GOAL_RSS_GROWTH_MB

    pretty = command("bench.bench_crawl", argv)
    table = "\n".join(
        [
            "| metric | value |",
            "|---|---|",
            f"| images kept (of {site.photo_count} served, {args.persons} persons) | {kept} |",
            f"| crawl wall time, process start to exit | {wall:.1f} s |",
            f"| **images/s, whole run (incl. ~1 s start-up)** | **{overall:.1f}** |",
            f"| images/s, first to last stored image | {steady:.1f} |",
            f"| peak RSS of the crawl process | {peak_mb:.0f} MB |",
            f"| RSS at the 200th image / at the last | {at_200.rss_mb:.0f} MB / {last.rss_mb:.0f} MB |",
            f"| **RSS growth, 200th image to the end (max - at 200th)** | **{growth:+.1f} MB** |",
        ]
    )
    section = "\n".join(
        [
            "## Crawl (`bench/bench_crawl.py`)",
            "",
            "The real `theplace` spider (`python -m crawler --no-polite`: no delay, no AutoThrottle, 16 requests in",
            "flight; robots.txt still obeyed; images checked, hashed, fsynced) against `demo.site` on",
            "127.0.0.1, served from the benchmark process on the same cores.",
            "",
            table,
            "",
            f"Goal: >= {GOAL_IMAGES_PER_S:.0f} images/s on 2 cores, RSS growth < {GOAL_RSS_GROWTH_MB:.0f} MB from the "
            f"200th image to the last: **{'met' if ok else 'NOT met'}**.",
            "",
            f"Machine: {machine(load, f'Scrapy {scrapy.__version__}')}. "
            f"Site generation ({site.photo_count} JPEGs) took {generate_s:.1f} s, not counted.",
            "",
            f"Command: `{pretty}`",
        ]
    )
    print(section)
    if args.write:
        write_section(args.write, "crawl", section)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
