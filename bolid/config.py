"""Config plumbing shared by every stage: YAML loading with clear errors and the ``components`` switch.

Every YAML in ``configs/<command>/`` may carry a ``components`` entry that picks real weights or the
tiny kit, in either form::

    components: tiny                # tests, demo, benchmarks: tiny random-init twins
    components:                     # real weights, some from local folders
      kind: real
      overrides: {sdxl: /models/sdxl-base, vitpose: /models/vitpose-base-simple}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bolid.components import COMPONENTS, KITS

KINDS = KITS


@dataclass(frozen=True)
class ComponentsConfig:
    """Which weights to use: ``kind`` is a kit (:data:`bolid.components.KITS`); ``overrides`` maps component -> id
    or path."""

    kind: str = "real"
    overrides: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"components.kind must be one of {KINDS}, got {self.kind!r}")
        unknown = set(self.overrides) - set(COMPONENTS)
        if unknown:
            raise ValueError(
                f"components.overrides has unknown component(s) {sorted(unknown)}; known: {', '.join(COMPONENTS)}"
            )

    @property
    def mini(self) -> bool:
        """The mini kit (:mod:`bolid.kits.mini`): small components trained on the BoLID-mini world."""
        return self.kind == "mini"

    @property
    def tiny(self) -> bool:
        return self.kind == "tiny"

    def source(self, name: str) -> str | None:
        """The override for component ``name``, or ``None`` for its default."""
        return self.overrides.get(name)

    @classmethod
    def parse(cls, value: Any) -> ComponentsConfig:
        """Accept ``"tiny"``, ``"real"``, a mapping ``{kind, overrides}`` or an instance."""
        if isinstance(value, ComponentsConfig):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls(kind=value)
        if isinstance(value, dict):
            extra = set(value) - {"kind", "overrides"}
            if extra:
                raise ValueError(f"components: unknown key(s) {sorted(extra)}; valid keys are 'kind' and 'overrides'")
            return cls(kind=value.get("kind", "real"), overrides=dict(value.get("overrides") or {}))
        raise ValueError(f"components must be 'real', 'tiny' or a mapping, got {type(value).__name__}")


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


def check_keys(section: dict, allowed: set[str] | dict, where: str) -> None:
    """Raise ``ValueError`` naming ``where.key`` for any key not in ``allowed`` (catches config typos)."""
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hints.append(f"{where}.{key}" + (f" (did you mean {where}.{close[0]}?)" if close else ""))
        raise ValueError(f"unknown config key(s): {', '.join(hints)}; valid: {', '.join(sorted(allowed))}")
