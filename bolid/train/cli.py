"""``bolid fit|validate|test``: LightningCLI over :class:`BoLIDTrainingModule` and :class:`PairDataModule`.

Configs live in ``configs/fit/`` (``tiny.yaml`` for a CPU smoke run, ``stage1.yaml`` / ``stage2.yaml`` for
real training); every typed ``__init__`` argument is a config key and a ``--model.*`` / ``--data.*`` flag.
"""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import configkit
from bolid.train.datamodule import PairDataModule
from bolid.train.module import BoLIDTrainingModule


class BoLIDArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose unknown-key errors also name the closest valid key (as every other config's)."""

    def error(self, message: str, ex: Exception | None = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        return super().error(configkit.did_you_mean(message, configkit.parser_keys(parser)), ex)


class BoLIDCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_class", BoLIDArgumentParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # One seed for a run, Lightning's own ``seed_everything``: the data order and the module's per-step
        # noise (both seeded explicitly, so a resumed run draws what an uninterrupted one would) follow it.
        # Neither is a key of its own, so a config cannot set one seed and silently train on another.
        for target in ("data.seed", "model.seed"):
            parser.link_arguments("seed_everything", target, compute_fn=_placeholder_seed)

    def before_instantiate_classes(self) -> None:
        # ``_set_seed`` has run: ``seed_everything: true`` is now the random seed it drew, ``false`` stays false.
        config = self.config[self.subcommand] if self.subcommand else self.config
        seed = config.get("seed_everything")
        seed = 0 if seed is False or seed is None else int(seed)
        config.data.seed = config.model.seed = seed


def _placeholder_seed(seed) -> int:
    """``seed_everything`` at parse time; ``true`` (a random seed) is resolved in ``before_instantiate_classes``."""
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def main(argv: list[str] | None = None) -> int:
    # Frozen models are in eval mode on purpose (see BoLIDTrainingModule.train); don't warn about it.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    BoLIDCLI(
        BoLIDTrainingModule,
        PairDataModule,
        args=None if argv is None or list(argv) == sys.argv[1:] else list(argv),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "bolid", "description": "Train, validate or test the BoLID adapter."},
    )
    return 0
