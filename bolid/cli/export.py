"""``bolid export``: a training checkpoint (``.ckpt``) -> an adapter folder and its stock-diffusers export.

Training writes the adapter when it ends; this turns any checkpoint into one, e.g. an intermediate step
to evaluate, or the ``last.ckpt`` of a run that was stopped. The checkpoint records the components and the
adapter's settings, so only the frozen base model is loaded again (the adapter is shaped by its UNet).
"""

from __future__ import annotations

import argparse
import inspect
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

    from bolid.train.module import BoLIDTrainingModule

    path = Path(args.ckpt)
    if not path.is_file():
        raise SystemExit(f"error: no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise SystemExit(f"error: {path} is not a `bolid fit` checkpoint (no hyper_parameters / state_dict)")
    accepted = set(inspect.signature(BoLIDTrainingModule.__init__).parameters) - {"self"}
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if k in accepted}  # drops LightningCLI bookkeeping
    # Only the base UNet and the image encoder are needed to rebuild the adapter: no Lightning branch.
    hp.update(stage=1, w_id=0.0, w_clip=0.0, sample_every_n_steps=0, init_adapter=None, cache_dir=None)
    hp["adapter"] = ckpt.get("adapter_config") or hp.get("adapter")
    if args.components:
        hp["components"] = args.components
    module = BoLIDTrainingModule(**hp)
    missing = set(module.trainable_named_parameters()) - set(ckpt["state_dict"])
    if missing:
        raise SystemExit(f"error: {path} lacks {len(missing)} adapter weights (e.g. {sorted(missing)[0]})")
    module.load_state_dict(ckpt["state_dict"], strict=False)
    if args.ema:
        if "ema" not in ckpt:
            raise SystemExit(f"error: {path} holds no EMA weights (train with model.ema_decay set)")
        module._ema = dict(ckpt["ema"])
    out = module.save_adapter(args.out, ema=args.ema)
    if not args.no_diffusers:
        module.adapter.export_diffusers(Path(out) / "diffusers")
    log.info("step %s of %s -> %s%s", ckpt.get("global_step"), path, out, " (EMA)" if args.ema else "")
    return 0
