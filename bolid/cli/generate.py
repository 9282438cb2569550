"""``bolid generate``: reference photo(s) of one person + a prompt -> PNGs and a JSON of every setting used.

Several references are combined by the mean of their embedding vectors (see :mod:`bolid.reference`).
The output folder gets ``image_000.png``, ``image_001.png``, ..., ``settings.json`` and
``embeds.safetensors`` (the face and body vectors, reusable as diffusers ``ip_adapter_image_embeds``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from bolid.components import KITS
from bolid.files import atomic_write

log = logging.getLogger(__name__)

POSE_BACKENDS = ("vitpose", "blazepose")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick the model (kit, adapter, UNet, pose model, device); shared with ``bolid app``."""
    parser.add_argument("--components", choices=KITS, default="real", help="components kit: real weights, tiny, ...")
    parser.add_argument("--adapter", default=None, help="adapter folder (adapter.safetensors + adapter.json)")
    parser.add_argument(
        "--no-lightning", dest="lightning", action="store_false", help="use the SDXL base UNet instead of Lightning"
    )
    parser.add_argument("--pose-threshold", type=float, default=0.5, help="person detection threshold")
    parser.add_argument(
        "--pose",
        choices=list(POSE_BACKENDS),
        default="vitpose",
        help="pose model that finds the person in the references: the kit's ViTPose, or MediaPipe BlazePose",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default float32 on CPU, bfloat16 on CUDA")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("references", nargs="+", help="reference photo(s) of one person")
    parser.add_argument("-p", "--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (only used with CFG)")
    parser.add_argument("-o", "--out", default="outputs/generate", help="output folder (created)")
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 4 Lightning, 30 base)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default 0 = off Lightning, 5 base)")
    parser.add_argument("--scale-face", type=float, default=1.0, help="lambda_face, weight of the face term")
    parser.add_argument("--scale-body", type=float, default=1.0, help="lambda_body, weight of the body term")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--num-images", type=int, default=1, help="images to generate")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")


def check_args(args: argparse.Namespace) -> None:
    for name in ("num_images", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"--{name} must be a positive multiple of 8, got {value}")
    missing = [r for r in args.references if not Path(r).is_file()]
    if missing:
        raise FileNotFoundError(f"reference photo(s) not found: {', '.join(missing)}")


def build_pipeline(args: argparse.Namespace, extractor=None):
    """The pipeline that the model options in ``args`` (:func:`add_model_arguments`) describe.

    Args:
        args: parsed model options.
        extractor: a pose extractor to reuse (e.g. from a previous pipeline); default builds ``args.pose``.
    """
    from bolid.pipeline import BoLIDPipeline
    from bolid.pose import BlazePoseExtractor

    if extractor is None and args.pose == "blazepose":
        extractor = BlazePoseExtractor(min_detection_confidence=args.pose_threshold)
    adapter = args.adapter
    if adapter is None and args.components == "mini":  # the mini kit ships a trained adapter
        from bolid.kits.mini import adapter_dir

        adapter = adapter_dir()
    pipe = BoLIDPipeline.from_components(
        args.components,
        lightning=args.lightning,
        adapter=adapter,
        device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        pose_threshold=args.pose_threshold,
        extractor=extractor,
    )
    pipe.info["pose"] = args.pose
    return pipe


def generate_images(pipe, args: argparse.Namespace, identity: bool = True):
    """Run ``pipe`` with the generation options in ``args`` (checked by :func:`check_args`); a ``GenerationResult``.

    ``identity=False`` gives the base model's images for the same prompt, seeds and sampling: no references.
    """
    conditioning = (
        {"references": args.references, "scale_face": args.scale_face, "scale_body": args.scale_body}
        if identity
        else {}
    )
    return pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        num_images=args.num_images,
        height=args.height,
        width=args.width,
        **conditioning,
    )


def save_result(result, out: str | Path, command: str = "generate", argv: list[str] | None = None) -> list[Path]:
    """Write ``image_000.png ...``, ``embeds.safetensors`` and ``settings.json`` of a generation into ``out``.

    Returns:
        The paths written, images first, then ``settings.json`` and ``embeds.safetensors``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(result.images):
        path = out / f"image_{i:03d}.png"
        image.save(path)
        files.append(path)
    result.embeds.save(out / "embeds.safetensors")
    settings = {"command": command, "argv": sys.argv if argv is None else argv, "images": [f.name for f in files]}
    settings.update(result.settings)
    atomic_write(out / "settings.json", json.dumps(settings, indent=1, default=str))
    return [*files, out / "settings.json", out / "embeds.safetensors"]


def run(args: argparse.Namespace) -> int:
    from bolid.adapter import AdapterShapeError
    from bolid.components import MissingWeightsError
    from bolid.images import ImageError
    from bolid.reference import NoPersonError

    try:
        check_args(args)
        result = generate_images(build_pipeline(args), args)
    except (MissingWeightsError, AdapterShapeError, NoPersonError, ImageError, FileNotFoundError, ValueError) as e:
        log.debug("generate failed", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = save_result(result, args.out)
    log.info("wrote %d image(s), settings.json and embeds.safetensors to %s", len(files) - 2, args.out)
    return 0
