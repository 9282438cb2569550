"""The mini kit's person "detector": one person per render, so the box is the frame.

:class:`bolid.pose.VitPoseExtractor` runs unchanged on it (top-down: boxes, then ViTPose in each). The
box is the frame shrunk by ViTPose's own padding factor (1.25, ``VitPoseImageProcessor``), so that the
processor's padded crop is exactly the full frame: the input the mini keypoint models were trained on, and
the one the ID loss's :class:`bolid.losses.DifferentiablePose` gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: ViTPose's processor grows every box by this factor (``box_to_center_and_scale(padding_factor=1.25)``).
VITPOSE_PADDING = 1.25


@dataclass
class FullFrameOutput:
    """What :class:`FullFrameDetector` returns: only the batch size matters."""

    batch: int


class FullFrameDetector(nn.Module):
    """A parameter-free stand-in for RT-DETR that reports one person per image (label 0, score 1)."""

    def forward(self, pixel_values: torch.Tensor) -> FullFrameOutput:
        return FullFrameOutput(pixel_values.shape[0])


class FullFrameDetectorProcessor:
    """The matching processor: ``__call__`` and ``post_process_object_detection`` as transformers' have them."""

    def __call__(self, images, return_tensors: str = "pt") -> dict:
        return {"pixel_values": torch.zeros(len(images), 1, 1, 1)}

    def post_process_object_detection(self, outputs: FullFrameOutput, target_sizes, threshold: float = 0.5):
        results = []
        for h, w in torch.as_tensor(target_sizes).tolist():
            mx, my = w * (1 - 1 / VITPOSE_PADDING) / 2, h * (1 - 1 / VITPOSE_PADDING) / 2
            box = torch.tensor([[mx, my, w - mx, h - my]], dtype=torch.float32)
            keep = 1.0 >= threshold
            results.append({
                "scores": torch.ones(int(keep)), "labels": torch.zeros(int(keep), dtype=torch.long),
                "boxes": box[: int(keep)],
            })  # fmt: skip
        return results
