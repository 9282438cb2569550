"""Synthetic photo-like JPEGs for tests and benchmarks, generated from a seed.

Random pixels are a poor stand-in for photographs: they compress badly and every copy looks
alike to a perceptual hash. These images are built like a photo instead: a smooth colour
field, a lighting gradient, a few solid shapes, mid-frequency texture and sensor noise. So
their JPEG size and decode cost are close to a real photo's of the same size, and images
from different seeds are far apart in perceptual hash while a re-encoded or resized copy
stays close. ``figures`` draws simple standing human silhouettes (head, torso, limbs).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def synthetic_photo(width: int, height: int, seed: int, figures: int = 0, noise: float = 5.0) -> Image.Image:
    """An RGB image of ``width`` x ``height`` px, deterministic in ``seed``.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        seed: random seed; different seeds give visually unrelated images.
        figures: number of standing human silhouettes drawn side by side.
        noise: standard deviation of the per-pixel sensor noise (0-255 scale).
    """
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (4 + seed % 3, 5 + seed % 4, 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1 + 1, y1 + 1], fill=fill)
    for i in range(figures):
        _figure(draw, (i + 0.5) * width / figures, height, min(width / figures, height) * 0.9, rng)
    img = img.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 800))
    arr = np.asarray(img, dtype=np.float32)
    tw, th = max(width // 8, 1), max(height // 8, 1)
    texture = rng.normal(0, 12, (th, tw, 1)).astype(np.float32)
    texture = np.asarray(Image.fromarray(texture[..., 0], mode="F").resize((width, height), Image.Resampling.BILINEAR))
    ramp = np.linspace(-25, 25, width, dtype=np.float32)[None, :, None] * (1 if seed % 2 else -1)
    arr = arr + texture[..., None] + ramp + rng.normal(0, noise, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _figure(draw: ImageDraw.ImageDraw, cx: float, height: int, size: float, rng: np.random.Generator) -> None:
    """A standing person seen from the front, ``size`` px tall, feet near the bottom edge."""
    top = height - size * 1.02
    u = size / 8  # head height
    skin = tuple(int(v) for v in rng.integers(150, 230, 3))
    cloth = tuple(int(v) for v in rng.integers(0, 256, 3))
    w = max(int(u * 0.5), 1)
    draw.ellipse([cx - u * 0.4, top, cx + u * 0.4, top + u], fill=skin)
    draw.rectangle([cx - u, top + u * 1.2, cx + u, top + u * 4], fill=cloth)
    for side in (-1, 1):
        draw.line([cx + side * u, top + u * 1.4, cx + side * u * 1.6, top + u * 4], fill=cloth, width=w)
        draw.line([cx + side * u * 0.5, top + u * 4, cx + side * u * 0.7, top + u * 8], fill=cloth, width=w)


def jpeg_bytes(img: Image.Image, quality: int = 90, **save_args) -> bytes:
    """Encode ``img`` as JPEG in memory."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **save_args)
    return buf.getvalue()
