"""``python -m demo`` (``make demo``): the whole system on a CPU, offline, in minutes, on the tiny kit.

1. **site**: a local ThePlace look-alike on 127.0.0.1 (:mod:`demo.site`) showing five drawn people
   with distinct body proportions (:mod:`demo.people`), many poses each, plus small and broken files;
2. **crawl**: the real ``theplace`` spider against it (politeness off: it is our own server);
3. **shards**: the real datapipe with ``configs/shards/tiny.yaml`` (tiny random-init models);
4. **train**: ``configs/fit/tiny.yaml`` for a few steps (all three losses), checkpoints and TensorBoard logs;
5. **eval**: ``configs/eval/tiny.yaml``: the results table, ``comparison.png`` and every generated image;
6. **BoLID-mini gallery**: the tiny kit's random weights draw noise, so the last stage shows what *trained*
   weights do: held-out BoLID-mini people (:mod:`bolid.mini.world`) drawn by the committed mini kit
   (``bolid/mini/weights``, trained from scratch on CPU), base model beside BoLID, in ``mini/gallery.png``.

Every stage runs as its own command (``python -m crawler``, ``python -m datapipe``, ``python -m bolid``) in the
project folder ``--root`` (default: the source checkout holding this package), whose ``configs/`` it uses and
under which it writes ``runs/demo``; this process never changes its working directory.

Every stage is resumable and a second run reuses what is done: the crawler skips stored photos, the
datapipe its cached model outputs, training resumes from ``last.ckpt`` (or is skipped once it reached
``max_steps``), and eval is skipped when its results are newer than the adapter.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("demo")

#: The source checkout this package sits in (the default ``--root``).
CHECKOUT = Path(__file__).resolve().parents[1]
DEMO_DIR = Path("runs/demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--photos", type=int, default=12, help="good photos per demo person (default 12)")
    parser.add_argument("--port", type=int, default=8765, help="port of the local demo site (0: any free port)")
    parser.add_argument("--train-steps", type=int, default=None, help="override configs/fit/tiny.yaml's max_steps")
    parser.add_argument("--skip-eval", action="store_true", help="stop after training")
    parser.add_argument("--quick", action="store_true", help="fewer photos, steps and prompts (what CI runs)")
    parser.add_argument(
        "--root",
        type=Path,
        default=CHECKOUT,
        help="project folder with configs/; runs/demo goes under it (%(default)s)",
    )


def _site(photos: int):
    """The demo site: each person's good photos (1024 px) plus a few traps the pipeline must reject."""
    from demo.people import BUILDS, render, slug
    from demo.site import DemoSite
    from demo.synthetic import jpeg_bytes

    identities = {}
    for p, build in enumerate(BUILDS):
        images = [jpeg_bytes(render(build, seed=1000 * p + n)[0], quality=88) for n in range(photos)]
        if p == 0:
            # too small (under 1000 px), then a truncated JPEG
            images.append(jpeg_bytes(render(build, seed=999, size=(640, 800))[0], quality=88))
            images.append(jpeg_bytes(render(build, seed=998)[0], quality=88)[:20_000])
        if p == 1:
            images.append(images[0])  # the same photo under a second URL
        identities[slug(build)] = (build.name, images)
    return DemoSite.from_identities(identities, per_page=8)


def _start_server(site, port: int):
    from demo.site import DemoServer

    try:
        return DemoServer(site, port=port).start()
    except OSError:
        log.warning("port %d is busy; serving the demo site on a free port instead", port)
        return DemoServer(site, port=0).start()


def _stage(name: str) -> float:
    log.info("━━ %s", name)
    return time.monotonic()


def _last_step(ckpt: Path) -> int:
    import torch

    if not ckpt.is_file():
        return -1
    return int(torch.load(ckpt, map_location="cpu", weights_only=False).get("global_step", -1))


def run(args: argparse.Namespace) -> int:
    import yaml

    root = args.root.resolve()
    if not (root / "configs" / "fit" / "tiny.yaml").is_file():
        log.error("--root %s: no configs/fit/tiny.yaml there; pass the BoLID project folder", root)
        return 2

    def command(*argv: str) -> int:  # the configs' relative paths (runs/demo/..., configs/...) are root's
        return subprocess.call([sys.executable, "-m", *argv], cwd=root)

    out = DEMO_DIR
    crawl, shards, train = out / "crawl", out / "shards", out / "train"
    photos = 6 if args.quick else args.photos
    t0 = time.monotonic()

    t = _stage(f"1/6 demo site: 5 people x {photos} photos (+ small, truncated and duplicate files)")
    server = _start_server(_site(photos), args.port)
    log.info("serving %s (%.1f s)", server.base_url, time.monotonic() - t)
    try:
        t = _stage("2/6 crawl with the real spider")
        cmd = [sys.executable, "-m", "crawler", "--out", str(crawl), "--base-url", server.base_url, "--no-polite",
               "--min-photos", str(photos), "--log-level", "WARNING"]  # fmt: skip
        code = subprocess.call(cmd, cwd=root)
        if code != 0:
            log.error("crawl failed (exit %d): %s", code, " ".join(cmd))
            return code
        log.info("crawl done (%.1f s)", time.monotonic() - t)
    finally:
        server.stop()

    t = _stage("3/6 shards with the real datapipe on the tiny kit")
    code = command(
        "datapipe", "build", "--config", "configs/shards/tiny.yaml", "--in", str(crawl), "--out", str(shards)
    )
    if code != 0:
        return code
    log.info("shards done (%.1f s)", time.monotonic() - t)

    t = _stage("4/6 train configs/fit/tiny.yaml (diffusion + body-ID + EVA-CLIP losses)")
    config = yaml.safe_load((root / "configs" / "fit" / "tiny.yaml").read_text())
    steps = args.train_steps or (6 if args.quick else config["trainer"]["max_steps"])
    ckpt = train / "checkpoints" / "last.ckpt"
    done = _last_step(root / ckpt)
    if done >= steps:
        log.info("training already reached step %d (%s): reusing it", done, ckpt)
    else:
        argv = [
            "fit",
            "--config",
            "configs/fit/tiny.yaml",
            "--data.shards",
            str(shards),
            "--trainer.max_steps",
            str(steps),
        ]
        if done >= 0:
            argv += ["--ckpt_path", str(ckpt)]
            log.info("resuming training from step %d", done)
        code = command("bolid", *argv)
        if code != 0:
            return code
    log.info("train done (%.1f s)", time.monotonic() - t)

    eval_dir = out / "eval"
    if not args.skip_eval:
        t = _stage("5/6 eval configs/eval/tiny.yaml (Body Sim, CLIP-T, CLIP-I; comparison.png)")
        adapter = train / "adapter" / "adapter.safetensors"
        results = eval_dir / "results.md"
        results, adapter = root / results, root / adapter
        if results.is_file() and adapter.is_file() and results.stat().st_mtime > adapter.stat().st_mtime:
            log.info("results are newer than the adapter: reusing %s", results)
        else:
            argv = ["eval", "--config", "configs/eval/tiny.yaml", "--out", str(eval_dir)]
            if args.quick:
                argv += ["--max-prompts", "1", "--images-per-prompt", "1"]
            code = command("bolid", *argv)
            if code != 0:
                return code
        log.info("eval done (%.1f s)", time.monotonic() - t)

    t = _stage("6/6 BoLID-mini gallery: held-out people drawn by the committed mini weights")
    code = command("demo.mini", "--gallery-only", "--out", str(out / "mini"))
    if code != 0:
        return code
    log.info("gallery done (%.1f s)", time.monotonic() - t)

    rows = [
        ("crawl manifest", crawl / "manifest.jsonl"),
        ("crawl per-person counts", crawl / "persons.jsonl"),
        ("shards + index", shards / "index.json"),
        ("datapipe stats", shards / "stats.json"),
        ("checkpoint", ckpt),
        ("adapter", train / "adapter"),
        ("TensorBoard", train / "tensorboard"),
        ("sample grids", train / "samples"),
        ("results table", eval_dir / "results.md"),
        ("comparison figure", eval_dir / "comparison.png"),
        ("BoLID-mini gallery", out / "mini" / "gallery.png"),
    ]
    print(f"\nBoLID demo finished in {time.monotonic() - t0:.0f} s. Outputs (in {root}):")
    for label, path in rows:
        if args.skip_eval and path.is_relative_to(eval_dir):
            continue
        mark = "✓" if (root / path).exists() else "✗ missing"
        print(f"  {label:<24} {path}  {mark}")
    print(f"\nTensorBoard: tensorboard --logdir {train / 'tensorboard'}")
    missing = [p for _, p in rows if not (root / p).exists() and not (args.skip_eval and p.is_relative_to(eval_dir))]
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    from bolid.__main__ import setup_logging

    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0].strip('"'))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
