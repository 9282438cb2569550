"""Per-stage counts and reject reasons, written as ``stats.json``.

Each stage counts the images it received (``in``), passed on (``out``) and rejected, per
reason; ``in == out + sum(rejected)`` always holds. Every reason of a stage is listed, zero
or not, so two runs compare key by key. Counts come from the final per-image decisions,
not from work done in this run, so a resumed run writes the same file as a clean one.
Stage and reason names are snake_case (no dots).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Stages in pipeline order, each with the reasons it may reject an image for.
STAGES: dict[str, tuple[str, ...]] = {
    # missing: a manifest line whose file is absent; unreadable: no image header; too_large: over the pixel
    # limit; too_small: width or height under ingest.min_size (header only); corrupt: the decode failed
    # (truncated, broken data); duplicate: same bytes as an earlier image of the same identity; near_duplicate:
    # pHash within ingest.near_duplicate_distance of a kept image of the same identity; multi_identity: the same
    # photo (bytes, or pHash within that distance) under two or more identities, every copy dropped.
    "ingest": (
        "missing",
        "unreadable",
        "too_large",
        "too_small",
        "corrupt",
        "duplicate",
        "near_duplicate",
        "multi_identity",
    ),
    "pose": ("no_person", "multiple_persons", "too_few_keypoints"),
    "identities": ("too_few_photos",),
    "caption": (),
    # removed: taken out on request (python -m datapipe remove; OUT/removed.json)
    "shards": ("removed",),
}


@dataclass
class StageCounts:
    """Counts of one stage."""

    name: str
    inputs: int = 0
    outputs: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.rejected = {r: int(self.rejected.get(r, 0)) for r in STAGES[self.name]}

    def passed(self, n: int = 1) -> None:
        self.inputs += n
        self.outputs += n

    def reject(self, reason: str, n: int = 1) -> None:
        if reason not in self.rejected:
            raise ValueError(f"stage {self.name!r} has no reject reason {reason!r}; known: {STAGES[self.name]}")
        self.inputs += n
        self.rejected[reason] += n

    def to_dict(self) -> dict:
        assert self.inputs == self.outputs + sum(self.rejected.values()), self
        return {"in": self.inputs, "out": self.outputs, "rejected": dict(self.rejected)}


@dataclass
class Stats:
    """All stages' counts plus identity totals."""

    stages: dict[str, StageCounts] = field(default_factory=lambda: {s: StageCounts(s) for s in STAGES})
    identities: dict[str, int] = field(default_factory=lambda: {"found": 0, "kept": 0})
    shards: int = 0

    def __getitem__(self, stage: str) -> StageCounts:
        return self.stages[stage]

    def to_dict(self) -> dict:
        return {
            "stages": {name: s.to_dict() for name, s in self.stages.items()},
            "identities": dict(self.identities),
            "shards": self.shards,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        stats = cls()
        for name, s in d["stages"].items():
            stats.stages[name] = StageCounts(name, s["in"], s["out"], s["rejected"])
        stats.identities = dict(d["identities"])
        stats.shards = int(d["shards"])
        return stats

    @classmethod
    def sum(cls, parts: list[Stats]) -> Stats:
        total = cls()
        for p in parts:
            for name, s in p.stages.items():
                t = total.stages[name]
                t.inputs += s.inputs
                t.outputs += s.outputs
                for r, n in s.rejected.items():
                    t.rejected[r] += n
            for k, v in p.identities.items():
                total.identities[k] = total.identities.get(k, 0) + v
            total.shards += p.shards
        return total
