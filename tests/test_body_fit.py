"""The fitted body-shape estimator (bolid.body_fit): invariances, yaw robustness, confidence, Body Sim v2 option."""

from __future__ import annotations

import math

import pytest
import torch
from body_helpers import rotate

from bolid.body_fit import FitSettings, fit_shape
from bolid.body_shape import (
    ShapeEstimate,
    difference_log_likelihood_ratio,
    flip_keypoints,
    shape_similarity,
)
from bolid.metrics import BodyShapeSimilarity
from bolid.synthetic_bodies import prior_stats, sample_lengths, synthetic_views

KINDS = ("standing", "walking")
FAST = FitSettings(steps=80)


@pytest.fixture(scope="module")
def few():
    kp = synthetic_views(6, torch.Generator().manual_seed(3), kinds=KINDS).keypoints
    return kp, fit_shape(kp, settings=FAST)


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param(lambda kp: torch.cat([kp[..., :2] * 3.7, kp[..., 2:]], -1), id="scale"),
        pytest.param(lambda kp: torch.cat([kp[..., :2] + torch.tensor([-250.0, 90.0]), kp[..., 2:]], -1), id="shift"),
        pytest.param(lambda kp: rotate(kp, 37.0), id="in-plane-rotation"),
        pytest.param(flip_keypoints, id="left-right-flip"),
    ],
)
def test_fit_is_invariant_to_image_transforms(few, transform):
    kp, a = few
    b = fit_shape(transform(kp), settings=FAST)
    assert torch.allclose(a.mean, b.mean, atol=2e-3) and torch.allclose(a.var, b.var, atol=2e-3)
    assert float(a.mean.abs().mean()) > 0.05  # not trivially the prior
    assert float(a.var.mean()) < 0.95


@pytest.fixture(scope="module")
def sweep():
    """One batch: n bodies at yaw 0, the same bodies at 30 and at 90 degrees, n other bodies at yaw 0."""
    n = 48
    gen = torch.Generator().manual_seed(11)
    lengths = sample_lengths(n, gen)
    views = [
        synthetic_views(n, gen, kinds=KINDS, lengths=lengths, yaw=torch.zeros(n)),
        synthetic_views(n, gen, kinds=KINDS, lengths=lengths, yaw=torch.full((n,), math.radians(30))),
        synthetic_views(n, gen, kinds=KINDS, lengths=lengths, yaw=torch.full((n,), math.radians(90))),
        synthetic_views(n, gen, kinds=KINDS, yaw=torch.zeros(n)),
    ]
    est = fit_shape(torch.cat([v.keypoints for v in views]))
    return [est[i * n : (i + 1) * n] for i in range(4)], views


def test_fit_scores_the_same_body_turned_above_different_bodies(sweep):
    (ref, turned, _, other), _ = sweep
    same = shape_similarity(ref, turned, max_var=1.0, method="difference")[0]
    diff = shape_similarity(ref, other, max_var=1.0, method="difference")[0]
    auc = float((same[:, None] > diff[None, :]).float().mean())
    print(f"same 30 deg {float(same.mean()):.3f} different {float(diff.mean()):.3f} auc {auc:.3f}")
    # Measured (seed 11, 48 bodies): same at 30 deg -0.113, different -0.164, AUC 0.539: a small gap, as in
    # BENCHMARKS.md (one 2D view says little about 3D proportions); the order must hold.
    assert float(same.mean()) > float(diff.mean()) + 0.03
    assert auc > 0.5


def test_fit_moves_towards_the_true_shape(sweep):
    (ref, *_), views = sweep
    mean, std = prior_stats()
    z = (views[0].shape - mean) / std
    # Better than the prior (mean 0) on every entry summed, and the variances are not overconfident.
    assert float(((ref.mean - z) ** 2).mean()) < float((z**2).mean()) * 0.9
    assert float(((ref.mean - z) ** 2 / ref.var).mean()) < 2.0


def test_side_view_widths_are_uncertain(sweep):
    """Seen from the side, shoulder and hip widths point at the camera: the fit must say it cannot tell."""
    (ref, _, side, _), _ = sweep
    widths = [4, 5]  # shoulder_width, hip_width
    print(f"width variance side {float(side.var[:, widths].mean()):.3f} front {float(ref.var[:, widths].mean()):.3f}")
    # Measured (seed 11): 0.98 side vs 0.83 front (1 = the prior only).
    assert float(side.var[:, widths].mean()) > float(ref.var[:, widths].mean()) + 0.1
    assert float(side.var[:, widths].mean()) > 0.95


def test_joint_fit_of_several_photos_is_more_confident():
    n = 8
    gen = torch.Generator().manual_seed(5)
    lengths = sample_lengths(n, gen)
    yaws = (0.0, 40.0, -70.0)
    kp = torch.stack(
        [synthetic_views(n, gen, kinds=KINDS, lengths=lengths, yaw=torch.full((n,), math.radians(y))).keypoints
         for y in yaws], 1)  # fmt: skip
    joint = fit_shape(kp, settings=FAST)
    single = fit_shape(kp[:, 0], settings=FAST)
    assert joint.var.shape == (n, 7)
    assert float(joint.var.mean()) < float(single.var.mean()) - 0.1


def test_missing_photos_and_bodies():
    kp = synthetic_views(3, torch.Generator().manual_seed(0), kinds=KINDS).keypoints
    kp[1] = float("nan")  # no person detected
    kp[2, 5:, 2] = 0.0  # every body keypoint below the score threshold
    est = fit_shape(kp, settings=FitSettings(steps=5))
    assert est.found.tolist() == [True, False, False]
    assert torch.equal(est.mean[1:], torch.zeros(2, 7)) and torch.equal(est.var[1:], torch.ones(2, 7))
    with pytest.raises(ValueError, match="keypoints must have shape"):
        fit_shape(kp[..., :2])
    with pytest.raises(ValueError, match="steps"):
        FitSettings(steps=0)


def test_difference_ratio_ignores_a_shared_measurement_shift():
    """A detector that puts every joint elsewhere shifts every measurement alike: the ratio must not move."""
    g = torch.Generator().manual_seed(0)
    va, vb = 0.2 + 0.6 * torch.rand(5, 7, generator=g), 0.2 + 0.6 * torch.rand(5, 7, generator=g)
    ya, yb = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    shift = torch.randn(7, generator=g) * 2

    def est(y, v):  # posterior of a measurement y with noise v / (1 - v) under the N(0, 1) prior
        return ShapeEstimate(y * (1 - v), v, torch.ones(5, dtype=torch.bool))

    base = difference_log_likelihood_ratio(est(ya, va), est(yb, vb))
    moved = difference_log_likelihood_ratio(est(ya + shift, va), est(yb + shift, vb))
    assert torch.allclose(base, moved, atol=1e-4)
    assert base.std() > 0.1  # not constant
    # The full likelihood ratio does move: it counts where in the population the two estimates sit.
    llr = shape_similarity(est(ya, va), est(yb, vb), max_var=1.0)[0]
    llr_moved = shape_similarity(est(ya + shift, va), est(yb + shift, vb), max_var=1.0)[0]
    assert (llr - llr_moved).abs().max() > 0.05
    # Equal estimates: a positive ratio, larger the more confident they are; a far pair: negative.
    same = est(ya, va)
    assert (difference_log_likelihood_ratio(same, same) > 0).all()
    far = est(ya + 3, va)
    assert (difference_log_likelihood_ratio(same, far) < 0).all()


def test_body_shape_similarity_with_the_fit():
    gen = torch.Generator().manual_seed(2)
    n = 3
    lengths = sample_lengths(n, gen)
    gen_kp = synthetic_views(n, gen, kinds=KINDS, lengths=lengths).keypoints
    refs = torch.stack([synthetic_views(n, gen, kinds=KINDS, lengths=lengths).keypoints for _ in range(2)], 1)
    m = BodyShapeSimilarity(estimator="fit", method="difference", max_var=1.0)
    m.update(gen_kp, refs)
    expected = shape_similarity(fit_shape(gen_kp), fit_shape(refs), max_var=1.0, method="difference")[0]
    assert torch.allclose(m.per_sample(), expected, atol=1e-5)
    assert float(m.compute()["body_sim"]) == pytest.approx(float(expected.mean()), abs=1e-5)
    with pytest.raises(ValueError, match="estimator"):
        BodyShapeSimilarity(estimator="mlp")
