"""IdentityEmbeds: the face and body vectors of a batch of references, as diffusers' ``ip_adapter_image_embeds``.

:meth:`bolid.adapter.BodyConditionModule.encode` produces them (with gradients into the trainable heads);
:meth:`IdentityEmbeds.image_embeds` lays them out as stock diffusers expects (one ``(B, 1, D)`` tensor per
adapter, negatives first under classifier-free guidance); :meth:`IdentityEmbeds.mean` combines several
references of one person. They save to and load from a small safetensors file, so that a stock diffusers
pipeline with the exported adapters can reuse what ``bolid generate`` computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class IdentityEmbeds:
    """Face and body vectors of a batch of references: diffusers' ``ip_adapter_image_embeds``, one per adapter.

    ``face`` ``(B, D_face)`` (zero rows where the face is not visible), ``body`` ``(B, D_body)`` and
    ``face_visible`` ``(B,)`` bool.
    """

    face: torch.Tensor
    body: torch.Tensor
    face_visible: torch.Tensor

    def __post_init__(self):
        n = self.face.shape[0]
        if self.face.ndim != 2 or self.body.ndim != 2 or self.body.shape[0] != n or self.face_visible.shape != (n,):
            raise ValueError(
                f"IdentityEmbeds needs face (B, D), body (B, D) and face_visible (B,), got "
                f"{tuple(self.face.shape)}, {tuple(self.body.shape)}, {tuple(self.face_visible.shape)}"
            )

    def __len__(self) -> int:
        return self.face.shape[0]

    def mean(self) -> IdentityEmbeds:
        """Combine several references of one person into one: the mean of their vectors, per modality.

        The face vector is the mean over the references whose face is visible (absent if none is); the body
        vector is the mean over all references. Returns a batch of one.
        """
        vis = self.face_visible.to(self.face.dtype)[:, None]  # (B, 1)
        n = vis.sum()
        face = (self.face * vis).sum(0, keepdim=True) / n.clamp(min=1)
        return IdentityEmbeds(face, self.body.mean(0, keepdim=True), (n > 0).reshape(1))

    def negative(self) -> IdentityEmbeds:
        """The classifier-free-guidance negative: zero vectors, the same face masks (as :meth:`image_embeds` uses)."""
        return IdentityEmbeds(torch.zeros_like(self.face), torch.zeros_like(self.body), self.face_visible)

    def repeat(self, n: int) -> IdentityEmbeds:
        """Repeat every row ``n`` times (batch ``B * n``, rows of one reference adjacent)."""
        return IdentityEmbeds(
            self.face.repeat_interleave(n, 0),
            self.body.repeat_interleave(n, 0),
            self.face_visible.repeat_interleave(n, 0),
        )

    def to(self, device=None, dtype=None) -> IdentityEmbeds:
        return IdentityEmbeds(
            self.face.to(device=device, dtype=dtype),
            self.body.to(device=device, dtype=dtype),
            self.face_visible.to(device),
        )

    def image_embeds(self, do_classifier_free_guidance: bool = False) -> list[torch.Tensor]:
        """``[face (B, 1, D_face), body (B, 1, D_body)]``, the layout of diffusers' ``ip_adapter_image_embeds``.

        With classifier-free guidance the negative (zero) embeddings come first, concatenated on dim 0, as
        diffusers' ``prepare_ip_adapter_image_embeds`` expects.
        """
        out = []
        for x in (self.face, self.body):
            x = x[:, None]  # (B, 1 image, D)
            out.append(torch.cat([torch.zeros_like(x), x]) if do_classifier_free_guidance else x)
        return out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"face": self.face, "body": self.body, "face_visible": self.face_visible.to(torch.uint8)}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> IdentityEmbeds:
        from safetensors.torch import load_file

        t = load_file(str(path))
        missing = {"face", "body", "face_visible"} - set(t)
        if missing:
            raise ValueError(f"{path}: not a BoLID embeddings file (missing {sorted(missing)})")
        return cls(t["face"], t["body"], t["face_visible"].bool())
