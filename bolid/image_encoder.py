"""The frozen image encoder BoLID's face and body encoders share, and batched box cropping.

:class:`ClipImageEncoder` wraps the visual tower of an open_clip model (EVA-CLIP ``EVA02-L-14-336`` by
default, as in PuLID; the tiny kit's ``BoLID-EVA02-Tiny`` in tests) and does its preprocessing in torch,
so that the same code path serves batched training tensors on the GPU and single reference photos at
inference. Its weights are frozen and never saved with the adapter.

:func:`crop_boxes` cuts square boxes out of a batch of images and resizes them in one call with
torchvision's ``roi_align`` (bilinear, with adaptive sampling that averages several samples per output
pixel, i.e. antialiased down-scaling). Parts of a box outside the image come out black, as
``PIL.Image.crop`` pads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def crop_boxes(pixels: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop one box per image and resize it to ``size`` x ``size``.

    Args:
        pixels: ``(B, C, H, W)`` images.
        boxes: ``(B, 4)`` boxes ``x0, y0, x1, y1`` in pixel coordinates of ``pixels`` (continuous: pixel
            ``i`` spans ``[i, i + 1)``); may extend beyond the image.
        size: output side in pixels.

    Returns:
        ``(B, C, size, size)`` crops, zero outside the image.
    """
    from torchvision.ops import roi_align

    if pixels.ndim != 4 or boxes.shape != (pixels.shape[0], 4):
        raise ValueError(
            f"expected pixels (B, C, H, W) and boxes (B, 4), got {tuple(pixels.shape)} and {tuple(boxes.shape)}"
        )
    index = torch.arange(pixels.shape[0], device=pixels.device, dtype=pixels.dtype)[:, None]
    rois = torch.cat([index, boxes.to(pixels)], dim=1)  # (B, 5): batch index, x0, y0, x1, y1
    return roi_align(pixels, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


class ClipImageEncoder(nn.Module):
    """A frozen open_clip image tower: ``(B, 3, H, W)`` pixels in ``[0, 1]`` -> ``(B, embed_dim)`` embeddings.

    The output is open_clip's ``encode_image`` (the projected, un-normalised image embedding, as
    diffusers' ``CLIPVisionModelWithProjection.image_embeds`` that IP-Adapter feeds its projection).

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` model, e.g. from
            ``bolid.components.load("eva_clip", kit)``. Only its visual tower is kept.
        name: the open_clip architecture name, recorded in adapter files so that loading can check it.
    """

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.visual = model.visual
        self.name = name
        size = self.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = getattr(self.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(self.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()
        param = next(self.visual.parameters())
        with torch.no_grad():  # the embedding width, from one probe on the tower's own device (meta works too)
            probe = torch.zeros(1, 3, self.image_size, self.image_size, device=param.device, dtype=param.dtype)
            self.embed_dim = int(self.visual(probe).shape[-1])

    @classmethod
    def from_components(cls, kind: str = "real", source: str | None = None, pretrained: str | None = None):
        """EVA-CLIP from a components kit (``real``, ``tiny``, ...; see :func:`bolid.components.load`)."""
        from bolid import components

        model, _, _, name = components.load("eva_clip", kind, source, pretrained=pretrained)
        return cls(model, name)

    def train(self, mode: bool = True) -> ClipImageEncoder:
        return super().train(False)  # always frozen: keep dropout / norm statistics in eval mode

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed images with values in ``[0, 1]``; resized (bicubic) if they are not ``image_size`` square."""
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(pixels, size=(self.image_size,) * 2, mode="bicubic", antialias=True)
        pixels = (pixels.to(self.mean.dtype) - self.mean) / self.std
        dtype = next(self.visual.parameters()).dtype
        return self.visual(pixels.to(dtype))
