"""The evaluation harness behind ``python -m bolid eval``: BoLID's comparison table and figure.

It works in two layers:

* a model-agnostic core, :func:`evaluate`, over **variants**: named callables
  ``generate(prompt, references, seeds) -> images``. For every dataset, identity, prompt and
  seed it generates, saves and scores images, then writes the outputs below;
* :mod:`bolid.cli.eval` and :func:`build_variant`, which turn the ``models`` of a YAML config
  (base SDXL-Lightning, BoLID with an adapter file and per-modality scales) into variants.

**Protocol.** Each identity of a dataset brings ``references`` photos; all go to the model. When the
identity has a further photo, it is held out: Body Sim compares the generated image with that
held-out photo, not with a photo that conditioned the generation, so copying the reference's pose or
viewpoint earns nothing; otherwise Body Sim compares against the first reference. The model without
identity input (the base model) is scored the same way: its Body Sim is the chance level, reported
beside every model in results.md. For every (identity, prompt) each model makes K
images (``images_per_prompt``) with seeds ``seed + k``, k = 0..K-1, in batches of
``batch_size``; each image's noise comes from its own CPU ``torch.Generator``, so an image
does not depend on the batch it was made in, and every model starts from the same noise for
the same prompt and k. A model without identity input (the base model) makes its images once
per (prompt, k) and they are scored against every identity. CLIP-I compares each image with
the *no-identity* image of the same prompt and seed, made by the base model, or by the variant's own
``no_identity`` model (a peer's SDXL base with the peer's steps and CFG, :mod:`bolid.peers`).

**Confidence intervals.** ``mean ± half-width`` of a 95% percentile bootstrap over identities
(a cluster bootstrap): identities are resampled with replacement ``ci_resamples`` times (seeded)
and the statistic is the mean over all scored images of the drawn identities. Images of one
identity share its reference and so are not independent; resampling whole identities keeps that.
The interval is asymmetric in general; the table shows the larger half-width, and results.csv /
results.json hold both ends. With one identity there is no interval ("n/a").

**Outputs** in ``out/``:

* ``results.md``: the table as in the paper (rows: models; per dataset: Face Sim when a face model is
  given, Body Sim, CLIP-T, CLIP-I), then the Body Sim (and Face Sim) failure rates and the run's settings;
* ``results.csv``: one row per (dataset, model, metric) with mean, CI ends, counts;
* ``results.json``: the same plus the settings and failure counts by reason;
* ``comparison.png``: reference | each model's first image, for a few identities and prompts;
* ``images/<model>/<dataset>/<identity>/p<prompt>_k<k>.png`` (a model without identity input:
  ``images/<model>/p<prompt>_k<k>.png``), each with its settings in a ``bolid`` PNG text chunk,
  and ``images.jsonl``: one line per scored image with its path, settings and scores.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from bolid.face_sim import FaceSimilarity
from bolid.images import ImageError, load_image
from bolid.metrics import BodySimilarity, CLIPImageSimilarity, CLIPTextScore
from bolid.results import (
    MetricResult,
    Row,
    cluster_bootstrap_ci,
    comparison_grid,
    paired_gain,
    save_image,
    write_results,
)

log = logging.getLogger(__name__)

#: ``generate(prompt, references or None, seeds)`` -> one PIL image per seed, as a list or as an object with
#: ``.images`` and a ``.settings`` dict recorded with each image (like BoLIDPipeline's ``GenerationResult``).
#: ``seeds`` are consecutive integers.
GenerateFn = Callable[[str, "list[Image.Image] | None", "list[int]"], object]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ------------------------------------------------------------------------------------------- data types


@dataclass
class Variant:
    """A model to evaluate.

    Args:
        name: the row name in the table.
        build: loads the model and returns its :data:`GenerateFn`; called once, and the model is released
            before the next variant is built, so only one model is in memory at a time.
        uses_identity: ``False`` for a model that ignores references (the base model).
        settings: recorded with every image (adapter file, scales, steps, ...).
        no_identity: the model CLIP-I compares this one with (a peer's own base model, sampled with the peer's
            steps and CFG); ``None``: :func:`evaluate`'s ``no_identity``.
    """

    name: str
    build: Callable[[], GenerateFn]
    uses_identity: bool = True
    settings: dict = field(default_factory=dict)
    no_identity: Variant | None = None


@dataclass
class Identity:
    """One person of a dataset: its reference photos and where they came from."""

    name: str
    references: list[Image.Image]
    sources: list[str]
    held_out: Image.Image | None = None  # a further photo of the person, never shown to the model
    held_out_source: str | None = None

    @property
    def body_target(self) -> Image.Image:
        """The photo Body Sim compares against: the held-out one when there is one, else the first reference."""
        return self.held_out if self.held_out is not None else self.references[0]


@dataclass
class EvalDataset:
    """A named set of identities: one column group of the table."""

    name: str
    identities: list[Identity]


@dataclass
class RunSettings:
    """How the images are made and scored (the YAML's top-level keys of the same names; their types and ranges are
    checked where the YAML is read, :class:`bolid.cli.eval.EvalFile`)."""

    images_per_prompt: int = 4
    seed: int = 0
    batch_size: int = 4
    device: str = "cpu"
    ci_resamples: int = 2000
    comparison_identities: int = 3
    comparison_prompts: int = 2
    comparison_tile: int = 256
    body_min_score: float = 0.5
    body_min_features: int = 3
    body_failure_score: float | None = None


# --------------------------------------------------------------------------------------------- datasets


def _slug(name: str) -> str:
    """A file-name-safe form of ``name`` (letters, digits, ``.-_``), unique per name.

    When making it safe changed the name (non-ASCII letters, spaces, ...), 8 hex digits of the name's SHA-256
    are appended, so that e.g. "Анна" and "Иван", or "Anna Ivanova" and "Anna_Ivanova", never share a folder.
    """
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    if s == name:
        return s
    return f"{s or 'id'}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"


def folder_dataset(name: str, root: str | Path, max_identities: int | None = None, references: int = 1) -> EvalDataset:
    """Identities from a folder laid out as ``root/<identity>/<image>``; the first images by name are references.

    Raises:
        ValueError: ``root`` is missing or holds no identity with ``references`` readable images.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset {name!r}: folder {root} does not exist")
    identities = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        images, sources = [], []
        for f in files:
            if len(images) == references + 1:  # the references and one held-out photo
                break
            try:
                images.append(load_image(f))
                sources.append(str(f))
            except ImageError as e:
                log.warning("dataset %s: skipping %s", name, e)
        if len(images) < references:
            log.warning(
                "dataset %s: identity %s has %d of %d references, skipped", name, sub.name, len(images), references
            )
            continue
        extra = (images.pop(), sources.pop()) if len(images) > references else (None, None)
        identities.append(Identity(sub.name, images, sources, *extra))
        if max_identities is not None and len(identities) >= max_identities:
            break
    if not identities:
        raise ValueError(f"dataset {name!r}: no identity folder in {root} has {references} readable image(s)")
    return EvalDataset(name, identities)


def shard_dataset(
    name: str,
    shard_sets: Sequence[str | Path],
    split: str = "test",
    max_identities: int | None = None,
    references: int = 1,
) -> EvalDataset:
    """The held-out identities of one or more BoLID shard sets (format: :mod:`bolid.shards`).

    Each shard set is a folder with ``index.json``; the identities of ``split`` are taken in sorted order
    (across sets, the first set's first), and each identity's first ``references`` samples in shard order
    become its references.

    Raises:
        ValueError: a set has no identity in ``split``, or no identity has ``references`` samples.
    """
    import webdataset as wds

    from bolid.shards import ShardSample, read_index

    identities: list[Identity] = []
    for root in shard_sets:
        index = read_index(root)
        wanted = index.identities_in(split)
        if not wanted:
            raise ValueError(f"dataset {name!r}: {root} has no identities in split {split!r}")
        found: dict[str, Identity] = {}
        need = set(wanted)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(index.shard_paths(split)),
            wds.tarfile_to_samples(),
        )
        for sample in pipeline:
            meta = ShardSample.from_json(sample["json"])
            if meta.identity not in need:
                continue
            ident = found.setdefault(meta.identity, Identity(meta.identity, [], []))
            ident.references.append(load_image(sample["jpg"]))
            ident.sources.append(f"{Path(sample['__url__']).name}:{sample['__key__']}")
            if len(ident.references) == references + 1:  # the references and one held-out photo
                need.discard(meta.identity)
                if not need:
                    break
        short = sorted(i for i in wanted if len(found.get(i, Identity(i, [], [])).references) < references)
        if short:
            log.warning("dataset %s: %d identities have fewer than %d samples, skipped", name, len(short), references)
        for i in sorted(wanted):
            if i in found and i not in short:
                ident = found[i]
                if len(ident.references) > references:
                    ident.held_out, ident.held_out_source = ident.references.pop(), ident.sources.pop()
                identities.append(ident)
    if not identities:
        raise ValueError(f"dataset {name!r}: no identity of split {split!r} has {references} sample(s)")
    return EvalDataset(name, identities[:max_identities] if max_identities else identities)


def load_prompts(value: str | Path | Sequence[str], max_prompts: int | None = None) -> list[str]:
    """Prompts from a list or from a YAML file holding ``prompts: [...]``.

    Raises:
        ValueError: no prompts, or an entry that is not a non-empty string.
    """
    from bolid.config import load_yaml

    where = "prompts"
    if isinstance(value, (str, Path)):
        data = load_yaml(value)
        if "prompts" not in data:
            raise ValueError(f"{value}: needs a top-level 'prompts' list")
        where, value = f"{value}: prompts", data["prompts"]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where} must be a non-empty list of strings")
    bad = [i for i, p in enumerate(value) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"{where}[{bad[0]}] is not a non-empty string")
    prompts = [p.strip() for p in value]
    return prompts[:max_prompts] if max_prompts else prompts


# --------------------------------------------------------------------------------------------- the core

_PER_CALL = ("seed", "seeds", "num_images", "prompt")  # per-call settings, replaced by per-image ones


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generate(
    fn: GenerateFn, prompt: str, refs: list[Image.Image] | None, seeds: list[int], batch: int, who: str
) -> tuple[list[Image.Image], dict]:
    """Images for ``seeds`` in batches, and the settings the model reported (from the first batch)."""
    images: list[Image.Image] = []
    settings: dict = {}
    for start in range(0, len(seeds), batch):
        chunk = seeds[start : start + batch]
        out = fn(prompt, refs, chunk)
        if hasattr(out, "images"):
            if not settings:
                settings = {k: v for k, v in dict(getattr(out, "settings", None) or {}).items() if k not in _PER_CALL}
            out = out.images
        out = list(out)
        if len(out) != len(chunk):
            raise RuntimeError(f"model {who!r} returned {len(out)} images for {len(chunk)} seeds")
        images.extend(out)
    return images, settings


@dataclass
class _Batch:
    """The K images of one (model, prompt[, identity]) with their files and (for shared images) keypoints."""

    images: list[Image.Image]
    paths: list[str]
    keypoints: torch.Tensor | None = None
    faces: torch.Tensor | None = None  # (K, 512) face embeddings, NaN rows where no face


class _Run:
    """State of one :func:`evaluate` call: output folder, seeds, metrics, manifest."""

    def __init__(self, out: Path, prompts: Sequence[str], s: RunSettings, clip, pose, faces=None, body_stats=None):
        self.out, self.prompts, self.s, self.clip = out, list(prompts), s, clip
        self.face_scorer = FaceSimilarity(faces) if faces is not None else None
        self.seeds = [s.seed + k for k in range(s.images_per_prompt)]
        self.body_kwargs = {
            "min_score": s.body_min_score,
            "min_features": s.body_min_features,
            "failure_score": s.body_failure_score,
        }
        if body_stats is not None:
            self.body_kwargs.update(mean=body_stats[0], std=body_stats[1])
        self.scorer = BodySimilarity(pose=pose, **self.body_kwargs)
        self.pose = self.scorer.pose  # one extractor for every dataset and model
        self.manifest = open(out / "images.jsonl", "w", encoding="utf-8")  # noqa: SIM115 - closed by evaluate
        self.firsts: dict[tuple[str, str, str, int], Image.Image] = {}  # (dataset, model, identity, prompt) -> k=0

    def make(self, variant: Variant, fn: GenerateFn, pi: int, ds: str | None = None, ident: Identity | None = None):
        """Generate and save the K images of prompt ``pi`` (for ``ident``, or shared when ``None``)."""
        prompt = self.prompts[pi]
        where = f"model {variant.name!r}" + (f", {ds}/{ident.name}" if ident else "")
        try:
            refs = ident.references if ident else None
            images, reported = _generate(fn, prompt, refs, self.seeds, self.s.batch_size, variant.name)
        except Exception as e:
            e.add_note(f"while generating for {where}, prompt {pi}")
            raise
        folder = self.out / "images" / _slug(variant.name)
        if ident is not None:
            folder = folder / _slug(ds) / _slug(ident.name)
        paths = []
        for k, (seed, im) in enumerate(zip(self.seeds, images, strict=True)):
            info = {"model": variant.name, "prompt": prompt, "seed": seed, **variant.settings}
            if ident is not None:
                info.update(dataset=ds, identity=ident.name, reference_files=ident.sources)
            info["pipeline"] = reported
            path = folder / f"p{pi:02d}_k{k}.png"
            save_image(im, path, info)
            paths.append(str(path.relative_to(self.out)))
        # Shared images are scored against every identity: run the pose and face models on them once.
        if ident is not None:
            return _Batch(images, paths)
        faces = self.face_scorer.embeddings(images) if self.face_scorer is not None else None
        return _Batch(images, paths, self.scorer.keypoints(images), faces)

    def shared(self, variant: Variant, fn: GenerateFn) -> list[_Batch]:
        prompts = tqdm(range(len(self.prompts)), desc=f"{variant.name} (no identity)", unit="prompt", leave=False)
        return [self.make(variant, fn, pi) for pi in prompts]

    def score(
        self, variant: Variant, fn: GenerateFn, ds: EvalDataset, base: list[_Batch], shared: list[_Batch] | None
    ) -> Row:
        """All images of ``variant`` on ``ds``, scored; one table row."""
        body = BodySimilarity(pose=self.pose, **self.body_kwargs)
        clip_t = CLIPTextScore(self.clip).to(self.s.device)
        clip_i = CLIPImageSimilarity(self.clip).to(self.s.device)
        ref_kps = {ident.name: self.scorer.keypoints([ident.body_target]) for ident in ds.identities}
        face = FaceSimilarity(self.face_scorer.faces) if self.face_scorer is not None else None
        ref_faces = {i.name: face.embeddings(i.references[:1]) for i in ds.identities} if face is not None else {}
        named = {"body_sim": body, "clip_t": clip_t, "clip_i": clip_i}
        if face is not None:
            named["face_sim"] = face
        groups: list[str] = []
        samples: dict[tuple[str, int, int], float] = {}
        bar = tqdm(total=len(ds.identities) * len(self.prompts), desc=f"{variant.name} / {ds.name}", unit="prompt")
        for ident in ds.identities:
            log.debug("model %s, dataset %s, identity %s", variant.name, ds.name, ident.name)
            for pi, prompt in enumerate(self.prompts):
                bar.update()
                batch = shared[pi] if shared is not None else self.make(variant, fn, pi, ds.name, ident)
                n0, n = len(groups), len(batch.images)
                body.update(
                    batch.images if batch.keypoints is None else batch.keypoints, ref_kps[ident.name].expand(n, 17, 3)
                )
                clip_t.update(batch.images, [prompt] * n)
                clip_i.update(batch.images, base[pi].images)
                if face is not None:
                    generated = batch.images if batch.faces is None else batch.faces
                    face.update(generated, ref_faces[ident.name].expand(n, -1))
                groups.extend([ident.name] * n)
                self.firsts[ds.name, variant.name, ident.name, pi] = batch.images[0]
                scores = {m: metric.per_sample()[n0:] for m, metric in named.items()}
                for k, value in enumerate(scores["body_sim"].tolist()):
                    samples[ident.name, pi, k] = value
                for k, (seed, path) in enumerate(zip(self.seeds, batch.paths, strict=True)):
                    line = {"path": path, "model": variant.name, "dataset": ds.name, "identity": ident.name}
                    line["body_sim_against"] = ident.held_out_source or ident.sources[0]
                    line.update(prompt_index=pi, prompt=prompt, k=k, seed=seed, settings=variant.settings)
                    line.update({m: _num(v[k]) for m, v in scores.items()})
                    self.manifest.write(json.dumps(line) + "\n")
        bar.close()
        metrics = {}
        for name, metric in named.items():
            mean, low, high, n = cluster_bootstrap_ci(
                metric.per_sample().cpu(), groups, self.s.ci_resamples, self.s.seed
            )
            metrics[name] = MetricResult(mean, low, high, n, len(set(groups)))
        rate = float(body.compute()["failure_rate"])
        row = Row(ds.name, variant.name, metrics, int(body.num_pairs), rate, body.failures(), body_sim_samples=samples)
        if face is not None:
            row.face_pairs, row.face_failures = int(face.num_pairs), face.failures()
            row.face_failure_rate = float(face.compute()["failure_rate"])
        log.info("%s on %s: %s", variant.name, ds.name, {m: r.cell(3) for m, r in metrics.items()})
        return row


def evaluate(
    variants: Sequence[Variant],
    datasets: Sequence[EvalDataset],
    prompts: Sequence[str],
    out: str | Path,
    clip: Callable[[], tuple],
    no_identity: Variant | None = None,
    settings: RunSettings | None = None,
    pose=None,
    record: dict | None = None,
    faces=None,
    body_stats: tuple[Sequence[float], Sequence[float]] | None = None,
) -> list[Row]:
    """Generate, save and score every image, then write results.md/.csv/.json and comparison.png.

    Args:
        variants: the models, in table order.
        datasets: the column groups, in table order.
        prompts: the prompt list.
        out: output folder (created).
        clip: a :func:`bolid.metrics.clip_loader` (or any ``CLIPScore`` model callable).
        no_identity: the model whose images CLIP-I compares against; defaults to the first variant with
            ``uses_identity=False``. It may be one of ``variants`` (its images are then made once) or not
            (made but left out of the table).
        settings: see :class:`RunSettings`.
        pose: pose extractor for Body Sim (default BlazePose).
        record: extra settings for results.json and results.md (config file, components, command).
        faces: a :class:`bolid.face_id.FaceAnalyzer` (or a callable building one) for the Face Sim column;
            ``None``: no Face Sim.
        body_stats: ``(mean, std)`` of the 6 proportions for Body Sim's z-scores (default: the real-photo
            constants of :mod:`bolid.metrics`; the mini kit passes its world's).

    Returns:
        One :class:`Row` per (dataset, model).

    Raises:
        ValueError: no variants, datasets or prompts, duplicate names, or no model for CLIP-I.
    """
    s = settings or RunSettings()
    out = Path(out)
    if not variants or not datasets or not prompts:
        raise ValueError("evaluate needs at least one variant, one dataset and one prompt")
    for what, names in (("model", [v.name for v in variants]), ("dataset", [d.name for d in datasets])):
        slugs = [_slug(n) for n in names]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"{what} names must be distinct (also as file names), got {names}")
    if no_identity is None:
        no_identity = next((v for v in variants if not v.uses_identity), None)
    if no_identity is None or no_identity.uses_identity:
        raise ValueError("CLIP-I needs a model without identity input (kind: base) to compare against")
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(out, prompts, s, clip, pose, faces, body_stats)
    rows: list[Row] = []
    try:
        log.info("generating the no-identity images (%s) for CLIP-I", no_identity.name)
        fn = no_identity.build()
        bases = {no_identity.name: run.shared(no_identity, fn)}  # CLIP-I references by model name
        for variant in variants:
            ref = variant.no_identity or no_identity
            if ref.name not in bases:  # a peer's own base model: made once, before the peer is loaded
                fn = None
                _release()
                log.info("generating the no-identity images (%s) for CLIP-I of %s", ref.name, variant.name)
                bases[ref.name] = run.shared(ref, ref.build())
            if variant is not no_identity:
                fn = None
                _release()
                log.info("model %s: loading", variant.name)
                fn = variant.build()
            shared = bases.get(variant.name) if not variant.uses_identity else None
            if shared is None and not variant.uses_identity:
                shared = run.shared(variant, fn)
            rows += [run.score(variant, fn, ds, bases[ref.name], shared) for ds in datasets]
        fn = None
        _release()
    finally:
        run.manifest.close()
    record = {**(record or {}), "run": asdict(s), "prompts": list(prompts), "seeds": run.seeds}
    record["datasets"] = {d.name: [i.name for i in d.identities] for d in datasets}
    record["models"] = {v.name: v.settings for v in variants}
    record["no_identity_model"] = no_identity.name
    chance_rows = {r.dataset: r for r in rows if r.model == no_identity.name}
    record["body_sim_chance_level"] = {
        d: _num(torch.tensor(r.metrics["body_sim"].mean)) for d, r in chance_rows.items()
    }
    record["clip_i_reference"] = {v.name: (v.no_identity or no_identity).name for v in variants}
    for r in rows:
        if r.model != no_identity.name and r.dataset in chance_rows:
            r.body_sim_gain = paired_gain(r, chance_rows[r.dataset], s.ci_resamples, s.seed)
    if run.face_scorer is not None:
        record["face_sim_model"] = run.face_scorer.faces.settings
    write_results(rows, out, [v.name for v in variants], [d.name for d in datasets], record)
    grid = []
    for ds in datasets:
        for ident in ds.identities[: s.comparison_identities]:
            for pi in range(min(s.comparison_prompts, len(prompts))):
                images = [run.firsts.get((ds.name, v.name, ident.name, pi)) for v in variants]
                grid.append((f"{ds.name} / {ident.name}: {prompts[pi]}", ident.references[0], images))
    comparison_grid(grid, [v.name for v in variants], s.comparison_tile).save(out / "comparison.png")
    log.info("wrote %s", out)
    return rows


def _num(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else round(v, 6)
