"""InsightFace face analysis from the model zoo's ONNX files, run with onnxruntime: detection, alignment, ArcFace.

Face Sim (:mod:`bolid.face_sim`) and the face-embedding peers (IP-Adapter FaceID, InstantID in
:mod:`bolid.peers`) need the face embeddings those peers were trained on. They come from InsightFace's model
packs, two ONNX files each (the other files of a pack, age/gender and dense landmarks, are not used):

=============  ==========================  ====================  ===============================
pack           detector (SCRFD, 5 points)  recogniser (ArcFace)  used by
=============  ==========================  ====================  ===============================
``antelopev2`` ``scrfd_10g_bnkps.onnx``    ``glintr100.onnx``    InstantID, PuLID
``buffalo_l``  ``det_10g.onnx``            ``w600k_r50.onnx``    IP-Adapter FaceID, Face Sim
=============  ==========================  ====================  ===============================

The ``insightface`` package itself is not needed (it compiles C++ on install): this module runs the same
ONNX files with onnxruntime and follows InsightFace's documented conventions, so its embeddings are the
ones the peers expect:

* **Detection** (SCRFD): the RGB image is scaled to fit ``det_size`` (640 x 640) keeping its aspect ratio and
  padded at the bottom and right, normalised as ``(x - 127.5) / 128``; the model gives, for strides 8, 16
  and 32 and 2 anchors per location, a score, 4 box distances and 5 keypoint offsets (in stride units from
  the anchor centre). Boxes scoring at least ``det_threshold`` are kept, then non-maximum suppression at
  IoU ``nms_threshold``.
* **Alignment**: the similarity transform (least squares, Umeyama) that maps the 5 keypoints onto ArcFace's
  112 x 112 template, applied with bilinear sampling.
* **Recognition** (ArcFace): the aligned RGB crop normalised as ``(x - 127.5) / 127.5``, unless the graph
  starts with its own ``Sub``/``Mul`` normalisation (InsightFace's test for that); out comes a 512-d
  embedding. :attr:`Face.normed_embedding` is it divided by its L2 norm.

A pack loads by local path: ``source`` argument (a YAML key), else ``$BOLID_ANTELOPEV2`` /
``$BOLID_BUFFALO_L``, else InsightFace's own location ``~/.insightface/models/<pack>``. Missing files raise
:class:`bolid.components.MissingWeightsError` saying where to get them; a missing onnxruntime raises
:class:`ImportError` naming the ``faceid`` extra. The tiny kit (:func:`bolid.kits.tiny_peers.tiny_face_pack`)
writes small random ONNX files of the same interface under the same names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bolid.components import MissingWeightsError

__all__ = [
    "ARCFACE_TEMPLATE",
    "FACE_PACKS",
    "Face",
    "FaceAnalyzer",
    "face_pack_dir",
    "similarity_transform",
]

#: Where ArcFace models expect the 5 keypoints (eyes, nose tip, mouth corners) in a 112 x 112 crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
STRIDES = (8, 16, 32)
ANCHORS_PER_LOCATION = 2


@dataclass(frozen=True)
class FacePack:
    """An InsightFace model pack: the file names of its detector and recogniser."""

    name: str
    detector: str
    recognizer: str

    @property
    def env_var(self) -> str:
        return f"BOLID_{self.name.upper()}"


FACE_PACKS = {
    p.name: p
    for p in (
        FacePack("antelopev2", "scrfd_10g_bnkps.onnx", "glintr100.onnx"),
        FacePack("buffalo_l", "det_10g.onnx", "w600k_r50.onnx"),
    )
}

_HOW = (
    "InsightFace model packs are not on the Hugging Face hub under an official id: download '{name}.zip' from "
    "the releases of github.com/deepinsight/insightface (model zoo, python-package README) on a machine with "
    "internet and unzip it to ~/.insightface/models/{name}/, or point BoLID at the folder with `{env}=/path` "
    "or the config key that names this pack. The folder must hold {files}. Note InsightFace's licence: its "
    "pretrained models are for non-commercial research only"
)


def face_pack_dir(name: str, source: str | Path | None = None) -> Path:
    """The folder holding pack ``name``'s detector and recogniser, checked.

    Raises:
        ValueError: ``name`` is not a known pack.
        MissingWeightsError: the folder or one of the two files is missing.
    """
    if name not in FACE_PACKS:
        raise ValueError(f"unknown InsightFace pack {name!r}; known: {', '.join(FACE_PACKS)}")
    pack = FACE_PACKS[name]
    where = source or os.environ.get(pack.env_var) or Path("~/.insightface/models") / name
    folder = Path(where).expanduser()
    missing = [f for f in (pack.detector, pack.recognizer) if not (folder / f).is_file()]
    if missing:
        how = _HOW.format(name=name, env=pack.env_var, files=f"{pack.detector} and {pack.recognizer}")
        raise MissingWeightsError(f"insightface {name}", f"path {folder}", f"{', '.join(missing)} not found.\n  {how}")
    return folder


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(
            "InsightFace face models run with onnxruntime, which is not installed: pip install 'bolid[faceid]'"
        ) from e
    return onnxruntime


@dataclass
class Face:
    """One detected face: box ``(x1, y1, x2, y2)`` and 5 keypoints in image pixels, score, ArcFace embedding."""

    box: np.ndarray
    score: float
    kps: np.ndarray
    embedding: np.ndarray

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))

    @property
    def normed_embedding(self) -> np.ndarray:
        return self.embedding / max(float(np.linalg.norm(self.embedding)), 1e-12)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity (rotation, uniform scale, shift) mapping ``src`` points onto ``dst`` in least squares.

    Umeyama (1991), "Least-squares estimation of transformation parameters between two point patterns".
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)  # (2, 2)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = float(np.trace(np.diag(sigma) @ sign) / max(s.var(0).sum(), 1e-12))
    shift = mu_d - scale * rot @ mu_s
    return np.concatenate([scale * rot, shift[:, None]], axis=1)


def align_face(image: Image.Image, kps: np.ndarray, size: int = 112) -> Image.Image:
    """The ``size`` x ``size`` ArcFace crop of the face with keypoints ``kps`` (5 x 2, image pixels)."""
    m = similarity_transform(kps, ARCFACE_TEMPLATE * size / 112.0)  # pixel centres at integers, as OpenCV's
    # PIL puts pixel centres at +0.5: the same map in its coordinates shifts by 0.5 - A @ (0.5, 0.5).
    m[:, 2] += 0.5 - m[:, :2] @ np.array([0.5, 0.5])
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]  # PIL maps output pixels back to input pixels
    return image.convert("RGB").transform(
        (size, size), Image.Transform.AFFINE, data=tuple(inv.ravel()), resample=Image.Resampling.BILINEAR
    )


def _normalises_inside(path: Path) -> bool:
    """InsightFace's test: a recogniser whose first graph nodes include Sub and Mul normalises its own input."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node[:8]
    names = [(n.name, n.op_type) for n in nodes]
    has = lambda prefix, op: any(n.startswith(prefix) or t == op for n, t in names)  # noqa: E731
    return has("Sub", "Sub") and has("Mul", "Mul")


class FaceAnalyzer:
    """Detect faces and compute their ArcFace embeddings with an InsightFace pack's two ONNX models.

    Args:
        detector: the SCRFD ``.onnx`` file (outputs: scores, boxes and keypoints for 3 strides).
        recognizer: the ArcFace ``.onnx`` file (input ``(N, 3, 112, 112)``, output ``(N, 512)``).
        det_size: detector input size (width, height), multiples of 32.
        det_threshold: lowest detection score kept.
        nms_threshold: IoU above which the lower-scoring of two boxes is dropped.
        providers: onnxruntime execution providers (default: CUDA when available, else CPU).
        name: recorded in settings (the pack's name).
    """

    def __init__(
        self,
        detector: str | Path,
        recognizer: str | Path,
        det_size: tuple[int, int] = (640, 640),
        det_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        providers: Sequence[str] | None = None,
        name: str = "",
    ):
        ort = _onnxruntime()
        if det_size[0] % 32 or det_size[1] % 32:
            raise ValueError(f"det_size must be multiples of 32, got {det_size}")
        available = ort.get_available_providers()
        providers = list(providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.det = ort.InferenceSession(str(detector), opts, providers=providers)
        self.rec = ort.InferenceSession(str(recognizer), opts, providers=providers)
        outs = self.det.get_outputs()
        if len(outs) != 3 * len(STRIDES):
            raise ValueError(f"{detector}: expected an SCRFD detector with keypoints (9 outputs), got {len(outs)}")
        shape = self.rec.get_inputs()[0].shape
        if list(shape[2:]) != [112, 112]:
            raise ValueError(f"{recognizer}: expected an ArcFace recogniser with 112x112 input, got {shape}")
        inside = _normalises_inside(Path(recognizer))
        self.rec_mean, self.rec_std = (0.0, 1.0) if inside else (127.5, 127.5)
        self.det_size, self.det_threshold, self.nms_threshold = tuple(det_size), det_threshold, nms_threshold
        self.name = name
        self.files = {"detector": str(detector), "recognizer": str(recognizer)}

    @classmethod
    def from_pack(cls, name: str, source: str | Path | None = None, kit: str = "real", **kwargs) -> FaceAnalyzer:
        """Load pack ``name`` (``antelopev2`` or ``buffalo_l``) from its folder, or the tiny kit's twin."""
        if kit == "tiny":
            from bolid.kits.tiny_peers import tiny_face_pack

            folder = tiny_face_pack(name)
        else:
            folder = face_pack_dir(name, source)
        pack = FACE_PACKS[name]
        return cls(folder / pack.detector, folder / pack.recognizer, name=name, **kwargs)

    @property
    def settings(self) -> dict:
        return {
            "pack": self.name,
            **self.files,
            "det_size": list(self.det_size),
            "det_threshold": self.det_threshold,
            "nms_threshold": self.nms_threshold,
        }

    # ------------------------------------------------------------------------------------------ detection

    def _detect_blob(self, image: Image.Image) -> tuple[np.ndarray, float]:
        w, h = image.size
        dw, dh = self.det_size
        scale = min(dw / w, dh / h)
        nw, nh = max(round(w * scale), 1), max(round(h * scale), 1)
        canvas = np.zeros((dh, dw, 3), dtype=np.float32)
        canvas[:nh, :nw] = np.asarray(image.convert("RGB").resize((nw, nh), Image.Resampling.BILINEAR), np.float32)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]  # (1, 3, H, W)
        return np.ascontiguousarray(blob), nh / h

    def detect(self, image: Image.Image) -> list[tuple[np.ndarray, float, np.ndarray]]:
        """``(box, score, kps)`` of every face in ``image``, highest score first."""
        blob, scale = self._detect_blob(image)
        outs = self.det.run(None, {self.det.get_inputs()[0].name: blob})
        outs = [o[0] if o.ndim == 3 else o for o in outs]  # batched exports carry a leading 1
        n = len(STRIDES)
        boxes, scores, kpss = [], [], []
        for i, stride in enumerate(STRIDES):
            score, dist, kdist = outs[i].reshape(-1), outs[i + n].reshape(-1, 4), outs[i + 2 * n].reshape(-1, 10)
            gh, gw = blob.shape[2] // stride, blob.shape[3] // stride
            ys, xs = np.mgrid[:gh, :gw]
            centres = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) * stride  # (gh*gw, 2) as (x, y)
            centres = np.repeat(centres, ANCHORS_PER_LOCATION, axis=0)  # location-major, anchor-minor
            keep = score >= self.det_threshold
            c = centres[keep]
            d, k = dist[keep] * stride, kdist[keep].reshape(-1, 5, 2) * stride
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            kpss.append(c[:, None, :] + k)
            scores.append(score[keep])
        boxes_a = np.concatenate(boxes) / scale
        kps_a = np.concatenate(kpss) / scale
        scores_a = np.concatenate(scores)
        if not len(scores_a):
            return []
        from torchvision.ops import nms

        keep = nms(torch.from_numpy(boxes_a).float(), torch.from_numpy(scores_a).float(), self.nms_threshold).numpy()
        return [(boxes_a[i], float(scores_a[i]), kps_a[i]) for i in keep]

    # ---------------------------------------------------------------------------------------- recognition

    def embed(self, image: Image.Image, kps: np.ndarray) -> np.ndarray:
        """The raw 512-d ArcFace embedding of the face with keypoints ``kps`` in ``image``."""
        crop = np.asarray(align_face(image, kps), np.float32)
        blob = ((crop - self.rec_mean) / self.rec_std).transpose(2, 0, 1)[None]
        return self.rec.run(None, {self.rec.get_inputs()[0].name: np.ascontiguousarray(blob)})[0][0]

    def __call__(self, image: Image.Image) -> list[Face]:
        """Every face in ``image`` with its embedding, highest detection score first."""
        image = image.convert("RGB")
        return [Face(box, score, kps, self.embed(image, kps)) for box, score, kps in self.detect(image)]

    def largest(self, image: Image.Image) -> Face | None:
        """The largest face (by box area, as InstantID picks it), or ``None`` when there is no face."""
        found = self.detect(image.convert("RGB"))
        if not found:
            return None
        box, score, kps = max(found, key=lambda f: max(f[0][2] - f[0][0], 0) * max(f[0][3] - f[0][1], 0))
        return Face(box, score, kps, self.embed(image.convert("RGB"), kps))
