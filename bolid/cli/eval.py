"""``bolid eval``: the paper's comparison table and figure from one YAML config (see configs/eval/real.yaml).

The config names the datasets (test identities of shard sets, or ``<identity>/<image>`` folders), the
prompt list, the models and the run settings; this module turns it into :class:`bolid.evaluate.Variant`s
and calls :func:`bolid.evaluate.evaluate`. Model kinds:

* ``base``: SDXL-Lightning with no identity (the BoLID pipeline with both identity terms off, which is the
  base UNet's output). The first ``base`` model also makes the no-identity images CLIP-I compares against;
  without one, they are made anyway and the model is left out of the table.
* ``bolid``: :class:`bolid.pipeline.BoLIDPipeline` with an ``adapter`` folder (``null``: a freshly
  initialised adapter) and per-modality scales: face-only is ``scale_body: 0``, body-only ``scale_face: 0``.
* ``ip_adapter``, ``ip_adapter_faceid``, ``instantid``: the peers of :mod:`bolid.peers` (keys: its
  :class:`~bolid.peers.PeerSpec`), each on SDXL base with its own steps and CFG, at the same size.

``metrics.face_pack`` (``buffalo_l`` or ``antelopev2``; ``metrics.face_pack_path`` for its folder) adds the
Face Sim column (:mod:`bolid.face_sim`).

Models sharing an adapter run on one loaded pipeline (only the scales change), and the base model reuses
whatever pipeline is loaded, so a table of BoLID, face-only, body-only and base loads SDXL once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveInt

import configkit
from bolid.config import ComponentsConfig
from bolid.evaluate import EvalDataset, RunSettings, Variant, evaluate, folder_dataset, load_prompts
from bolid.face_id import FACE_PACKS, FaceAnalyzer
from bolid.metrics import clip_loader
from bolid.peers import PEER_KINDS, PeerSpec, peer_variant
from configkit import number

log = logging.getLogger(__name__)

MODEL_KINDS = ("base", "bolid")  # and the peers' PEER_KINDS
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ModelKind = Literal["base", "bolid", "ip_adapter", "ip_adapter_faceid", "instantid"]  # a peer's kind picks PeerSpec
FacePack = Literal[tuple(FACE_PACKS)]
_RUN = RunSettings  # the run settings' defaults live on RunSettings; the sections below only add types and ranges


@dataclass(frozen=True)
class ModelSpec:
    """One ``models`` entry."""

    name: str
    kind: ModelKind = "bolid"
    adapter: str | None = None
    scale_face: NonNegativeFloat = 1.0
    scale_body: NonNegativeFloat = 1.0

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            kinds = MODEL_KINDS + PEER_KINDS
            raise ValueError(f"models[{self.name!r}].kind must be one of {kinds}, got {self.kind!r}")
        if self.kind == "base" and (self.adapter is not None or (self.scale_face, self.scale_body) != (1.0, 1.0)):
            raise ValueError(f"models[{self.name!r}]: kind 'base' takes no adapter or scales")


@dataclass(frozen=True)
class DatasetSpec:
    """One ``datasets`` entry: exactly one of ``shards`` (shard-set folders) or ``folder``."""

    name: str
    shards: tuple[str, ...] = ()
    folder: str | None = None
    split: str = "test"
    max_identities: PositiveInt | None = None
    references: PositiveInt = 1

    def __post_init__(self):
        if bool(self.shards) == bool(self.folder):
            raise ValueError(f"datasets[{self.name!r}]: give exactly one of 'shards' or 'folder'")

    def load(self) -> EvalDataset:
        if self.folder:
            return folder_dataset(self.name, self.folder, self.max_identities, self.references)
        from bolid.evaluate import shard_dataset

        return shard_dataset(self.name, list(self.shards), self.split, self.max_identities, self.references)


@dataclass(frozen=True)
class GenerationSection:
    """``generation``: passed to every row (a key left out keeps each model's own default)."""

    steps: PositiveInt | None = None
    guidance_scale: NonNegativeFloat | None = None
    height: PositiveInt | None = None
    width: PositiveInt | None = None
    lightning: bool = True
    pose_threshold: ClosedUnitInterval = 0.5


@dataclass(frozen=True)
class MetricsSection:
    """``metrics``: Body Sim's thresholds, the bootstrap, and the Face Sim pack (null: no Face Sim column)."""

    body_min_score: ClosedUnitInterval = _RUN.body_min_score
    body_min_features: PositiveInt = _RUN.body_min_features
    body_failure_score: float | None = _RUN.body_failure_score
    ci_resamples: number(int, (">=", 100)) = _RUN.ci_resamples
    face_pack: FacePack | None = None
    face_pack_path: str | None = None


@dataclass(frozen=True)
class ComparisonSection:
    """``comparison``: the comparison.png grid."""

    identities: PositiveInt = _RUN.comparison_identities
    prompts: PositiveInt = _RUN.comparison_prompts
    tile: number(int, (">=", 32)) = _RUN.comparison_tile


@dataclass(frozen=True)
class EvalFile:
    """The keys of an eval YAML (``configs/eval/*.yaml``), as :func:`configkit.parse` checks them.

    Attributes:
        components: ``real``, ``tiny`` or ``{kind, overrides}`` (:class:`bolid.config.ComponentsConfig`).
        out: output folder.
        prompts: a YAML file with a ``prompts`` list, or the list itself.
        datasets: the datasets (table column groups), :class:`DatasetSpec` entries.
        models: the models (table rows), :class:`ModelSpec` or :class:`bolid.peers.PeerSpec` entries.
        max_prompts: use only the first N prompts.
        images_per_prompt: K images per (identity, prompt).
        seed: image k uses seed + k.
        batch_size: images per generation call.
        device: torch device for generation and CLIP.
        dtype: null picks bfloat16 on CUDA, float32 on CPU.
    """

    out: str
    prompts: str | list[str]
    datasets: list[dict]
    models: list[dict]
    components: str | dict = "real"
    max_prompts: PositiveInt | None = None
    images_per_prompt: PositiveInt = _RUN.images_per_prompt
    seed: int = _RUN.seed
    batch_size: PositiveInt = _RUN.batch_size
    device: str = _RUN.device
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    generation: GenerationSection = field(default_factory=GenerationSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    comparison: ComparisonSection = field(default_factory=ComparisonSection)


@dataclass
class EvalConfig:
    """A parsed eval YAML; relative paths are taken from the current directory, as the Makefile runs."""

    components: ComponentsConfig
    out: str
    prompts: list[str]
    datasets: list[DatasetSpec]
    models: list[ModelSpec | PeerSpec]
    run: RunSettings
    generation: dict
    dtype: str | None = None
    face_pack: str | None = None
    face_pack_path: str | None = None

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "") -> EvalConfig:
        """Check and build (:func:`configkit.parse`): errors name the key, with "did you mean" for typos."""
        cfg = {k: ({} if v is None and k in ("generation", "metrics", "comparison") else v) for k, v in cfg.items()}
        f = configkit.parse(EvalFile, cfg, where)
        metrics, comparison = dataclasses.asdict(f.metrics), dataclasses.asdict(f.comparison)
        face = {k: metrics.pop(k) for k in ("face_pack", "face_pack_path")}
        run = RunSettings(
            images_per_prompt=f.images_per_prompt,
            seed=f.seed,
            batch_size=f.batch_size,
            device=f.device,
            **metrics,
            **{f"comparison_{k}": v for k, v in comparison.items()},
        )
        given = cfg.get("generation") or {}  # only the keys the YAML sets (the rest: each model's default)
        return cls(
            components=ComponentsConfig.parse(f.components),
            out=f.out,
            prompts=load_prompts(f.prompts, f.max_prompts),
            datasets=[_dataset(d, i) for i, d in enumerate(_non_empty(f.datasets, "datasets"))],
            models=[_model(m, i) for i, m in enumerate(_non_empty(f.models, "models"))],
            run=run,
            generation={k: getattr(f.generation, k) for k in given},
            dtype=f.dtype,
            **face,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> EvalConfig:
        try:
            return cls.from_dict(configkit.load_yaml(path))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _non_empty(value: list, key: str) -> list:
    if not value:
        raise ValueError(f"{key} must be a non-empty list")
    return value


def _dataset(entry: dict, i: int) -> DatasetSpec:
    if isinstance(entry.get("shards"), str):
        entry = {**entry, "shards": [entry["shards"]]}
    return configkit.parse(DatasetSpec, entry, f"datasets[{i}]")


def _model(entry: dict, i: int) -> ModelSpec | PeerSpec:
    if entry.get("kind") in PEER_KINDS:
        return PeerSpec.from_dict(entry, f"models[{i}]")
    return configkit.parse(ModelSpec, entry, f"models[{i}]")


# ------------------------------------------------------------------------------------------- variants


class PipelineCache:
    """Keeps the last loaded :class:`bolid.pipeline.BoLIDPipeline`, so models differing only in scales share it."""

    def __init__(
        self,
        components: ComponentsConfig,
        lightning: bool = True,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        pose_threshold: float = 0.5,
    ):
        self.components, self.lightning, self.device, self.dtype = components, lightning, device, dtype
        self.pose_threshold = pose_threshold
        self.pipe = None
        self.adapter: str | None = None

    def get(self, adapter: str | None, any_adapter: bool = False):
        """The pipeline with ``adapter`` loaded (or, with ``any_adapter``, whichever is loaded)."""
        if self.pipe is not None and (any_adapter or self.adapter == adapter):
            return self.pipe
        from bolid.pipeline import BoLIDPipeline

        self.pipe = None  # free the old one before loading the next
        self.pipe = BoLIDPipeline.from_components(
            self.components,
            lightning=self.lightning,
            adapter=adapter,
            device=self.device,
            dtype=self.dtype,
            pose_threshold=self.pose_threshold,
        )
        self.adapter = adapter
        return self.pipe


def build_variant(spec: ModelSpec, pipes: PipelineCache, generation: dict) -> Variant:
    """A :class:`Variant` over the BoLID pipeline for one ``models`` entry."""
    gen = {k: generation[k] for k in ("steps", "guidance_scale", "height", "width") if k in generation}
    settings = {"kind": spec.kind, "adapter": spec.adapter, **gen}
    if spec.kind == "bolid":
        settings.update(scale_face=spec.scale_face, scale_body=spec.scale_body)

    def build():
        pipe = pipes.get(spec.adapter, any_adapter=spec.kind == "base")
        embeds: dict[tuple[int, ...], tuple] = {}  # one encoding per identity, not per call

        def generate(prompt, references, seeds):
            if list(seeds) != list(range(seeds[0], seeds[0] + len(seeds))):
                raise ValueError(f"seeds must be consecutive, got {seeds}")
            kwargs = dict(gen, seed=seeds[0], num_images=len(seeds))
            if spec.kind == "base":
                return pipe(prompt, **kwargs)
            key = tuple(id(r) for r in references)
            if key not in embeds:
                embeds[key] = (references, *pipe.encode_references(references))
            _, e, refs = embeds[key]
            result = pipe(prompt, embeds=e, scale_face=spec.scale_face, scale_body=spec.scale_body, **kwargs)
            result.settings["references"] = [r.to_dict() for r in refs]
            return result

        return generate

    return Variant(spec.name, build, uses_identity=spec.kind == "bolid", settings=settings)


def run_config(cfg: EvalConfig, record: dict | None = None):
    """Load the datasets, build the models and run :func:`bolid.evaluate.evaluate`."""
    datasets = [d.load() for d in cfg.datasets]
    for d in datasets:
        log.info("dataset %s: %d identities", d.name, len(d.identities))
    lightning = bool(cfg.generation.get("lightning", True))
    dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    threshold = float(cfg.generation.get("pose_threshold", 0.5))
    pipes = PipelineCache(cfg.components, lightning, cfg.run.device, dtype, threshold)
    generation = {k: v for k, v in cfg.generation.items() if k not in ("lightning", "pose_threshold")}
    size = {k: generation.get(k) for k in ("height", "width")}  # every row, peers included, at the same size
    variants = [
        build_variant(m, pipes, generation)
        if isinstance(m, ModelSpec)
        else peer_variant(m, cfg.components, cfg.run.device, dtype, **size)
        for m in cfg.models
    ]
    no_identity = next((v for v in variants if not v.uses_identity), None)
    if no_identity is None:
        name = "SDXL-Lightning (no identity)" if lightning else "SDXL (no identity)"
        no_identity = build_variant(ModelSpec(name, kind="base"), pipes, generation)
    record = {
        **(record or {}),
        "components": {"kind": cfg.components.kind, "overrides": dict(cfg.components.overrides)},
        "generation": cfg.generation,
        "dtype": cfg.dtype,
    }
    clip = clip_loader(cfg.components.kind, cfg.components.source("clip"))
    faces = None
    if cfg.face_pack:
        pack, path, kit = cfg.face_pack, cfg.face_pack_path, cfg.components.kind
        faces = FaceAnalyzer.from_pack(pack, path, kit=kit)  # fails now, not after the first model, if missing
    pose = stats = None
    if cfg.components.mini:  # Body Sim with the mini kit's evaluation keypoint model and its world's statistics
        from bolid.kits import mini

        pose, stats = mini.pose_extractor("eval", device=cfg.run.device), mini.body_stats()
        record["body_sim"] = {"pose": "mini vitpose_eval", "mean": stats[0], "std": stats[1]}
    return evaluate(
        variants,
        datasets,
        cfg.prompts,
        cfg.out,
        clip,
        no_identity,
        cfg.run,
        pose=pose,
        record=record,
        faces=faces,
        body_stats=stats,
    )


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="eval YAML (configs/eval/real.yaml, configs/eval/tiny.yaml)")
    parser.add_argument("--out", help="output folder (overrides the config's 'out')")
    parser.add_argument("--device", help="torch device (overrides the config's 'device')")
    parser.add_argument("--images-per-prompt", type=int, help="K (overrides 'images_per_prompt')")
    parser.add_argument("--max-prompts", type=int, help="use only the first N prompts (overrides 'max_prompts')")


def run(args: argparse.Namespace) -> int:
    raw = configkit.load_yaml(args.config)
    for flag, key in (("out", "out"), ("device", "device"), ("images_per_prompt", "images_per_prompt")):
        if getattr(args, flag) is not None:
            raw[key] = getattr(args, flag)
    if args.max_prompts is not None:
        raw["max_prompts"] = args.max_prompts
    try:
        cfg = EvalConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{args.config}: {e}") from None
    command = ["python", "-m", "bolid", "eval", "--config", str(args.config)]
    for flag in ("out", "device", "images_per_prompt", "max_prompts"):
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    command = shlex.join(command)
    rows = run_config(cfg, record={"config": str(args.config), "command": command})
    print((Path(cfg.out) / "results.md").read_text(encoding="utf-8").split("\n## ")[0])
    return 0 if rows else 1
