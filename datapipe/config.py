"""Settings of ``python -m datapipe build``, read from ``configs/shards/*.yaml``.

Each YAML section maps to one dataclass below; every field is documented on its class, its type and
range are its annotation, and :func:`configkit.parse` checks them: an unknown key is an error naming it
and the closest valid key (a typo never falls back to a default silently). Command-line flags override the
YAML, checked the same way (``--components``, ``--device``, ``--batch-size``, ``--workers``, ``--executor``,
``--num-parts``, ``--retries``, ``--ray-address``).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

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
class RayConfig:
    """``executor: ray``: parts as Ray tasks, the models as pools of Ray actors (:mod:`datapipe.executors`).

    Attributes:
        address: the cluster to join (``ray://host:10001``, ``host:6379``, ``auto``); empty starts a local Ray.
        num_cpus: CPUs of a local Ray (empty: all); ignored when joining a cluster.
        object_store_mb: object store size of a local Ray in MB (empty: Ray's default).
        part_cpus: CPUs each part task reserves (its decode/resize workers run inside it).
        pose_actors: detector + ViTPose actors (each keeps its models loaded across parts and batches).
        caption_actors: BLIP-2 actors.
        actor_gpus: GPUs each model actor reserves (fractions share one GPU; 0 on a CPU-only cluster).
        actor_cpus: CPUs each model actor reserves while it lives (keep ``actors * actor_cpus`` below the cluster's
            CPUs, or the part tasks cannot start).
    """

    address: str = ""
    num_cpus: PositiveInt | None = None
    object_store_mb: number(int, (">=", 64)) | None = None
    part_cpus: PositiveFloat = 1.0
    pose_actors: PositiveInt = 1
    caption_actors: PositiveInt = 1
    actor_gpus: NonNegativeFloat = 0.0
    actor_cpus: NonNegativeFloat = 1.0


@dataclass(frozen=True)
class SlurmConfig:
    """``executor: slurm``: an ``sbatch --array`` job over the parts and a merge job after it.

    Attributes:
        python: the interpreter the jobs run (``python -m datapipe``); a path when the cluster's differs.
        partition: ``--partition`` (empty: the cluster's default).
        time: ``--time`` per part, e.g. ``"12:00:00"`` (empty: the partition's default).
        cpus_per_task: ``--cpus-per-task`` of each part (its decode/resize workers).
        gpus_per_task: ``--gpus-per-task`` of each part (0: none).
        mem: ``--mem`` per part, e.g. ``"64G"`` (empty: the partition's default).
        max_parallel: run at most this many parts at once (``--array=0-N%M``); 0: no limit.
        extra: more ``#SBATCH`` options, each a full option such as ``"--account=vision"``.
        setup: shell lines run before the command (``module load``, ``source .venv/bin/activate``).
    """

    python: str = "python"
    partition: str = ""
    time: str = ""
    cpus_per_task: PositiveInt = 8
    gpus_per_task: NonNegativeInt = 1
    mem: str = ""
    max_parallel: NonNegativeInt = 0
    extra: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()

    def __post_init__(self):
        """Rules beyond a type (types and ranges are checked by :func:`configkit.parse`)."""
        object.__setattr__(self, "extra", tuple(self.extra))
        object.__setattr__(self, "setup", tuple(self.setup))
        if not self.python:
            raise ValueError(f"slurm.python must be an interpreter, got {self.python!r}")
        for option in self.extra:
            if not str(option).startswith("--"):
                raise ValueError(f"slurm.extra must be a list of --options, got {option!r}")


Executor = Literal["local", "ray", "slurm"]
EXECUTORS: tuple[str, ...] = typing.get_args(Executor)


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``build`` needs.

    Attributes:
        components: ``real``, ``tiny`` or ``{kind, overrides}`` (see :mod:`bolid.config`).
        device: torch device for the models; ``auto`` picks CUDA when present.
        dtype: model dtype: ``auto`` (float16 on CUDA, float32 on CPU), ``float32``, ``float16`` or ``bfloat16``.
        workers: CPU worker processes for decode, resize and encode; 0 runs them in the main process;
            ``auto`` (or -1) uses one per available core.
        executor: what runs the parts: ``local`` (this machine, one part after another), ``ray`` or ``slurm``
            (:mod:`datapipe.executors`; their settings are the ``ray`` and ``slurm`` sections).
        num_parts: how many parts the identities are split into (:mod:`datapipe.balance`).
        retries: how many times a failed part is started again (it resumes from the cache).
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
    executor: Executor = "local"
    num_parts: PositiveInt = 1
    retries: NonNegativeInt = 1
    ray: RayConfig = field(default_factory=RayConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

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
        for name in ("ingest", "pose", "caption", "identities", "split", "shards", "ray", "slurm"):
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
