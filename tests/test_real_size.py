"""Real-size shape check on the CPU: the real architectures (random kit) through training, generation and the datapipe.

The tiny kit hides whatever depends on real widths and depths (70 cross-attention layers at 2048 wide, a
336 px EVA-CLIP, ViTPose's 256x192 crops, BLIP-2's 32 query tokens, bf16 through the whole graph). This
module runs each path once at real size, at the smallest image the real UNet accepts (a 4x4 latent:
SDXL's UNet halves it twice), in bfloat16:

* one stage-1 training step (Lightning ``Trainer.fit``, bf16-mixed, diffusion loss);
* one stage-2 training step (adds the 4-step Lightning branch, the VAE decode, ViTPose's body-ID loss and
  EVA-CLIP's text loss, back-propagated through the last step);
* ``BoLIDPipeline`` generating one image from a reference photo (RT-DETR + ViTPose find the person);
* one datapipe annotate batch: RT-DETR + ViTPose, then BLIP-2 OPT-2.7b captions.

It needs about 16 GB of RAM and many minutes, so it is not part of ``make test``: run it with
``make check-real-size``, which sets ``BOLID_REAL_SIZE=1`` and runs each test in its own process (so each
step's peak RSS is its own and a failure frees its memory); with ``BOLID_REAL_SIZE_REPORT=BENCHMARKS.md`` each
step's time and peak RSS are kept in ``runs/real_size/figures.json`` and written into that file. Stage 2 and
generation share one set of UNet weights between the base and Lightning UNets
(``BOLID_RANDOM_SHARE_LIGHTNING=1``): two module objects, so the wiring is that of two UNets, with one UNet's
memory. ``BOLID_REAL_SIZE_KIT=tiny`` runs
the same steps on the tiny kit in seconds (a dry run of this module, not a real-size check).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.real_size,
    pytest.mark.skipif(
        os.environ.get("BOLID_REAL_SIZE") != "1",
        reason="real-size check (~16 GB RAM, minutes): run `make check-real-size`",
    ),
]

KIT = os.environ.get("BOLID_REAL_SIZE_KIT", "random")
REAL = KIT == "random"
LATENT = 4  # the smallest latent SDXL's UNet accepts (two downsamplings)
PIXELS = 8 * LATENT
FIGURES_FILE = Path(os.environ.get("BOLID_REAL_SIZE_FIGURES", "runs/real_size/figures.json"))


def _peak_rss_gib() -> float:
    """This process's peak RSS since the last reset (VmHWM), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


@pytest.fixture(autouse=True)
def measure(request):
    import gc

    gc.collect()
    _reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    figures = {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,  # all threads; wall time on a shared machine says little
        "peak_rss_gib": _peak_rss_gib(),
        "kit": KIT,
    }
    gc.collect()
    if os.environ.get("BOLID_REAL_SIZE_REPORT") and REAL:
        _report(request.node.name, figures, os.environ["BOLID_REAL_SIZE_REPORT"])


def _cpu(figures: dict) -> str:
    return f"{figures['cpu_seconds']:.0f}" if "cpu_seconds" in figures else "-"


def _report(name: str, figures: dict, target: str) -> None:
    """Add this step's figures to the kept ones and rewrite the Markdown section from all of them."""
    from bench.report import write_section
    from bolid.files import atomic_write

    known = json.loads(FIGURES_FILE.read_text()) if FIGURES_FILE.exists() else {}
    known[name] = figures
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(FIGURES_FILE, json.dumps(known, indent=2), fsync=False)
    order = ["test_stage1_training_step", "test_stage2_training_step", "test_generate_one_image",
             "test_datapipe_annotate_batch"]  # fmt: skip
    rows = [
        f"| {n} | {known[n]['seconds']:.0f} | {_cpu(known[n])} | {known[n]['peak_rss_gib']:.1f} |"
        for n in sorted(known, key=lambda n: order.index(n) if n in order else len(order))
    ]
    threads = torch.get_num_threads()
    text = "\n".join(
        [
            "## Real-size shape check on the CPU (`make check-real-size`)",
            "",
            f"Random-init real architectures (`components: random`), bfloat16, {LATENT}x{LATENT} latents "
            f"({PIXELS} px), batch 1. Each step runs in its own process and builds its own models; the times "
            "include building them. Peak RSS is the process's high-water mark "
            "during that step alone (VmHWM reset before it).",
            "",
            "| step | wall seconds | CPU seconds | peak RSS (GiB) |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch "
            f"{torch.__version__}, {threads} torch thread(s), run under `nice -n 10` on a shared machine.",
            "",
            "Command: `make check-real-size`",
        ]
    )
    write_section(target, "real-size", text)


# ------------------------------------------------------------------------------------------------ training


def _fit(shards: Path, tmp: Path, **model_kw) -> tuple:
    import lightning as L

    from bolid.train.datamodule import PairDataModule
    from bolid.train.module import BoLIDTrainingModule

    module = BoLIDTrainingModule(
        components=KIT, frozen_dtype="bf16", warmup_steps=0, lr=1e-3, branch_resolution=PIXELS, **model_kw
    )
    before = {k: p.detach().clone() for k, p in module.trainable_named_parameters().items()}
    frozen = module.unet.conv_in.weight.detach().clone()
    dm = PairDataModule(str(shards), resolution=PIXELS, batch_size=1, num_workers=0, shuffle_buffer=2)
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=tmp,
    )  # fmt: skip
    trainer.fit(module, dm)
    after = module.trainable_named_parameters()
    moved = [k for k, p in after.items() if not torch.equal(p.detach(), before[k])]
    assert all(torch.isfinite(p).all() for p in after.values())
    assert torch.equal(module.unet.conv_in.weight, frozen), "a frozen UNet weight changed"
    trainable = {id(p) for p in after.values()}  # the adapter's processors sit inside the UNet, in fp32
    assert all(p.dtype == torch.bfloat16 for p in module.unet.parameters() if id(p) not in trainable)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return module, moved, metrics


def test_stage1_training_step(tiny_shards, tmp_path):
    module, moved, metrics = _fit(tiny_shards, tmp_path, stage=1)
    assert np.isfinite(metrics["train/loss_diff"])
    # The optimiser step moved the adapter: face and body heads and the identity K/V of the cross-attentions.
    assert any("face" in k for k in moved) and any("body" in k for k in moved), moved[:5]
    if REAL:
        assert len(module.adapter.processors) == 70  # SDXL's 70 cross-attention layers all carry the adapter


def test_stage2_training_step(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("BOLID_RANDOM_SHARE_LIGHTNING", "1")
    module, moved, metrics = _fit(tiny_shards, tmp_path, stage=2, w_id=0.3, w_clip=0.1, lightning_steps=4, grad_steps=1)
    for name in ("train/loss_diff", "train/loss_id", "train/loss_clip"):
        assert np.isfinite(metrics[name]), name
    assert module.lightning_unet is not module.unet
    assert moved


# -------------------------------------------------------------------------------------------------- generate


def test_generate_one_image(fixtures, monkeypatch):
    from bolid.pipeline import BoLIDPipeline

    monkeypatch.setenv("BOLID_RANDOM_SHARE_LIGHTNING", "1")

    pipe = BoLIDPipeline.from_components(KIT, lightning=True, dtype=torch.bfloat16, pose_threshold=0.0)
    photo = fixtures / "coco_000000000785.jpg"
    kw = dict(seed=0, height=PIXELS, width=PIXELS, output_type="np")
    with_id = pipe("a person on a beach", references=[photo], **kw)
    without = pipe("a person on a beach", references=[photo], scale_face=0.0, scale_body=0.0, **kw)
    image = np.asarray(with_id.images[0], dtype=np.float32)
    assert image.shape == (PIXELS, PIXELS, 3) and np.isfinite(image).all()
    assert image.std() > 0  # an image, not a constant
    assert with_id.settings["steps"] == 4
    # The identity tokens reach the image: the same seed with both identity terms off gives another one.
    assert np.abs(image - np.asarray(without.images[0], dtype=np.float32)).mean() > 1e-3


# -------------------------------------------------------------------------------------------------- datapipe


def test_datapipe_annotate_batch(fixtures):
    from PIL import Image

    from datapipe.annotate import Captioner, PoseModel
    from datapipe.config import BuildConfig

    config = BuildConfig.from_dict(
        {
            "components": KIT,
            "device": "cpu",
            "dtype": "bfloat16",
            "pose": {"threshold": 0.0, "batch_size": 2},
            "caption": {"max_length": 4, "batch_size": 2},
        }
    )
    images = [Image.open(fixtures / "coco_000000000785.jpg").convert("RGB")] * 2
    pose = PoseModel(config)
    poses = pose(images)
    pose.close()
    assert len(poses) == 2 and poses[0]["persons"], "random RT-DETR at threshold 0 gives boxes"
    for person in poses[0]["persons"]:
        kp = np.asarray(person["keypoints"], dtype=np.float32)
        assert kp.shape == (17, 3) and np.isfinite(kp).all()
    captioner = Captioner(config)
    captions = captioner(images)
    assert len(captions) == 2 and all(isinstance(c["caption"], str) for c in captions)
    assert captions[0] == captions[1]  # greedy decoding: the same image gives the same tokens
    if REAL:
        assert captioner.input_size == (224, 224)
