"""configkit, the one config system: keys from the dataclass (did you mean), types and ranges from annotations."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Literal

import pytest
from jsonargparse.typing import ClosedUnitInterval, PositiveInt

import configkit
from configkit import number


@dataclass(frozen=True)
class Section:
    backend: Literal["a", "b"] = "a"
    threshold: ClosedUnitInterval = 0.5
    area: number(float, (">", 0), ("<=", 1)) = 0.25
    batch_size: PositiveInt = 8
    cap: PositiveInt | None = None
    names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Top:
    out: str
    workers: number(int, (">=", -1)) = -1
    section: Section = field(default_factory=Section)


def test_defaults_and_values_are_builtin_and_pickle():
    top = configkit.parse(Top, {"out": "x", "section": {"batch_size": 3, "names": ["p"]}})
    assert top == Top("x", -1, Section(batch_size=3, names=["p"]))
    assert type(top.section.batch_size) is int and type(top.section.area) is float  # not jsonargparse's subclasses
    assert pickle.loads(pickle.dumps(top)) == top  # configs travel to worker processes


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"out": "x", "sectoin": {}}, r"^unknown config key\(s\): sectoin \(did you mean section\?\); valid: out, "),
        ({"out": "x", "section": {"batch_sise": 1}}, r"section\.batch_sise \(did you mean section\.batch_size\?\)"),
        ({}, r"^missing key 'out'$"),
        ({"out": "x", "section": 3}, r"^section must be a mapping, got int$"),
        ({"out": "x", "section": {"threshold": 2}}, r"^section\.threshold must be a number in \[0, 1\], got 2$"),
        ({"out": "x", "section": {"area": 0}}, r"^section\.area must be a number in \(0, 1\], got 0$"),
        ({"out": "x", "section": {"backend": "c"}}, r"^section\.backend must be one of 'a', 'b', got 'c'$"),
        ({"out": "x", "section": {"batch_size": "8"}}, r"^section\.batch_size must be an int > 0, got '8'$"),
        ({"out": "x", "section": {"cap": 0}}, r"^section\.cap must be an int > 0 or null, got 0$"),
        ({"out": "x", "section": {"names": "p"}}, r"^section\.names must be a list of strings, got 'p'$"),
        ({"out": "x", "workers": -2}, r"^workers must be an int >= -1, got -2$"),
        ({"out": "x", "workers": True}, r"^workers must be an int >= -1, got True$"),
    ],
)
def test_errors_name_the_key_and_what_is_valid(data, message):
    with pytest.raises(ValueError, match=message):
        configkit.parse(Top, data)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: x\nsection:\n  treshold: 0.4\n")
    with pytest.raises(ValueError, match=r"c\.yaml: unknown config key\(s\): section\.treshold \(did you mean"):
        configkit.parse_yaml(Top, path)
    path.write_text("- a\n")
    with pytest.raises(ValueError, match=r"c\.yaml: top level must be a mapping, got list"):
        configkit.parse_yaml(Top, path)


def test_did_you_mean_for_jsonargparse_errors():
    keys = {"model.lr", "model.components", "data.batch_size"}
    hint = configkit.did_you_mean("Group 'model' does not accept option 'componets'", keys)
    assert hint.endswith("(did you mean model.components?)")
    assert configkit.did_you_mean("unrecognized arguments: --model.lrr 1", keys).endswith("(did you mean model.lr?)")
    assert configkit.did_you_mean("Key 'data.batch_sizee' is not expected", keys).endswith("data.batch_size?)")
    assert configkit.did_you_mean("something else", keys) == "something else"
