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
import torch.nn.functional as F

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

    def __init__(self, model, processor, threshold: float = 0.05, batch_size: int = 32, device: str = "cpu"):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.net = DifferentiablePose(model, processor, beta=200.0).to(device)
        self.threshold, self.batch_size, self.device = threshold, batch_size, torch.device(device)

    @torch.inference_mode()
    def keypoints(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, 17, 3)`` keypoints in pixels.

        Decoded as ViTPose's own post-processing does: the heatmap's arg-max, refined to sub-pixel by the
        centroid of its 3x3 neighbourhood (a soft-argmax over the whole map, as the training loss needs, is
        pulled towards the background where a peak is weak).
        """
        net = self.net
        _, _, h, w = pixels.shape
        x = F.interpolate((pixels.to(self.device).float() + 1) / 2, size=net.input_hw, mode="bilinear",
                          align_corners=False, antialias=True)  # fmt: skip
        heat = net.model(pixel_values=(x - net.mean) / net.std).heatmaps.float()  # (B, 17, hm_h, hm_w)
        b, k, hm_h, hm_w = heat.shape
        peak, idx = heat.flatten(2).max(-1)
        iy, ix = (idx // hm_w).float(), (idx % hm_w).float()
        padded = F.pad(heat, (1, 1, 1, 1))
        win = padded.unfold(2, 3, 1).unfold(3, 3, 1)  # (B, K, hm_h, hm_w, 3, 3)
        win = win.reshape(b, k, hm_h * hm_w, 9).gather(2, idx[..., None, None].expand(b, k, 1, 9))[:, :, 0]
        win = win.clamp(min=0) + 1e-6
        offs = torch.tensor([-1.0, 0.0, 1.0], device=heat.device)
        dy = (win.view(b, k, 3, 3).sum(-1) * offs).sum(-1) / win.sum(-1)
        dx = (win.view(b, k, 3, 3).sum(-2) * offs).sum(-1) / win.sum(-1)
        px = (ix + dx + 0.5) * (w / hm_w)
        py = (iy + dy + 0.5) * (h / hm_h)
        return torch.stack([px, py, peak], -1).cpu()

    def __call__(self, images: Sequence) -> list[list[Person]]:
        ims = [load_image(im) for im in images]
        out: list[list[Person]] = []
        for start in range(0, len(ims), self.batch_size):
            batch = ims[start : start + self.batch_size]
            size = batch[0].size
            px = torch.stack([torch.from_numpy(np.array(im.resize(size) if im.size != size else im)) for im in batch])
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
