"""Is the identity-pair loader fast enough to feed training? Loader pairs/s against a training step's consumption.

Builds shards with the real datapipe (tiny kit) from generated photos, then, in one run on the same shards:

* the DataModule's training stream (decode, pairing, SDXL resize/crop, reference letterbox, collate) in pairs/s,
  with 0 and 2 worker processes;
* the tiny config's training step (stage 2: diffusion + Lightning-branch ID and CLIP losses, forward and
  backward) in pairs/s consumed.

The goal is a loader at least 2x faster than the step that consumes it, with a single worker process, so that
data loading never stalls training. On GPUs the step gets ~100x faster and the loader scales with workers: the
number that transfers is the single-worker loader rate per image size.

    python -m bench.bench_train_data --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.report import command, machine, write_section

ROOT = Path(__file__).resolve().parents[1]

GOAL_RATIO = 2.0


def make_shards(root: Path, identities: int, photos: int, size: tuple[int, int]) -> Path:
    from datapipe.__main__ import main as datapipe_main
    from demo.synthetic import synthetic_photo

    src = root / "photos"
    for i in range(identities):
        (src / f"person-{i}").mkdir(parents=True, exist_ok=True)
        for j in range(photos):
            synthetic_photo(*size, seed=1000 * i + j, figures=1).save(src / f"person-{i}" / f"{j}.jpg", quality=90)
    out = root / "shards"
    argv = ["build", "--config", str(ROOT / "configs" / "shards" / "tiny.yaml"), "--in", str(src), "--out", str(out)]
    if datapipe_main(argv) != 0:
        raise SystemExit("datapipe build failed")
    return out


def loader_rate(shards: Path, workers: int, resolution: int, batch: int, repeats: int) -> float:
    from bolid.train.datamodule import PairDataModule

    dm = PairDataModule(str(shards), resolution=resolution, crop_size=336, batch_size=batch, num_workers=workers)
    dm.setup("fit")
    rates = []
    for epoch in range(repeats):
        dm._datasets["train"].set_epoch(epoch)
        loader = dm.train_dataloader()
        t0, n = time.perf_counter(), 0
        for b in loader:
            n += len(b["key"])
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def step_rate(shards: Path, resolution: int, batch: int, steps: int) -> float:
    import torch

    from bolid.data import PairDataset
    from bolid.shards import read_index
    from bolid.train.module import BoLIDTrainingModule

    module = BoLIDTrainingModule(
        components="tiny", stage=2, w_id=0.3, w_clip=0.1, lightning_steps=2, grad_steps=1, branch_resolution=resolution
    )
    opt = torch.optim.AdamW(module.adapter.trainable_parameters(), lr=1e-4)
    ds = PairDataset.from_index(read_index(shards), "train", train=True, resolution=resolution,
                                crop_size=module.adapter.image_encoder.image_size, batch_size=batch)  # fmt: skip
    data = next(iter(ds))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(i)
        parts = module.id_losses(data, g)
        loss = module.diffusion_loss(data, g) + 0.3 * parts["loss_id"] + 0.1 * parts["loss_clip"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--identities", type=int, default=6)
    p.add_argument("--photos", type=int, default=8, help="photos per identity")
    p.add_argument("--resolution", type=int, default=64, help="training crop side (the tiny config's)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--write", metavar="BENCHMARKS.md", help="rewrite this benchmark's section of the file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.identities, args.photos, (192, 256))
        load0 = loader_rate(shards, 0, args.resolution, args.batch, 3)
        load2 = loader_rate(shards, 2, args.resolution, args.batch, 3)
        step = step_rate(shards, args.resolution, args.batch, args.steps)
    ratio = load0 / step
    body = "\n".join(
        [
            "## Training data: loader vs. training step (tiny config)",
            "",
            f"Goal: the identity-pair loader with one process yields ≥ {GOAL_RATIO:.0f}x the pairs/s a training step "
            "consumes.",
            "",
            "| what | pairs/s |",
            "| --- | ---: |",
            f"| loader, in-process (0 workers) | {load0:.1f} |",
            f"| loader, 2 worker processes | {load2:.1f} |",
            f"| training step, stage 2 tiny (diffusion + ID + CLIP, fwd+bwd) | {step:.1f} |",
            f"| **ratio loader (0 workers) / step** | **{ratio:.1f}x** "
            f"({'met' if ratio >= GOAL_RATIO else 'MISSED'}) |",
            "",
            f"Machine: {machine()}. Command: `{command('bench.bench_train_data')}`",
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, "train-data", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
