"""Settings of ``python -m datapipe build``, read from ``configs/shards/*.yaml``.

Each YAML section maps to one dataclass below; every field is documented on its class, its type and
range are its annotation, and :func:`configkit.parse` checks them: an unknown key is an error naming it
and the closest valid key (a typo never falls back to a default silently). Command-line flags override the
YAML, checked the same way (``--components``, ``--device``, ``--batch-size``, ``--workers``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonargparse.typing import ClosedUnitInterval, PositiveInt

import configkit
from bolid.config import ComponentsConfig
from bolid.images import MAX_IMAGE_PIXELS
from configkit import number

Resample = Literal["box", "bilinear", "bicubic", "lanczos"]  # the keys of datapipe.resize.RESAMPLE


@dataclass(frozen=True)
class IngestConfig:
    """Stage 1, ingest and validate.

    Attributes:
        min_size: reject images whose width or height (after EXIF orientation) is under this many pixels;
            read from the header, without decoding.
        near_duplicate_distance: two images of one identity whose 64-bit pHashes differ in at most this many
            bits are near-duplicates and only the larger is kept; -1 turns near-duplicate removal off.
        max_pixels: reject images whose header declares more pixels (``too_large``, decompression bombs)
            without decoding them; the same default as the crawler's ``max_image_pixels`` (50 MP).
    """

    min_size: PositiveInt = 1000
    near_duplicate_distance: number(int, (">=", -1), ("<=", 32)) = 6
    max_pixels: PositiveInt = MAX_IMAGE_PIXELS

    def __post_init__(self):
        if self.max_pixels < self.min_size**2:
            raise ValueError(f"ingest.max_pixels must be at least min_size squared, got {self.max_pixels!r}")


@dataclass(frozen=True)
class PoseConfig:
    """Stage 2, person and keypoints.

    Attributes:
        backend: ``vitpose`` (RT-DETR boxes + ViTPose, from ``components``) or ``blazepose`` (MediaPipe,
            at most one person per image).
        threshold: minimum detector score for a person box (BlazePose: its detection confidence).
        max_persons: reject images with more prominent persons than this (the BoLID authors dropped
            multi-person photos: 1).
        prominent_area: a person is prominent when its box area is at least this fraction of the largest box's.
        keypoint_score: a keypoint is visible when its score is at least this.
        min_body_keypoints: reject images whose main person shows fewer of the 12 body keypoints
            (shoulders, elbows, wrists, hips, knees, ankles).
        batch_size: images per model batch.
    """

    backend: Literal["vitpose", "blazepose"] = "vitpose"
    threshold: ClosedUnitInterval = 0.5
    max_persons: PositiveInt = 1
    prominent_area: number(float, (">", 0), ("<=", 1)) = 0.25
    keypoint_score: ClosedUnitInterval = 0.3
    min_body_keypoints: number(int, (">=", 0), ("<=", 12)) = 6
    batch_size: PositiveInt = 8


@dataclass(frozen=True)
class CaptionConfig:
    """Stage 3, captions with BLIP-2.

    Attributes:
        prompt: text BLIP-2 continues (empty: unconditional captioning); the stored caption is the
            continuation without the prompt.
        max_length: maximum number of generated tokens.
        num_beams: beam search width (1: greedy).
        batch_size: images per generate() call.
    """

    prompt: str = "a photo of"
    max_length: PositiveInt = 40
    num_beams: PositiveInt = 1
    batch_size: PositiveInt = 8


@dataclass(frozen=True)
class IdentitiesConfig:
    """Stage 4, identity filter.

    Attributes:
        min_photos: drop identities with fewer accepted images than this (100 in the BoLID paper).
    """

    min_photos: PositiveInt = 100


@dataclass(frozen=True)
class SplitConfig:
    """Train/validation/test split by identity (held-out people, not held-out photos).

    Attributes:
        validation: fraction of identities for validation.
        test: fraction of identities for test. The rest train. With 3 or more identities every split with a
            non-zero fraction gets at least one.
    """

    validation: number(float, (">=", 0), ("<", 1)) = 0.05
    test: number(float, (">=", 0), ("<", 1)) = 0.05

    def __post_init__(self):
        if self.validation + self.test >= 1.0:
            raise ValueError(f"split.validation + split.test must be < 1, got {self.validation + self.test!r}")


@dataclass(frozen=True)
class ShardsConfig:
    """Stage 5, shards.

    Attributes:
        resolution: stored images have their short side scaled down to at most this (the training resolution).
        quality: JPEG quality of stored images.
        resample: resampling filter after the JPEG draft: box, bilinear, bicubic or lanczos.
        samples_per_shard: maximum samples per shard (~300 KB each at 1024 px).
    """

    resolution: number(int, (">=", 16)) = 1024
    quality: number(int, (">=", 1), ("<=", 100)) = 95
    resample: Resample = "bilinear"
    samples_per_shard: PositiveInt = 1000

    @property
    def tag(self) -> str:
        """Names the stored-image settings (cache folder, model fingerprints)."""
        return f"r{self.resolution}-q{self.quality}-{self.resample}"


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``build`` needs.

    Attributes:
        components: ``real``, ``tiny`` or ``{kind, overrides}`` (see :mod:`bolid.config`).
        device: torch device for the models; ``auto`` picks CUDA when present.
        dtype: model dtype: ``auto`` (float16 on CUDA, float32 on CPU), ``float32``, ``float16`` or ``bfloat16``.
        workers: CPU worker processes for decode, resize and encode; 0 runs them in the main process;
            ``auto`` (or -1) uses one per available core.
    """

    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    workers: number(int, (">=", -1)) = -1
    ingest: IngestConfig = field(default_factory=IngestConfig)
    pose: PoseConfig = field(default_factory=PoseConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    identities: IdentitiesConfig = field(default_factory=IdentitiesConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)

    @property
    def num_workers(self) -> int:
        if self.workers >= 0:
            return self.workers
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.float16 if self.resolved_device().startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> BuildConfig:
        """Build from a parsed YAML mapping (:func:`configkit.parse`: unknown keys, types and ranges are checked).

        ``components`` may be a kit name or a mapping (:meth:`ComponentsConfig.parse`); ``workers: auto`` is -1."""
        data = dict(data)
        components = ComponentsConfig.parse(data.pop("components", "real"))
        if data.get("workers") == "auto":
            data["workers"] = -1
        for name in ("ingest", "pose", "caption", "identities", "split", "shards"):
            if data.get(name, {}) is None:  # an empty section in YAML
                data[name] = {}
        config = configkit.parse(cls, data, where)
        return dataclasses.replace(config, components=components)

    @classmethod
    def from_yaml(cls, path: str | Path) -> BuildConfig:
        try:
            return cls.from_dict(configkit.load_yaml(path))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def replace(self, **changes) -> BuildConfig:
        """A copy with top-level fields or ``section__field`` entries replaced (``None`` values ignored), checked
        like the YAML (command-line flags go through here)."""
        data = dataclasses.asdict(self)
        for key, value in changes.items():
            if value is None:
                continue
            if "__" in key:
                section, name = key.split("__", 1)
                data.setdefault(section, {})[name] = value
            else:
                data[key] = value
        return type(self).from_dict(data)
