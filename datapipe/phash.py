"""Perceptual hash (pHash) for near-duplicate detection, in numpy.

The hash follows the common DCT pHash construction (as in Zauner's thesis and the
``imagehash`` package): shrink the greyscale image to 32x32, take its 2D DCT, keep the
8x8 lowest frequencies, and set one bit per coefficient that lies above their median (the
DC term excluded from the median). Re-encoding, resizing, mild colour changes and small
crops move only a few of the 64 bits; unrelated photos differ in about half of them.
Two images are near-duplicates when the Hamming distance of their hashes is at most a
threshold (``ingest.near_duplicate_distance``).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

HASH_SIZE = 8  # 8x8 low frequencies -> 64 bits
_SIDE = HASH_SIZE * 4  # the DCT input is 32x32


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``D`` with ``D @ x`` the DCT of a length-``n`` vector."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def phash(img: Image.Image) -> int:
    """The 64-bit pHash of ``img`` as an int (bit 63 = lowest frequency row-major)."""
    grey = img.convert("L").resize((_SIDE, _SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    pixels = np.asarray(grey, dtype=np.float64)
    d = _dct_matrix(_SIDE)
    coeffs = (d @ pixels @ d.T)[:HASH_SIZE, :HASH_SIZE]  # (8, 8) lowest frequencies
    flat = coeffs.ravel()
    bits = flat > np.median(flat[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


def to_hex(h: int) -> str:
    """16 hex digits, the form stored in journals."""
    return f"{h:016x}"


def from_hex(s: str) -> int:
    return int(s, 16)
