"""``build``: one part of the pipeline from an input folder to shards, restartable at any point.

Stages, in the order they run (each one counts what it rejects and why, :mod:`datapipe.stats`):

1. ``ingest`` (:mod:`datapipe.ingest`): header size check, decode check, SHA-256 and pHash
   dedupe; each accepted image is stored resized (worker pool).
2. ``pose`` (:mod:`datapipe.annotate`): person boxes and keypoints, batched; person rules.
3. ``identities``: drop identities with fewer than ``identities.min_photos`` accepted images.
   It runs before captioning, which never rejects, so that BLIP-2 (the slowest model) does not
   caption people who would be dropped; the shards are the same either way.
4. ``caption``: BLIP-2 captions, batched.
5. ``shards`` (:mod:`datapipe.writer`; format: :mod:`bolid.shards`): identity-grouped WebDataset shards, each
   written to a temporary name and renamed, less what ``datapipe remove`` took out (:mod:`datapipe.removals`);
   identities that did not change keep their shards (:func:`datapipe.writer.plan_stable`); then this part's
   index (:mod:`datapipe.index`) and its rows of ``samples.parquet`` (:mod:`datapipe.table`).

Ingest decides over every identity of the input, not only this part's (each part probes its own images first,
then the others', sharing the probe cache), so duplicates across identities are found whatever the partition
and N parts give the same samples as one.

Every result is cached as soon as it exists (:mod:`datapipe.cache`) and every decision is a
pure function of the inputs, the settings and the cached results, taken in (identity, sha256)
order. So a run killed at any point (SIGKILL included) and started again writes the same
shards as an uninterrupted run, and a run after adding images only works on the new ones. A
shard whose content is unchanged since the last run is not rewritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from bolid.shards import ShardSample, sample_key, shard_name, shard_pattern
from datapipe.annotate import Captioner, PoseModel, Verdict, annotate, judge_persons
from datapipe.balance import assign_sources
from datapipe.cache import Journal, PartLock, StoredImages
from datapipe.config import BuildConfig
from datapipe.index import merge, part_path, part_tag, write_part
from datapipe.ingest import Item, Source, decide, discover, run_probes
from datapipe.removals import Removals
from datapipe.stats import Stats
from datapipe.table import sample_rows, write_rows
from datapipe.workers import StoredTask, WorkerPool, stored_bytes
from datapipe.writer import file_sha256, plan_stable, shard_digest, write_shard

log = logging.getLogger(__name__)


def _progress(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(unit="img", dynamic_ncols=True, disable=None, **kwargs)


def _settings(config: BuildConfig) -> dict:
    """What every part of one dataset must agree on (batch sizes, device and workers may differ)."""
    drop = {"batch_size"}
    return {
        "components": config.components.kind,
        "ingest": dataclasses.asdict(config.ingest),
        "pose": {k: v for k, v in dataclasses.asdict(config.pose).items() if k not in drop},
        "caption": {k: v for k, v in dataclasses.asdict(config.caption).items() if k not in drop},
        "identities": dataclasses.asdict(config.identities),
        "split": dataclasses.asdict(config.split),
        "shards": dataclasses.asdict(config.shards),
    }


def _summary(stats: Stats, stage: str) -> None:
    s = stats[stage]
    why = ", ".join(f"{r} {n}" for r, n in s.rejected.items() if n)
    log.info("%s: %d in, %d out%s", stage, s.inputs, s.outputs, f" (rejected: {why})" if why else "")


def build(
    config: BuildConfig,
    in_dir: str | Path,
    out_dir: str | Path,
    part: int = 0,
    num_parts: int = 1,
    progress=_progress,
    models: Callable | None = None,
) -> dict:
    """Run every stage for one part of the identities and write its shards and part index.

    Args:
        config: the settings (``configs/shards/*.yaml`` plus command-line overrides).
        in_dir: the crawler's output folder (with ``manifest.jsonl``) or an ``<identity>/<image>`` folder.
        out_dir: where shards, index, stats and the cache go.
        part: which part this run is, ``0 <= part < num_parts``.
        num_parts: how many parts the identities are split into (one machine each); with 1 the run also
            merges, writing ``index.json`` and ``stats.json``.
        progress: a ``tqdm``-like factory for the per-stage progress bars.
        models: ``models(stage, config)`` gives the model of ``"pose"`` or ``"caption"``; default: loaded here
            (:class:`~datapipe.annotate.PoseModel`, :class:`~datapipe.annotate.Captioner`). The Ray executor passes
            handles on shared actors instead (:mod:`datapipe.executors`).

    Returns:
        This part's index (see :func:`datapipe.index.write_part`).
    """
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"--part must be in [0, --num-parts), got part {part} of {num_parts}")
    out = Path(out_dir)
    in_dir = Path(in_dir)
    if out.resolve() == in_dir.resolve() or in_dir.resolve() in out.resolve().parents:
        raise ValueError(f"--out {out} must not be inside --in {in_dir}")
    tag = part_tag(part, num_parts)
    cache_dir = out / "cache"
    with PartLock(out / "parts" / f"{tag}.lock"), _model_threads(config):
        everyone, layout = discover(in_dir)
        if not everyone:
            raise ValueError(f"--in {in_dir}: no images found (expected manifest.jsonl or <identity>/<image> files)")
        assignment = assign_sources((s.identity for s in everyone), num_parts)
        sources = [s for s in everyone if assignment[s.identity] == part]
        others = [s for s in everyone if assignment[s.identity] != part]
        log.info(
            "%s: %d images of %d identities (%s layout), part %d of %d",
            in_dir,
            len(sources),
            len({s.identity for s in sources}),
            layout,
            part,
            num_parts,
        )
        stats = Stats()
        stats.identities["found"] = len({s.identity for s in sources})
        rejects: list[dict] = []
        stored = StoredImages(cache_dir / f"stored-{config.shards.tag}")
        with WorkerPool(config.num_workers) as pool:
            run = PartRun(config, cache_dir, tag, stored, pool, progress, models or local_model)
            items = _record(stats, rejects, "ingest", *stage_ingest(sources, run, others))
            posed = _record(stats, rejects, "pose", *stage_pose(items, run))
            kept = _record(stats, rejects, "identities", *stage_identities(posed, config.identities.min_photos))
            stats.identities["kept"] = len({it.identity for it, _ in kept})
            samples = _record(stats, rejects, "caption", *stage_caption(kept, run), summary=False)
            shards, samples = stage_shards(samples, run, out, part, num_parts, stats, rejects)
            stats.shards = len(shards)

        content = _part_index(config, part, num_parts, layout, shards, samples, stats)
        rejects.sort(key=lambda r: (r["identity"], r["path"], r["stage"]))
        write_part(out, part, num_parts, content, rejects)
        rows = sample_rows(sources, run.records, rejects, samples, shards)
        write_rows(part_path(out, part, num_parts).with_suffix(".samples.jsonl"), rows)
        log.info(
            "part %d of %d: %d samples of %d identities in %d shards",
            part,
            num_parts,
            len(samples),
            len(content["identities"]),
            len(shards),
        )
        if not samples:
            log.warning("no image passed every stage; see %s", out / "rejects.jsonl")
    if num_parts == 1:
        merge(out, 1)
    return content


# ------------------------------------------------------------------------------- stages: (kept, rejects)


def local_model(stage: str, config: BuildConfig):
    """The model of a stage, loaded in this process on first use."""
    return {"pose": PoseModel, "caption": Captioner}[stage](config)


@dataclasses.dataclass
class PartRun:
    """What the stages of one part share: settings, cache folder, part tag, stored images, workers, progress."""

    config: BuildConfig
    cache_dir: Path
    tag: str
    stored: StoredImages
    pool: WorkerPool
    progress: Callable = _progress
    models: Callable = None  # (stage, config) -> the model; default local_model
    records: dict[str, dict] = dataclasses.field(default_factory=dict)  # ingest's probe record per source path

    def model(self, stage: str):
        return (self.models or local_model)(stage, self.config)

    def task(self, item: Item, draft: tuple[int, int] | None = None) -> StoredTask:
        """The worker task that loads ``item``'s stored pixels (at ``draft`` size, for a model's input)."""
        sh = self.config.shards
        return StoredTask(
            item.sha256,
            str(self.stored.directory),
            str(item.source.path),
            sh.resolution,
            sh.quality,
            sh.resample,
            draft,
        )


def stage_ingest(sources: list[Source], run: PartRun, others: list[Source] = ()) -> tuple[list[Item], list[dict]]:
    """1. Size and decode checks, the stored (resized) copy, duplicate removal; returns this part's outcome.

    ``others`` are the other parts' sources: probed too (after this part's, reusing the shared probe cache) so
    that duplicates across identities are decided over the whole input, the same way in every part.
    """
    sh, ing = run.config.shards, run.config.ingest
    journal = Journal(run.cache_dir, f"ingest-{sh.tag}", run.tag, key="path")
    run.records = run_probes(
        [*sources, *others],
        ing.min_size,
        run.stored,
        journal,
        (sh.resolution, sh.quality, sh.resample),
        run.pool.map_ordered,
        run.progress,
        max_pixels=ing.max_pixels,
    )
    journal.close()
    everyone = sorted([*sources, *others], key=lambda s: (s.identity, s.rel))
    items, rejects = decide(everyone, run.records, ing.min_size, ing.near_duplicate_distance, ing.max_pixels)
    mine = {s.identity for s in sources}
    return [it for it in items if it.identity in mine], [r for r in rejects if r["identity"] in mine]


def stage_pose(items: list[Item], run: PartRun) -> tuple[list[tuple[Item, Verdict]], list[dict]]:
    """2. Person and 17 keypoints per image; images without one clear, visible person are rejected."""
    config = run.config
    pose_model = run.model("pose")
    journal = Journal(run.cache_dir, f"pose-{pose_model.fingerprint}", run.tag, key="sha256")
    outputs = annotate(items, pose_model, config.pose.batch_size, journal, run.task, run.pool, run.progress, "pose")
    journal.close()
    pose_model.close()
    posed: list[tuple[Item, Verdict]] = []
    pose_rejects = []
    for item in items:
        verdict = judge_persons(outputs[item.sha256]["persons"], config.pose)
        if verdict.reason is None:
            posed.append((item, verdict))
        else:
            pose_rejects.append(_reject("pose", verdict.reason, item, verdict.detail))
    return posed, pose_rejects


def stage_identities(
    posed: list[tuple[Item, Verdict]], min_photos: int
) -> tuple[list[tuple[Item, Verdict]], list[dict]]:
    """3. People with fewer than ``min_photos`` photos left are dropped."""
    per_identity = Counter(item.identity for item, _ in posed)
    kept = [(it, v) for it, v in posed if per_identity[it.identity] >= min_photos]
    id_rejects = [
        _reject("identities", "too_few_photos", it, f"{per_identity[it.identity]} < {min_photos} photos")
        for it, v in posed
        if per_identity[it.identity] < min_photos
    ]
    return kept, id_rejects


def stage_caption(kept: list[tuple[Item, Verdict]], run: PartRun) -> tuple[list[tuple[Item, ShardSample]], list[dict]]:
    """4. BLIP-2 captions; never rejects. Returns each item with its complete shard sample."""
    config = run.config
    captioner = run.model("caption")
    journal = Journal(run.cache_dir, f"caption-{captioner.fingerprint}", run.tag, key="sha256")
    kept_items = [it for it, _ in kept]
    captions = annotate(
        kept_items, captioner, config.caption.batch_size, journal, run.task, run.pool, run.progress, "caption"
    )
    journal.close()
    captioner.close()
    return [(it, _sample(it, v, captions[it.sha256]["caption"])) for it, v in kept], []


def stage_shards(
    samples: list[tuple[Item, ShardSample]],
    run: PartRun,
    out: Path,
    part: int,
    num_parts: int,
    stats: Stats,
    rejects: list[dict],
) -> tuple[list[dict], list[tuple[Item, ShardSample]]]:
    """5. This part's shards (``index.json``-style entries) and the samples in them; rejects only what
    ``datapipe remove`` took out (``OUT/removed.json``)."""
    removals = Removals.load(out)
    removed = [
        _reject("shards", "removed", it, removals.why(it.identity, it.sha256))
        for it, _ in samples
        if removals.covers(it.identity, it.sha256)
    ]
    samples = [(it, s) for it, s in samples if not removals.covers(it.identity, it.sha256)]
    _record(stats, rejects, "shards", samples, removed, summary=False)
    shards = _write_shards(samples, run.config, out, run.cache_dir, part, num_parts, run.pool, run.task, run.progress)
    return shards, samples


def _record(stats: Stats, rejects: list[dict], stage: str, kept: list, stage_rejects: list[dict], summary=True):
    """Count a stage's outcome in ``stats``, collect its rejects, log it; returns what it kept."""
    _count(stats, stage, len(kept), stage_rejects)
    rejects += stage_rejects
    if summary:
        _summary(stats, stage)
    return kept


def _part_index(
    config: BuildConfig, part: int, num_parts: int, layout: str, shards: list[dict], samples: list, stats: Stats
) -> dict:
    """This part's index content (:func:`datapipe.index.write_part`)."""
    identities: dict[str, dict] = {}
    for shard in shards:
        for identity, n in shard["identities"].items():
            info = identities.setdefault(identity, {"name": "", "count": 0, "shards": []})
            info["count"] += n
            info["shards"].append(shard["name"])
    for it, _ in samples:
        identities[it.identity]["name"] = it.source.name
    stats.identities["kept"] = len(identities)  # in the shards (less any removed on request)
    return {
        "part": part,
        "num_parts": num_parts,
        "layout": layout,
        "settings": _settings(config),
        "shards": shards,
        "identities": identities,
        # Content hashes per identity, so that the merge can find a photo kept by two parts.
        "hashes": {i: sorted(it.sha256 for it, _ in samples if it.identity == i) for i in sorted(identities)},
        "stats": stats.to_dict(),
    }


@contextlib.contextmanager
def _model_threads(config: BuildConfig):
    """On a CPU device, leave half the cores to the worker processes while models run.

    Torch's OpenMP threads busy-wait at every barrier, so sharing all cores with busy workers (or other jobs)
    can make a CPU model several times slower. The previous setting is restored afterwards.
    """
    import torch

    before = torch.get_num_threads()
    if config.resolved_device() == "cpu" and config.num_workers > 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // 2))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reject(stage: str, reason: str, item: Item, detail: str) -> dict:
    return {"stage": stage, "reason": reason, "identity": item.identity, "path": item.source.rel, "detail": detail}


def _count(stats: Stats, stage: str, passed: int, rejects: list[dict]) -> None:
    stats[stage].passed(passed)
    for reason, n in sorted(Counter(r["reason"] for r in rejects).items()):
        stats[stage].reject(reason, n)


def _sample(item: Item, verdict, caption: str) -> ShardSample:
    person = verdict.person
    src = item.source
    return ShardSample(
        identity=item.identity,
        name=src.name,
        caption=caption,
        width=item.stored_width,
        height=item.stored_height,
        original_width=item.width,
        original_height=item.height,
        box=tuple(person["box"]),
        score=person["score"],
        keypoints=tuple(tuple(k) for k in person["keypoints"]),
        face_box=None if person["face_box"] is None else tuple(person["face_box"]),
        num_persons=verdict.num_persons,
        sha256=item.sha256,
        url=src.url,
        page_url=src.page_url,
        source=src.rel,
    )


def _previous_shards(out: Path, part: int, num_parts: int, config: BuildConfig) -> list[dict]:
    """The shards of the last complete build of this part with the same shard settings (else [])."""
    path = part_path(out, part, num_parts)
    if not path.is_file():
        return []
    previous = json.loads(path.read_text(encoding="utf-8"))
    if previous.get("settings", {}).get("shards") != dataclasses.asdict(config.shards):
        return []
    return [s for s in previous["shards"] if "number" in s]


def _write_shards(samples, config, out, cache_dir, part, num_parts, pool, task, progress) -> list[dict]:
    """Write this part's shards; unchanged ones (same samples and settings as recorded) are kept as they are."""
    sh = config.shards
    by_identity: dict[str, list] = defaultdict(list)
    for it, sample in samples:
        by_identity[it.identity].append((it, sample))
    order = sorted(by_identity)
    counts = [(i, len(by_identity[i])) for i in order]
    plan = plan_stable(_previous_shards(out, part, num_parts, config), counts, sh.samples_per_shard)
    pattern = shard_pattern(part, num_parts)
    for stale in out.glob(".shard-*.tmp"):
        if pattern.fullmatch(stale.name[1:].rsplit(".", 2)[0]):
            stale.unlink()  # left by a killed run
    journal = Journal(cache_dir, "shards", part_tag(part, num_parts), key="name")
    done = journal.load()
    planned = []
    for number, slices in plan:
        members = [m for identity, a, b in slices for m in by_identity[identity][a:b]]
        metas = [(sample_key(it.identity, it.sha256), s.to_json()) for it, s in members]
        digest = shard_digest(sh.tag, metas)
        name = shard_name(number, part, num_parts)
        rec, path = done.get(name), out / name
        fresh = rec is not None and rec["digest"] == digest and path.is_file()
        fresh = fresh and path.stat().st_size == rec["bytes"]
        planned.append((number, name, slices, members, metas, digest, fresh))
    todo = [task(it) for _, _, _, members, _, _, fresh in planned if not fresh for it, _ in members]
    jpgs = pool.map_ordered(stored_bytes, todo)
    shards = []
    with progress(total=len(samples), desc="shards") as bar:
        for number, name, slices, members, metas, digest, fresh in planned:
            path = out / name
            if fresh:
                size = path.stat().st_size
                sha = done[name].get("sha256") or file_sha256(path)
            else:
                size = write_shard(path, ((key, next(jpgs), meta) for key, meta in metas))
                sha = file_sha256(path)
                journal.append([{"name": name, "digest": digest, "bytes": size, "sha256": sha}], fsync=True)
            per_identity: dict[str, int] = {}
            for identity, a, b in slices:
                per_identity[identity] = per_identity.get(identity, 0) + b - a
            shards.append(
                {
                    "name": name,
                    "number": number,
                    "count": len(members),
                    "bytes": size,
                    "sha256": sha,
                    "identities": per_identity,
                }
            )
            bar.update(len(members))
    journal.close()
    names = {s["name"] for s in shards}
    for old in out.glob("shard-*.tar"):
        if pattern.fullmatch(old.name) and old.name not in names:
            log.info("removing %s: no longer part of the dataset", old)
            old.unlink()
    return shards
