"""The CPU path from a source photo to the JPEG stored in a shard: decode, resize, encode.

A stored image keeps its aspect ratio and has its short side scaled down to at most
``resolution`` (never up). To keep this cheap, the JPEG is decoded with Pillow's
``Image.draft``: libjpeg then scales by 1/2, 1/4 or 1/8 inside the inverse DCT, staying at
or above the target size, so a 12 MP photo is decoded at 3 MP for about a third of the
cost. Only the remaining factor (less than 2) is resampled, by default with Pillow's
antialiased bilinear (triangle) filter, which is within ~48 dB PSNR of a full-size
LANCZOS resize and costs a third of it. EXIF orientation is applied and every mode is
converted to RGB (:func:`bolid.images.load_image`), so stored images are upright RGB
and the keypoints measured on them need no further transform.

Models see exactly the stored pixels: every stage decodes the stored JPEG bytes
(:func:`decode_stored`), never the original, so a resumed run reproduces a clean one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bolid.images import ImageError, load_image, upright_size

#: ``shards.resample`` names -> Pillow filters (all antialiased when downscaling).
RESAMPLE = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class StoredImage:
    """A re-encoded image and its sizes (all upright, after EXIF orientation)."""

    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def stored_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Size with the short side scaled down to ``resolution`` (aspect kept), or unchanged if already smaller."""
    short = min(width, height)
    if short <= resolution:
        return width, height
    scale = resolution / short
    if width <= height:
        return resolution, max(1, round(height * scale))
    return max(1, round(width * scale)), resolution


def resize_for_storage(img: Image.Image, resolution: int, resample: str = "bilinear") -> Image.Image:
    """Decode an open image (ideally still lazy, so the JPEG draft applies) to upright RGB at its stored size.

    Raises:
        bolid.images.ImageError: the image cannot be decoded (truncated, corrupt).
    """
    try:
        size = upright_size(img)
    except (OSError, SyntaxError, ValueError) as e:  # a malformed EXIF block
        raise ImageError(f"unreadable EXIF ({type(e).__name__}: {e})") from None
    tw, th = stored_size(*size, resolution)
    rgb = load_image(img, draft=(tw, th) if (tw, th) != size else None)
    if rgb.size != (tw, th):
        rgb = rgb.resize((tw, th), RESAMPLE[resample])
    return rgb


def encode_jpeg(rgb: Image.Image, quality: int = 95) -> bytes:
    """Baseline JPEG bytes of an RGB image (Pillow's defaults otherwise: 4:2:0, no EXIF)."""
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def encode_stored(img: Image.Image, resolution: int, quality: int = 95, resample: str = "bilinear") -> StoredImage:
    """:func:`resize_for_storage` then :func:`encode_jpeg`.

    Args:
        img: the source, as returned by ``Image.open`` (lazy) or any PIL image.
        resolution: maximum short side of the result.
        quality: JPEG quality of the result.
        resample: one of :data:`RESAMPLE`.
    """
    w, h = upright_size(img)  # before the decode: a JPEG draft shrinks img.size
    rgb = resize_for_storage(img, resolution, resample)
    return StoredImage(encode_jpeg(rgb, quality), rgb.width, rgb.height, w, h)


def encode_stored_file(
    src: str | Path | bytes, resolution: int, quality: int = 95, resample: str = "bilinear"
) -> StoredImage:
    """:func:`encode_stored` for a path or encoded bytes."""
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{src if isinstance(src, (str, Path)) else '<bytes>'}: not a readable image ({e})") from None
    with img:
        return encode_stored(img, resolution, quality, resample)


def decode_stored(data: bytes, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode a stored JPEG to RGB; ``min_size`` lets the decoder scale down (draft) while staying at least that big."""
    img = Image.open(io.BytesIO(data))
    if min_size is not None:
        img.draft("RGB", min_size)
    return img.convert("RGB")
