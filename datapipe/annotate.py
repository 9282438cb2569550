"""Stages 2 and 3: person boxes and keypoints, then captions; model outputs cached per image hash.

Pose (:class:`PoseModel`) runs any :class:`bolid.pose.PoseExtractor`: RT-DETR + ViTPose
(``pose.backend: vitpose``, real weights or the tiny kit per ``components``) or MediaPipe
BlazePose (``blazepose``). The cache keeps every person found, so the rules that judge them
(:func:`judge_persons`) can change without re-running the model:

1. no person box at or above ``pose.threshold`` -> ``no_person``;
2. a person is *prominent* when its box area is at least ``pose.prominent_area`` times the
   largest box's; more than ``pose.max_persons`` prominent persons -> ``multiple_persons``;
3. the main (largest) person shows fewer than ``pose.min_body_keypoints`` of the 12 body
   keypoints with score at least ``pose.keypoint_score`` -> ``too_few_keypoints``.

Captions (:class:`Captioner`) come from BLIP-2 in transformers, greedy or beam search, with
the prompt and maximum length of the ``caption`` section.

:func:`annotate` runs a model only on images whose output is not cached, in batches of the
batch size taken in (identity, sha256) order, and caches each batch as one journal line, so
a batch is saved whole or not at all. After a kill, the images left are exactly the batches
not saved, so the re-run feeds the model the same batches as an uninterrupted run and gets
bit-identical outputs (batch composition can change float results in the last bits); after
images are added, only the new ones are run. Outputs are keyed by the image's SHA-256 in a
journal named by the model's fingerprint: the weights, the settings that change outputs, and
the stored-image settings (models see the stored JPEG, see :mod:`datapipe.resize`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from datapipe.cache import Journal
from datapipe.config import BuildConfig, PoseConfig
from datapipe.workers import StoredTask, WorkerPool, stored_pixels

log = logging.getLogger(__name__)


def _fingerprint(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def box_area(box: Sequence[float]) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def visible_body_keypoints(keypoints: Sequence[Sequence[float]], min_score: float) -> int:
    """How many of the 12 body keypoints score at least ``min_score`` (:func:`bolid.body.visible_body_count`)."""
    import torch

    from bolid.body import visible_body_count

    return int(visible_body_count(torch.tensor(keypoints, dtype=torch.float32), min_score))


@dataclass(frozen=True)
class Verdict:
    """The pose stage's decision on one image."""

    reason: str | None  # None: accepted
    person: dict | None  # the main person (``Person.to_dict()`` form) when there is one
    num_persons: int
    detail: str = ""


def judge_persons(persons: list[dict], rules: PoseConfig) -> Verdict:
    """Apply the person rules (module docstring) to the persons of one image (``Person.to_dict()`` dicts)."""
    if not persons:
        return Verdict("no_person", None, 0, "no person box")
    persons = sorted(persons, key=lambda p: -box_area(p["box"]))  # stable: ties keep the detector's order
    largest = box_area(persons[0]["box"])
    prominent = sum(box_area(p["box"]) >= rules.prominent_area * largest for p in persons)
    main = persons[0]
    if prominent > rules.max_persons:
        return Verdict("multiple_persons", main, len(persons), f"{prominent} prominent persons")
    visible = visible_body_keypoints(main["keypoints"], rules.keypoint_score)
    if visible < rules.min_body_keypoints:
        return Verdict("too_few_keypoints", main, len(persons), f"{visible} of 12 body keypoints visible")
    return Verdict(None, main, len(persons))


class PoseModel:
    """Persons with boxes and 17 keypoints for a batch of stored images; the extractor loads on first use."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self._extractor = None
        pose, comp = config.pose, config.components
        spec: dict = {"stage": "pose", "backend": pose.backend, "threshold": pose.threshold, "input": config.shards.tag}
        if pose.backend == "vitpose":
            spec.update(
                components=comp.kind,
                person_detector=comp.source("person_detector"),
                vitpose=comp.source("vitpose"),
                dtype=str(config.resolved_dtype()),
            )
        self.fingerprint = _fingerprint(spec)
        self.input_size: tuple[int, int] | None = None  # the whole stored image

    @property
    def extractor(self):
        if self._extractor is None:
            from bolid.pose import build_extractor

            pose = self.config.pose
            if pose.backend == "vitpose":
                self._extractor = build_extractor(
                    "vitpose",
                    self.config.components.kind,
                    detector=self.config.components.source("person_detector"),
                    vitpose=self.config.components.source("vitpose"),
                    device=self.config.resolved_device(),
                    dtype=self.config.resolved_dtype(),
                    threshold=pose.threshold,
                    batch_size=pose.batch_size,
                )
            else:
                self._extractor = build_extractor("blazepose", min_detection_confidence=pose.threshold)
        return self._extractor

    def load(self) -> None:
        _ = self.extractor

    def close(self) -> None:
        """Release the models (and their GPU memory) before the next stage loads its own."""
        if self._extractor is not None and hasattr(self._extractor, "close"):
            self._extractor.close()
        self._extractor = None
        _empty_cuda_cache()

    def __call__(self, images: list[Image.Image]) -> list[dict]:
        return [{"persons": [p.to_dict() for p in persons]} for persons in self.extractor(images)]


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Captioner:
    """BLIP-2 captions for a batch of images; the model loads on first use.

    The stored caption is the generated continuation of ``caption.prompt``, whitespace-normalised.
    """

    def __init__(self, config: BuildConfig):
        self.config = config
        self.model = self.processor = None
        cap, comp = config.caption, config.components
        self.fingerprint = _fingerprint(
            {
                "stage": "caption",
                "components": comp.kind,
                "blip2": comp.source("blip2"),
                "prompt": cap.prompt,
                "max_length": cap.max_length,
                "num_beams": cap.num_beams,
                "input": config.shards.tag,
                "dtype": str(config.resolved_dtype()),
            }
        )
        self.input_size: tuple[int, int] | None = None

    def load(self) -> None:
        if self.model is not None:
            return
        dtype = self.config.resolved_dtype()
        if self.config.components.mini:  # zero-shot over the mini world's captions with the mini CLIP
            from bolid.kits.mini import clip
            from bolid.mini.caption import ZeroShotCaptioner

            self.device, self.dtype = self.config.resolved_device(), dtype
            self.model, self.input_size = ZeroShotCaptioner(*clip(), device=self.device), None
            return
        from bolid.components import load

        model, processor = load("blip2", self.config.components, torch_dtype=dtype)
        self.device = self.config.resolved_device()
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.processor = processor
        size = processor.image_processor.size
        # Let the JPEG decoder scale down towards BLIP-2's input (224 px for the real model) for free.
        self.input_size = (int(size["width"]), int(size["height"]))

    def close(self) -> None:
        self.model = self.processor = None
        _empty_cuda_cache()

    def __call__(self, images: list[Image.Image]) -> list[dict]:
        import torch

        self.load()
        if self.config.components.mini:
            return [{"caption": c} for c in self.model(images)]
        prompt = self.config.caption.prompt
        kwargs = {"text": [prompt] * len(images)} if prompt else {}
        inputs = self.processor(images=images, return_tensors="pt", **kwargs).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.config.caption.max_length,
                num_beams=self.config.caption.num_beams,
                do_sample=False,
            )
        ids = inputs.get("input_ids")
        if ids is not None and out.shape[1] >= ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids):
            out = out[:, ids.shape[1] :]  # generate() returns the prompt too; keep the continuation
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [{"caption": " ".join(t.split())} for t in texts]


def annotate(
    items: list,
    model: PoseModel | Captioner,
    batch_size: int,
    journal: Journal,
    task: Callable[[object, tuple[int, int] | None], StoredTask],
    pool: WorkerPool,
    progress: Callable,
    desc: str,
) -> dict[str, dict]:
    """Model outputs for every item (``sha256 -> record``), running the model only on items not cached.

    Args:
        items: objects with a ``sha256``, in the order that fixes the batches.
        model: called on a list of RGB images, returns one record (dict) per image.
        batch_size: images per model call.
        journal: the model's cache.
        task: builds the worker task that loads an item's stored pixels, given the model's input size.
        pool: decodes the next batches while the model runs.
        progress: a ``tqdm``-like factory.
        desc: progress bar label.
    """
    known = journal.load()
    todo = [it for it in items if it.sha256 not in known]
    done = len(items) - len(todo)
    if done:
        log.info("%s: %d of %d images already in the cache", desc, done, len(items))
    if not todo:
        return {it.sha256: known[it.sha256] for it in items}
    model.load()
    pixels = pool.map_ordered(stored_pixels, [task(it, model.input_size) for it in todo])
    with progress(total=len(items), initial=done, desc=desc) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = [Image.fromarray(next(pixels)) for _ in batch]
            outputs = model(images)
            records = [{"sha256": it.sha256, **out} for it, out in zip(batch, outputs, strict=True)]
            journal.append_group(records, fsync=True)
            known.update((r["sha256"], r) for r in records)
            bar.update(len(batch))
    return {it.sha256: known[it.sha256] for it in items}
