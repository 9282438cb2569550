"""``make mini`` (``python -m demo.mini``): BoLID end to end on the BoLID-mini world, on a CPU.

1. **world**: render the people (:mod:`bolid.mini.world`) as ``<identity>/<photo>.png`` folders;
2. **shards**: the real datapipe (``configs/shards/mini.yaml``: mini keypoint model, zero-shot captions);
3. **stage 1**, the **ablation** and **stage 2**: ``bolid fit`` with ``configs/fit/mini_*.yaml``;
4. **eval**: ``bolid eval`` with ``configs/eval/mini.yaml`` (base, face only, body only, stage 1, stage 2,
   ablation; Body Sim with the evaluation keypoint model, CLIP-T, CLIP-I, 95% CIs over held-out people);
5. **report**: ``results.md``, ``comparison.png`` and ``settings.json`` copied to ``--docs``.

The mini kit's weights (``bolid/mini/weights``) are committed; ``--train-components`` retrains them first.
Every stage is resumable: run the same command again after a crash and finished stages are reused
(the world and shards by their own markers, training from ``last.ckpt``, evaluation when its results are
newer than every adapter). The configs are copied to ``<out>/configs/`` with their ``runs/mini`` paths
pointing at ``--out``, so those copies are exactly what ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import yaml

from bolid.files import atomic_write

log = logging.getLogger("bolid.mini")
ROOT = Path(__file__).resolve().parents[1]
#: name -> config file (each is copied to ``<out>/configs/<name>.yaml`` with its paths retargeted).
CONFIGS = {
    "shards": ROOT / "configs" / "shards" / "mini.yaml",
    "stage1": ROOT / "configs" / "fit" / "mini_stage1.yaml",
    "ablation": ROOT / "configs" / "fit" / "mini_ablation.yaml",
    "stage2": ROOT / "configs" / "fit" / "mini_stage2.yaml",
    "eval": ROOT / "configs" / "eval" / "mini.yaml",
}
TRAININGS = ("stage1", "ablation", "stage2")


def _retarget(value, out: str):
    """Replace the ``runs/mini`` prefix of every string in a parsed YAML with ``out``."""
    if isinstance(value, dict):
        return {k: _retarget(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_retarget(v, out) for v in value]
    if isinstance(value, str) and value.startswith("runs/mini"):
        return out + value[len("runs/mini") :]
    return value


def write_config(name: str, out: Path, overrides: dict | None = None) -> Path:
    """Config ``name`` (:data:`CONFIGS`) retargeted to ``out`` (plus nested ``overrides``), in ``<out>/configs/``."""
    cfg = _retarget(yaml.safe_load(CONFIGS[name].read_text()), str(out))
    for dotted, v in (overrides or {}).items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[leaf] = v
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(cfg, sort_keys=False))
    return path


def _last_step(ckpt: Path) -> int:
    import torch

    if not ckpt.is_file():
        return -1
    return int(torch.load(ckpt, map_location="cpu", weights_only=False).get("global_step", -1))


def _quick_callbacks(out: Path, name: str) -> list[dict]:
    return [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / name / "checkpoints"), "save_last": True, "every_n_train_steps": 1}},
        {"class_path": "bolid.train.callbacks.AdapterExport", "init_args": {"dirpath": str(out / name / "adapter")}},
    ]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bolid.mini.world import write_world

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    identities, photos = (12, 5) if args.quick else (args.identities, args.photos)
    timings: dict[str, float] = {}

    def stage(name: str, fn) -> None:
        t = time.monotonic()
        log.info("━━ %s", name)
        fn()
        timings[name] = round(time.monotonic() - t, 1)
        log.info("%s done (%.0f s)", name, timings[name])

    if args.train_components:
        from bolid.mini.train import main as train_components

        stage("components (python -m bolid.mini.train)", lambda: train_components(["--work", str(out / "components")]))
    world = out / "world"
    stage(f"1/5 world: {identities} people x {photos} photos",
          lambda: write_world(world, args.seed, identities, photos, progress=tqdm))  # fmt: skip

    def shards():
        from datapipe.__main__ import main as datapipe_main

        config = write_config("shards", out, {"identities.min_photos": min(4, photos)})
        if datapipe_main(["build", "--config", str(config), "--in", str(world), "--out", str(out / "shards")]) != 0:
            raise RuntimeError("datapipe build failed")

    stage("2/5 shards with the real datapipe", shards)
    for name in TRAININGS:
        quick = {}
        if args.quick:
            quick = {"trainer.max_steps": 2, "data.batch_size": 4, "trainer.logger": False,
                     "trainer.callbacks": _quick_callbacks(out, name)}  # fmt: skip
        config = write_config(name, out, quick)
        stage(f"3/5 fit {name}", lambda c=config, n=name: fit(c, out, n))
    stage("4/5 eval", lambda: evaluate(out, args.quick))
    stage("5/5 report", lambda: report(out, Path(args.docs), timings, args))
    log.info("BoLID-mini finished in %.0f s: %s", time.monotonic() - t0, Path(args.docs) / "results.md")
    return 0


def fit(config: Path, out: Path, name: str) -> None:
    """``bolid fit`` one config, resuming from its ``last.ckpt``; a finished run is reused."""
    from bolid.__main__ import main as bolid_main

    cfg = yaml.safe_load(config.read_text())
    ckpt = out / name / "checkpoints" / "last.ckpt"
    done = _last_step(ckpt)
    if done >= cfg["trainer"]["max_steps"] and (out / name / "adapter" / "adapter.safetensors").exists():
        log.info("%s: already at step %d: reusing %s", name, done, out / name / "adapter")
        return
    argv = ["fit", "--config", str(config)]
    if done >= 0:
        argv += ["--ckpt_path", str(ckpt)]
        log.info("%s: resuming from step %d", name, done)
    if bolid_main(argv) != 0:
        raise RuntimeError(f"bolid fit --config {config} failed")


def evaluate(out: Path, quick: bool) -> None:
    from bolid.__main__ import main as bolid_main

    quick_settings = {"max_prompts": 1, "images_per_prompt": 1, "metrics.ci_resamples": 100, "comparison.identities": 1}
    config = write_config("eval", out, quick_settings if quick else None)
    results = out / "eval" / "results.md"
    adapters = [out / n / "adapter" / "adapter.safetensors" for n in TRAININGS]
    if results.exists() and all(a.exists() and results.stat().st_mtime > a.stat().st_mtime for a in adapters):
        log.info("eval: results are newer than every adapter: reusing %s", results)
        return
    if bolid_main(["eval", "--config", str(config)]) != 0:
        raise RuntimeError(f"bolid eval --config {config} failed")


def report(out: Path, docs: Path, timings: dict, args: argparse.Namespace) -> None:
    """Copy the table, figure and every setting into ``docs``."""
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "eval" / "comparison.png", docs / "comparison.png")
    shutil.copyfile(out / "eval" / "results.md", docs / "results.md")
    settings = {
        "command": "python -m demo.mini " + " ".join(args.argv),
        "world": json.loads((out / "world" / "world.json").read_text()),
        # only the configs this command wrote: <out>/configs may also hold a user's own experiments
        "configs": {n: yaml.safe_load((out / "configs" / f"{n}.yaml").read_text()) for n in sorted(CONFIGS)},
        "stage_seconds": timings,
        "datapipe_stats": json.loads((out / "shards" / "stats.json").read_text()),
    }
    atomic_write(docs / "settings.json", json.dumps(settings, indent=1, default=str))


GALLERY_PROMPTS = (
    "a photo of a person on a beach, wearing a red shirt and blue trousers",
    "a photo of a person in a city at night, wearing a yellow shirt and black trousers",
)


def gallery(out: Path, people: int = 4, seed: int = 9) -> Path:
    """``out/gallery.png``: held-out rendered people, and what the committed mini weights make of them.

    Columns: the base model (no identity) and BoLID (the committed stage-2 adapter,
    ``bolid/mini/weights/bolid_stage2``), same prompt and seed; the reference photos are also written to
    ``out/references/`` so ``bolid generate --components mini`` can be tried on them.
    """
    from bolid.kits import mini
    from bolid.mini.world import iter_world
    from bolid.pipeline import BoLIDPipeline
    from bolid.results import comparison_grid

    out.mkdir(parents=True, exist_ok=True)
    (out / "references").mkdir(exist_ok=True)
    pipe = BoLIDPipeline.from_components("mini", adapter=mini.adapter_dir(), pose_threshold=0.05)
    rows = []
    for ident, _, _, ref, _ in iter_world(seed, people, 1):
        ref.save(out / "references" / f"{ident.name}.png")
        for k, prompt in enumerate(GALLERY_PROMPTS):
            kw = dict(seed=k, num_images=1, steps=8, guidance_scale=3.0)
            base = pipe(prompt, **kw).images[0]
            bolid = pipe(prompt, references=[ref], **kw).images[0]
            rows.append((f"{ident.name}: {prompt[len('a photo of a person ') :]}", ref, [base, bolid]))
    path = out / "gallery.png"
    comparison_grid(rows, ["base (no identity)", "BoLID (mini)"], tile=128).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m demo.mini", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/mini", help="runs folder (resumable)")
    p.add_argument("--docs", default="docs/mini", help="where results.md, comparison.png and settings.json go")
    p.add_argument("--identities", type=int, default=250, help="people in the world (10%% validation, 10%% test)")
    p.add_argument("--photos", type=int, default=10, help="photos per person")
    p.add_argument("--seed", type=int, default=0, help="world seed (the components trained on seeds 101, 102)")
    p.add_argument("--quick", action="store_true", help="a few people and steps per stage: checks the wiring")
    p.add_argument("--train-components", action="store_true", help="retrain the mini kit's weights first")
    p.add_argument(
        "--gallery-only",
        action="store_true",
        help="only draw <out>/gallery.png: held-out people, base model vs the committed BoLID-mini adapter",
    )
    args = p.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.gallery_only:
        print(f"gallery: {gallery(Path(args.out))}")
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
