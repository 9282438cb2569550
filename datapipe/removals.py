"""``OUT/removed.json``: people and photos taken out of a dataset on request, honoured by every later build.

Written by ``python -m datapipe remove`` (:mod:`datapipe.remove`)::

    {"identities": {identity: "YYYY-MM-DD"}, "sha256": {sha256: "YYYY-MM-DD"}}

A build drops the samples it covers just before writing shards (stage ``shards``, reason ``removed``), so a
rebuild gives the same shards as the removal did.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from bolid.files import atomic_write

FILE = "removed.json"


@dataclass
class Removals:
    identities: dict[str, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, out: str | Path) -> Removals:
        path = Path(out) / FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(dict(data.get("identities", {})), dict(data.get("sha256", {})))

    def save(self, out: str | Path) -> None:
        data = {"identities": dict(sorted(self.identities.items())), "sha256": dict(sorted(self.sha256.items()))}
        atomic_write(Path(out) / FILE, json.dumps(data, indent=1) + "\n")

    def add(self, identities: list[str], sha256s: list[str]) -> None:
        today = time.strftime("%Y-%m-%d", time.gmtime())
        for identity in identities:
            self.identities.setdefault(identity, today)
        for sha in sha256s:
            self.sha256.setdefault(sha.lower(), today)

    def covers(self, identity: str, sha256: str) -> bool:
        return identity in self.identities or sha256 in self.sha256

    def why(self, identity: str, sha256: str) -> str:
        if identity in self.identities:
            return f"identity removed on request ({self.identities[identity]})"
        return f"photo removed on request ({self.sha256.get(sha256, '')})"
