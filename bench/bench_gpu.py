"""Paper-scale GPU benchmark: one command, a hard time budget, every figure a reader needs.

Runs BoLID's real code paths on the **random kit** (``components: random``: the real architectures at real
size with random weights, so step time and memory are the real ones; no weights need to be on the machine):

* **training**, s/iter and peak memory: stage 1 (diffusion loss) at 1024 px, batch 1, 2, 4; stage 2 (adds
  the 4-step Lightning branch, VAE decode, ViTPose body-ID loss and EVA-CLIP text loss) at 768 and 1024 px
  with gradients through the last k = 1, 2, 3, 4 branch steps; each with and without gradient checkpointing;
  bf16 autocast over bf16 frozen weights, SDPA attention. PuLID's A100 figures sit beside stage 2 at 768 px;
* **MFU**: the UNet's forward + backward FLOPs counted by ``torch.utils.flop_counter`` (the UNet is frozen, so
  the backward pass computes input gradients only), divided by the measured time and the GPU's bf16 peak;
* **inference**: 4-step SDXL-Lightning generation at 1024 px with and without the adapter (overhead ratio),
  images/s at batch 1 and 4;
* **datapipe models**: RT-DETR + ViTPose, and BLIP-2 captions (``caption.max_length`` tokens; random weights
  never stop early, so this is the worst case), images/s at batch 8, 16, 32, through the datapipe's own
  ``PoseModel`` and ``Captioner``;
* **torch.compile** of the UNet (optional, last; compile time reported apart from the speed-up).

Cases run in priority order; one that would not fit the remaining budget is skipped and listed, one that runs
out of memory is recorded as such, and an alarm stops whatever runs at the deadline, so the command always
ends within ``--budget`` seconds (plus the final write) with every finished figure saved. Results go to
``--out`` (``bench_gpu.json``, ``bench_gpu.md``, rewritten after every case) and, with ``--write``, to that
Markdown file's ``gpu`` section.

    make bench-gpu                                   # = python -m bench.bench_gpu --write BENCHMARKS.md
    python -m bench.bench_gpu --budget 300 --no-compile
    python -m bench.bench_gpu --smoke                # CPU, tiny kit, seconds: checks the script end to end

Absolute times count only on a GPU: on a CPU the command refuses unless ``--smoke``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: PuLID (NeurIPS'24) on an A100, 768 px, back-propagating through the last k Lightning steps (ANCHORS.md).
PULID_A100_768 = {1: (2.6, 41), 2: (2.9, 49), 3: (3.1, 56), 4: (3.3, 63)}
TARGET_STAGE2 = {"k": 2, "resolution": 768, "s_per_iter": 2.0, "memory_gib": 48.0}
TARGET_MFU = 0.40
TARGET_OVERHEAD = 1.10
#: Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; the first matching name wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)
CAPTION = "a photo of a person standing on a beach in summer clothes"


class BudgetExceeded(Exception):
    """The benchmark's time budget ran out in the middle of a case."""


@dataclass
class Scale:
    """Sizes of one run: the paper's on a GPU, the tiny kit's in ``--smoke``."""

    kit: str
    stage1_resolution: int
    stage1_batches: tuple[int, ...]
    stage2_resolutions: tuple[int, ...]
    stage2_ks: tuple[int, ...]
    ref_size: int
    infer_resolution: int
    infer_batches: tuple[int, ...]
    datapipe_batches: tuple[int, ...]
    photo_size: tuple[int, int]
    caption_tokens: int
    warmup: int
    repeats: int

    @classmethod
    def paper(cls) -> Scale:
        return cls("random", 1024, (1, 2, 4), (768, 1024), (1, 2, 3, 4), 512, 1024, (1, 4), (8, 16, 32),
                   (768, 1024), 40, 1, 3)  # fmt: skip

    @classmethod
    def smoke(cls) -> Scale:
        return cls("tiny", 64, (1, 2), (64,), (1, 2), 64, 64, (1, 2), (2,), (96, 128), 4, 0, 1)


@dataclass
class Bench:
    """Runs cases against a deadline and keeps every result, saved after each case."""

    device: torch.device
    deadline: float
    out: Path
    results: dict = field(default_factory=dict)
    spent: dict = field(default_factory=dict)
    estimate_scale: float = 1.0  # the smoke run's cases are ~20x quicker than the GPU run's estimates

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def case(self, section: str, name: str, estimate_s: float, fn: Callable[[], dict]) -> dict | None:
        """Run ``fn`` unless ``estimate_s`` exceeds what is left; record its result, an OOM or the skip."""
        rows = self.results.setdefault(section, [])
        estimate = max(estimate_s * self.estimate_scale, self.spent.get(section, 0.0))
        if self.remaining() < estimate:
            rows.append({"name": name, "skipped": f"budget: {self.remaining():.0f} s left, needs ~{estimate:.0f} s"})
            self.save()
            return None
        t0 = time.monotonic()
        try:
            row = {"name": name, **fn()}
        except torch.cuda.OutOfMemoryError:
            row = {"name": name, "error": "out of memory"}
        except BudgetExceeded:
            row = {"name": name, "skipped": "budget ran out during the case"}
        finally:
            self.spent[section] = time.monotonic() - t0
            _free(self.device)
        rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        from bolid.files import atomic_write

        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "bench_gpu.json", json.dumps(self.results, indent=2, default=str), fsync=False)
        atomic_write(self.out / "bench_gpu.md", report(self.results), fsync=False)


# ------------------------------------------------------------------------------------------------- helpers


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict:
    """Median wall seconds of ``fn`` after ``warmup`` calls, and the peak GPU memory over the timed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {"seconds": statistics.median(times), "seconds_all": [round(t, 4) for t in times]}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    from bench.report import cpu_name

    env = {
        "device": str(device),
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "packages": {},
    }
    for pkg in ("diffusers", "transformers", "open-clip-torch", "timm", "lightning", "accelerate"):
        with contextlib.suppress(md.PackageNotFoundError):
            env["packages"][pkg] = md.version(pkg)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            sdpa={
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            },
        )
    return env


def synthetic_batch(b: int, resolution: int, ref_size: int, device: torch.device, seed: int = 0) -> dict:
    """A training batch as :class:`bolid.data.PairDataset` yields it, with a standing person's keypoints."""
    g = torch.Generator().manual_seed(seed)
    # COCO-17 of a standing person in the unit square (nose, eyes, ears, shoulders ... ankles).
    unit = torch.tensor([[.50, .10], [.48, .08], [.52, .08], [.46, .09], [.54, .09], [.40, .22], [.60, .22],
                         [.36, .38], [.64, .38], [.34, .52], [.66, .52], [.44, .54], [.56, .54], [.44, .74],
                         [.56, .74], [.44, .94], [.56, .94]])  # fmt: skip
    kp = torch.cat([unit * ref_size, torch.ones(17, 1)], 1)
    return {
        "pixels": (torch.rand(b, 3, resolution, resolution, generator=g) * 2 - 1).to(device),
        "time_ids": torch.tensor([resolution, resolution, 0, 0, resolution, resolution])
        .repeat(b, 1)
        .float()
        .to(device),
        "flip": torch.zeros(b, dtype=torch.bool),
        "caption": [CAPTION] * b,
        "ref_pixels": torch.rand(b, 3, ref_size, ref_size, generator=g).to(device),
        "ref_keypoints": kp.repeat(b, 1, 1).to(device),
        "ref_box": torch.tensor([0.3, 0.02, 0.7, 0.98]).mul(ref_size).repeat(b, 1).to(device),
        "key": [f"bench_{i}" for i in range(b)],
    }


# ------------------------------------------------------------------------------------------------ training


def build_module(kit: str, stage: int, device: torch.device):
    """BoLID's training module, built directly on ``device`` (random init on a GPU takes seconds)."""
    from bolid.kits import random as random_kit
    from bolid.train.module import BoLIDTrainingModule

    kw = dict(w_id=0.3, w_clip=0.1, lightning_steps=4, grad_steps=1) if stage == 2 else {}
    with random_kit.on_device(device):
        module = BoLIDTrainingModule(components=kit, stage=stage, frozen_dtype="bf16", warmup_steps=0, **kw)
    return module.to(device)


def set_checkpointing(module, on: bool) -> None:
    for unet in (module.unet, module.lightning_unet):
        if unet is not None:
            unet.enable_gradient_checkpointing() if on else unet.disable_gradient_checkpointing()


def train_step_fn(module, batch: dict, stage: int, device: torch.device) -> Callable[[], float]:
    """One optimiser step as ``training_step`` composes it: shared text/identity encodings, losses, AdamW."""
    params = list(module.trainable_named_parameters().values())
    opt = torch.optim.AdamW(params, lr=1e-5)
    hp = module.hparams

    def step() -> float:
        g = torch.Generator(device=device).manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            text = module.encode_text(batch["caption"])
            identity = module.adapter.encode(batch["ref_pixels"], batch["ref_keypoints"], boxes=batch["ref_box"])
            loss = hp.w_diff * module.diffusion_loss(batch, g, text=text, identity=identity)
            if stage == 2:
                parts = module.id_losses(batch, g, text=text, identity=identity)
                loss = loss + hp.w_id * parts["loss_id"] + hp.w_clip * parts["loss_clip"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def unet_fns(module, b: int, latent: int, device: torch.device) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(forward, forward_backward)`` of the base UNet with the adapter at batch ``b`` (input and adapter grads)."""
    from bolid.adapter import IdentityEmbeds

    cfg, dtype = module.unet.config, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, cfg.in_channels, latent, latent, generator=g).to(device, dtype)
    text = torch.randn(b, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    pooled = torch.randn(b, pooled_dim, generator=g).to(device, dtype)
    time_ids = torch.tensor([8.0 * latent, 8.0 * latent, 0, 0, 8.0 * latent, 8.0 * latent]).repeat(b, 1).to(device)
    t = torch.full((b,), 500, device=device)
    face = torch.randn(b, module.adapter.image_encoder.embed_dim, generator=g).to(device)
    body = torch.randn(b, module.adapter.config.body_dim, generator=g).to(device)
    embeds = IdentityEmbeds(face, body, torch.ones(b, dtype=torch.bool, device=device))

    def forward(sample: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return module._unet(module.unet, sample, t, text, pooled, time_ids, embeds)

    def forward_only() -> None:
        with torch.no_grad():
            forward(x)

    def forward_backward() -> None:
        forward(x.detach().requires_grad_(True)).float().square().mean().backward()
        for p in module.adapter.trainable_parameters():
            p.grad = None

    return forward_only, forward_backward


def count_flops(fn: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def run_stage2(bench: Bench, scale: Scale, resolutions: tuple[int, ...], compile_after: bool = False) -> None:
    """Stage 2 at each resolution, k = 1..4, checkpointing on and off (one module, built on the device)."""
    if not resolutions:
        return
    dev = bench.device
    module = build_module(scale.kit, 2, dev)
    for res in resolutions:
        batch = synthetic_batch(1, res, scale.ref_size, dev)
        for ckpt in (True, False):
            for k in scale.stage2_ks:

                def case(res=res, k=k, ckpt=ckpt, batch=batch):
                    module.hparams.grad_steps, module.hparams.branch_resolution = k, res
                    set_checkpointing(module, ckpt)
                    row = timed(train_step_fn(module, batch, 2, dev), dev, scale.warmup, scale.repeats)
                    return {"stage": 2, "resolution": res, "batch": 1, "k": k, "checkpointing": ckpt, **row}

                bench.case("train", f"stage 2, {res} px, k={k}, ckpt={'on' if ckpt else 'off'}", 20, case)
    if compile_after:
        run_compile(bench, scale, module)
    module = None
    _free(dev)


def run_stage1(bench: Bench, scale: Scale, peak: float | None) -> None:
    """Stage 1 at each batch size, checkpointing on and off, then the UNet's MFU (its own module)."""
    dev = bench.device
    module = build_module(scale.kit, 1, dev)
    res = scale.stage1_resolution
    latent = res // (2 ** (len(module.vae.config.block_out_channels) - 1))
    for ckpt in (True, False):
        for b in scale.stage1_batches:

            def case(b=b, ckpt=ckpt):
                set_checkpointing(module, ckpt)
                batch = synthetic_batch(b, res, scale.ref_size, dev)
                row = timed(train_step_fn(module, batch, 1, dev), dev, scale.warmup, scale.repeats)
                return {"stage": 1, "resolution": res, "batch": b, "checkpointing": ckpt, **row}

            bench.case("train", f"stage 1, {res} px, batch {b}, ckpt={'on' if ckpt else 'off'}", 10, case)
    for b in scale.stage1_batches:

        def mfu_case(b=b):
            set_checkpointing(module, False)
            forward, run = unet_fns(module, b, latent, dev)
            fwd, total = count_flops(forward), count_flops(run)
            row = timed(run, dev, scale.warmup, scale.repeats)
            achieved = total / row["seconds"] / 1e12
            return {
                "batch": b, "resolution": res, "forward_tflop": fwd / 1e12, "fwd_bwd_tflop": total / 1e12,
                "achieved_tflops": achieved, "peak_tflops": peak, "mfu": achieved / peak if peak else None, **row,
            }  # fmt: skip

        bench.case("mfu", f"UNet + adapter fwd+bwd, {res} px, batch {b}", 10, mfu_case)
    module = None
    _free(dev)


def run_compile(bench: Bench, scale: Scale, module) -> None:
    """``torch.compile`` of the base UNet against eager, forward + backward at stage 1's resolution, batch 1."""
    dev = bench.device
    latent = scale.stage1_resolution // (2 ** (len(module.vae.config.block_out_channels) - 1))

    def case():
        set_checkpointing(module, False)
        eager = timed(unet_fns(module, 1, latent, dev)[1], dev, scale.warmup, scale.repeats)
        original = module.unet
        module.unet = torch.compile(original)
        try:
            t0 = time.perf_counter()
            run = unet_fns(module, 1, latent, dev)[1]
            run()
            _sync(dev)
            compile_s = time.perf_counter() - t0
            compiled = timed(run, dev, scale.warmup, scale.repeats)
        finally:
            module.unet = original
        return {
            "batch": 1, "eager_seconds": eager["seconds"], "compiled_seconds": compiled["seconds"],
            "speedup": eager["seconds"] / compiled["seconds"], "compile_seconds": compile_s,
        }  # fmt: skip

    bench.case("compile", "torch.compile(UNet), fwd+bwd, batch 1", 150, case)


# ----------------------------------------------------------------------------------------------- inference


def run_inference(bench: Bench, scale: Scale) -> None:
    from bolid.kits import random as random_kit
    from bolid.pipeline import BoLIDPipeline

    dev = bench.device
    with random_kit.on_device(dev):
        pipe = BoLIDPipeline.from_components(scale.kit, lightning=True, device=dev, dtype=torch.bfloat16)
    ref = synthetic_batch(1, 8, scale.ref_size, dev)
    with torch.no_grad():
        embeds = pipe.adapter.encode(ref["ref_pixels"], ref["ref_keypoints"], boxes=ref["ref_box"])
    res = scale.infer_resolution
    for n in scale.infer_batches:

        def case(n=n):
            def with_adapter():
                pipe.adapter.install(pipe.sdxl.unet)
                pipe(CAPTION, embeds=embeds, num_images=n, height=res, width=res, output_type="np")

            def plain():
                pipe.adapter.uninstall(pipe.sdxl.unet)
                pipe.sdxl(CAPTION, num_inference_steps=4, guidance_scale=0.0, num_images_per_prompt=n,
                          height=res, width=res, output_type="np")  # fmt: skip

            a, p = [], []
            for r in range(scale.warmup + scale.repeats):  # interleaved, so both see the same GPU state
                for fn, acc in ((with_adapter, a), (plain, p)):
                    row = timed(fn, dev, 0, 1)
                    if r >= scale.warmup:
                        acc.append(row["seconds"])
            pipe.adapter.install(pipe.sdxl.unet)
            sa, sp = statistics.median(a), statistics.median(p)
            return {
                "batch": n, "resolution": res, "steps": 4, "seconds_adapter": sa, "seconds_plain": sp,
                "overhead": sa / sp, "images_per_s_adapter": n / sa, "images_per_s_plain": n / sp,
            }  # fmt: skip

        bench.case("inference", f"4-step Lightning, {res} px, batch {n}", 15, case)
    pipe = None
    _free(dev)


# ------------------------------------------------------------------------------------------------ datapipe


def run_datapipe(bench: Bench, scale: Scale) -> None:
    from bolid.kits import random as random_kit
    from datapipe.annotate import Captioner, PoseModel
    from datapipe.config import BuildConfig
    from demo.synthetic import synthetic_photo

    dev = bench.device
    top = max(scale.datapipe_batches)
    photos = [synthetic_photo(*scale.photo_size, seed=i, figures=1) for i in range(top)]

    def config(batch: int) -> BuildConfig:
        return BuildConfig.from_dict(
            {
                "components": scale.kit,
                "device": str(dev),
                "dtype": "bfloat16",
                "pose": {"threshold": 0.0, "batch_size": batch},  # random weights: keep every box
                "caption": {"max_length": scale.caption_tokens, "batch_size": batch},
            }
        )

    pose = PoseModel(config(top))
    with random_kit.on_device(dev):  # the random kit builds straight on the GPU
        pose.load()
    pose.extractor.max_persons = 1  # one person crop per photo, as on BoLID's photos (random boxes are many)
    for n in scale.datapipe_batches:

        def pose_case(n=n):
            pose.config = config(n)
            pose.extractor.batch_size = n
            row = timed(lambda: pose(photos[:n]), dev, scale.warmup, scale.repeats)
            return {"model": "RT-DETR + ViTPose", "batch": n, "images_per_s": n / row["seconds"], **row}

        bench.case("datapipe", f"RT-DETR + ViTPose, batch {n}", 5, pose_case)
    pose.close()
    captioner = Captioner(config(top))
    with random_kit.on_device(dev):
        captioner.load()
    for n in scale.datapipe_batches:

        def caption_case(n=n):
            row = timed(lambda: captioner(photos[:n]), dev, scale.warmup, scale.repeats)
            return {
                "model": "BLIP-2 OPT-2.7b", "batch": n, "tokens": scale.caption_tokens,
                "images_per_s": n / row["seconds"], **row,
            }  # fmt: skip

        bench.case("datapipe", f"BLIP-2 captions ({scale.caption_tokens} tokens), batch {n}", 20, caption_case)
    captioner.close()


# -------------------------------------------------------------------------------------------------- report


def _f(v, fmt: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def report(results: dict) -> str:
    """The Markdown section: tables per part, PuLID beside stage 2, targets, skips, machine and command."""
    env, opts = results.get("environment", {}), results.get("options", {})
    smoke = opts.get("smoke")
    title = "## GPU benchmark at paper scale (`make bench-gpu`)"
    lines = [title, ""]
    if smoke:
        lines += ["**Smoke run on the CPU with the tiny kit: the figures only show that every part runs.**", ""]
    lines += [
        f"Kit `{opts.get('kit')}` (random: real architectures, random weights), bf16 autocast over bf16 frozen "
        "weights, SDPA attention; "
        f"median of {opts.get('repeats')} timed runs after {opts.get('warmup')} warm-up; peak = "
        "`torch.cuda.max_memory_allocated`.",
        "",
    ]
    done = lambda section: [r for r in results.get(section, []) if "seconds" in r or "seconds_adapter" in r]  # noqa: E731
    train = done("train")
    if train:
        lines += ["### Training (s/iter, peak GiB)", "",
                  "| stage | px | batch | k | checkpointing | s/iter | peak GiB | PuLID A100 s/iter | PuLID GiB |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in train:
            pulid = PULID_A100_768.get(r.get("k")) if r["stage"] == 2 and r["resolution"] == 768 else None
            lines.append(
                f"| {r['stage']} | {r['resolution']} | {r['batch']} | {r.get('k', '-')} | "
                f"{'on' if r['checkpointing'] else 'off'} | {_f(r['seconds'])} | "
                f"{_f(r.get('peak_memory_gib'), '.1f')} | {pulid[0] if pulid else '-'} | {pulid[1] if pulid else '-'} |"
            )
        lines.append("")
    mfu = done("mfu")
    if mfu:
        lines += ["### UNet forward + backward MFU", "",
                  "| batch | px | fwd TFLOP | fwd+bwd TFLOP | s | achieved TFLOP/s | peak TFLOP/s | MFU |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in mfu:
            lines.append(
                f"| {r['batch']} | {r['resolution']} | {_f(r['forward_tflop'], '.3f')} "
                f"| {_f(r['fwd_bwd_tflop'], '.3f')} "
                f"| {_f(r['seconds'], '.3f')} | {_f(r['achieved_tflops'], '.1f')} | {_f(r['peak_tflops'], '.0f')} "
                f"| {_f(r['mfu'] * 100 if r['mfu'] is not None else None, '.1f')}% |"
            )
        lines += ["", "The UNet is frozen: its backward pass computes input gradients only (about 1x the forward).", ""]
    infer = done("inference")
    if infer:
        lines += ["### Inference (4-step SDXL-Lightning, text encoding to decoded image)", "",
                  "| batch | px | s with adapter | s plain | overhead | images/s with adapter | images/s plain |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in infer:
            lines.append(
                f"| {r['batch']} | {r['resolution']} | {_f(r['seconds_adapter'], '.3f')} "
                f"| {_f(r['seconds_plain'], '.3f')} "
                f"| {_f(r['overhead'], '.3f')}x | {_f(r['images_per_s_adapter'])} | {_f(r['images_per_s_plain'])} |"
            )
        lines.append("")
    dp = done("datapipe")
    if dp:
        lines += [
            "### Datapipe models",
            "",
            "| model | batch | images/s | s/batch | peak GiB |",
            "|---|---|---|---|---|",
        ]
        for r in dp:
            lines.append(
                f"| {r['model']} | {r['batch']} | {_f(r['images_per_s'], '.1f')} | {_f(r['seconds'], '.3f')} "
                f"| {_f(r.get('peak_memory_gib'), '.1f')} |"
            )
        lines.append("")
    comp = [r for r in results.get("compile", []) if "speedup" in r]
    for r in comp:
        lines += [f"torch.compile(UNet), fwd+bwd batch 1: {_f(r['eager_seconds'], '.3f')} s eager, "
                  f"{_f(r['compiled_seconds'], '.3f')} s compiled, speed-up {_f(r['speedup'])}x "
                  f"(compiling took {_f(r['compile_seconds'], '.0f')} s).", ""]  # fmt: skip
    lines += targets(results)
    skipped = [
        f"{s}: {r['name']} ({r.get('skipped') or r.get('error')})"
        for s in ("train", "mfu", "inference", "datapipe", "compile")
        for r in results.get(s, [])
        if "skipped" in r or "error" in r
    ]
    if skipped:
        lines += ["Not measured:", "", *(f"- {s}" for s in skipped), ""]
    gpu = env.get("gpu") or f"CPU ({env.get('cpu')})"
    pk = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items())
    lines += [
        f"Machine: {gpu}{', ' + str(env.get('gpu_memory_gib')) + ' GiB' if env.get('gpu_memory_gib') else ''}; "
        f"torch {env.get('torch')}, CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}; {pk}; "
        f"Python {env.get('python')}. Budget {opts.get('budget')} s, used {_f(results.get('elapsed_s'), '.0f')} s.",
        "",
        f"Command: `{opts.get('command')}`",
    ]
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[str]:
    """The issue's targets, met or not, from whatever was measured."""
    rows = []
    t = TARGET_STAGE2
    s2 = [r for r in results.get("train", []) if r.get("stage") == 2 and r.get("k") == t["k"] and "seconds" in r
          and r.get("resolution") == t["resolution"]]  # fmt: skip
    if s2:
        best = min(s2, key=lambda r: r["seconds"] if r.get("peak_memory_gib", 0) <= t["memory_gib"] else math.inf)
        ok = best["seconds"] <= t["s_per_iter"] and best.get("peak_memory_gib", math.inf) <= t["memory_gib"]
        rows.append(
            f"| stage 2, {t['resolution']} px, k={t['k']} | <= {t['s_per_iter']} s/iter, <= {t['memory_gib']:.0f} GiB "
            f"| {_f(best['seconds'])} s/iter, {_f(best.get('peak_memory_gib'), '.1f')} GiB "
            f"(ckpt {'on' if best['checkpointing'] else 'off'}) | {'yes' if ok else '**no**'} |"
        )
    mfu = [r for r in results.get("mfu", []) if r.get("mfu") is not None]
    if mfu:
        best = max(mfu, key=lambda r: r["mfu"])
        rows.append(f"| UNet fwd+bwd MFU, bf16 | >= {TARGET_MFU:.0%} | {best['mfu']:.1%} (batch {best['batch']}) "
                    f"| {'yes' if best['mfu'] >= TARGET_MFU else '**no**'} |")  # fmt: skip
    inf = [r for r in results.get("inference", []) if "overhead" in r]
    if inf:
        worst = max(inf, key=lambda r: r["overhead"])
        met = "yes" if worst["overhead"] <= TARGET_OVERHEAD else "**no**"
        rows.append(f"| adapter inference overhead, {worst['resolution']} px | <= {TARGET_OVERHEAD:.2f}x "
                    f"| {worst['overhead']:.3f}x (batch {worst['batch']}) | {met} |")  # fmt: skip
    if not rows:
        return []
    return ["### Targets", "", "| target | goal | measured | met |", "|---|---|---|---|", *rows, ""]


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny kit on the CPU: checks the script, no figures")
    parser.add_argument(
        "--budget", type=float, default=None, help="hard time budget in seconds (default 480; smoke 120)"
    )
    parser.add_argument("--out", default="runs/bench_gpu", help="folder for bench_gpu.json and bench_gpu.md")
    parser.add_argument("--write", metavar="MD", help="also replace the 'gpu' section of this Markdown file")
    parser.add_argument("--only", default="train,inference,datapipe", help="comma list of parts (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile case (always off in smoke)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU when the GPU is not known")
    parser.add_argument("--device", default="cuda", help="CUDA device (default: %(default)s)")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"train", "inference", "datapipe"}
    if unknown:
        parser.error(f"--only: unknown part(s) {sorted(unknown)}; choose from train, inference, datapipe")
    if args.smoke:
        device, scale = torch.device("cpu"), Scale.smoke()
    else:
        if not torch.cuda.is_available():
            print(
                "bench_gpu: no CUDA GPU here. Absolute times count only on a GPU, so the benchmark does not run on a "
                "CPU.\n  On a GPU box: `make bench-gpu` (writes runs/bench_gpu/bench_gpu.json and .md and the 'gpu' "
                "section of BENCHMARKS.md).\n  To check the script end to end on this CPU: "
                "`python -m bench.bench_gpu --smoke` (tiny kit, no figures).",
                file=sys.stderr,
            )
            return 2
        device, scale = torch.device(args.device), Scale.paper()
    budget = args.budget if args.budget is not None else (120.0 if args.smoke else 480.0)
    start = time.monotonic()
    bench = Bench(device, start + budget, Path(args.out), estimate_scale=0.05 if args.smoke else 1.0)
    shown = argv if argv is not None else sys.argv[1:]
    bench.results["options"] = {
        "smoke": args.smoke, "budget": budget, "warmup": scale.warmup, "repeats": scale.repeats,
        "compile": not (args.no_compile or args.smoke), "kit": scale.kit,
        "command": shlex.join(["python", "-m", "bench.bench_gpu", *shown]),
    }  # fmt: skip
    bench.results["environment"] = environment(device)
    peak = peak_tflops(device, args.peak_tflops)

    def alarm(*_):
        raise BudgetExceeded

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(budget, 0.001))
    try:
        # Priority order: the targets (stage 2 at 768 px, MFU, adapter overhead) first, then the rest.
        first, rest = scale.stage2_resolutions[:1], scale.stage2_resolutions[1:]
        compile_ = bench.results["options"]["compile"] and "train" in parts
        if "train" in parts:
            run_stage2(bench, scale, first, compile_after=compile_ and not rest)
            run_stage1(bench, scale, peak)
        if "inference" in parts:
            run_inference(bench, scale)
        if "datapipe" in parts:
            run_datapipe(bench, scale)
        if "train" in parts:
            run_stage2(bench, scale, rest, compile_after=compile_)
    except BudgetExceeded:  # between cases (a build, say): what is done is kept
        bench.results.setdefault("stopped", "budget ran out")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    bench.results["elapsed_s"] = time.monotonic() - start
    bench.save()
    text = report(bench.results)
    print(text)
    if args.write:
        from bench.report import write_section

        write_section(args.write, "gpu", text)
        print(f"wrote {args.write}", file=sys.stderr)
    print(f"wrote {bench.out / 'bench_gpu.json'} and {bench.out / 'bench_gpu.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
