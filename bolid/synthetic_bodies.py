"""Synthetic 3D skeletons seen by synthetic cameras: the training and test bench of the body-shape model.

A body is a set of 3D segment lengths drawn around the Drillis & Contini proportions tabulated in
Winter's *Biomechanics and Motor Control of Human Movement* (fractions of stature H; upper arm 0.186,
forearm 0.146, thigh 0.245, shank 0.246, torso = shoulder height 0.818 - hip height 0.530). COCO's
shoulder and hip keypoints sit inside the biacromial (0.259 H) and bi-iliac (0.191 H) breadths, so the
keypoint widths are taken as 0.20 H and 0.6 x 0.191 H. Log lengths vary with a coefficient of variation
of 5% (lengths) and 7% (breadths), correlated as in adult surveys (lengths with each other r = 0.6,
breadths with each other 0.6, breadths with lengths 0.3), plus 1% left/right asymmetry.

A pose puts the segments in 3D with joint angles inside human limits, drawn per sample from one of
the kinds in :data:`POSE_KINDS` (standing, walking, arms raised, crouching, bending, anything within the
limits; weighted by :data:`KIND_WEIGHTS`). A pinhole camera looks at the body from yaw within
``±yaw_max`` (default 90°; half the views uniform, half near-frontal, sigma 25°), pitch ±30°, roll ±20°,
2-8 m away with a focal length that makes the person 200-900 px tall; the projection is perspective.
Then what a detector does to keypoints: Gaussian jitter of 0.3-2% of the torso length, occasional
outliers, dropped joints (more on the far side of a turned body), whole-body and single-limb left/right
swaps.

The body's *shape vector* (:data:`SHAPE_NAMES`) is what identity means here: the log of each 3D length
minus the mean of those logs, so it is free of stature (scale) and of pose and camera by construction.
:func:`prior_stats` gives its population mean and standard deviation under this generator; these, not
any statistics of real photos, standardise it.

Everything is batched torch on the CPU, seeded through a ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Entries of the shape vector, each the log of a 3D length minus the mean of the 7 logs.
SHAPE_NAMES = ("upper_arm", "forearm", "thigh", "shin", "shoulder_width", "hip_width", "torso")
SHAPE_DIM = len(SHAPE_NAMES)
#: Fractions of stature: the 7 shape lengths, then the head offset used to place the face points.
BASE_FRACTIONS = (0.186, 0.146, 0.245, 0.246, 0.20, 0.6 * 0.191, 0.818 - 0.530, 0.11)
_CV = (0.05, 0.05, 0.05, 0.05, 0.07, 0.07, 0.05, 0.04)
_IS_BREADTH = (False, False, False, False, True, True, False, False)
POSE_KINDS = ("standing", "walking", "arms_raised", "crouching", "bending", "any")
#: COCO-17 left/right partner of every keypoint (a horizontal flip or a detector's L/R swap).
COCO_FLIP = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)


def _correlation() -> torch.Tensor:
    n = len(_CV)
    c = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j:
                c[i, j] = 0.6 if _IS_BREADTH[i] == _IS_BREADTH[j] else 0.3
    return c


def sample_lengths(n: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, 8, 2)`` left/right 3D lengths in metres: the 7 shape lengths and the head offset."""
    cv = torch.tensor(_CV, dtype=torch.float64)
    chol = torch.linalg.cholesky(_correlation() * cv[:, None] * cv[None, :])
    z = torch.randn(n, len(_CV), generator=gen, dtype=torch.float64) @ chol.T
    stature = 1.5 + 0.45 * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    base = torch.tensor(BASE_FRACTIONS, dtype=torch.float64) * stature * torch.exp(z)
    asym = torch.exp(0.01 * torch.randn(n, len(_CV), 2, generator=gen, dtype=torch.float64))
    return (base[..., None] * asym).float()


def shape_vector(lengths: torch.Tensor) -> torch.Tensor:
    """``(..., 7)`` shape vector of :data:`SHAPE_NAMES` from ``(..., 8, 2)`` lengths (left/right averaged)."""
    logs = torch.log(lengths[..., :SHAPE_DIM, :].mean(-1))
    return logs - logs.mean(-1, keepdim=True)


def prior_stats(n: int = 200_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Population mean and standard deviation ``(7,)`` of the shape vector under :func:`sample_lengths`."""
    s = shape_vector(sample_lengths(n, torch.Generator().manual_seed(seed)))
    return s.mean(0), s.std(0)


# ------------------------------------------------------------------------------------------------ rotations


def _rot(axis: str, angle: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 3)`` rotation about a coordinate axis by ``angle`` radians (right-handed)."""
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(angle), torch.zeros_like(angle)
    rows = {
        "x": ((o, z, z), (z, c, -s), (z, s, c)),
        "y": ((c, z, s), (z, o, z), (-s, z, c)),
        "z": ((c, -s, z), (s, c, z), (z, z, o)),
    }[axis]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def _apply(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (m @ v.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------------------------------------ poses


@dataclass
class _Angles:
    bend: torch.Tensor  # (n,) trunk forward bend
    side: torch.Tensor  # trunk side lean
    twist: torch.Tensor  # shoulders vs hips
    head_yaw: torch.Tensor
    hip_flex: torch.Tensor  # (n, 2) left, right
    hip_abd: torch.Tensor
    knee: torch.Tensor
    sh_flex: torch.Tensor
    sh_abd: torch.Tensor
    elbow: torch.Tensor
    forearm_twist: torch.Tensor


def _u(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return math.radians(lo) + math.radians(hi - lo) * torch.rand(shape, generator=gen)


# (lo, hi) in degrees per kind; None = special handling below.
_RANGES = {
    #               bend       hip_flex    hip_abd    knee       sh_flex     sh_abd     elbow
    "standing": ((-5, 10), (-5, 10), (0, 12), (0, 10), (-10, 20), (5, 30), (0, 30)),
    "walking": ((0, 10), None, (0, 8), (0, 60), None, (5, 20), (10, 60)),
    "arms_raised": ((-5, 10), (-5, 10), (0, 15), (0, 15), (0, 170), (30, 170), (0, 120)),
    "crouching": ((10, 45), (60, 120), (5, 40), (60, 140), (0, 90), (5, 45), (20, 120)),
    "bending": ((30, 90), (0, 30), (0, 15), (0, 30), (0, 90), (0, 40), (0, 90)),
    "any": ((-10, 90), (-20, 120), (-10, 45), (0, 140), (-40, 170), (0, 170), (0, 145)),
}


#: How often each pose kind is drawn by default: photos of people are mostly of people standing or walking.
KIND_WEIGHTS = {"standing": 0.3, "walking": 0.2, "arms_raised": 0.1, "crouching": 0.1, "bending": 0.1, "any": 0.2}


def sample_angles(n: int, gen: torch.Generator, kinds: tuple[str, ...] = POSE_KINDS) -> _Angles:
    """Joint angles (radians) within human limits, each sample's pose kind drawn from ``kinds``.

    The kinds are weighted by :data:`KIND_WEIGHTS`.
    """
    bad = set(kinds) - set(POSE_KINDS)
    if bad or not kinds:
        raise ValueError(f"pose kinds must be among {POSE_KINDS}, got {kinds}")
    weights = torch.tensor([KIND_WEIGHTS[k] for k in kinds])
    kind = torch.multinomial(weights, n, replacement=True, generator=gen)
    two = (n, 2)
    out = {k: torch.zeros(two) for k in ("hip_flex", "hip_abd", "knee", "sh_flex", "sh_abd", "elbow")}
    bend = torch.zeros(n)
    for ki, name in enumerate(kinds):
        m = kind == ki
        r = _RANGES[name]
        bend = torch.where(m, _u(gen, (n,), *r[0]), bend)
        for key, rng in zip(("hip_flex", "hip_abd", "knee", "sh_flex", "sh_abd", "elbow"), r[1:], strict=True):
            if rng is None:  # walking: legs and arms swing in opposition
                swing = _u(gen, (n, 1), -30, 30)
                jitter = _u(gen, two, -5, 5)
                val = torch.cat([swing, -swing], 1) * (1 if key == "hip_flex" else -1) + jitter
            else:
                val = _u(gen, two, *rng)
            out[key] = torch.where(m[:, None], val, out[key])
    return _Angles(
        bend=bend,
        side=_u(gen, (n,), -12, 12),
        twist=_u(gen, (n,), -25, 25),
        head_yaw=_u(gen, (n,), -20, 20),
        forearm_twist=_u(gen, two, -60, 60),
        **out,
    )


def pose_joints(lengths: torch.Tensor, ang: _Angles) -> torch.Tensor:
    """``(n, 17, 3)`` COCO-17 joints in the body frame (x = the person's left, y = up, z = forward, mid-hip 0)."""
    n = lengths.shape[0]
    f32 = lengths.dtype
    ex, ey = torch.tensor([1.0, 0, 0], dtype=f32), torch.tensor([0, 1.0, 0], dtype=f32)
    down = -ey
    ua, fa, th, sh, sw, hw, torso, head = (lengths[:, i] for i in range(8))  # each (n, 2)
    trunk = _rot("z", ang.side) @ _rot("x", -ang.bend)  # forward bend tips +y toward +z
    upper = trunk @ _rot("y", ang.twist)
    sh_c = _apply(trunk, ey.expand(n, 3)) * torso.mean(1, keepdim=True)
    sh_axis = _apply(upper, ex.expand(n, 3))
    j = torch.zeros(n, 17, 3, dtype=f32)
    for side, sign in ((0, 1.0), (1, -1.0)):
        s_pt = sh_c + sign * sh_axis * sw[:, side : side + 1] / 2
        arm = upper @ _rot("x", -ang.sh_flex[:, side]) @ _rot("z", sign * ang.sh_abd[:, side])
        e_pt = s_pt + _apply(arm, down.expand(n, 3)) * ua[:, side : side + 1]
        fore = arm @ _rot("y", ang.forearm_twist[:, side]) @ _rot("x", -ang.elbow[:, side])
        w_pt = e_pt + _apply(fore, down.expand(n, 3)) * fa[:, side : side + 1]
        h_pt = sign * ex.expand(n, 3) * hw[:, side : side + 1] / 2
        leg = _rot("x", -ang.hip_flex[:, side]) @ _rot("z", sign * ang.hip_abd[:, side])
        k_pt = h_pt + _apply(leg, down.expand(n, 3)) * th[:, side : side + 1]
        shin = leg @ _rot("x", ang.knee[:, side])
        a_pt = k_pt + _apply(shin, down.expand(n, 3)) * sh[:, side : side + 1]
        for idx, pt in zip((5, 7, 9, 11, 13, 15), (s_pt, e_pt, w_pt, h_pt, k_pt, a_pt), strict=True):
            j[:, idx + side] = pt
    face = upper @ _rot("y", ang.head_yaw)
    h = head.mean(1, keepdim=True)
    offsets = torch.tensor(
        [[0, 0.8, 0.55], [0.3, 1.0, 0.45], [-0.3, 1.0, 0.45], [0.65, 0.85, 0.0], [-0.65, 0.85, 0.0]], dtype=f32
    )
    j[:, :5] = sh_c[:, None] + (face[:, None] @ offsets[None, :, :, None]).squeeze(-1) * h[:, None]
    return j


# ------------------------------------------------------------------------------------------------ cameras


@dataclass
class Views:
    """Projected, detector-like keypoints of a batch and the truths behind them."""

    keypoints: torch.Tensor  # (n, 17, 3) x, y, score in pixels
    shape: torch.Tensor  # (n, 7) true shape vector
    yaw: torch.Tensor  # (n,) body yaw relative to the camera, radians (0 = facing it)


def project(
    joints: torch.Tensor,
    gen: torch.Generator,
    yaw: torch.Tensor | None = None,
    yaw_max: float = 90.0,
    pitch_max: float = 30.0,
    roll_max: float = 20.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Perspective pixels ``(n, 17, 2)`` of body-frame joints, and the yaw used ``(n,)`` (radians)."""
    n = joints.shape[0]
    if yaw is None:  # half uniform over +-yaw_max, half near-frontal (most photos face the camera)
        frontal = torch.randn(n, generator=gen) * math.radians(25)
        yaw = torch.where(torch.rand(n, generator=gen) < 0.5, _u(gen, (n,), -yaw_max, yaw_max), frontal)
        yaw = yaw.clamp(-math.radians(yaw_max), math.radians(yaw_max))
    pitch, roll = _u(gen, (n,), -pitch_max, pitch_max), _u(gen, (n,), -roll_max, roll_max)
    # Body frame (x left, y up, z forward) -> camera frame (x right, y down, z away from the camera).
    to_cam = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    rot = _rot("z", roll) @ _rot("x", pitch) @ to_cam @ _rot("y", yaw)
    dist = 2.0 + 6.0 * torch.rand(n, generator=gen)
    centre = torch.stack([0.1 * torch.randn(n, generator=gen), torch.zeros(n), dist], 1)
    cam = (rot[:, None] @ joints[..., None]).squeeze(-1) + centre[:, None]
    height_px = 200 + 700 * torch.rand(n, generator=gen)
    focal = height_px * dist / 1.75
    uv = focal[:, None, None] * cam[..., :2] / cam[..., 2:3].clamp(min=0.2)
    return uv + torch.tensor([512.0, 512.0]), yaw


def detector_noise(
    uv: torch.Tensor,
    yaw: torch.Tensor,
    gen: torch.Generator,
    jitter: tuple[float, float] = (0.003, 0.02),
    drop: float = 0.05,
    swap: float = 0.05,
) -> torch.Tensor:
    """``(n, 17, 3)`` keypoints with scores: jitter, outliers, dropped joints and left/right swaps.

    Args:
        uv: ``(n, 17, 2)`` exact pixels.
        yaw: ``(n,)`` body yaw; joints on the far side of a turned body drop more often.
        jitter: range of the Gaussian jitter's sigma, as a fraction of the projected torso length.
        drop: probability that a joint is missed (score below 0.3).
        swap: probability of a whole-body left/right swap (and, separately, of one swapped limb pair).
    """
    n = uv.shape[0]
    torso = torch.linalg.vector_norm((uv[:, 5] + uv[:, 6] - uv[:, 11] - uv[:, 12]) / 2, dim=-1).clamp(min=1.0)
    sigma = (jitter[0] + (jitter[1] - jitter[0]) * torch.rand(n, generator=gen)) * torso
    xy = uv + sigma[:, None, None] * torch.randn(n, 17, 2, generator=gen)
    outlier = torch.rand(n, 17, 1, generator=gen) < 0.02
    xy = xy + outlier * 0.15 * torso[:, None, None] * torch.randn(n, 17, 2, generator=gen)
    score = 0.5 + 0.5 * torch.rand(n, 17, generator=gen)
    # Far side of a turned body (yaw > 0 turns the person's right side away): occluded more often.
    far_right = torch.tensor([i % 2 == 0 and i > 0 for i in range(17)])
    far = torch.where((yaw > 0)[:, None], far_right[None], ~far_right[None] & (torch.arange(17) > 0)[None])
    p_drop = drop + 0.3 * far * (yaw.abs() > math.radians(60))[:, None]
    dropped = torch.rand(n, 17, generator=gen) < p_drop
    score = torch.where(dropped, 0.3 * torch.rand(n, 17, generator=gen), score)
    kp = torch.cat([xy, score[..., None]], -1)
    flip = torch.tensor(COCO_FLIP)
    whole = torch.rand(n, generator=gen) < swap
    kp = torch.where(whole[:, None, None], kp[:, flip], kp)
    pair = torch.randint(5, 17, (n,), generator=gen)
    one = torch.rand(n, generator=gen) < swap
    rows = torch.arange(n)[one]
    a, b = pair[one], flip[pair[one]]
    kp[rows, a], kp[rows, b] = kp[rows, b].clone(), kp[rows, a].clone()
    return kp


def synthetic_views(
    n: int,
    gen: torch.Generator,
    kinds: tuple[str, ...] = POSE_KINDS,
    lengths: torch.Tensor | None = None,
    yaw: torch.Tensor | None = None,
    yaw_max: float = 90.0,
    noise: bool = True,
) -> Views:
    """``n`` random views: bodies (or the given ``(n, 8, 2)`` ``lengths``), poses, cameras, detector noise."""
    lengths = sample_lengths(n, gen) if lengths is None else lengths
    joints = pose_joints(lengths, sample_angles(n, gen, kinds))
    uv, yaw = project(joints, gen, yaw=yaw, yaw_max=yaw_max)
    if noise:
        kp = detector_noise(uv, yaw, gen)
    else:
        kp = torch.cat([uv, torch.ones(n, 17, 1)], -1)
    return Views(keypoints=kp, shape=shape_vector(lengths), yaw=yaw)
