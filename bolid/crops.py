"""Face and person crops of a reference photo: the one function that training and inference share.

The face and body encoders see a reference only through two square crops, cut at the encoder's input size
(EVA-CLIP: 336 px) from the photo at the resolution that inference uses (longer side at most
:data:`MAX_REFERENCE_SIDE`): the face box from the 5 face keypoints (:func:`bolid.face_encoder.face_boxes`) and
the square person box (:func:`bolid.body_encoder.person_boxes`). Cropping from the full-resolution photo keeps a
face in a full-body shot sharp: a 1500 px tall person has a ~150 px face, which the encoder sees at about 2x;
cropped from a 512 px letterbox the same face is ~50 px, upsampled ~7x and blurred.

:func:`reference_crops` takes a PIL photo (the data loader's stored shard image, or a user's reference at
inference) and :func:`crop_reference` does the batched torch part for tensors already at that resolution
(:meth:`bolid.adapter.BodyConditionModule.encode`). Both end in :class:`ReferenceCrops`, which
:meth:`bolid.adapter.BodyConditionModule.encode_crops` turns into face and body vectors. The crops are cut with
torchvision's ``roi_align`` (antialiased), a few milliseconds per photo in a data-loader worker, much less than
decoding the JPEG, so they are not cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from bolid.body_encoder import keypoints_to_box, person_boxes
from bolid.face_encoder import face_boxes
from bolid.image_encoder import crop_boxes

#: References are scaled down to at most this many pixels on the longer side before cropping.
MAX_REFERENCE_SIDE = 2048


@dataclass
class ReferenceCrops:
    """What the face and body encoders see of a batch of references.

    Attributes:
        face: ``(B, 3, S, S)`` face crops in ``[0, 1]`` (black where no face is visible).
        person: ``(B, 3, S, S)`` square person crops in ``[0, 1]``, not yet keypoint-weighted.
        keypoints: ``(B, 17, 3)`` keypoints ``(x, y, score)`` in person-crop pixels.
        face_visible: ``(B,)`` bool, whether the face keypoints give a face box.
    """

    face: torch.Tensor
    person: torch.Tensor
    keypoints: torch.Tensor
    face_visible: torch.Tensor

    def to(self, device=None, dtype=None) -> ReferenceCrops:
        return ReferenceCrops(
            self.face.to(device, dtype),
            self.person.to(device, dtype),
            self.keypoints.to(device),
            self.face_visible.to(device),
        )

    @staticmethod
    def cat(items: list[ReferenceCrops]) -> ReferenceCrops:
        return ReferenceCrops(
            *(torch.cat([getattr(c, f) for c in items]) for f in ("face", "person", "keypoints", "face_visible"))
        )


def crop_reference(
    pixels: torch.Tensor,
    keypoints: torch.Tensor,
    boxes: torch.Tensor | None,
    size: int,
    min_score: float = 0.3,
) -> ReferenceCrops:
    """Face and person crops of a batch of references (see the module docstring).

    Args:
        pixels: ``(B, 3, H, W)`` images in ``[0, 1]``.
        keypoints: ``(B, 17, 3)`` COCO keypoints in pixels of ``pixels``.
        boxes: ``(B, 4)`` detector person boxes xyxy, or ``None`` for the visible keypoints' extent.
        size: crop side (the image encoder's input size).
        min_score: keypoints scoring below this are not visible.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3 or keypoints.shape != (pixels.shape[0], 17, 3):
        raise ValueError(
            f"expected pixels (B, 3, H, W) and keypoints (B, 17, 3), got {tuple(pixels.shape)} "
            f"and {tuple(keypoints.shape)}"
        )
    pixels, keypoints = pixels.float(), keypoints.float()
    fboxes, visible = face_boxes(keypoints, min_score)
    pboxes = person_boxes(keypoints, tuple(pixels.shape[-2:]), boxes, min_score=min_score)
    return ReferenceCrops(
        crop_boxes(pixels, fboxes, size),
        crop_boxes(pixels, pboxes, size),
        keypoints_to_box(keypoints, pboxes, size),
        visible,
    )


def reference_crops(
    image: Image.Image,
    keypoints: np.ndarray | torch.Tensor,
    box: np.ndarray | torch.Tensor | None,
    size: int,
    min_score: float = 0.3,
    max_side: int = MAX_REFERENCE_SIDE,
) -> ReferenceCrops:
    """Crops of one reference photo (batch of 1), with ``keypoints (17, 3)`` and ``box (4,)`` in its pixels.

    The photo is scaled down (Lanczos) to at most ``max_side`` on the longer side, as at inference, keypoints and
    box with it, then cut by :func:`crop_reference`.
    """
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    kp = torch.as_tensor(np.asarray(keypoints, dtype=np.float32)).clone()[None]
    kp[..., :2] *= scale
    b = None if box is None else torch.as_tensor(np.asarray(box, dtype=np.float32))[None] * scale
    return crop_reference(pixels, kp, b, size, min_score)
