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
from typing import Any, Literal

import configkit
from bolid.components import COMPONENTS, KITS
from configkit import load_yaml

__all__ = ["KINDS", "ComponentsConfig", "load_yaml"]

KINDS = KITS
Kit = Literal[KITS]


@dataclass(frozen=True)
class ComponentsConfig:
    """Which weights to use: ``kind`` is a kit (:data:`bolid.components.KITS`); ``overrides`` maps component -> id
    or path."""

    kind: Kit = "real"
    overrides: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"components.kind must be one of {KINDS}, got {self.kind!r}")
        try:
            configkit.check_keys(self.overrides, COMPONENTS, "components.overrides")
        except ValueError as e:
            raise ValueError(f"components.overrides: unknown component: {e}") from None

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
            return configkit.parse(
                cls, {k: ({} if k == "overrides" and v is None else v) for k, v in value.items()}, "components"
            )
        raise ValueError(f"components must be 'real', 'tiny' or a mapping, got {type(value).__name__}")
