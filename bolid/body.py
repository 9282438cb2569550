"""Body features from COCO-17 keypoints: the 12 body points BoLID conditions on.

BoLID follows InstantID's use of a few facial landmarks, but for the body: the 12
non-face COCO keypoints (indices 5..16: left/right shoulder, elbow, wrist, hip, knee,
ankle). Everything here is plain torch, batched over any leading dimensions and
differentiable, so the same code serves the data pipeline, the Body-ID encoder, the
body-identity training loss and the Body Sim metric.

Features (all computed from ``keypoints[..., 17, 3]`` = ``(x, y, score)`` in pixels):

``visibility`` ``(..., 12)``
    1.0 where the keypoint score is at least ``min_score``, else 0.0.

``coords`` ``(..., 12, 2)``
    Keypoints centred on the mid-hip and divided by the torso length (see below).
    Invisible points are set to 0 *and* flagged by ``visibility``; consumers must use
    the mask. This is the raw *pose*: it changes when the person moves.

``proportions`` ``(..., 6)`` and ``proportions_mask`` ``(..., 6)``
    Pose-invariant body proportions, each a length divided by the torso length:

    ====  ==============  =========================================
    idx   name            segment (left/right averaged)
    ====  ==============  =========================================
    0     upper_arm       shoulder -> elbow
    1     forearm         elbow -> wrist
    2     thigh           hip -> knee
    3     shin            knee -> ankle
    4     shoulder_width  left shoulder -> right shoulder
    5     hip_width       left hip -> right hip
    ====  ==============  =========================================

    Where both sides of a limb are visible the two lengths are averaged; where one is,
    that one is used; where neither is, the feature is masked (``proportions_mask`` 0)
    and its value is 0. Nothing missing is ever averaged in as zero.

Torso length: the mean of the visible shoulder-to-hip side lengths (left shoulder to
left hip, right shoulder to right hip). If neither side is visible, every feature of
that person is masked. Ratios of lengths do not change under image scale, translation
or in-plane rotation, and left/right averaging makes them invariant to a horizontal
flip, so they describe *build*, not pose (foreshortening out of the image plane is the
one thing 2D keypoints cannot undo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# COCO-17 keypoint order.
COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
FACE_INDICES = (0, 1, 2, 3, 4)
BODY_INDICES = tuple(range(5, 17))
NUM_BODY = len(BODY_INDICES)

# Indices into the 12 body points (0 = left shoulder ... 11 = right ankle).
_LS, _RS, _LE, _RE, _LW, _RW, _LH, _RH, _LK, _RK, _LA, _RA = range(12)

PROPORTION_NAMES = ("upper_arm", "forearm", "thigh", "shin", "shoulder_width", "hip_width")
NUM_PROPORTIONS = len(PROPORTION_NAMES)
# Paired limbs: ((left a, left b), (right a, right b)).
_LIMBS = (
    ((_LS, _LE), (_RS, _RE)),
    ((_LE, _LW), (_RE, _RW)),
    ((_LH, _LK), (_RH, _RK)),
    ((_LK, _LA), (_RK, _RA)),
)
_WIDTHS = ((_LS, _RS), (_LH, _RH))

#: Length of the flat body-feature vector: coords (24) + visibility (12) + proportions (6) + mask (6).
FEATURE_DIM = NUM_BODY * 2 + NUM_BODY + 2 * NUM_PROPORTIONS


@dataclass
class BodyFeatures:
    """Features of a batch of persons; see the module docstring for each field."""

    coords: torch.Tensor  # (..., 12, 2)
    visibility: torch.Tensor  # (..., 12)
    proportions: torch.Tensor  # (..., 6)
    proportions_mask: torch.Tensor  # (..., 6)
    torso_length: torch.Tensor  # (...,) in pixels; 0 where unknown

    def flat(self, include_pose: bool = False) -> torch.Tensor:
        """Concatenate into one vector per person.

        Args:
            include_pose: also include the raw normalised coordinates (the reference pose).
                Off by default so that identity is separable from pose.

        Returns:
            ``(..., FEATURE_DIM)`` if ``include_pose`` else ``(..., 2 * NUM_PROPORTIONS + 12)``: proportions,
            their mask and keypoint visibility (coords zeroed when excluded, to keep one layout).
        """
        coords = self.coords if include_pose else torch.zeros_like(self.coords)
        return torch.cat([coords.flatten(-2), self.visibility, self.proportions, self.proportions_mask], dim=-1)

    def z_scores(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``(..., 6)``: the proportions z-scored with a population's ``mean`` and ``std``; 0 where not visible."""
        mean, std = mean.to(self.proportions), std.to(self.proportions)
        return (self.proportions - mean) / std * self.proportions_mask


def proportion_cosine(
    a: BodyFeatures, b: BodyFeatures, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Body Sim v1's core: cosine of two persons' z-scored proportions over the proportions visible in both.

    Returns:
        ``(cosine, common)``, each ``(...,)``: the cosine (0 where a z-vector is all zeros, guarded by ``eps``)
        and how many proportions both persons show.
    """
    za = a.z_scores(mean, std) * b.proportions_mask
    zb = b.z_scores(mean, std) * a.proportions_mask
    cos = (za * zb).sum(-1) / (za.norm(dim=-1) * zb.norm(dim=-1)).clamp(min=eps)
    return cos, (a.proportions_mask * b.proportions_mask).sum(-1)


def _dist(p: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return torch.linalg.vector_norm(p[..., a, :] - p[..., b, :], dim=-1)


def body_features(keypoints: torch.Tensor, min_score: float = 0.3, eps: float = 1e-6) -> BodyFeatures:
    """Compute :class:`BodyFeatures` from COCO-17 keypoints.

    Args:
        keypoints: ``(..., 17, 3)`` tensor of ``(x, y, score)`` in pixels. A ``(..., 12, 3)`` tensor of the
            body points alone is accepted too.
        min_score: keypoints scoring below this are treated as missing.
        eps: lengths below this count as degenerate (torso of zero length).

    Returns:
        The features; differentiable with respect to the keypoint coordinates.
    """
    if keypoints.shape[-1] != 3 or keypoints.shape[-2] not in (17, NUM_BODY):
        raise ValueError(f"keypoints must have shape (..., 17, 3) or (..., 12, 3), got {tuple(keypoints.shape)}")
    if keypoints.shape[-2] == 17:
        keypoints = keypoints[..., BODY_INDICES[0] :, :]
    xy = keypoints[..., :2]  # (..., 12, 2)
    vis = (keypoints[..., 2] >= min_score).to(xy.dtype)  # (..., 12)

    def both(a: int, b: int) -> torch.Tensor:
        return vis[..., a] * vis[..., b]

    # Torso: mean of visible shoulder-hip sides.
    side_l, side_r = _dist(xy, _LS, _LH), _dist(xy, _RS, _RH)
    m_l, m_r = both(_LS, _LH), both(_RS, _RH)
    n_sides = m_l + m_r
    torso = (side_l * m_l + side_r * m_r) / n_sides.clamp(min=1)
    torso_ok = (n_sides > 0) & (torso > eps)
    torso_safe = torch.where(torso_ok, torso, torch.ones_like(torso))

    # Mid-hip centre: mean of visible hips, else mean of visible shoulders, else mean of all visible points.
    def masked_mean(idx: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        w = vis[..., list(idx)]  # (..., k)
        s = (xy[..., list(idx), :] * w.unsqueeze(-1)).sum(-2)
        n = w.sum(-1, keepdim=True)
        return s / n.clamp(min=1), n.squeeze(-1) > 0

    hip_c, hip_ok = masked_mean((_LH, _RH))
    sh_c, sh_ok = masked_mean((_LS, _RS))
    all_c, _ = masked_mean(tuple(range(NUM_BODY)))
    centre = torch.where(hip_ok.unsqueeze(-1), hip_c, torch.where(sh_ok.unsqueeze(-1), sh_c, all_c))

    coords = (xy - centre.unsqueeze(-2)) / torso_safe[..., None, None]
    coords = coords * vis.unsqueeze(-1) * torso_ok[..., None, None].to(xy.dtype)

    props, masks = [], []
    for (la, lb), (ra, rb) in _LIMBS:
        ml, mr = both(la, lb), both(ra, rb)
        n = ml + mr
        length = (_dist(xy, la, lb) * ml + _dist(xy, ra, rb) * mr) / n.clamp(min=1)
        props.append(length)
        masks.append((n > 0).to(xy.dtype))
    for a, b in _WIDTHS:
        props.append(_dist(xy, a, b))
        masks.append(both(a, b))
    prop = torch.stack(props, -1) / torso_safe.unsqueeze(-1)
    mask = torch.stack(masks, -1) * torso_ok.unsqueeze(-1).to(xy.dtype)
    prop = prop * mask
    return BodyFeatures(
        coords=coords,
        visibility=vis,
        proportions=prop,
        proportions_mask=mask,
        torso_length=torso * torso_ok.to(xy.dtype),
    )


def visible_body_count(keypoints: torch.Tensor, min_score: float = 0.3) -> torch.Tensor:
    """Number of the 12 body keypoints scoring at least ``min_score``; ``(...,)``."""
    return (keypoints[..., BODY_INDICES[0] :, 2] >= min_score).sum(-1)


def face_box(keypoints: torch.Tensor, min_score: float = 0.3, scale: float = 2.2) -> tuple[float, ...] | None:
    """A square face box from the 5 COCO face keypoints of one person.

    The box is centred on the visible face points and its side is ``scale`` times their spread
    (at least the eye distance), so no separate face detector is needed.

    Args:
        keypoints: ``(17, 3)`` keypoints of one person in pixels.
        min_score: face points below this are ignored.
        scale: box side relative to the face-point extent.

    Returns:
        ``(x0, y0, x1, y1)`` in pixels, or ``None`` when fewer than 2 face points are visible
        (a face turned away or out of frame); callers drop the face condition then.
    """
    face = keypoints[list(FACE_INDICES)]
    ok = face[:, 2] >= min_score
    if int(ok.sum()) < 2:
        return None
    pts = face[ok, :2].float()
    centre = pts.mean(0)
    extent = float((pts.max(0).values - pts.min(0).values).max())
    # Ears widen the spread; a frontal face with only eyes+nose needs a floor from the shoulders.
    shoulders = keypoints[5:7]
    if bool((shoulders[:, 2] >= min_score).all()):
        extent = max(extent, 0.5 * float(torch.linalg.vector_norm(shoulders[0, :2] - shoulders[1, :2])))
    half = max(extent * scale / 2, 4.0)
    cx, cy = float(centre[0]), float(centre[1])
    return (cx - half, cy - half, cx + half, cy + half)
