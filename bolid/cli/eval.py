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
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from bolid.config import ComponentsConfig, check_keys, load_yaml
from bolid.evaluate import EvalDataset, RunSettings, Variant, evaluate, folder_dataset, load_prompts
from bolid.face_id import FACE_PACKS, FaceAnalyzer
from bolid.metrics import clip_loader
from bolid.peers import PEER_KINDS, PeerSpec, peer_variant

log = logging.getLogger(__name__)

TOP_KEYS = {
    "components": "real | tiny | mini | {kind, overrides}",
    "out": "output folder",
    "device": "torch device for generation and CLIP",
    "dtype": "float32 | float16 | bfloat16 (default: bfloat16 on CUDA, float32 on CPU)",
    "prompts": "a YAML file with a 'prompts' list, or the list itself",
    "max_prompts": "use only the first N prompts",
    "datasets": "list of datasets (table column groups)",
    "models": "list of models (table rows)",
    "generation": "steps, guidance_scale, height, width, lightning, pose_threshold",
    "metrics": "body_min_score, body_min_features, body_failure_score, ci_resamples",
    "comparison": "identities, prompts, tile (comparison.png)",
    "images_per_prompt": "K images per (identity, prompt)",
    "seed": "image k uses seed + k",
    "batch_size": "images per generation call",
}
DATASET_KEYS = {"name", "shards", "folder", "split", "max_identities", "references"}
MODEL_KEYS = {"name", "kind", "adapter", "scale_face", "scale_body"}
MODEL_KINDS = ("base", "bolid")  # and the peers' PEER_KINDS
GENERATION_KEYS = {"steps", "guidance_scale", "height", "width", "lightning", "pose_threshold"}
METRIC_KEYS = {
    "body_min_score",
    "body_min_features",
    "body_failure_score",
    "ci_resamples",
    "face_pack",
    "face_pack_path",
}
COMPARISON_KEYS = {"identities", "prompts", "tile"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """One ``models`` entry."""

    name: str
    kind: str = "bolid"
    adapter: str | None = None
    scale_face: float = 1.0
    scale_body: float = 1.0

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            kinds = MODEL_KINDS + PEER_KINDS
            raise ValueError(f"models[{self.name!r}].kind must be one of {kinds}, got {self.kind!r}")
        if self.kind == "base" and (self.adapter is not None or (self.scale_face, self.scale_body) != (1.0, 1.0)):
            raise ValueError(f"models[{self.name!r}]: kind 'base' takes no adapter or scales")
        for key in ("scale_face", "scale_body"):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) < 0:
                raise ValueError(f"models[{self.name!r}].{key} must be a number >= 0, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class DatasetSpec:
    """One ``datasets`` entry: exactly one of ``shards`` (shard-set folders) or ``folder``."""

    name: str
    shards: tuple[str, ...] = ()
    folder: str | None = None
    split: str = "test"
    max_identities: int | None = None
    references: int = 1

    def __post_init__(self):
        if bool(self.shards) == bool(self.folder):
            raise ValueError(f"datasets[{self.name!r}]: give exactly one of 'shards' or 'folder'")
        if self.references < 1 or (self.max_identities is not None and self.max_identities < 1):
            raise ValueError(f"datasets[{self.name!r}]: references and max_identities must be >= 1")

    def load(self) -> EvalDataset:
        if self.folder:
            return folder_dataset(self.name, self.folder, self.max_identities, self.references)
        from bolid.evaluate import shard_dataset

        return shard_dataset(self.name, list(self.shards), self.split, self.max_identities, self.references)


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
    def from_dict(cls, cfg: dict, where: str = "config") -> EvalConfig:
        check_keys(cfg, TOP_KEYS, where)
        for key in ("out", "prompts", "datasets", "models"):
            if key not in cfg:
                raise ValueError(f"{where}: missing key '{key}' ({TOP_KEYS[key]})")
        prompts = load_prompts(cfg["prompts"], cfg.get("max_prompts"))
        datasets = [_dataset(d, i) for i, d in enumerate(_list(cfg, "datasets"))]
        models = [_model(m, i) for i, m in enumerate(_list(cfg, "models"))]
        gen = dict(cfg.get("generation") or {})
        check_keys(gen, GENERATION_KEYS, "generation")
        metrics = dict(cfg.get("metrics") or {})
        check_keys(metrics, METRIC_KEYS, "metrics")
        face = {k: metrics.pop(k, None) for k in ("face_pack", "face_pack_path")}
        if face["face_pack"] is not None and face["face_pack"] not in FACE_PACKS:
            raise ValueError(
                f"metrics.face_pack must be one of {sorted(FACE_PACKS)} or null, got {face['face_pack']!r}"
            )
        comparison = dict(cfg.get("comparison") or {})
        check_keys(comparison, COMPARISON_KEYS, "comparison")
        run = {k: cfg[k] for k in ("images_per_prompt", "seed", "batch_size", "device") if k in cfg}
        run.update({k: v for k, v in metrics.items()})
        run.update({f"comparison_{k}": v for k, v in comparison.items()})
        dtype = cfg.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or null, got {dtype!r}")
        return cls(
            components=ComponentsConfig.parse(cfg.get("components", "real")),
            out=str(cfg["out"]),
            prompts=prompts,
            datasets=datasets,
            models=models,
            run=RunSettings(**run),
            generation=gen,
            dtype=dtype,
            **face,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> EvalConfig:
        try:
            return cls.from_dict(load_yaml(path))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _list(cfg: dict, key: str) -> list:
    value = cfg[key]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key} must be a non-empty list")
    return value


def _named(entry, key: str, i: int) -> dict:
    if not isinstance(entry, dict) or not entry.get("name"):
        raise ValueError(f"{key}[{i}] must be a mapping with a 'name'")
    return dict(entry)


def _dataset(entry, i: int) -> DatasetSpec:
    d = _named(entry, "datasets", i)
    check_keys(d, DATASET_KEYS, f"datasets[{i}]")
    shards = d.pop("shards", None) or ()
    d["shards"] = (shards,) if isinstance(shards, str) else tuple(str(s) for s in shards)
    return DatasetSpec(**d)


def _model(entry, i: int) -> ModelSpec | PeerSpec:
    m = _named(entry, "models", i)
    if m.get("kind") in PEER_KINDS:
        return PeerSpec.from_dict(m, f"models[{i}]")
    check_keys(m, MODEL_KEYS, f"models[{i}]")
    if m.get("adapter") is not None:
        m["adapter"] = str(m["adapter"])
    return ModelSpec(**m)


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
    raw = load_yaml(args.config)
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
