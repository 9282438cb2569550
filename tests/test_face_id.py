"""InsightFace ONNX runtime (tiny packs built with `onnx`, run with onnxruntime) and the Face Sim metric, by value."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

pytest.importorskip("onnxruntime", reason="the faceid extra (bolid[faceid]) is part of dev")

from bolid.components import MissingWeightsError  # noqa: E402
from bolid.face_id import ARCFACE_TEMPLATE, FaceAnalyzer, align_face, face_pack_dir, similarity_transform  # noqa: E402
from bolid.face_sim import FaceSimilarity  # noqa: E402


@pytest.fixture(scope="module")
def faces() -> FaceAnalyzer:
    return FaceAnalyzer.from_pack("buffalo_l", kit="tiny")


@pytest.fixture(scope="module")
def photo(fixtures) -> Image.Image:
    return Image.open(fixtures / "coco_000000000785.jpg").convert("RGB")


FLAT = Image.new("RGB", (160, 200), (128, 128, 128))


def test_similarity_transform_recovers_a_known_one():
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_TEMPLATE
    dst = src @ (scale * rot).T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


def test_alignment_puts_the_keypoints_on_the_arcface_template():
    """Dots drawn at 5 keypoints of a rotated, scaled 'face' land on the template in the 112 px crop."""
    angle, scale = -0.25, 2.3
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    kps = ARCFACE_TEMPLATE @ (scale * rot).T + np.array([150.0, 90.0])
    m = similarity_transform(kps, ARCFACE_TEMPLATE)
    for i, (x, y) in enumerate(kps):
        image = Image.new("L", (400, 400), 0)
        ImageDraw.Draw(image).ellipse([x - 6, y - 6, x + 6, y + 6], fill=255)  # one dot at a time
        src = _centroid(np.asarray(image, np.float64))  # where the dot really is, pixel centres at integers
        out = _centroid(np.asarray(align_face(image, kps), np.float64)[..., 0])
        np.testing.assert_allclose(out, m[:, :2] @ src + m[:, 2], atol=0.1, err_msg=f"keypoint {i}")
        np.testing.assert_allclose(out, ARCFACE_TEMPLATE[i], atol=1.0)


def _centroid(a: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[: a.shape[0], : a.shape[1]]
    return np.array([(a * xs).sum() / a.sum(), (a * ys).sum() / a.sum()])


def test_detection_scales_back_to_image_pixels(faces, photo):
    """An image twice the size gives the detector the same input, so boxes and keypoints double exactly."""
    big = photo.resize((1280, 850), Image.Resampling.BILINEAR)
    small = big.resize((640, 425), Image.Resampling.BILINEAR)
    a, b = faces.detect(big), faces.detect(small)
    assert a and len(a) == len(b)
    for (box_a, score_a, kps_a), (box_b, score_b, kps_b) in zip(a, b, strict=True):
        np.testing.assert_allclose(box_a, 2 * box_b, rtol=1e-5)
        np.testing.assert_allclose(kps_a, 2 * kps_b, rtol=1e-5)
        assert score_a == pytest.approx(score_b)


def test_no_face_in_a_flat_image(faces):
    assert faces.detect(FLAT) == [] and faces.largest(FLAT) is None


def test_embeddings_follow_insightface_conventions(faces, photo):
    face = faces.largest(photo)
    assert face is not None and face.embedding.shape == (512,)
    assert np.linalg.norm(face.normed_embedding) == pytest.approx(1.0, abs=1e-6)
    assert face.area == max(f.area for f in faces(photo))
    assert (faces.rec_mean, faces.rec_std) == (127.5, 127.5)
    inside = FaceAnalyzer.from_pack("antelopev2", kit="tiny")  # its tiny recogniser normalises in the graph
    assert (inside.rec_mean, inside.rec_std) == (0.0, 1.0)


def test_missing_pack_names_the_files_and_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv("BOLID_ANTELOPEV2", raising=False)
    with pytest.raises(MissingWeightsError, match=r"(?s)scrfd_10g_bnkps\.onnx.*glintr100\.onnx.*BOLID_ANTELOPEV2"):
        face_pack_dir("antelopev2", tmp_path)
    with pytest.raises(ValueError, match="unknown InsightFace pack"):
        face_pack_dir("buffalo_xl")


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"bolid\[faceid\]"):
        FaceAnalyzer.from_pack("buffalo_l", kit="tiny")


# ------------------------------------------------------------------------------------------------ Face Sim


def test_face_sim_is_one_for_the_same_face_and_counts_failures(faces, photo):
    other = ImageOps.mirror(photo)
    metric = FaceSimilarity(faces)
    metric.update([photo, other, FLAT, photo], [photo, photo, photo, FLAT])
    values = metric.per_sample()
    assert values[0] == pytest.approx(1.0, abs=1e-6)
    assert -1.0 <= float(values[1]) < 0.999  # another face
    assert torch.isnan(values[2:]).all()
    assert metric.failures() == {"no_face": 1, "no_reference_face": 1}
    out = metric.compute()
    assert float(out["face_sim"]) == pytest.approx(float(values[:2].mean()), abs=1e-6)
    assert float(out["failure_rate"]) == pytest.approx(0.5)

    zero = FaceSimilarity(faces, failure_score=0.0)  # failures counted at 0 in the mean
    zero.update(zero.embeddings([photo, other, FLAT, photo]), zero.embeddings([photo, photo, photo, FLAT]))
    torch.testing.assert_close(zero.per_sample()[:2], values[:2])
    assert float(zero.compute()["face_sim"]) == pytest.approx(float(values[:2].sum()) / 4, abs=1e-6)


def test_face_sim_builds_its_model_lazily_and_pickles():
    import functools
    import pickle

    metric = FaceSimilarity(functools.partial(FaceAnalyzer.from_pack, "buffalo_l", kit="tiny"))
    metric.update([FLAT], [FLAT])  # builds the onnxruntime sessions, which cannot be pickled
    copy = pickle.loads(pickle.dumps(metric))
    copy.reset()
    copy.update([FLAT], [FLAT])
    assert copy.failures() == {"no_face": 1, "no_reference_face": 0}
