"""BoLID-mini's captioner: the mini CLIP picks the best caption of the world's grammar for each image.

BLIP-2 is far beyond a CPU budget, so the mini kit captions zero-shot, as CLIP does classification: every
caption the world can produce (scene x shirt colour x trouser colour) is embedded once by the trained mini
CLIP, and each image gets the one closest to it. Like any captioner it can be wrong; the datapipe stores
what it says.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from bolid.mini.world import COLOURS, SCENES, Photo


def world_captions() -> list[str]:
    """Every caption the world's renders can carry."""
    return [
        Photo(scene, shirt, trousers, 0.0, (0.0,) * 4, (0.0,) * 4, 0.0, 0.0).caption
        for scene, shirt, trousers in itertools.product(SCENES, COLOURS, COLOURS)
    ]


class ZeroShotCaptioner:
    """Caption images with a transformers ``CLIPModel`` by picking the closest of ``captions``.

    Args:
        model: ``CLIPModel``.
        processor: its ``CLIPProcessor``.
        captions: the candidate captions (default: :func:`world_captions`).
    """

    def __init__(self, model, processor, captions: Sequence[str] | None = None, device: str = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.processor = processor
        self.captions = list(captions or world_captions())
        self.device = torch.device(device)
        with torch.inference_mode():
            tok = processor.tokenizer(self.captions, padding=True, return_tensors="pt").to(self.device)
            text = self.model.get_text_features(**tok)
            text = getattr(text, "pooler_output", text)
        self.text = F.normalize(text, dim=-1)

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        feats = self.model.get_image_features(pixel_values=pixels.to(self.device))
        feats = F.normalize(getattr(feats, "pooler_output", feats), dim=-1)
        best = (feats @ self.text.T).argmax(-1)
        return [self.captions[int(i)] for i in best]
