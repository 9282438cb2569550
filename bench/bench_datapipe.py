"""Data-pipeline CPU benchmark: the shard path against a naive Pillow baseline, on the same real-size JPEGs.

Generates ``--images`` photo-like JPEGs (``demo.synthetic``: smooth colour fields, shapes, texture and
sensor noise, ~2 bits/pixel like camera photos) at sizes typical of web galleries, 1200 to 4000 px on the
short side, so every one is resized. Then, in one run, on one core each, interleaved for ``--repeats``
rounds (median time per round):

* **datapipe**: read the file, ``datapipe.resize.encode_stored`` (JPEG ``draft`` decode at 1/2, 1/4 or
  1/8 scale where that stays at or above the target, EXIF transpose, RGB, antialiased bilinear resize of the
  remaining factor to short side 1024, JPEG quality 95), then ``datapipe.writer.write_shard`` (one tar);
* **baseline**: ``Image.open`` + full decode + EXIF transpose + RGB + LANCZOS resize to the same size +
  ``save`` as a JPEG file (quality 95, as above).

Also reports the same path on all cores through ``datapipe.workers.WorkerPool``, header-only size checks
(``bolid.images.image_size``) per second against full decodes per second, and the PSNR between the two
paths' outputs. Goal: datapipe >= 1.5x the baseline's images/s per core. Prints a Markdown section;
``--write BENCHMARKS.md`` replaces the part between ``<!-- bench:datapipe:start -->`` and
``<!-- bench:datapipe:end -->`` in that file (appending it if absent).

    python -m bench.bench_datapipe --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from bench.report import command, machine, write_section
from bolid.images import image_size
from datapipe.resize import encode_stored, encode_stored_file, stored_size
from datapipe.workers import WorkerPool
from datapipe.writer import write_shard
from demo.synthetic import jpeg_bytes, synthetic_photo

ROOT = Path(__file__).resolve().parents[1]

GOAL = 1.5
RESOLUTION = 1024
QUALITY = 95
#: (width, height) cycled over the generated images: phone, DSLR and web-gallery sizes, portrait and landscape.
SIZES = [
    (1200, 1600),
    (1365, 2048),
    (1920, 1280),
    (1600, 2400),
    (2000, 3000),
    (2448, 3264),
    (3264, 2448),
    (3000, 4000),
]


def make_images(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        path = folder / f"{i:03d}_{w}x{h}.jpg"
        path.write_bytes(jpeg_bytes(synthetic_photo(w, h, 100 + i, figures=1 + i % 2), 92))
        paths.append(path)
    return paths


def datapipe_path(paths: list[Path], shard: Path) -> list[bytes]:
    """The pipeline's CPU path: decode with draft -> resize -> encode -> one shard."""
    stored = []
    for p in paths:
        with Image.open(io.BytesIO(p.read_bytes())) as img:
            stored.append(encode_stored(img, RESOLUTION, QUALITY, "bilinear").data)
    meta = b'{"identity":"bench"}'
    write_shard(shard, ((f"img{i:05d}", data, meta) for i, data in enumerate(stored)))
    return stored


def baseline_path(paths: list[Path], folder: Path) -> list[Path]:
    """The naive way: full decode, LANCZOS resize, save a JPEG file per image."""
    outs = []
    for i, p in enumerate(paths):
        img = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        img = img.resize(stored_size(*img.size, RESOLUTION), Image.Resampling.LANCZOS)
        out = folder / f"{i:05d}.jpg"
        img.save(out, quality=QUALITY)
        outs.append(out)
    return outs


def pooled(paths: list[Path], shard: Path, workers: int) -> float:
    """Seconds for the datapipe path with the work spread over ``workers`` processes (pool start-up excluded)."""
    tasks = [(str(p), RESOLUTION, QUALITY, "bilinear") for p in paths]
    with WorkerPool(workers) as pool:
        list(pool.map_ordered(_encode_task, tasks[: 2 * workers]))  # start the processes and their imports first
        t = time.perf_counter()
        stored = pool.map_ordered(_encode_task, tasks)
        write_shard(shard, ((f"img{i:05d}", s, b"{}") for i, s in enumerate(stored)))
        return time.perf_counter() - t


def _encode_task(task: tuple[str, int, int, str]) -> bytes:
    return encode_stored_file(*task).data


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def pillow() -> str:
    from PIL import features

    turbo = "libjpeg-turbo" if features.check_feature("libjpeg_turbo") else "libjpeg"
    return f"Pillow {Image.__version__} ({turbo})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="generated JPEGs (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default: %(default)s)")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace the bench:datapipe section of this file")
    args = parser.parse_args(argv)
    if args.images < len(SIZES) or args.repeats < 1:
        parser.error(f"--images must be >= {len(SIZES)} and --repeats >= 1")
    load = os.getloadavg()[0]  # other work on the machine skews the numbers: report it
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench-datapipe-") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        t = time.perf_counter()
        paths = make_images(tmp / "in", args.images)
        generate_s = time.perf_counter() - t
        megapixels = sum(w * h for w, h in (image_size(p) for p in paths)) / 1e6
        mb = sum(p.stat().st_size for p in paths) / 1e6
        classes = {
            "short side < 2048": [p for p in paths if min(image_size(p)) < 2048],
            "short side >= 2048": [p for p in paths if min(image_size(p)) >= 2048],
        }
        times: dict[str, dict[str, list[float]]] = {c: {"datapipe": [], "baseline": []} for c in classes}
        header_s, decode_s = [], []
        (tmp / "base").mkdir()
        datapipe_path(paths, tmp / "ours.tar")  # warm-up, not timed: page cache, imports, allocator
        baseline_path(paths, tmp / "base")
        for r in range(args.repeats):
            for c, subset in classes.items():
                run = [("datapipe", datapipe_path, tmp / "ours.tar"), ("baseline", baseline_path, tmp / "base")]
                for name, fn, dest in run if r % 2 == 0 else run[::-1]:  # alternate which goes first
                    times[c][name].append(timed(fn, subset, dest))
            header_s.append(timed(lambda: [image_size(p) for p in paths]))
            decode_s.append(timed(lambda: [Image.open(p).load() for p in paths]))
        pool_s = pooled(paths, tmp / "pooled.tar", cores)
        ours = datapipe_path(paths, tmp / "ours.tar")
        base = baseline_path(paths, tmp / "base")
        quality = [
            psnr(Image.open(io.BytesIO(a)).convert("RGB"), Image.open(b).convert("RGB"))
            for a, b in zip(ours, base, strict=True)
        ]

    med = {c: {k: statistics.median(v) for k, v in d.items()} for c, d in times.items()}
    total = {k: sum(med[c][k] for c in classes) for k in ("datapipe", "baseline")}
    n = len(paths)
    ips = {k: n / v for k, v in total.items()}
    ratio = ips["datapipe"] / ips["baseline"]
    ok = ratio >= GOAL
    rows = [
        "| path (one core) | images/s | ms/image | vs baseline |",
        "|---|---|---|---|",
        f"| naive Pillow baseline: full decode + LANCZOS + save | {ips['baseline']:.1f} | "
        f"{1000 / ips['baseline']:.0f} | 1.00x |",
        f"| **datapipe: draft decode + bilinear + encode + shard write** | **{ips['datapipe']:.1f}** | "
        f"**{1000 / ips['datapipe']:.0f}** | **{ratio:.2f}x** |",
    ]
    for c, subset in classes.items():
        r_c = med[c]["baseline"] / med[c]["datapipe"]
        rows.append(
            f"| datapipe, {len(subset)} images with {c} | {len(subset) / med[c]['datapipe']:.1f} | "
            f"{1000 * med[c]['datapipe'] / len(subset):.0f} | {r_c:.2f}x |"
        )
    rows += [
        f"| datapipe on all {cores} cores (WorkerPool, {cores} processes) | {n / pool_s:.1f} "
        f"({n / pool_s / cores:.1f} per core) | | |",
        "",
        "| size check | per second |",
        "|---|---|",
        f"| header only (`bolid.images.image_size`) | {n / statistics.median(header_s):,.0f} |",
        f"| full decode (`Image.open(...).load()`) | {n / statistics.median(decode_s):,.1f} |",
    ]
    pretty = command("bench.bench_datapipe", argv)
    section = "\n".join(
        [
            "## Data pipeline CPU path (`bench/bench_datapipe.py`)",
            "",
            f"{n} generated photo-like JPEGs (quality 92), {megapixels:.0f} MP and {mb:.0f} MB in all, sizes "
            f"{', '.join(f'{w}x{h}' for w, h in SIZES)}; each resized to short side {RESOLUTION} and encoded at "
            f"quality {QUALITY} by both paths. Median of {args.repeats} interleaved rounds.",
            "",
            *rows,
            "",
            f"Output quality: datapipe vs baseline PSNR {statistics.mean(quality):.1f} dB mean, "
            f"{min(quality):.1f} dB worst.",
            "",
            f"Goal: datapipe >= {GOAL}x the baseline's images/s per core: **{'met' if ok else 'NOT met'}** "
            f"({ratio:.2f}x).",
            "",
            f"Machine: {machine(load, pillow())}. Generating the images took {generate_s:.0f} s, not counted.",
            "",
            f"Command: `{pretty}`",
        ]
    )
    print(section)
    if args.write:
        write_section(args.write, "datapipe", section)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
