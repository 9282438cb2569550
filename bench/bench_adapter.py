"""Adapter benchmark: the Body-Condition Module's cost in a frozen SDXL-shaped UNet, measured side by side.

One run times, interleaved (ABAB... so that machine noise hits every variant alike), after warm-up, the median of
``--repeats`` steps of:

* a training step, forward + backward, UNet frozen: the plain UNet (gradients flow back to the input latents, so
  the backward pass is as deep as the adapter's) against the UNet with the adapter trainable (encoder heads,
  projections and ``to_k_ip`` / ``to_v_ip``), once with every face visible and once with half the faces dropped
  (the per-sample ``ip_adapter_masks`` path); the frozen EVA-CLIP forward is not in the step (its embeddings
  are an input, precomputable per reference);
* an inference step (one UNet forward, no grad) with and without the adapter;
* trainable parameters against the UNet's, for the benchmarked UNet and for SDXL's full UNet (counted on the
  meta device, nothing allocated).

Goals: training-step overhead <= 1.15x, inference-step overhead <= 1.10x, trainable parameters < 5% of the UNet.

The default UNet is mid-size and SDXL-shaped (channels 160/320/640, 1/2/4 transformer layers, 34 cross-attention
layers, cross-attention width 1024) on 32x32 latents, float32 on the CPU. ``--real-size`` runs SDXL's full UNet
config (70 cross-attention layers, width 2048) in bfloat16 on CUDA at 128x128 latents (1024 px) and also reports
seconds per step and peak GPU memory. On the CPU the steps run on one thread and are timed in process CPU time,
which a shared machine's other work does not inflate. Prints a Markdown table; ``--write BENCHMARKS.md`` replaces
the section between ``<!-- bench:adapter:start -->`` and ``<!-- bench:adapter:end -->`` in that file (appending
it if absent).

    python -m bench.bench_adapter --write BENCHMARKS.md
    python -m bench.bench_adapter --real-size --write BENCHMARKS.md     # on a CUDA machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.report import command, machine, write_section
from bolid.adapter import BodyConditionModule, IdentityEmbeds
from bolid.image_encoder import ClipImageEncoder

ROOT = Path(__file__).resolve().parents[1]

GOAL_TRAIN, GOAL_INFER, GOAL_PARAMS = 1.15, 1.10, 0.05

_SDXL_BLOCKS = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    use_linear_projection=True,
    addition_embed_type="text_time",
    in_channels=4,
    out_channels=4,
)
#: SDXL base 1.0's UNet config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json).
SDXL_UNET = dict(
    _SDXL_BLOCKS,
    block_out_channels=(320, 640, 1280),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 * 256 + 1280 (pooled text)
    sample_size=128,
)
#: Half SDXL's widths, fewer transformer layers; 64-wide heads as SDXL's.
MID_UNET = dict(
    _SDXL_BLOCKS,
    block_out_channels=(160, 320, 640),
    attention_head_dim=(5, 5, 10),
    transformer_layers_per_block=(1, 2, 4),
    cross_attention_dim=1024,
    addition_time_embed_dim=128,
    projection_class_embeddings_input_dim=1408,  # 6 * 128 + 640
    sample_size=32,
)
EVA = "EVA02-L-14-336"  # BoLID's default image encoder: fixes the face / body vector width (768)


def build(config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A random-init UNet of ``config`` and a fresh adapter for it (image encoder on the meta device)."""
    import open_clip
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it runs (SDXL's 2.6B parameters init fast on a GPU)
        unet = UNet2DConditionModel(**config).to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):  # only its width matters here; its forward is not part of a step
        eva = open_clip.create_model(EVA, pretrained=None, device="meta")
    adapter = BodyConditionModule(unet, ClipImageEncoder(eva, EVA))
    for p in adapter.trainable_parameters():
        p.data = p.data.to(device, dtype)
    return unet, adapter


def count_sdxl_params() -> tuple[int, int]:
    """(UNet, adapter trainable) parameter counts for SDXL's full UNet, built on the meta device."""
    with torch.device("meta"):
        unet, adapter = build(SDXL_UNET, "meta", torch.float32)
    return sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in adapter.trainable_parameters())


def make_inputs(unet, adapter, batch: int, latent: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    kp = torch.rand(batch, 17, 3, generator=g) * torch.tensor([300.0, 400.0, 1.0])
    kp[:, :, 2] = 1.0
    return {
        "sample": randn(batch, 4, latent, latent),
        "t": torch.full((batch,), 500, device=device),
        "text": randn(batch, 77, cfg.cross_attention_dim),
        "added": {
            "text_embeds": randn(batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim),
            "time_ids": randn(batch, 6),
        },
        "clip_face": randn(batch, adapter.image_encoder.embed_dim),  # precomputed frozen EVA-CLIP embeddings
        "clip_body": randn(batch, adapter.image_encoder.embed_dim),
        "keypoints": kp.to(device),
        "target": randn(batch, 4, latent, latent),
    }


def embeds_of(adapter, x: dict, face_visible: torch.Tensor) -> IdentityEmbeds:
    """The trainable part of :meth:`BodyConditionModule.encode`, from precomputed CLIP embeddings."""
    face = adapter.face_encoder(x["clip_face"]) * face_visible[:, None].to(x["clip_face"].dtype)
    body = adapter.body_encoder(x["keypoints"], x["clip_body"])
    return IdentityEmbeds(face, body, face_visible)


def steps(unet, adapter, x: dict) -> dict[str, Callable[[], None]]:
    """The step variants; each installs or removes the adapter as it needs (cheap: processor swaps)."""
    n = x["sample"].shape[0]
    visible = torch.ones(n, dtype=torch.bool, device=x["sample"].device)
    mixed = visible.clone()
    mixed[::2] = False  # half the faces dropped (all of them at batch 1)

    def plain(train: bool):
        if in_unet(unet, adapter):
            adapter.uninstall(unet)
        sample = x["sample"].detach().requires_grad_(train)
        with torch.set_grad_enabled(train):
            out = unet(sample, x["t"], x["text"], added_cond_kwargs=x["added"]).sample
            if train:
                F.mse_loss(out.float(), x["target"].float()).backward()

    def with_adapter(train: bool, face_visible: torch.Tensor):
        if not in_unet(unet, adapter):
            adapter.install(unet)
        sample = x["sample"].detach().requires_grad_(train)  # as deep a backward as the plain step's
        with torch.set_grad_enabled(train):
            embeds = embeds_of(adapter, x, face_visible)
            kwargs = adapter.unet_kwargs(embeds, sample, x["added"])
            out = unet(sample, x["t"], x["text"], **kwargs).sample
            if train:
                F.mse_loss(out.float(), x["target"].float()).backward()
                for p in adapter.trainable_parameters():
                    p.grad = None

    return {
        "train_plain": lambda: plain(True),
        "train_adapter": lambda: with_adapter(True, visible),
        "train_adapter_mixed": lambda: with_adapter(True, mixed),
        "infer_plain": lambda: plain(False),
        "infer_adapter": lambda: with_adapter(False, visible),
    }


def in_unet(unet, adapter) -> bool:
    return unet.encoder_hid_proj is adapter.image_proj


def time_all(fns: dict[str, Callable[[], None]], warmup: int, repeats: int, cuda: bool) -> dict[str, list[float]]:
    """Seconds per call of each function: wall clock on CUDA, this process's CPU time on the CPU.

    CPU time, with one thread (see ``--threads``), is what the step costs whatever else the machine runs;
    wall-clock ratios on a shared 2-core box swing by 2x from one run to the next.
    """
    clock = time.perf_counter if cuda else time.process_time
    times: dict[str, list[float]] = {k: [] for k in fns}
    peak: dict[str, float] = {}
    for r in range(warmup + repeats):
        for name, fn in fns.items():  # interleaved: every variant sees the same machine state
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = clock()
            fn()
            if cuda:
                torch.cuda.synchronize()
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            if r >= warmup:
                times[name].append(clock() - t0)
    times["_peak_gib"] = [peak.get(k, float("nan")) for k in fns]
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-size", action="store_true", help="SDXL's full UNet in bfloat16 on CUDA (1024 px)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 2; 1 with --real-size)")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 32; 128 with --real-size)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, median reported (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: %(default)s)")
    parser.add_argument("--write", metavar="MD", help="replace this benchmark's section in a Markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.real_size and not torch.cuda.is_available():
        parser.error("--real-size needs a CUDA GPU (it runs SDXL's full UNet in bfloat16)")
    device, dtype = ("cuda", torch.bfloat16) if args.real_size else ("cpu", torch.float32)
    config = SDXL_UNET if args.real_size else MID_UNET
    batch = args.batch or (1 if args.real_size else 2)
    latent = args.latent or config["sample_size"]

    unet, adapter = build(config, device, dtype)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_adapter = sum(p.numel() for p in adapter.trainable_parameters())
    sdxl_unet, sdxl_adapter = count_sdxl_params()
    x = make_inputs(unet, adapter, batch, latent, device, dtype)
    fns = steps(unet, adapter, x)
    times = time_all(fns, args.warmup, args.repeats, device == "cuda")
    peak = dict(zip(fns, times.pop("_peak_gib"), strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio_train = med["train_adapter"] / med["train_plain"]
    ratio_mixed = med["train_adapter_mixed"] / med["train_plain"]
    ratio_infer = med["infer_adapter"] / med["infer_plain"]
    share, sdxl_share = n_adapter / n_unet, sdxl_adapter / sdxl_unet

    def ok(good: bool) -> str:
        return "yes" if good else "**no**"

    size = "SDXL full UNet, bf16, CUDA" if args.real_size else "mid-size SDXL-shaped UNet, fp32, CPU"
    layers = len(adapter.processors)
    rows = [
        ("training step, all faces (adapter / plain)", f"<= {GOAL_TRAIN:.2f}x", f"{ratio_train:.3f}x",
         ok(ratio_train <= GOAL_TRAIN), f"{med['train_adapter']:.3f} / {med['train_plain']:.3f}"),
        ("training step, faces dropped in half the batch (mask path)", f"<= {GOAL_TRAIN:.2f}x", f"{ratio_mixed:.3f}x",
         ok(ratio_mixed <= GOAL_TRAIN), f"{med['train_adapter_mixed']:.3f} / {med['train_plain']:.3f}"),
        ("inference step (adapter / plain)", f"<= {GOAL_INFER:.2f}x", f"{ratio_infer:.3f}x",
         ok(ratio_infer <= GOAL_INFER), f"{med['infer_adapter']:.3f} / {med['infer_plain']:.3f}"),
        ("trainable parameters / UNet, this UNet", f"< {GOAL_PARAMS:.0%}", f"{share:.2%}", ok(share < GOAL_PARAMS),
         f"{n_adapter / 1e6:.1f}M / {n_unet / 1e6:.0f}M"),
        ("trainable parameters / UNet, SDXL full size", f"< {GOAL_PARAMS:.0%}", f"{sdxl_share:.2%}",
         ok(sdxl_share < GOAL_PARAMS), f"{sdxl_adapter / 1e6:.1f}M / {sdxl_unet / 1e6:.0f}M"),
    ]  # fmt: skip
    cmd = command("bench.bench_adapter", argv)
    lines = [
        f"### Body-Condition Module overhead ({size})",
        "",
        f"{layers} cross-attention layers, batch {batch}, {latent}x{latent} latents, 77 text + 2x4 identity tokens; "
        f"median of {args.repeats} interleaved steps after {args.warmup} warm-up rounds; "
        + ("wall-clock seconds." if device == "cuda" else f"CPU seconds, {args.threads} thread(s)."),
        "",
        "| measure | goal | measured | met | seconds or counts (adapter / plain) |",
        "|---|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows),
    ]
    if device == "cuda":
        lines += [
            "",
            "| step | s/step | peak GPU memory (GiB) |",
            "|---|---|---|",
            *(f"| {k} | {med[k]:.3f} | {peak[k]:.1f} |" for k in fns),
        ]
    lines += ["", f"Machine: {machine()}.", "", f"Command: `{cmd}`"]
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(args.write, "adapter", section)
        print(f"wrote {args.write}", file=sys.stderr)
    met = ratio_train <= GOAL_TRAIN and ratio_mixed <= GOAL_TRAIN and ratio_infer <= GOAL_INFER and share < GOAL_PARAMS
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
