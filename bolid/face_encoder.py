"""The face encoder: face box from the pose pass's 5 face keypoints -> CLIP image embedding -> face vector.

No face detector runs: the face box comes from the COCO face keypoints (nose, eyes, ears) of the same
pose pass that gives the body keypoints (:func:`bolid.body.face_box`). The crop is embedded by the
frozen EVA-CLIP tower (:class:`bolid.image_encoder.ClipImageEncoder`), and :class:`FaceEncoder` maps the
embedding through a small trainable residual MLP to the *face vector*. The vector is what diffusers calls
an ``ip_adapter_image_embeds`` entry; the face adapter's ``ImageProjection`` (owned by
:class:`bolid.adapter.BodyConditionModule`) turns it into tokens, as in IP-Adapter.

The MLP's last layer starts at zero, so an untrained face encoder passes the CLIP embedding through
unchanged: training starts from plain IP-Adapter behaviour.

A person whose face is not visible (fewer than 2 face keypoints above the score threshold) has no face
box; :func:`face_boxes` reports it in its ``visible`` mask and the face term is dropped for that sample.
"""

from __future__ import annotations

import torch
from torch import nn

from bolid.body import face_box


def face_boxes(keypoints: torch.Tensor, min_score: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Square face boxes for a batch of persons, from their face keypoints.

    Args:
        keypoints: ``(B, 17, 3)`` COCO keypoints ``(x, y, score)`` in pixels.
        min_score: face keypoints scoring below this are ignored.

    Returns:
        ``boxes`` ``(B, 4)`` xyxy in pixels (zeros where no face) and ``visible`` ``(B,)`` bool.
    """
    if keypoints.ndim != 3 or keypoints.shape[1:] != (17, 3):
        raise ValueError(f"keypoints must be (B, 17, 3), got {tuple(keypoints.shape)}")
    boxes = torch.zeros(keypoints.shape[0], 4, dtype=torch.float32)
    visible = torch.zeros(keypoints.shape[0], dtype=torch.bool)
    for i, kp in enumerate(keypoints.detach().float().cpu()):
        box = face_box(kp, min_score=min_score)
        if box is not None:
            boxes[i] = torch.tensor(box)
            visible[i] = True
    return boxes.to(keypoints.device), visible.to(keypoints.device)


class FaceEncoder(nn.Module):
    """Trainable head over the frozen CLIP face embedding: ``(B, embed_dim)`` -> ``(B, embed_dim)``.

    ``out = x + MLP(LayerNorm(x))`` with a zero-initialised last layer (identity at the start).

    Args:
        embed_dim: the image encoder's embedding width (also the face vector's width).
        hidden_dim: the MLP's hidden width.
    """

    def __init__(self, embed_dim: int, hidden_dim: int):
        super().__init__()
        if embed_dim < 1 or hidden_dim < 1:
            raise ValueError(f"embed_dim and hidden_dim must be >= 1, got {embed_dim} and {hidden_dim}")
        self.embed_dim = embed_dim
        self.mlp = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, embed_dim)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        x = clip_embeds.to(self.mlp[1].weight.dtype)
        return x + self.mlp(x)
