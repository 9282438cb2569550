"""Synthetic "identities" for the demo: drawn people whose body proportions differ from person to person.

Each :class:`Build` fixes a person: limb lengths relative to the torso, shoulder and hip width, head
size, skin and clothing colours. :func:`render` draws that person in a new pose (arm and leg angles,
position, scale, facing) over a photo-like background, so that one identity is seen in many poses
while its proportions stay the same: the property BoLID's pose-invariant body features measure.
:func:`skeleton` returns the 17 COCO keypoints of what was drawn, so the drawings can be checked
against :mod:`bolid.body`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class Build:
    """A person's proportions (lengths relative to the torso, shoulder-to-hip) and colours."""

    name: str
    upper_arm: float
    forearm: float
    thigh: float
    shin: float
    shoulder_width: float
    hip_width: float
    head: float
    skin: tuple[int, int, int]
    top: tuple[int, int, int]
    bottom: tuple[int, int, int]

    def proportions(self) -> np.ndarray:
        """The six ratios in :data:`bolid.body.PROPORTION_NAMES` order."""
        return np.array([self.upper_arm, self.forearm, self.thigh, self.shin, self.shoulder_width, self.hip_width])


#: Five demo people with clearly different builds.
BUILDS = (
    Build("Ada Long", 0.62, 0.55, 0.95, 0.92, 0.70, 0.48, 0.36, (224, 186, 160), (200, 40, 40), (40, 40, 90)),
    Build("Boris Broad", 0.55, 0.48, 0.72, 0.70, 1.05, 0.80, 0.40, (198, 150, 120), (30, 110, 60), (60, 50, 40)),
    Build("Cleo Petite", 0.48, 0.42, 0.66, 0.64, 0.62, 0.55, 0.46, (150, 105, 80), (230, 190, 40), (200, 200, 210)),
    Build("Dan Lanky", 0.72, 0.66, 1.02, 1.00, 0.60, 0.42, 0.33, (236, 204, 180), (40, 90, 200), (20, 20, 20)),
    Build("Eva Athletic", 0.58, 0.52, 0.84, 0.82, 0.88, 0.62, 0.38, (120, 85, 60), (150, 60, 170), (90, 90, 90)),
)


def skeleton(build: Build, rng: random.Random, size: tuple[int, int]) -> np.ndarray:
    """COCO-17 keypoints ``(17, 3)`` of ``build`` in a random pose that fits in an image of ``size``."""
    w, h = size
    total = 1.0 + build.head * 1.3 + build.thigh + build.shin  # height in torso units
    torso = rng.uniform(0.55, 0.8) * h / total
    cx = rng.uniform(0.35, 0.65) * w
    top = rng.uniform(0.04, 0.1) * h
    neck_y = top + build.head * 1.3 * torso
    hip_y = neck_y + torso
    sw, hw = build.shoulder_width * torso / 2, build.hip_width * torso / 2
    kp = np.zeros((17, 3), np.float32)
    kp[:, 2] = 1.0
    ls, rs = (cx + sw, neck_y), (cx - sw, neck_y)  # the person's left is on the image's right (facing us)
    lh, rh = (cx + hw, hip_y), (cx - hw, hip_y)

    def limb(start, length_a, length_b, angle_a, angle_b):
        a = (start[0] + length_a * math.sin(angle_a), start[1] + length_a * math.cos(angle_a))
        b = (a[0] + length_b * math.sin(angle_b), a[1] + length_b * math.cos(angle_b))
        return a, b

    for side, shoulder, hip in ((1, ls, lh), (-1, rs, rh)):
        arm = rng.uniform(0.1, 1.4)
        elbow, wrist = limb(shoulder, build.upper_arm * torso, build.forearm * torso,
                            side * arm, side * (arm + rng.uniform(-0.6, 0.9)))  # fmt: skip
        leg = rng.uniform(0.0, 0.35)
        knee, ankle = limb(hip, build.thigh * torso, build.shin * torso, side * leg, side * leg * rng.uniform(0, 1))
        i = 0 if side == 1 else 1
        kp[5 + i, :2], kp[7 + i, :2], kp[9 + i, :2] = shoulder, elbow, wrist
        kp[11 + i, :2], kp[13 + i, :2], kp[15 + i, :2] = hip, knee, ankle
    head_r = build.head * torso / 2
    hx, hy = cx, top + head_r
    kp[0, :2] = (hx, hy + head_r * 0.1)
    kp[1, :2], kp[2, :2] = (hx + head_r * 0.35, hy - head_r * 0.15), (hx - head_r * 0.35, hy - head_r * 0.15)
    kp[3, :2], kp[4, :2] = (hx + head_r * 0.9, hy), (hx - head_r * 0.9, hy)
    if rng.random() < 0.5:  # mirror: the same person, turned
        kp[:, 0] = w - kp[:, 0]
        kp = kp[[0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]]
    return kp


def render(build: Build, seed: int, size: tuple[int, int] = (1024, 1024)) -> tuple[Image.Image, np.ndarray]:
    """One photo of ``build``: ``(image, keypoints (17, 3))``, deterministic in ``seed``."""
    from demo.synthetic import synthetic_photo

    rng = random.Random(seed)
    kp = skeleton(build, rng, size)
    img = synthetic_photo(size[0] // 4, size[1] // 4, seed=seed, noise=2.0).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    torso = float(np.linalg.norm((kp[5, :2] + kp[6, :2]) / 2 - (kp[11, :2] + kp[12, :2]) / 2))
    limb_w = max(int(torso * 0.14), 3)
    pt = lambda i: (float(kp[i, 0]), float(kp[i, 1]))  # noqa: E731
    for a, b in ((11, 13), (13, 15), (12, 14), (14, 16)):
        draw.line([pt(a), pt(b)], fill=build.bottom, width=int(limb_w * 1.3))
    draw.polygon([pt(5), pt(6), pt(12), pt(11)], fill=build.top)
    for a, b in ((5, 7), (6, 8)):
        draw.line([pt(a), pt(b)], fill=build.top, width=limb_w)
    for a, b in ((7, 9), (8, 10)):
        draw.line([pt(a), pt(b)], fill=build.skin, width=int(limb_w * 0.8))
    r = build.head * torso / 2
    hx, hy = (kp[3, 0] + kp[4, 0]) / 2, (kp[1, 1] + kp[0, 1]) / 2
    draw.ellipse([hx - r * 0.8, hy - r, hx + r * 0.8, hy + r], fill=build.skin)
    for i in (1, 2):
        draw.ellipse(
            [kp[i, 0] - r * 0.08, kp[i, 1] - r * 0.08, kp[i, 0] + r * 0.08, kp[i, 1] + r * 0.08], fill=(20, 20, 20)
        )
    return img.filter(ImageFilter.GaussianBlur(0.8)), kp


def slug(build: Build) -> str:
    return build.name.lower().replace(" ", "_")
