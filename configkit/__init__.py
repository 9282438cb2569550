"""One way to read a config: a dataclass states the keys, their types and their ranges; this module checks a mapping
(a parsed YAML file) against it and builds it.

The types are jsonargparse's (``PositiveInt``, ``ClosedUnitInterval``, :func:`number`, ``Literal[...]``), and
jsonargparse does the type and range checking. This thin layer adds what every config of the project wants on top:

- an unknown key is an error that names it, its file, the closest valid key ("did you mean") and all valid keys
  (:func:`did_you_mean` adds the hint to the errors of a jsonargparse parser, e.g. LightningCLI's);
- a string is not silently converted to a number or a boolean (``min_width: "1000"``, ``autothrottle: "yes"``);
- every error is a ``ValueError`` of the form ``<file>: <section.key> must be <what is valid>, got <value>``.

Cross-field rules (``validation + test < 1``) stay in the dataclass's ``__post_init__``. This package sits below all
the others: it imports only the standard library, PyYAML and jsonargparse.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from jsonargparse import ArgumentParser
from jsonargparse.typing import restricted_number_type

__all__ = ["ConfigError", "check_keys", "did_you_mean", "load_yaml", "number", "parse", "parse_yaml", "parser_keys"]

T = TypeVar("T")

ConfigError = ValueError  # every config error is a ValueError (one except clause catches them all)

_OPS = {operator.ge: ">=", operator.gt: ">", operator.le: "<=", operator.lt: "<"}
_NAMES = {">=": "ge", ">": "gt", "<=": "le", "<": "lt"}


def number(kind: type, low: tuple[str, float] | None = None, high: tuple[str, float] | None = None) -> type:
    """An ``int`` or ``float`` restricted to a range, e.g. ``number(int, (">=", -1), ("<=", 32))``."""
    bounds = [b for b in (low, high) if b is not None]
    name = "_".join([kind.__name__] + [f"{_NAMES[op]}{v}".replace("-", "m").replace(".", "p") for op, v in bounds])
    return restricted_number_type(name, kind, bounds)


# ------------------------------------------------------------------------------------------------ describing types


def _range(annotation: Any) -> str:
    bounds = {_OPS[op]: value for op, value in getattr(annotation, "_restrictions", [])}
    low = next(((op, bounds[op]) for op in (">=", ">") if op in bounds), None)
    high = next(((op, bounds[op]) for op in ("<=", "<") if op in bounds), None)
    if low and high:
        return f"in {'[' if low[0] == '>=' else '('}{low[1]}, {high[1]}{']' if high[0] == '<=' else ')'}"
    return " ".join(f"{op} {value}" for op, value in (low or high,))


def describe(annotation: Any) -> str:
    """What a value of ``annotation`` looks like, for error messages ("an int >= 1", "one of 'a', 'b' or null")."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return describe(args[0])
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(describe(a) for a in rest)
        return text + (" or null" if len(rest) < len(args) else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    if isinstance(annotation, type) and issubclass(annotation, bool | int | float) and annotation not in (int, float):
        base = "an int" if issubclass(annotation, int) else "a number"
        return f"{base} {_range(annotation)}"
    if annotation is int:
        return "an int"
    if annotation is float:
        return "a number"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


# ------------------------------------------------------------------------------------------------ checks


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _fields(cls: type) -> dict[str, Any]:
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _dataclass_of(annotation: Any) -> type | None:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) else None


def check_keys(data: dict, allowed, where: str = "") -> None:
    """Raise ``ValueError`` for any key of ``data`` not in ``allowed``, naming it and the closest valid key."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        dot = f"{where}." if where else ""
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1)
            hints.append(f"{dot}{key}" + (f" (did you mean {dot}{close[0]}?)" if close else ""))
        raise ValueError(f"unknown config key(s): {', '.join(hints)}; valid: {', '.join(sorted(map(str, allowed)))}")


_UNKNOWN = (
    re.compile(r"Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Key '(?P<key>[^']+)' is not expected"),
    re.compile(r"(?i)unrecognized arguments: --(?P<key>[\w.-]+)"),
)


def parser_keys(parser: Any) -> set[str]:
    """Every dotted key of a jsonargparse parser and its subcommands' parsers (``model.lr``, ``trainer.max_steps``)."""
    keys: set[str] = set()
    for action in getattr(parser, "_actions", []):
        if isinstance(getattr(action, "choices", None), dict):
            for sub in action.choices.values():
                if isinstance(sub, ArgumentParser):
                    keys |= parser_keys(sub)
        if isinstance(action.dest, str) and action.dest not in ("help", "config", "==SUPPRESS=="):
            keys.add(action.dest)
    return keys


def did_you_mean(message: str, keys: set[str]) -> str:
    """``message`` (a jsonargparse "not accepted" error) with the closest valid key appended, when there is one."""
    for pattern in _UNKNOWN:
        match = pattern.search(message)
        if not match:
            continue
        key = match.group("key").replace("-", "_")
        if "group" in match.groupdict():
            key = f"{match.group('group')}.{key}"
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = sorted(k for k in keys if k.rsplit(".", 1)[0] == parent) if parent else sorted(keys)
        close = difflib.get_close_matches(key, siblings, n=1)
        if close:
            return f"{message.rstrip()} (did you mean {close[0]}?)"
    return message


def _admits_str(annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _admits_str(args[0])
    if origin in (Union, types.UnionType):
        return any(_admits_str(a) for a in args)
    if origin is Literal:
        return any(isinstance(a, str) for a in args)
    return not (isinstance(annotation, type) and issubclass(annotation, bool | int | float))


def _check(cls: type, data: Any, where: str) -> None:
    """Keys exist (did you mean), sections are mappings, numbers and booleans are not strings."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = _fields(cls)
    check_keys(data, fields, where)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and required and f.name not in data:
            raise ValueError(f"{where + ': ' if where else ''}missing key '{f.name}'")
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        sub = _dataclass_of(fields[key])
        if sub is not None and value is not None:
            _check(sub, value, name)
        elif isinstance(value, str) and not _admits_str(fields[key]):
            raise ValueError(f"{name} must be {describe(fields[key])}, got {value!r}")


def _annotation_at(cls: type, key: str) -> Any:
    annotation: Any = cls
    for part in key.split("."):
        sub = _dataclass_of(annotation)
        if sub is None or part not in _fields(sub):
            return None
        annotation = _fields(sub)[part]
    return annotation


def _value_at(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


@functools.cache
def _parser(cls: type) -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False, default_env=False)
    parser.add_class_arguments(cls)
    return parser


def parse(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys, types and ranges. ``where`` prefixes key names."""
    data = {} if data is None else data
    _check(cls, data, where)
    parser = _parser(cls)
    try:
        namespace = parser.parse_object(data)
    except Exception as e:  # jsonargparse's ArgumentError: rewrite it as "<key> must be <what>, got <value>"
        match = re.search(r'key "([^"]+)"', str(e))
        key = match.group(1) if match else None
        annotation = _annotation_at(cls, key) if key else None
        if annotation is None:
            raise ValueError(f"{where or 'config'}: {e}") from None
        name = f"{where}.{key}" if where else key
        raise ValueError(f"{name} must be {describe(annotation)}, got {_value_at(data, key)!r}") from None
    return _build(cls, namespace.as_dict())


def _plain(value: Any) -> Any:
    """Builtin values: jsonargparse's restricted numbers are subclasses made at run time, which do not pickle."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _build(cls: type[T], data: dict) -> T:
    kwargs = {}
    for name, annotation in _fields(cls).items():
        sub = _dataclass_of(annotation)
        value = data[name]
        kwargs[name] = _build(sub, value) if sub is not None and isinstance(value, dict) else _plain(value)
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_yaml(cls: type[T], path: str | Path) -> T:
    """:func:`parse` a YAML file; every error starts with the file's path."""
    data = load_yaml(path)
    try:
        return parse(cls, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
