"""``python -m bolid`` / ``bolid``: one entry point for every BoLID command.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them, so ``--help`` shows what exists and a
module is imported only when its command runs. LightningCLI commands (``fit``,
``validate``, ``test``) are handed their own argv untouched.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Modules define add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "components": ("bolid.cli.components", "list the pretrained components, where each resolves, and check them"),
    "pose": ("bolid.cli.pose", "extract persons and 17 COCO keypoints from images (JSON lines)"),
    "generate": ("bolid.cli.generate", "generate images of the person in reference photo(s) from a prompt"),
    "export": ("bolid.cli.export", "turn a training checkpoint into an adapter folder + stock-diffusers files"),
    "app": ("bolid.cli.app", "the generation web page (Gradio): references, keypoints, sliders, Body Sim"),
    "eval": ("bolid.cli.eval", "the comparison table (Body Sim, CLIP-T, CLIP-I) and figure from an eval config"),
}
# name -> (module with a `main(argv)` function, one-line help): commands with their own parser.
LIGHTNING_COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("bolid.train.cli", "train the adapter (LightningCLI; e.g. --config configs/fit/tiny.yaml)"),
    "validate": ("bolid.train.cli", "validation loss of an adapter checkpoint on held-out identities"),
    "test": ("bolid.train.cli", "test loss of an adapter checkpoint on the test identities"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bolid",
        description="BoLID: Body-Lightning ID Diffusion. Identity-preserving SDXL generation that keeps the body.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in {**COMMANDS, **LIGHTNING_COMMANDS}.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        module = importlib.import_module(LIGHTNING_COMMANDS[argv[0]][0])
        return int(module.main(argv) or 0)
    top = build_parser()
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv)  # prints help, or errors on an unknown command
        top.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"bolid {name}", description=COMMANDS[name][1])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    setup_logging(args.verbose)
    return int(module.run(args) or 0)


def setup_logging(verbose: bool = False) -> None:
    """Timestamped INFO (DEBUG with ``verbose``) logging on stderr, without the libraries' duplicate lines."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in ("lightning.pytorch", "lightning.fabric"):  # they print through their own handler already
        logging.getLogger(name).propagate = False
    for handler in logging.getLogger().handlers:  # open_clip logs routine INFO through the root logger itself
        handler.addFilter(lambda record: record.name != "root" or record.levelno >= logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
