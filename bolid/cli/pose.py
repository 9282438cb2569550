"""``bolid pose``: persons, boxes and 17 COCO keypoints for each image, one JSON line per image."""

from __future__ import annotations

import argparse
import json
import sys

from bolid.components import KITS
from bolid.images import ImageError
from bolid.pose import build_extractor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--backend", choices=["vitpose", "blazepose"], default="vitpose", help="pose model")
    parser.add_argument(
        "--components", choices=KITS, default="real", help="components kit: real weights, the tiny random-init kit, ..."
    )
    parser.add_argument("--device", default="cpu", help="torch device for the vitpose backend")
    parser.add_argument("--threshold", type=float, default=0.5, help="person detection threshold (vitpose)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per detector batch (vitpose)")


def run(args: argparse.Namespace) -> int:
    if args.backend == "vitpose":
        extractor = build_extractor(
            "vitpose", args.components, device=args.device, threshold=args.threshold, batch_size=args.batch_size
        )
    else:
        extractor = build_extractor("blazepose")
    status = 0
    for path in args.images:
        try:
            persons = extractor([path])[0]
        except ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps({"image": path, "persons": [p.to_dict() for p in persons]}))
    return status
