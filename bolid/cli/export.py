"""``bolid export``: a training checkpoint (``.ckpt``) -> an adapter folder and its stock-diffusers export.

Training writes the adapter when it ends; this turns any checkpoint into one, e.g. an intermediate step
to evaluate, or the ``last.ckpt`` of a run that was stopped. The checkpoint records the components, the
adapter's settings and its trained weights, so only what shapes the adapter is loaded again: the base UNet
(whose cross-attention K/V the adapter's low-rank updates apply to) and the image encoder (its width).
No VAE, text encoders, Lightning UNet or training module.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="a checkpoint written by `bolid fit` (e.g. runs/stage1/checkpoints/last.ckpt)")
    parser.add_argument("-o", "--out", required=True, help="adapter folder to write (adapter.safetensors + .json)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (needs model.ema_decay)")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the stock-diffusers IP-Adapter files")
    parser.add_argument(
        "--components", help="override the checkpoint's components (tiny, real), e.g. to use local weights"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from bolid import components
    from bolid.adapter import AdapterConfig, BodyConditionModule
    from bolid.config import ComponentsConfig
    from bolid.image_encoder import ClipImageEncoder

    path = Path(args.ckpt)
    if not path.is_file():
        raise SystemExit(f"error: no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise SystemExit(f"error: {path} is not a `bolid fit` checkpoint (no hyper_parameters / state_dict)")
    hp = ckpt["hyper_parameters"]
    if args.ema and "ema" not in ckpt:
        raise SystemExit(f"error: {path} holds no EMA weights (train with model.ema_decay set)")
    cfg = ComponentsConfig.parse(args.components or hp.get("components", "real"))
    unet = components.load_unet(cfg)
    image_encoder = ClipImageEncoder.from_components(cfg.kind, cfg.source("eva_clip"))
    settings = ckpt.get("adapter_config") or hp.get("adapter") or {}
    adapter = BodyConditionModule(unet, image_encoder, AdapterConfig.from_dict(settings))
    # As in training: the frozen parts in model.frozen_dtype, the trainable ones in fp32.
    dtype = components.DTYPES[hp.get("frozen_dtype", "fp32")]
    if dtype != torch.float32:
        unet.to(dtype)
        image_encoder.to(dtype)
    for p in adapter.trainable_parameters():
        p.data = p.data.float()
    weights = ckpt["ema"] if args.ema else ckpt["state_dict"]
    state = {k.removeprefix("adapter."): v for k, v in weights.items() if k.startswith("adapter.")}
    missing = set(adapter.adapter_state_dict()) - set(state)
    if missing:
        raise SystemExit(f"error: {path} lacks {len(missing)} adapter weights (e.g. adapter.{sorted(missing)[0]})")
    adapter.load_state_dict(state, strict=False)
    out = adapter.save(args.out)
    if not args.no_diffusers:
        adapter.export_diffusers(Path(out) / "diffusers")
    log.info("step %s of %s -> %s%s", ckpt.get("global_step"), path, out, " (EMA)" if args.ema else "")
    return 0
