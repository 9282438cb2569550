"""The entry point lists its subcommands, and every YAML under configs/ parses and validates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bolid.__main__ import COMMANDS, LIGHTNING_COMMANDS, main
from bolid.config import ComponentsConfig, load_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("**/*.yaml"))


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "bolid", "--help"], capture_output=True, text=True, check=True).stdout
    for name in {**COMMANDS, **LIGHTNING_COMMANDS}:
        assert name in out


def test_unknown_subcommand_fails():
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_pose_command_on_a_real_photo(fixtures, capsys):
    assert main(["pose", "--backend", "blazepose", str(fixtures / "coco_000000000785.jpg")]) == 0
    out = capsys.readouterr().out
    assert '"persons": [{"box"' in out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(path):
    data = load_yaml(path)
    assert isinstance(data, dict) and data
    if "components" in data:
        ComponentsConfig.parse(data["components"])


def test_configs_exist():
    assert len(CONFIGS) >= 2


TRAIN_CONFIGS = [p for p in CONFIGS if "trainer" in load_yaml(p)]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=[p.name for p in TRAIN_CONFIGS])
def test_training_configs_validate_against_the_cli(path):
    """Every key of a LightningCLI config must exist and have the right type (parsed, not instantiated)."""
    from bolid.train.cli import BoLIDCLI
    from bolid.train.datamodule import PairDataModule
    from bolid.train.module import BoLIDTrainingModule

    class ParseOnly(BoLIDCLI):
        def instantiate_classes(self) -> None:  # parse and type-check only: no weights are loaded
            pass

    cli = ParseOnly(BoLIDTrainingModule, PairDataModule, run=False, args=["--config", str(path)])
    assert cli.config["model"]["components"] in ("tiny", "real")
    with pytest.raises(SystemExit):
        ParseOnly(BoLIDTrainingModule, PairDataModule, run=False, args=["--config", str(path), "--model.lrr", "1"])
