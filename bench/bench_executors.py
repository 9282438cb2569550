"""Executor overhead: ``datapipe build`` on the tiny kit with ``--executor local`` against ``--executor ray``.

Generates ``--identities`` x ``--photos`` synthetic photos (``demo.synthetic``), then, interleaved for
``--repeats`` rounds, builds them into a fresh output folder (no model cache) in ``--num-parts`` parts with:

* **local**: the parts one after another in this process (``workers: 0``, single-threaded torch);
* **ray**: the parts as Ray tasks and the models on Ray actors, on a local Ray already started (``num_cpus``
  = the cores, 256 MB object store, no dashboard); the Ray start is timed on its own.

Reports input images/s (median round) and the ratio. On the tiny kit the models cost almost nothing, so this
measures what the executor adds (task and actor start, model load per actor, pickling the images to the
actors), not what Ray gains on a cluster of GPUs. Prints a Markdown section; ``--write BENCHMARKS.md``
replaces the ``bench:executors`` section.

    python -m bench.bench_executors --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.report import command, machine, write_section

ROOT = Path(__file__).resolve().parents[1]


def make_input(folder: Path, identities: int, photos: int) -> int:
    from demo.synthetic import jpeg_bytes, synthetic_photo

    seed = 0
    for i in range(identities):
        (folder / f"person{i:02d}").mkdir(parents=True)
        for j in range(photos):
            seed += 1
            img = synthetic_photo(200 + 8 * (j % 3), 240, seed, figures=1)
            (folder / f"person{i:02d}" / f"{j:02d}.jpg").write_bytes(jpeg_bytes(img, 90))
    return identities * photos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=6)
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--num-parts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", help="replace the bench:executors section of this Markdown file")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load = os.getloadavg()[0]

    import ray
    import torch

    from datapipe.config import BuildConfig
    from datapipe.executors import run_local, run_ray

    torch.set_num_threads(1)
    config = BuildConfig.from_yaml(ROOT / "configs" / "shards" / "tiny.yaml").replace(
        workers=0, num_parts=args.num_parts, identities__min_photos=1
    )
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = make_input(tmp / "in", args.identities, args.photos)
        t0 = time.perf_counter()
        ray.init(
            num_cpus=cores,
            object_store_memory=256 * 2**20,
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}},
        )
        ray_start = time.perf_counter() - t0
        times: dict[str, list[float]] = {"local": [], "ray": []}
        try:
            for r in range(args.repeats):
                for name in times:
                    out = tmp / f"{name}{r}"
                    t0 = time.perf_counter()
                    if name == "local":
                        run_local(config, tmp / "in", out)
                    else:
                        run_ray(
                            config.replace(
                                executor="ray", ray__part_cpus=cores / args.num_parts / 2, ray__actor_cpus=0.5
                            ),
                            tmp / "in",
                            out,
                        )
                    times[name].append(time.perf_counter() - t0)
                    shutil.rmtree(out)
        finally:
            ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: n / v for k, v in med.items()}
    body = "\n".join(
        [
            "## Datapipe executors: local vs Ray (`bench/bench_executors.py`)",
            "",
            f"{n} photos of {args.identities} identities, tiny kit, {args.num_parts} parts, fresh cache each round, "
            f"median of {args.repeats} rounds.",
            "",
            "| executor | s per build | images/s | vs local |",
            "|---|---:|---:|---:|",
            f"| local (parts in turn, in-process models) | {med['local']:.1f} | {rate['local']:.2f} | 1.00x |",
            f"| ray (parts as tasks, models on 1+1 actors) | {med['ray']:.1f} | {rate['ray']:.2f} | "
            f"{rate['ray'] / rate['local']:.2f}x |",
            "",
            f"Starting the local Ray itself: {ray_start:.1f} s (not in the table). On the tiny kit the models cost"
            " almost nothing, so the gap is the executor's overhead (worker and actor start, model load per actor,"
            " images pickled to the actors), not what Ray gains on a GPU cluster. No GPU figure for the executors yet"
            " (`make bench-gpu` measures the models, not the executors).",
            "",
            f"Machine: {machine(load, f'ray {ray.__version__}')}",
            "",
            f"Command: `{command('bench.bench_executors', argv)}`",
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, "executors", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
