"""Full-frame keypoints for BoLID-mini's one-person renders.

The mini world has exactly one person per image, so instead of a person detector the whole frame is
the box: the ViTPose input is the full image (the same preprocessing as the ID loss's
:class:`bolid.losses.DifferentiablePose`), keypoints come from the heatmaps' soft-argmax, and the
person box is the extent of the confident keypoints (as BlazePose derives its box from landmarks).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bolid.images import load_image
from bolid.losses import DifferentiablePose
from bolid.pose import Person, PoseExtractor


class FullFramePoseExtractor(PoseExtractor):
    """One person per image from a full-frame ViTPose.

    Args:
        model: ``VitPoseForPoseEstimation`` (trained on full frames).
        processor: its ``VitPoseImageProcessor`` (input size, mean, std).
        threshold: minimum mean confidence of the 12 body keypoints for a person to be reported.
        batch_size: images per forward pass.
        device: where the model runs.
    """

    def __init__(self, model, processor, threshold: float = 0.2, batch_size: int = 32, device: str = "cpu"):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.net = DifferentiablePose(model, processor, beta=200.0).to(device)
        self.threshold, self.batch_size, self.device = threshold, batch_size, torch.device(device)

    @torch.inference_mode()
    def keypoints(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, 17, 3)`` keypoints in pixels."""
        return self.net(pixels.to(self.device)).cpu()

    def __call__(self, images: Sequence) -> list[list[Person]]:
        ims = [load_image(im) for im in images]
        out: list[list[Person]] = []
        for start in range(0, len(ims), self.batch_size):
            batch = ims[start : start + self.batch_size]
            size = batch[0].size
            px = torch.stack([torch.from_numpy(np.asarray(im.resize(size) if im.size != size else im)) for im in batch])
            px = px.permute(0, 3, 1, 2).float() / 127.5 - 1
            kps = self.keypoints(px).numpy()
            for im, kp in zip(batch, kps, strict=True):
                kp[:, 0] *= im.width / size[0]
                kp[:, 1] *= im.height / size[1]
                score = float(kp[5:, 2].mean())
                if score < self.threshold:
                    out.append([])
                    continue
                lo, hi = kp[:, :2].min(0), kp[:, :2].max(0)
                pad = 0.1 * (hi - lo)
                box = np.concatenate([np.maximum(lo - pad, 0), np.minimum(hi + pad, [im.width, im.height])])
                out.append([Person(box.astype(np.float32), score, kp.astype(np.float32))])
        return out
