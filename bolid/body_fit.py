"""Body shape by fitting a kinematic skeleton to 2D keypoints, jointly over one or several photos of a person.

The skeleton is :func:`bolid.synthetic_bodies.pose_joints` (the synthetic bench's own body model): seven 3D
segment lengths (:data:`bolid.synthetic_bodies.SHAPE_NAMES`, left = right), trunk bend / side lean / twist
and per-side hip flexion and abduction, knee, shoulder flexion and abduction, elbow and forearm twist. A
camera (yaw, pitch, roll, scale, 2D shift, perspective) per photo projects it. SMPLify-style, on this
skeleton: gradient descent (Adam) on

    sum_j  score-visible_j * rho(|proj_j - keypoint_j|^2 / sigma^2)  +  |z|^2 / 2  +  pose prior

where ``z`` is the shape vector in population z-units (:func:`bolid.synthetic_bodies.prior_stats`, shared by
every photo of the person), ``rho`` is a robust (pseudo-Huber) penalty against detector outliers and
swaps, joint angles stay inside human limits by construction (a sigmoid between the limits) and have a
broad Gaussian prior around an upright stance, and the camera's pitch and roll a Gaussian prior. Only the
12 body keypoints count (the face points are ignored). Several starting yaws are fitted in one batch and
the lowest objective wins; several photos of one person are first fitted one by one, then refined together
with one shared shape.

Confidence: a Laplace approximation. At the fit, the Gauss-Newton Hessian ``J^T J`` of all the residuals
(data and priors) with respect to every parameter of the person is inverted, and its shape block gives a
per-entry posterior variance in z-units, 1 = the prior only. A segment seen foreshortened, or a width in
a side view, is not constrained by the keypoints: its pose parameters trade off against its length, the
marginal variance stays near 1, and :func:`bolid.body_shape.shape_similarity` weighs it accordingly (or
fails the pair with ``ambiguous_view``). The result is a :class:`bolid.body_shape.ShapeEstimate`, so it
fuses and compares like the network's.

Invariances: the keypoints are canonicalised first (:func:`bolid.body_shape.canonical_keypoints`: centred on
the mid-hip, rotated so the torso points up, scaled by the RMS spread), so the estimate is invariant to image
scale, translation and in-plane rotation up to float rounding. Horizontal flips: the skeleton, its priors
and the set of starting yaws are mirror-symmetric, so the fit of mirrored keypoints is the mirror of the fit
(same lengths) from the mirrored start, and the same start wins.

The camera is weak-perspective plus a fitted perspective term (stature / distance, about the mid-hip's
depth), since a body a few metres from the lens is noticeably nearer at the shoulders when bending.

The fit is not offered as a training loss: it runs a few hundred optimiser steps and its output is
piecewise in the keypoints (which start wins). ``L_id`` keeps the network of :mod:`bolid.body_shape`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bolid.body_shape import ShapeEstimate, canonical_keypoints
from bolid.synthetic_bodies import BASE_FRACTIONS, SHAPE_DIM, _Angles, _rot, pose_joints, prior_stats

#: Joint angles the fit solves for: (name, sides, lower limit, upper limit, prior mean, prior sd), degrees.
#: Limits as the synthetic bench's widest pose kind ("any"), a little wider for lean and twist.
ANGLES = (
    ("bend", 1, -10.0, 90.0, 5.0, 25.0),
    ("side", 1, -30.0, 30.0, 0.0, 10.0),
    ("twist", 1, -45.0, 45.0, 0.0, 15.0),
    ("hip_flex", 2, -30.0, 125.0, 5.0, 35.0),
    ("hip_abd", 2, -15.0, 50.0, 5.0, 12.0),
    ("knee", 2, 0.0, 145.0, 10.0, 40.0),
    ("sh_flex", 2, -45.0, 175.0, 10.0, 45.0),
    ("sh_abd", 2, 0.0, 175.0, 15.0, 35.0),
    ("elbow", 2, 0.0, 150.0, 20.0, 45.0),
    ("forearm_twist", 2, -90.0, 90.0, 0.0, 45.0),
)
_N_ANGLES = sum(a[1] for a in ANGLES)  # 19
_N_CAMERA = 7  # yaw, pitch, roll, log scale, shift x, shift y, logit(stature / distance)
_N_POSE = _N_ANGLES + _N_CAMERA
#: Starting yaws (degrees) fitted side by side; the lowest objective wins.
START_YAWS = (-60.0, -20.0, 20.0, 60.0)


@dataclass(frozen=True)
class FitSettings:
    """Settings of :func:`fit_shape`.

    Attributes:
        sigma: keypoint noise, as a fraction of the RMS spread of the body keypoints (the canonical unit).
        pitch_sd, roll_sd: prior standard deviations of the camera's pitch and roll, degrees.
        steps: Adam steps of the single-photo fits; the joint refinement of several photos takes half as many.
        lr: Adam learning rate.
        min_visible: fewest visible body keypoints (of 12) for a photo to count.
        pose_prior_scale: multiplies every joint angle's prior standard deviation (:data:`ANGLES`).
    """

    sigma: float = 0.03
    pitch_sd: float = 15.0
    roll_sd: float = 15.0
    steps: int = 250
    lr: float = 0.05
    min_visible: int = 6
    pose_prior_scale: float = 1.0

    def __post_init__(self):
        if self.sigma <= 0 or self.pitch_sd <= 0 or self.roll_sd <= 0 or self.pose_prior_scale <= 0:
            raise ValueError("sigma, pitch_sd, roll_sd and pose_prior_scale must be > 0")
        if self.steps < 1 or self.lr <= 0:
            raise ValueError(f"steps must be >= 1 and lr > 0, got {self.steps}, {self.lr}")
        if not 1 <= self.min_visible <= 12:
            raise ValueError(f"min_visible must be in [1, 12], got {self.min_visible}")


def _angle_tables() -> tuple[torch.Tensor, ...]:
    lo, hi, mu, sd = ([math.radians(a[i]) for a in ANGLES for _ in range(a[1])] for i in (2, 3, 4, 5))
    return torch.tensor(lo), torch.tensor(hi), torch.tensor(mu), torch.tensor(sd)


class _Skeleton:
    """Parameters -> canonical 2D body keypoints, and the prior residuals. Batched over leading dimensions."""

    def __init__(self, settings: FitSettings):
        self.s = settings
        self.lo, self.hi, self.mu, self.sd = _angle_tables()
        self.sd = self.sd * settings.pose_prior_scale
        mean, std = prior_stats()
        self.prior_mean, self.prior_std = mean, std
        self.base = torch.log(torch.tensor(BASE_FRACTIONS[:SHAPE_DIM]))
        # z -> the sum-zero shape vector in z-units is linear (the rescaling direction removed); its prior
        # variance per entry (below 1) rescales the output so that "the prior only" reads as variance 1.
        a = torch.eye(SHAPE_DIM) - 1 / SHAPE_DIM
        self.out_map = a * std[None, :] / std[:, None]
        self.out_sd = (self.out_map**2).sum(1).sqrt()

    def angles(self, u: torch.Tensor) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * torch.sigmoid(u)

    def u_of(self, a: torch.Tensor) -> torch.Tensor:
        p = ((a - self.lo) / (self.hi - self.lo)).clamp(1e-3, 1 - 1e-3)
        return torch.log(p / (1 - p))

    def shape(self, z: torch.Tensor) -> torch.Tensor:
        """z-units ``(..., 7)`` -> the (sum-zero) shape vector; the direction that only rescales drops out."""
        s = self.prior_mean + self.prior_std * z
        return s - s.mean(-1, keepdim=True)

    def z_out(self, z: torch.Tensor) -> torch.Tensor:
        return (self.shape(z) - self.prior_mean) / self.prior_std / self.out_sd

    def project(self, z: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """``z (..., 7)``, ``pose (..., 25)`` -> ``(..., 12, 2)`` canonical coordinates of COCO 5-16."""
        lead = pose.shape[:-1]
        z = z.expand(*lead, SHAPE_DIM).reshape(-1, SHAPE_DIM)
        pose = pose.reshape(-1, _N_POSE)
        n = pose.shape[0]
        seg = torch.exp(self.shape(z) - self.shape(torch.zeros(SHAPE_DIM)) + self.base)  # about stature 1
        lengths = torch.cat([seg, torch.full((n, 1), BASE_FRACTIONS[-1])], 1)[..., None].expand(n, 8, 2)
        a = self.angles(pose[:, :_N_ANGLES])
        cols, i = {}, 0
        for name, sides, *_ in ANGLES:
            cols[name] = a[:, i] if sides == 1 else a[:, i : i + 2]
            i += sides
        ang = _Angles(head_yaw=torch.zeros(n), **cols)
        joints = pose_joints(lengths, ang)[:, 5:]  # (n, 12, 3), body frame: x left, y up, z forward
        yaw, pitch, roll, log_s, tx, ty, persp = pose[:, _N_ANGLES:].unbind(-1)
        to_cam = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
        rot = _rot("z", roll) @ _rot("x", pitch) @ to_cam @ _rot("y", yaw)
        cam = (rot[:, None] @ joints[..., None]).squeeze(-1)
        # Perspective about the mid-hip's depth: stature / distance in (0, 1), 0 = weak perspective.
        depth = 1 + torch.sigmoid(persp)[:, None] * cam[..., 2]
        xy = torch.exp(log_s)[:, None, None] * cam[..., :2] / depth[..., None] + torch.stack([tx, ty], -1)[:, None]
        return xy.reshape(*lead, 12, 2)

    def residuals(
        self, z: torch.Tensor, pose: torch.Tensor, target: torch.Tensor, vis: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """Whitened residuals ``(P, R)``: ``z (P, 7)``, ``pose (P, G, N_POSE)``, ``target (P, G, 12, 2)``,
        ``vis`` and robust ``weight (P, G, 12)`` -> data, shape prior, pose prior, camera prior."""
        p = z.shape[0]
        xy = self.project(z.unsqueeze(-2), pose)
        data = (xy - target) / self.s.sigma * (vis * weight).sqrt()[..., None]
        ang = (self.angles(pose[..., :_N_ANGLES]) - self.mu) / self.sd
        cam = pose[..., _N_ANGLES + 1 : _N_ANGLES + 3] / self._cam_sd()
        return torch.cat([data.reshape(p, -1), z, ang.reshape(p, -1), cam.reshape(p, -1)], 1)

    def _cam_sd(self) -> torch.Tensor:
        return torch.tensor([math.radians(self.s.pitch_sd), math.radians(self.s.roll_sd)])


def _robust(e: torch.Tensor) -> torch.Tensor:
    """Pseudo-Huber on squared standardised residuals: ~e near 0, ~2 sqrt(e) far out."""
    return 2 * ((1 + e).sqrt() - 1)


def _objective(sk: _Skeleton, z, pose, target, vis) -> torch.Tensor:
    """``(...)`` objective of a batch: ``z (..., 7)``, ``pose (..., G, 25)``, ``target (..., G, 12, 2)``."""
    xy = sk.project(z.unsqueeze(-2), pose)
    e = ((xy - target) ** 2).sum(-1) / sk.s.sigma**2
    data = (_robust(e) * vis).sum((-1, -2))
    ang = ((sk.angles(pose[..., :_N_ANGLES]) - sk.mu) / sk.sd) ** 2
    cam = (pose[..., _N_ANGLES + 1 : _N_ANGLES + 3] / sk._cam_sd()) ** 2
    return data + 0.5 * (z**2).sum(-1) + 0.5 * (ang.sum((-1, -2)) + cam.sum((-1, -2)))


def _adam(sk: _Skeleton, z, pose, target, vis, steps: int, lr: float) -> tuple[torch.Tensor, ...]:
    z, pose = z.detach().clone().requires_grad_(True), pose.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z, pose], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.05)
    for _ in range(steps):
        loss = _objective(sk, z, pose, target, vis)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final = _objective(sk, z, pose, target, vis)
    return z.detach(), pose.detach(), final


def _start_pose(sk: _Skeleton, n: int, yaw_deg: float) -> torch.Tensor:
    pose = torch.zeros(n, _N_POSE)
    pose[:, :_N_ANGLES] = sk.u_of(sk.mu)
    pose[:, _N_ANGLES] = math.radians(yaw_deg)
    # Scale: a standing skeleton of stature 1 has an RMS keypoint spread of about 0.33 (canonical spread: 1).
    pose[:, _N_ANGLES + 3] = math.log(3.0)
    pose[:, _N_ANGLES + 6] = math.log(0.3 / 0.7)  # stature / distance 0.3 (a full body fills a photo at ~3.3)
    return pose


def _laplace_var(sk: _Skeleton, z, pose, target, vis) -> torch.Tensor:
    """Posterior variance ``(P, 7)`` of the z-units shape vector, from the Gauss-Newton Hessian at the fit.

    The people are independent, so one backward pass of a residual entry summed over the people gives that
    row of every person's Jacobian: as many passes as residuals per person, each over the whole batch.
    """
    with torch.no_grad():
        e = ((sk.project(z.unsqueeze(-2), pose) - target) ** 2).sum(-1) / sk.s.sigma**2
        weight = (1 + e).rsqrt()  # IRLS weight of the pseudo-Huber penalty at the fit
    z, pose = z.detach().requires_grad_(True), pose.detach().requires_grad_(True)
    res = sk.residuals(z, pose, target, vis, weight)  # (P, R)
    rows = []
    for k in range(res.shape[1]):
        gz, gp = torch.autograd.grad(res[:, k].sum(), (z, pose), retain_graph=k + 1 < res.shape[1])
        rows.append(torch.cat([gz, gp.flatten(1)], 1))
    j = torch.stack(rows, 1).double()  # (P, R, 7 + G * N_POSE)
    h = j.transpose(1, 2) @ j + 1e-6 * torch.eye(j.shape[2], dtype=j.dtype)
    cov = torch.linalg.inv(h)[:, :SHAPE_DIM, :SHAPE_DIM].float()
    a = (sk.out_map / sk.out_sd[:, None])[None]  # the linear map z -> z_out
    return torch.diagonal(a @ cov @ a.transpose(1, 2), dim1=-2, dim2=-1).clamp(1e-4, 1.0)


def _fit_once(kp: torch.Tensor, sk: _Skeleton, settings: FitSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``(P, G, 17, 3)`` keypoints: posterior mean and variance ``(P, 7)`` of the z-units shape vector."""
    p, g = kp.shape[:2]
    rel, v, _ = canonical_keypoints(kp, 0.5)
    target, vis = rel[..., 5:, :], v[..., 5:]  # (P, G, 12, 2), (P, G, 12)
    # 1. Every photo alone, from each starting yaw, in one batch: (S, P * G).
    ns = len(START_YAWS)
    t1 = target.reshape(1, p * g, 1, 12, 2).expand(ns, p * g, 1, 12, 2)
    v1 = vis.reshape(1, p * g, 1, 12).expand(ns, p * g, 1, 12)
    pose0 = torch.stack([_start_pose(sk, p * g, y) for y in START_YAWS])[:, :, None]
    z1, pose1, obj = _adam(sk, torch.zeros(ns, p * g, SHAPE_DIM), pose0, t1, v1, settings.steps, settings.lr)
    best = obj.argmin(0)  # (P * G,)
    rows = torch.arange(p * g)
    z1, pose1 = z1[best, rows].view(p, g, SHAPE_DIM), pose1[best, rows, 0].view(p, g, _N_POSE)
    # 2. The photos of one person together: one shape, each photo its own pose and camera.
    if g > 1:
        zs, poses, _ = _adam(sk, z1.mean(1), pose1, target, vis, max(settings.steps // 2, 1), settings.lr / 2)
    else:
        zs, poses = z1[:, 0], pose1
    return sk.z_out(zs), _laplace_var(sk, zs, poses, target, vis)


def fit_shape(keypoints: torch.Tensor, min_score: float = 0.5, settings: FitSettings | None = None) -> ShapeEstimate:
    """Shape estimate of each person from ``(P, G, 17, 3)`` keypoints: G photos of each of P people.

    ``(P, 17, 3)`` is read as one photo a person. Keypoints scoring below ``min_score`` are missing; a photo
    with fewer than ``settings.min_visible`` visible body keypoints, or with NaN coordinates, is left out of
    its person's fit (a person without any photo left is ``found = False``, with the prior as estimate).
    """
    settings = settings or FitSettings()
    if keypoints.shape[-2:] != (17, 3) or keypoints.ndim not in (3, 4):
        raise ValueError(f"keypoints must have shape (P, 17, 3) or (P, G, 17, 3), got {tuple(keypoints.shape)}")
    kp = keypoints.detach().float().cpu()
    kp = kp[:, None] if kp.ndim == 3 else kp
    nan = torch.isnan(kp).any(-1)  # (P, G, 17)
    score = torch.where(nan, 0.0, torch.nan_to_num(kp[..., 2]))
    visible = score >= min_score
    photo_ok = visible[..., 5:].sum(-1) >= settings.min_visible  # (P, G)
    # Missing points and left-out photos get score 0 (the fit ignores them); coordinates must be finite.
    kp = torch.cat([torch.nan_to_num(kp[..., :2]), (visible & photo_ok[..., None]).float()[..., None]], -1)
    with torch.enable_grad():
        mean, var = _fit_once(kp, _Skeleton(settings), settings)
    found = photo_ok.any(-1)
    f = found[:, None]
    return ShapeEstimate(torch.where(f, mean, 0.0), torch.where(f, var, 1.0), found)
