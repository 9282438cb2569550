"""Optional on-disk cache of the frozen encoders' outputs for stage 1: VAE latent distributions and text embeddings.

Stage 1 spends much of each step in the frozen VAE encoder and the two text encoders, whose outputs
depend only on the input. With ``model.cache_dir`` set, the module stores

* for a target crop: the VAE's latent *distribution* (mean and log-variance, so a fresh latent is still
  sampled every step), keyed by the sample key, the crop (``time_ids``) and the flip;
* for a caption: SDXL's prompt embeddings and pooled embedding, keyed by the caption's SHA-256.

Entries live under ``<cache_dir>/<fingerprint>/``, where the fingerprint names the components (a cache
made with other weights or resolution is never read), and are written atomically (temporary name, then
rename), so a killed run leaves no torn entry. Random crops and flips give a new key per epoch and so
few hits: use ``data.random_crop: false`` with the cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from bolid.files import atomic_write


class EncodingCache:
    """Latent distributions and text embeddings on disk, one small safetensors file per entry.

    Args:
        root: cache folder.
        fingerprint: what the cached values depend on (component ids, resolution); becomes a sub-folder.
    """

    def __init__(self, root: str | Path, fingerprint: str):
        digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self.root = Path(root) / digest
        (self.root / "latents").mkdir(parents=True, exist_ok=True)
        (self.root / "text").mkdir(parents=True, exist_ok=True)
        (self.root / "fingerprint.txt").write_text(fingerprint + "\n", encoding="utf-8")
        self.hits = self.misses = 0

    @staticmethod
    def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        data = save({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in tensors.items()})
        atomic_write(path, data, fsync=False)

    def _latent_path(self, key: str, time_ids: torch.Tensor, flip: bool) -> Path:
        crop = "-".join(str(int(v)) for v in time_ids.tolist())
        return self.root / "latents" / f"{key}_{crop}{'_flip' if flip else ''}.safetensors"

    def _text_path(self, caption: str) -> Path:
        return self.root / "text" / f"{hashlib.sha256(caption.encode()).hexdigest()[:32]}.safetensors"

    def get_latents(self, key: str, time_ids: torch.Tensor, flip: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(mean, logvar)`` of one crop's latent distribution, or ``None``."""
        path = self._latent_path(key, time_ids, flip)
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        t = load_file(str(path))
        return t["mean"], t["logvar"]

    def put_latents(
        self, key: str, time_ids: torch.Tensor, flip: bool, mean: torch.Tensor, logvar: torch.Tensor
    ) -> None:
        self._write(self._latent_path(key, time_ids, flip), {"mean": mean, "logvar": logvar})

    def get_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(prompt_embeds, pooled)`` of one caption, or ``None``."""
        path = self._text_path(caption)
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        t = load_file(str(path))
        return t["embeds"], t["pooled"]

    def put_text(self, caption: str, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        self._write(self._text_path(caption), {"embeds": embeds, "pooled": pooled})
