"""Body features: pose-invariant proportions are invariant to similarity transforms and flips, and
change when limbs are stretched; missing points are masked, never averaged in as zero."""

from __future__ import annotations

import math

import pytest
import torch

from bolid.body import FEATURE_DIM, NUM_PROPORTIONS, body_features, face_box, visible_body_count

# A standing person, COCO-17, (x, y, score) in pixels. Left side is on the image's right.
BASE = torch.tensor(
    [
        [100, 40, 0.9], [106, 35, 0.9], [94, 35, 0.9], [112, 38, 0.9], [88, 38, 0.9],  # face
        [125, 80, 0.9], [75, 80, 0.9],  # shoulders
        [132, 120, 0.9], [68, 122, 0.9],  # elbows
        [136, 158, 0.9], [64, 160, 0.9],  # wrists
        [115, 170, 0.9], [85, 170, 0.9],  # hips
        [118, 225, 0.9], [83, 226, 0.9],  # knees
        [120, 280, 0.9], [80, 282, 0.9],  # ankles
    ],
    dtype=torch.float64,
)  # fmt: skip


def transform(kp: torch.Tensor, scale=1.0, angle=0.0, shift=(0.0, 0.0), flip_width: float | None = None):
    out = kp.clone()
    xy = out[:, :2]
    if flip_width is not None:
        xy[:, 0] = flip_width - xy[:, 0]
        # A horizontal flip also swaps what the model calls left and right.
        perm = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
        out = out[perm]
        xy = out[:, :2]
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=kp.dtype)
    out[:, :2] = (xy @ rot.T) * scale + torch.tensor(shift, dtype=kp.dtype)
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale": 3.7},
        {"scale": 0.25},
        {"shift": (512.0, -80.0)},
        {"angle": 0.6},
        {"angle": -2.0, "scale": 1.8, "shift": (10.0, 20.0)},
        {"flip_width": 640.0},
        {"flip_width": 200.0, "angle": 0.3, "scale": 0.5},
    ],
)
def test_proportions_invariant(kwargs):
    ref = body_features(BASE)
    moved = body_features(transform(BASE, **kwargs))
    assert ref.proportions_mask.all()
    torch.testing.assert_close(moved.proportions, ref.proportions, rtol=1e-9, atol=1e-9)


def test_flip_invariance_needs_averaging_when_asymmetric():
    # Make the left forearm longer than the right: the averaged feature is still flip-invariant.
    kp = BASE.clone()
    kp[9, :2] += torch.tensor([4.0, 25.0], dtype=kp.dtype)
    torch.testing.assert_close(
        body_features(transform(kp, flip_width=300.0)).proportions, body_features(kp).proportions
    )


@pytest.mark.parametrize(("joint", "feature"), [(15, 3), (16, 3), (9, 1), (13, 2)])
def test_stretching_a_limb_changes_its_proportion(joint, feature):
    ref = body_features(BASE).proportions
    kp = BASE.clone()
    kp[joint, 1] += 30.0  # move the joint further down the limb
    changed = body_features(kp).proportions
    assert changed[feature] > ref[feature] + 0.02
    others = [i for i in range(NUM_PROPORTIONS) if i != feature and not (joint in (13,) and i == 3)]
    torch.testing.assert_close(changed[others], ref[others])


def test_missing_points_are_masked_not_zero_filled():
    kp = BASE.clone()
    kp[[9, 10], 2] = 0.05  # both wrists invisible -> forearm unknown
    feats = body_features(kp)
    assert feats.proportions_mask[1] == 0 and feats.proportions[1] == 0
    assert feats.proportions_mask[[0, 2, 3, 4, 5]].all()
    # One side missing: the other side alone is used, not averaged with zero.
    kp = BASE.clone()
    kp[15, 2] = 0.0  # left ankle missing
    one = body_features(kp).proportions[3]
    right_shin = torch.linalg.vector_norm(BASE[14, :2] - BASE[16, :2]) / body_features(BASE).torso_length
    torch.testing.assert_close(one, right_shin)


def test_no_torso_masks_everything():
    kp = BASE.clone()
    kp[[5, 6], 2] = 0.0  # no shoulders -> no torso length
    feats = body_features(kp)
    assert not feats.proportions_mask.any()
    assert torch.all(feats.coords == 0) and feats.torso_length == 0


def test_coords_centred_on_mid_hip_and_scaled_by_torso():
    feats = body_features(BASE)
    mid_hip = (feats.coords[6] + feats.coords[7]) / 2
    torch.testing.assert_close(mid_hip, torch.zeros(2, dtype=mid_hip.dtype))
    side = torch.linalg.vector_norm(feats.coords[0] - feats.coords[6])  # left shoulder to left hip
    assert 0.9 < float(side) < 1.1


def test_batched_and_differentiable():
    kp = torch.stack([BASE, transform(BASE, scale=2.0)]).requires_grad_(True)
    feats = body_features(kp)
    assert feats.proportions.shape == (2, NUM_PROPORTIONS)
    assert feats.flat(include_pose=True).shape == (2, FEATURE_DIM)
    feats.proportions.sum().backward()
    assert kp.grad is not None and torch.isfinite(kp.grad).all() and kp.grad[:, 5:, :2].abs().sum() > 0
    torch.testing.assert_close(visible_body_count(kp.detach()), torch.tensor([12, 12]))


def test_flat_excludes_pose_by_default():
    a = body_features(BASE).flat()
    b = body_features(transform(BASE, angle=0.4)).flat()
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(body_features(BASE).flat(True), body_features(transform(BASE, angle=0.4)).flat(True))


def test_bad_shape_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        body_features(torch.zeros(17, 2))


def test_face_box_from_face_keypoints():
    box = face_box(BASE)
    assert box is not None
    x0, y0, x1, y1 = box
    assert x0 < 88 and x1 > 112 and y0 < 35 and y1 > 40
    hidden = BASE.clone()
    hidden[:5, 2] = 0.0
    assert face_box(hidden) is None
