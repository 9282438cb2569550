"""Settings of ``python -m datapipe build``, read from ``configs/shards/*.yaml``.

Each YAML section maps to one dataclass below; every field is documented on its class and
checked on construction, and an unknown key is an error naming it (a typo never falls
back to a default silently). Command-line flags override the YAML (``--components``,
``--device``, ``--batch-size``, ``--workers``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bolid.config import ComponentsConfig, check_keys, load_yaml
from bolid.images import MAX_IMAGE_PIXELS
from datapipe.resize import RESAMPLE


def _check(cond: bool, key: str, what: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{key} must be {what}, got {value!r}")


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

    min_size: int = 1000
    near_duplicate_distance: int = 6
    max_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self):
        _check(self.min_size >= 1, "ingest.min_size", "a positive number of pixels", self.min_size)
        _check(self.max_pixels >= self.min_size**2, "ingest.max_pixels", "at least min_size squared", self.max_pixels)
        _check(
            -1 <= self.near_duplicate_distance <= 32,
            "ingest.near_duplicate_distance",
            "in [-1, 32]",
            self.near_duplicate_distance,
        )


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

    backend: str = "vitpose"
    threshold: float = 0.5
    max_persons: int = 1
    prominent_area: float = 0.25
    keypoint_score: float = 0.3
    min_body_keypoints: int = 6
    batch_size: int = 8

    def __post_init__(self):
        _check(self.backend in ("vitpose", "blazepose"), "pose.backend", "'vitpose' or 'blazepose'", self.backend)
        _check(0.0 <= self.threshold <= 1.0, "pose.threshold", "in [0, 1]", self.threshold)
        _check(self.max_persons >= 1, "pose.max_persons", ">= 1", self.max_persons)
        _check(0.0 < self.prominent_area <= 1.0, "pose.prominent_area", "in (0, 1]", self.prominent_area)
        _check(0.0 <= self.keypoint_score <= 1.0, "pose.keypoint_score", "in [0, 1]", self.keypoint_score)
        _check(0 <= self.min_body_keypoints <= 12, "pose.min_body_keypoints", "in [0, 12]", self.min_body_keypoints)
        _check(self.batch_size >= 1, "pose.batch_size", ">= 1", self.batch_size)


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
    max_length: int = 40
    num_beams: int = 1
    batch_size: int = 8

    def __post_init__(self):
        _check(isinstance(self.prompt, str), "caption.prompt", "a string", self.prompt)
        _check(self.max_length >= 1, "caption.max_length", ">= 1", self.max_length)
        _check(self.num_beams >= 1, "caption.num_beams", ">= 1", self.num_beams)
        _check(self.batch_size >= 1, "caption.batch_size", ">= 1", self.batch_size)


@dataclass(frozen=True)
class IdentitiesConfig:
    """Stage 4, identity filter.

    Attributes:
        min_photos: drop identities with fewer accepted images than this (100 in the BoLID paper).
    """

    min_photos: int = 100

    def __post_init__(self):
        _check(self.min_photos >= 1, "identities.min_photos", ">= 1", self.min_photos)


@dataclass(frozen=True)
class SplitConfig:
    """Train/validation/test split by identity (held-out people, not held-out photos).

    Attributes:
        validation: fraction of identities for validation.
        test: fraction of identities for test. The rest train. With 3 or more identities every split with a
            non-zero fraction gets at least one.
    """

    validation: float = 0.05
    test: float = 0.05

    def __post_init__(self):
        for key in ("validation", "test"):
            v = getattr(self, key)
            _check(0.0 <= v < 1.0, f"split.{key}", "in [0, 1)", v)
        _check(self.validation + self.test < 1.0, "split.validation + split.test", "< 1", self.validation + self.test)


@dataclass(frozen=True)
class ShardsConfig:
    """Stage 5, shards.

    Attributes:
        resolution: stored images have their short side scaled down to at most this (the training resolution).
        quality: JPEG quality of stored images.
        resample: resampling filter after the JPEG draft: box, bilinear, bicubic or lanczos.
        samples_per_shard: maximum samples per shard (~300 KB each at 1024 px).
    """

    resolution: int = 1024
    quality: int = 95
    resample: str = "bilinear"
    samples_per_shard: int = 1000

    def __post_init__(self):
        _check(self.resolution >= 16, "shards.resolution", ">= 16", self.resolution)
        _check(1 <= self.quality <= 100, "shards.quality", "in [1, 100]", self.quality)
        _check(self.resample in RESAMPLE, "shards.resample", f"one of {sorted(RESAMPLE)}", self.resample)
        _check(self.samples_per_shard >= 1, "shards.samples_per_shard", ">= 1", self.samples_per_shard)

    @property
    def tag(self) -> str:
        """Names the stored-image settings (cache folder, model fingerprints)."""
        return f"r{self.resolution}-q{self.quality}-{self.resample}"


_SECTIONS = {
    "ingest": IngestConfig,
    "pose": PoseConfig,
    "caption": CaptionConfig,
    "identities": IdentitiesConfig,
    "split": SplitConfig,
    "shards": ShardsConfig,
}


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
    dtype: str = "auto"
    workers: int = -1
    ingest: IngestConfig = field(default_factory=IngestConfig)
    pose: PoseConfig = field(default_factory=PoseConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    identities: IdentitiesConfig = field(default_factory=IdentitiesConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)

    def __post_init__(self):
        _check(
            self.dtype in ("auto", "float32", "float16", "bfloat16"),
            "dtype",
            "auto, float32, float16 or bfloat16",
            self.dtype,
        )
        _check(isinstance(self.workers, int) and self.workers >= -1, "workers", "auto or an int >= 0", self.workers)

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
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> BuildConfig:
        """Build from a parsed YAML mapping; unknown keys raise ``ValueError`` naming them."""
        top = {"components", "device", "dtype", "workers", *_SECTIONS}
        check_keys(data, top, where)
        kwargs: dict[str, Any] = {}
        for name, klass in _SECTIONS.items():
            section = data.get(name) or {}
            if not isinstance(section, dict):
                raise ValueError(f"{name} must be a mapping, got {type(section).__name__}")
            check_keys(section, {f.name for f in dataclasses.fields(klass)}, name)
            kwargs[name] = klass(**section)
        workers = data.get("workers", "auto")
        kwargs["workers"] = -1 if workers == "auto" else workers
        return cls(
            components=ComponentsConfig.parse(data.get("components", "real")),
            device=str(data.get("device", "auto")),
            dtype=str(data.get("dtype", "auto")),
            **kwargs,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> BuildConfig:
        try:
            return cls.from_dict(load_yaml(path))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def replace(self, **changes) -> BuildConfig:
        """A copy with top-level fields or ``section__field`` entries replaced (``None`` values ignored)."""
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            if value is None:
                continue
            if "__" in key:
                section, name = key.split("__", 1)
                sections.setdefault(section, {})[name] = value
            else:
                top[key] = value
        for section, fields in sections.items():
            top[section] = dataclasses.replace(getattr(self, section), **fields)
        if "components" in top:
            top["components"] = ComponentsConfig.parse(top["components"])
        return dataclasses.replace(self, **top)
