"""Pictures for the app: what BoLID reads in a reference (box, 17 keypoints, face box) and the body-shape chart.

:func:`draw_reference` draws, on a copy of the photo scaled to at most ``max_side`` pixels, the person box
the pose model chose (green), the COCO-17 skeleton (yellow lines, red body points, cyan face points; only
points at or above the visibility score that :func:`bolid.body.body_features` uses) and the face box that
:meth:`bolid.pose.Person.face_box` derives from the face points (orange). :func:`shape_rows` gives each
reference's six pose-invariant proportions (:data:`bolid.body.PROPORTION_NAMES`) and their z-scores
against the population statistics of Body Sim (:data:`bolid.metrics.BODY_STATS_MEAN` / ``_STD``): the
shape vector Body Sim compares. :func:`shape_chart` draws the proportions beside the average body.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from bolid.body import FACE_INDICES, PROPORTION_NAMES, body_features
from bolid.metrics import BODY_STATS_MEAN, BODY_STATS_STD
from bolid.reference import Reference

#: COCO-17 skeleton edges (face, arms, torso, legs).
SKELETON = (
    (0, 1), (0, 2), (1, 3), (2, 4),
    (5, 7), (7, 9), (6, 8), (8, 10),
    (5, 6), (11, 12), (5, 11), (6, 12),
    (11, 13), (13, 15), (12, 14), (14, 16),
)  # fmt: skip
#: Keypoints scoring below this are not drawn (the visibility threshold of :func:`bolid.body.body_features`).
MIN_SCORE = 0.3
BOX_COLOUR = (0, 200, 0)
FACE_BOX_COLOUR = (255, 150, 0)
LINE_COLOUR = (255, 230, 0)
BODY_POINT_COLOUR = (255, 30, 30)
FACE_POINT_COLOUR = (0, 220, 255)


def draw_reference(ref: Reference, max_side: int = 768, min_score: float = MIN_SCORE) -> Image.Image:
    """The reference photo (scaled to at most ``max_side`` px) with its person box, keypoints and face box."""
    scale = min(1.0, max_side / max(ref.image.size))
    image = ref.image
    if scale < 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    image = image.copy()
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 200))
    radius = width + 2
    box = [float(v) * scale for v in ref.person.box]
    draw.rectangle(box, outline=BOX_COLOUR, width=width)
    face = ref.person.face_box()
    if face is not None:
        draw.rectangle([v * scale for v in face], outline=FACE_BOX_COLOUR, width=width)
    kp = ref.person.keypoints
    visible = kp[:, 2] >= min_score
    for a, b in SKELETON:
        if visible[a] and visible[b]:
            draw.line([tuple(kp[a, :2] * scale), tuple(kp[b, :2] * scale)], fill=LINE_COLOUR, width=width)
    for i, (x, y, _) in enumerate(kp):
        if visible[i]:
            colour = FACE_POINT_COLOUR if i in FACE_INDICES else BODY_POINT_COLOUR
            x, y = x * scale, y * scale
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return image


def shape_rows(refs: list[Reference], min_score: float = MIN_SCORE) -> list[dict]:
    """Per reference: ``name``, ``proportions`` and ``z`` (each 6 floats, NaN where the proportion is not visible)."""
    if not refs:
        return []
    kp = torch.from_numpy(np.stack([r.person.keypoints for r in refs]).astype(np.float64))
    feats = body_features(kp, min_score=min_score)
    props = torch.where(feats.proportions_mask > 0, feats.proportions, torch.full_like(feats.proportions, math.nan))
    mean = torch.tensor(BODY_STATS_MEAN, dtype=torch.float64)
    std = torch.tensor(BODY_STATS_STD, dtype=torch.float64)
    z = (props - mean) / std
    return [{"name": r.name, "proportions": props[i].tolist(), "z": z[i].tolist()} for i, r in enumerate(refs)]


def shape_chart(rows: list[dict]) -> Figure | None:
    """Bars of each reference's proportions beside the average body (mean +- 1 sd); ``None`` without rows."""
    if not rows:
        return None
    fig = Figure(figsize=(6.4, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(PROPORTION_NAMES))
    width = 0.8 / (len(rows) + 1)
    ax.bar(x - 0.4 + width / 2, BODY_STATS_MEAN, width, yerr=BODY_STATS_STD, color="#bbbbbb", label="average body")
    for i, row in enumerate(rows):
        props = np.asarray(row["proportions"], dtype=float)
        bars = ax.bar(x - 0.4 + (i + 1.5) * width, np.nan_to_num(props), width, label=row["name"][:28])
        for bar, value in zip(bars, props, strict=True):
            if math.isnan(value):
                ax.annotate("n/a", (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [n.replace("_", " ") for n in PROPORTION_NAMES], fontsize=8)
    ax.set_ylabel("length / torso length", fontsize=8)
    ax.set_title("Body proportions: what Body Sim compares (z-scored against the average body)", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=7, loc="upper right")
    return fig
