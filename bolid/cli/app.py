"""``bolid app``: the generation web page (Gradio), on 127.0.0.1 unless ``--host`` is given.

The model options are ``bolid generate``'s own (:func:`bolid.cli.generate.add_model_arguments`), so any kit
the CLI accepts works here; the default kit is the tiny one, which runs on any CPU (its images are noise: it
shows that everything works, not what trained weights produce). Gradio is an optional dependency
(``pip install 'bolid[app]'``), imported only when this command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from bolid.cli.generate import add_model_arguments

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.set_defaults(components="tiny")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also make a public Gradio share link (off by default)")
    parser.add_argument(
        "--examples", nargs="*", default=None, help="example reference photos offered on the page (default: bundled)"
    )
    parser.add_argument("--max-upload-mb", type=int, default=64, help="largest upload accepted, in MB")
    parser.add_argument("--max-megapixels", type=float, default=40.0, help="largest photo accepted, in megapixels")
    parser.add_argument("--max-images", type=int, default=8, help="most images per generation")
    parser.add_argument("--keep-minutes", type=float, default=60.0, help="generated files are deleted after this")


def _examples(given: list[str] | None) -> list[Path]:
    from bolid.app import EXAMPLES

    if given is None:
        return sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    missing = [p for p in given if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"--examples: not found: {', '.join(missing)}")
    return [Path(p).resolve() for p in given]


def run(args: argparse.Namespace) -> int:
    from bolid.adapter import AdapterShapeError
    from bolid.app.engine import AppEngine
    from bolid.components import MissingWeightsError

    for name in ("max_upload_mb", "max_megapixels", "max_images", "keep_minutes"):
        if getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}", file=sys.stderr)
            return 2
    engine = AppEngine(
        args, max_pixels=int(args.max_megapixels * 1e6), max_images=args.max_images, keep_s=args.keep_minutes * 60
    )
    # Gradio's uploads and cached outputs go under the engine's folder too, so stopping the app removes them all.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(engine.workdir / "gradio"))
    try:
        from bolid.app import ui
    except ImportError as e:
        engine.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        examples = _examples(args.examples)
        engine.default_pipeline()  # load the model before serving: missing weights fail here, not on the first click
        ui.launch(
            engine,
            host=args.host,
            port=args.port,
            share=args.share,
            max_upload_mb=args.max_upload_mb,
            examples=examples,
            keep_s=int(args.keep_minutes * 60),
        )
    except (MissingWeightsError, AdapterShapeError, FileNotFoundError, ValueError, OSError) as e:
        log.debug("app failed", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
    return 0
