"""The entry point lists its subcommands, and every YAML under configs/ parses and validates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import configkit
from bolid.__main__ import COMMANDS, LIGHTNING_COMMANDS, main
from bolid.config import ComponentsConfig, load_yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("**/*.yaml"))
IDS = [str(p.relative_to(CONFIG_DIR)) for p in CONFIGS]


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


def parse_fit_config(path: Path, *extra: str):
    """Parse and type-check a LightningCLI config (nothing is instantiated: no weights are loaded)."""
    from bolid.train.cli import BoLIDCLI
    from bolid.train.datamodule import PairDataModule
    from bolid.train.module import BoLIDTrainingModule

    class ParseOnly(BoLIDCLI):
        def instantiate_classes(self) -> None:
            pass

    return ParseOnly(BoLIDTrainingModule, PairDataModule, run=False, args=["--config", str(path), *extra])


def parse_config(path: Path, command: str | None = None):
    """Parse a config with the parser of ``command``, by default the one its folder is named for
    (configs/<command>/*.yaml)."""
    from bolid.cli.eval import EvalConfig
    from bolid.evaluate import load_prompts
    from crawler.config import CrawlConfig
    from datapipe.config import BuildConfig

    command = command or path.relative_to(CONFIG_DIR).parts[0]
    if command == "crawl":
        return CrawlConfig.from_yaml(path)
    if command == "shards":
        return BuildConfig.from_yaml(path)
    if command == "fit":
        return parse_fit_config(path).config
    if command == "eval":
        return load_prompts(path) if path.name.endswith("prompts.yaml") else EvalConfig.from_yaml(path)
    if command == "components":
        data = load_yaml(path)
        configkit.check_keys(data, {"components"})
        return ComponentsConfig.parse(data["components"])
    raise AssertionError(f"{path}: a config belongs in configs/<command>/ (crawl, shards, fit, eval, components)")


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_every_config_parses_with_its_commands_parser(path):
    assert parse_config(path)
    data = load_yaml(path)
    if "components" in data:
        ComponentsConfig.parse(data["components"])


def _misspelled(data: dict) -> tuple[dict, str, str]:
    """``data`` with one key misspelled (a nested one when the config has a section), the key and its typo."""
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "trainer":
            inner = next(iter(value))
            return (
                {**data, key: {f"{inner}x" if k == inner else k: v for k, v in value.items()}},
                f"{key}.{inner}",
                f"{inner}x",
            )
    key = next(iter(data))
    return {f"{key}x" if k == key else k: v for k, v in data.items()}, key, f"{key}x"


TYPO_CONFIGS = [p for p in CONFIGS if not p.name.endswith("prompts.yaml")]  # a prompt list has no keys


@pytest.mark.parametrize("path", TYPO_CONFIGS, ids=[str(p.relative_to(CONFIG_DIR)) for p in TYPO_CONFIGS])
def test_every_config_names_a_typo_and_the_key_meant(path, tmp_path, capsys):
    """One config system: a misspelt key in any config is an error naming the file, the typo and the key meant."""
    import yaml

    command = path.relative_to(CONFIG_DIR).parts[0]
    data, key, typo = _misspelled(load_yaml(path))
    bad = tmp_path / path.name
    bad.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    if command == "fit":
        with pytest.raises(SystemExit):
            parse_fit_config(bad)
        message = capsys.readouterr().err
    else:
        with pytest.raises(ValueError) as info:
            parse_config(bad, command)
        message = str(info.value)
        assert str(bad) in message or command == "components", message
    assert typo in message and f"did you mean {key}?" in message, message


def test_configs_are_grouped_by_command():
    assert {p.relative_to(CONFIG_DIR).parts[0] for p in CONFIGS} == {"crawl", "shards", "fit", "eval", "components"}


TRAIN_CONFIGS = [p for p in CONFIGS if p.relative_to(CONFIG_DIR).parts[0] == "fit"]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=[p.name for p in TRAIN_CONFIGS])
def test_training_configs_reject_a_typo(path):
    """Every key of a LightningCLI config must exist and have the right type (parsed, not instantiated)."""
    cli = parse_fit_config(path)
    assert cli.config["model"]["components"] in ("tiny", "real", "mini")
    with pytest.raises(SystemExit):
        parse_fit_config(path, "--model.lrr", "1")


def test_seed_everything_seeds_the_data_order_and_the_training_noise(capsys):
    """``seed_everything`` is the run's one seed: the DataModule's order and the module's per-step noise (both
    seeded explicitly, for exact resumes) follow it, a random ``true`` included; neither can be set apart."""
    tiny = CONFIG_DIR / "fit" / "tiny.yaml"
    for extra, seed in (((), 0), (("--seed_everything", "7"), 7)):
        config = parse_fit_config(tiny, *extra).config
        assert (config.data.seed, config.model.seed) == (seed, seed)
    drawn = parse_fit_config(tiny, "--seed_everything", "true").config
    assert isinstance(drawn.seed_everything, int) and drawn.data.seed == drawn.model.seed == drawn.seed_everything
    with pytest.raises(SystemExit):
        parse_fit_config(tiny, "--data.seed", "3")
    assert 'must be given via "seed_everything"' in capsys.readouterr().err
