"""Body-ID and face encoders: keypoint weighting, pose-free body identity, face boxes, crops, the frozen CLIP tower."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bolid.body import face_box
from bolid.body_encoder import (
    BodyIDEncoder,
    gaussian_keypoint_weights,
    keypoints_to_box,
    person_boxes,
    weight_pixels,
)
from bolid.face_encoder import FaceEncoder, face_boxes
from bolid.image_encoder import ClipImageEncoder, crop_boxes


@pytest.fixture(scope="module")
def coco_keypoints(fixtures) -> torch.Tensor:
    """The annotated person of the COCO fixture as (17, 3) keypoints with score 1 where labelled visible."""
    ann = json.loads((fixtures / "coco_000000000785.json").read_text())["annotations"][0]
    kp = torch.tensor(ann["keypoints"], dtype=torch.float32).reshape(17, 3)
    kp[:, 2] = (kp[:, 2] == 2).float()
    return kp


def _rotate(points: torch.Tensor, centre: torch.Tensor, degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return (points - centre) @ rot.T + centre


def test_gaussian_weights_follow_the_formula():
    kp = torch.tensor([[[10.5, 5.5, 1.0], [2.5, 14.5, 1.0], [20.5, 1.5, 0.0]]])  # third keypoint not visible
    sigma = 3.0
    w = gaussian_keypoint_weights(kp, (16, 24), sigma)
    assert w.shape == (1, 16, 24)
    ys, xs = torch.meshgrid(torch.arange(16) + 0.5, torch.arange(24) + 0.5, indexing="ij")
    raw = torch.stack(
        [torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)) for x, y, _ in kp[0, :2].tolist()]
    ).amax(0)
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    torch.testing.assert_close(w[0], expected)
    assert w[0, 5, 10] == 1.0 and w[0, 14, 2] == 1.0 and float(w.min()) == 0.0
    assert float(w[0, 1, 20]) < 0.01  # the invisible keypoint adds nothing


def test_gaussian_weights_without_visible_keypoints_are_uniform():
    kp = torch.tensor([[[4.0, 4.0, 0.1]]])
    assert torch.equal(gaussian_keypoint_weights(kp, (8, 8), 2.0), torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="sigma"):
        gaussian_keypoint_weights(kp, (8, 8), 0.0)


def test_weight_pixels_keeps_keypoints_and_dims_background():
    pixels = torch.rand(1, 3, 4, 4)
    weights = torch.zeros(1, 4, 4)
    weights[0, 1, 2] = 1.0
    out = weight_pixels(pixels, weights, alpha=0.25)
    torch.testing.assert_close(out[0, :, 1, 2], pixels[0, :, 1, 2])
    torch.testing.assert_close(out[0, :, 0, 0], 0.25 * pixels[0, :, 0, 0])
    with pytest.raises(ValueError, match="alpha"):
        weight_pixels(pixels, weights, alpha=1.5)


def test_body_identity_is_separable_from_pose(coco_keypoints):
    """The default body vector ignores where the person stands in the image and how large; the raw-pose option
    sees a bent arm. (How far the shape estimate itself resists pose and viewpoint is pinned in
    tests/test_body_shape.py.)"""
    torch.manual_seed(0)
    pose_free = BodyIDEncoder(out_dim=16, hidden_dim=32)
    with_pose = BodyIDEncoder(out_dim=16, hidden_dim=32, include_pose=True)
    with_pose.load_state_dict(pose_free.state_dict())
    bent = coco_keypoints.clone()
    elbow = bent[7, :2]
    bent[9, :2] = _rotate(bent[9:10, :2], elbow, 70.0)[0]  # left wrist swings around the left elbow
    moved = coco_keypoints.clone()  # the whole person rotated, scaled and shifted in the image
    moved[:, :2] = _rotate(moved[:, :2], torch.tensor([300.0, 200.0]), 25.0) * 1.7 + torch.tensor([40.0, -15.0])
    batch = torch.stack([coco_keypoints, bent, moved])
    out = pose_free(batch)
    torch.testing.assert_close(out[2], out[0], atol=1e-4, rtol=1e-4)
    posed = with_pose(batch)
    assert (posed[1] - posed[0]).abs().max() > 1e-3  # the raw-pose option does see the new pose
    # A different build (longer shins) is a different body.
    tall = coco_keypoints.clone()
    tall[15:17, 1] += 60.0
    assert (pose_free(tall[None])[0] - out[0]).abs().max() > 1e-3


def test_body_encoder_init_does_not_depend_on_the_shape_model_cache(coco_keypoints):
    # Same seed, same weights and body vector whether the frozen shape model is loaded first or already cached
    # (the app and `bolid generate` in one process build the encoder in both states).
    from bolid.body_shape import load

    encoders = []
    for clear in (True, False):
        if clear:
            load.cache_clear()
        torch.manual_seed(3)
        encoders.append(BodyIDEncoder(out_dim=8, hidden_dim=16, appearance_dim=4))
    first, cached = encoders
    for (name, a), (_, b) in zip(first.state_dict().items(), cached.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    appearance = torch.randn(1, 4)
    assert torch.equal(first(coco_keypoints[None], appearance), cached(coco_keypoints[None], appearance))


def test_body_encoder_with_appearance_needs_it():
    enc = BodyIDEncoder(out_dim=8, hidden_dim=16, appearance_dim=4)
    kp = torch.rand(2, 17, 3) * 50
    assert enc(kp, torch.randn(2, 4)).shape == (2, 8)
    with pytest.raises(ValueError, match="appearance must be"):
        enc(kp)
    with pytest.raises(ValueError, match="keypoints must be"):
        enc(torch.rand(2, 5, 3), torch.randn(2, 4))


def test_face_boxes_match_the_single_person_rule(coco_keypoints):
    no_face = coco_keypoints.clone()
    no_face[:5, 2] = 0.0  # face turned away: no face keypoint is visible
    boxes, visible = face_boxes(torch.stack([coco_keypoints, no_face]))
    assert visible.tolist() == [True, False]
    torch.testing.assert_close(boxes[0], torch.tensor(face_box(coco_keypoints)))
    x0, y0, x1, y1 = boxes[0].tolist()
    assert x1 - x0 == pytest.approx(y1 - y0)  # square
    nose = coco_keypoints[0]
    assert x0 < nose[0] < x1 and y0 < nose[1] < y1


def test_person_boxes_are_square_and_hold_the_person(coco_keypoints):
    kp = coco_keypoints[None]
    box = person_boxes(kp, (425, 640))[0]
    assert float(box[2] - box[0]) == pytest.approx(float(box[3] - box[1]))
    vis = kp[0, :, 2] > 0
    assert (kp[0, vis, 0] > box[0]).all() and (kp[0, vis, 0] < box[2]).all()
    assert (kp[0, vis, 1] > box[1]).all() and (kp[0, vis, 1] < box[3]).all()
    det = torch.tensor([[100.0, 50.0, 200.0, 250.0]])  # 100 x 200 detector box
    sq = person_boxes(kp, (425, 640), boxes=det, margin=0.1)[0]
    torch.testing.assert_close(sq, torch.tensor([150.0 - 120, 150.0 - 120, 150.0 + 120, 150.0 + 120]))
    inside = keypoints_to_box(kp, sq[None], 48)
    torch.testing.assert_close(inside[0, 0, :2], (kp[0, 0, :2] - sq[:2]) * 48 / 240)


def test_crop_boxes_cuts_exact_pixels_and_pads_black():
    pixels = torch.rand(2, 3, 20, 30)
    boxes = torch.tensor([[4.0, 6.0, 12.0, 14.0], [-4.0, -4.0, 4.0, 4.0]])
    crops = crop_boxes(pixels, boxes, 8)  # 8-pixel boxes to 8 pixels: one sample per pixel centre
    torch.testing.assert_close(crops[0], pixels[0, :, 6:14, 4:12])
    torch.testing.assert_close(crops[1, :, 4:, 4:], pixels[1, :, :4, :4])
    assert crops[1, :, :3, :].abs().max() == 0 and crops[1, :, :, :3].abs().max() == 0


def test_clip_image_encoder_is_frozen_open_clip():
    from bolid.kits import tiny

    model, preprocess, _ = tiny.tiny_eva_clip()
    enc = ClipImageEncoder(model, tiny.TINY_EVA_CLIP)
    assert enc.embed_dim == 32 and enc.image_size == 32
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training
    pixels = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(preprocess.transforms[-1].mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.transforms[-1].std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels), model.encode_image((pixels - mean) / std))
        assert enc(torch.rand(1, 3, 50, 70)).shape == (1, 32)  # other sizes are resized


def test_face_encoder_starts_as_identity_and_trains():
    enc = FaceEncoder(embed_dim=32, hidden_dim=64)
    x = torch.randn(3, 32)
    torch.testing.assert_close(enc(x), x)
    enc(x).pow(2).sum().backward()
    assert enc.mlp[-1].weight.grad is not None and enc.mlp[-1].weight.grad.abs().max() > 0
    assert np.isfinite(enc.mlp[1].weight.grad.numpy()).all()
