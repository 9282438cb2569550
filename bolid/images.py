"""Image loading that every BoLID stage shares: decode checks, EXIF orientation, RGB conversion.

One function, :func:`load_image`, turns a path, bytes or PIL image into an upright RGB
``PIL.Image``. Anything that is not a decodable image (a text file, a truncated JPEG, an
HTML error page saved as ``.jpg``) raises :class:`ImageError` naming the input, so callers
can count and skip it instead of crashing mid-run.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Refuse images with more pixels than this (decompression bombs), from the header, before any decode: 50 MP
#: (e.g. 8660 x 5773). The crawler (``max_image_pixels``) and the datapipe (``ingest.max_pixels``) default to it.
MAX_IMAGE_PIXELS = 50_000_000


class ImageError(ValueError):
    """An input that is not a usable image; the message names the input."""


class ImageTooLarge(ImageError):
    """An image whose header declares more pixels than allowed (a decompression bomb, or just too big)."""


def limit_pillow(max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Set Pillow's own bomb guard to ``max_pixels`` for this process.

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` and refuses to open above twice that; its default (~89 MP)
    would let an image between the cap and 179 MP decode in full if a caller skipped the header check.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels


def _name(src) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any mode to RGB: greyscale and CMYK are converted, alpha is composited on ``background``,
    16-bit and float greyscale is scaled to 8 bits (Pillow's own conversion would clip it at 255)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))  # mode L
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _transposed(img: Image.Image) -> bool:
    """Whether the image's EXIF orientation turns it by 90 degrees (width and height swap when shown)."""
    return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an open image as shown, after its EXIF orientation, from the header alone."""
    return (img.height, img.width) if _transposed(img) else img.size


def image_size(src: str | Path | bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the header alone (no pixel decode), after EXIF orientation.

    Args:
        src: a path or encoded bytes.
        max_pixels: raise :class:`ImageTooLarge` when the header declares more pixels (None: no cap).

    Raises:
        ImageTooLarge: more than ``max_pixels`` pixels, or more than Pillow agrees to open.
        ImageError: the header cannot be read.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as img:
                width, height = upright_size(img)
    except Image.DecompressionBombError as e:  # Pillow refuses to even open it: far too many pixels
        raise ImageTooLarge(f"{_name(src)}: too many pixels ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{_name(src)}: not a readable image ({e})") from None
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{_name(src)}: {width}x{height} exceeds {max_pixels} pixels")
    return width, height


def load_image(src: str | Path | bytes | Image.Image, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``src`` fully into an upright RGB image.

    Args:
        src: a path, encoded bytes, or an already open PIL image.
        draft: if given, let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while staying at least this
            ``(width, height)`` (Pillow's ``Image.draft``), which is much cheaper than a full decode.

    Raises:
        ImageError: not an image, truncated or corrupt, or larger than :data:`MAX_IMAGE_PIXELS`.
    """
    try:
        if isinstance(src, Image.Image):
            img = src
        else:
            img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src)
        if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
            raise ImageTooLarge(f"{_name(src)}: {img.size[0]}x{img.size[1]} exceeds {MAX_IMAGE_PIXELS} pixels")
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", (draft[1], draft[0]) if _transposed(img) else draft)
        img.load()  # full decode: raises on truncated data
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{_name(src)}: too many pixels ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{_name(src)}: not a readable image ({type(e).__name__}: {e})") from None
