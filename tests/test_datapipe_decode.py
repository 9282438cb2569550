"""Decoding safety: one pixel cap (50 MP, ``bolid.images.MAX_IMAGE_PIXELS``) for the crawler and the datapipe,
checked from the header; Pillow's own limit set to match, so a bomb is ``too_large`` and is never decoded.

Each probe runs in a fresh subprocess that reports its peak RSS, compared with the same probe of an ordinary
photo: decoding the 100 MP image would cost 100-400 MB more, and the 20000 x 20000 bomb 1.2 GB."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from bolid.images import MAX_IMAGE_PIXELS, ImageTooLarge, image_size
from crawler.config import CrawlConfig
from datapipe.config import IngestConfig
from demo.site import claimed_size_jpeg
from demo.synthetic import jpeg_bytes, synthetic_photo

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, os, resource, sys
from datapipe.ingest import ProbeTask, probe
path, stored = sys.argv[1], sys.argv[2]
st = os.stat(path)
rec = probe(ProbeTask(path, os.path.basename(path), st.st_size, st.st_mtime_ns, 1000, 50_000_000, stored,
                      1024, 90, "lanczos"))
print(json.dumps({"rec": rec, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_grey_png(path: Path, width: int, height: int) -> None:
    """A real, fully decodable 8-bit greyscale PNG, written row by row (never held in memory)."""
    compressor = zlib.compressobj(1)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def run_probe(path: Path, stored: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), str(stored)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    """The same probe on an ordinary 1200 x 1500 photo (decoded, resized, stored)."""
    folder = tmp_path_factory.mktemp("ok")
    path = folder / "ok.jpg"
    path.write_bytes(jpeg_bytes(synthetic_photo(1200, 1500, 3)))
    out = run_probe(path, folder / "stored")
    assert out["rec"]["decoded"] and "error" not in out["rec"]
    return out


def test_one_pixel_cap_for_crawler_and_datapipe():
    assert MAX_IMAGE_PIXELS == 50_000_000
    assert CrawlConfig().max_image_pixels == IngestConfig().max_pixels == MAX_IMAGE_PIXELS
    assert CrawlConfig.from_yaml(ROOT / "configs" / "crawl" / "theplace.yaml").max_image_pixels == MAX_IMAGE_PIXELS


def test_bomb_header_is_too_large_without_decoding(tmp_path, baseline):
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(claimed_size_jpeg(20000, 20000))  # 3 KB declaring 400 MP
    assert bomb.stat().st_size < 10_000
    with pytest.raises(ImageTooLarge, match="too many pixels"):
        image_size(bomb)  # over twice Pillow's limit (set to the cap): Pillow refuses it in open()
    out = run_probe(bomb, tmp_path / "stored")
    assert out["rec"]["error"] == "too_large" and not out["rec"].get("decoded")
    assert not (tmp_path / "stored").exists() or not any((tmp_path / "stored").rglob("*.jpg"))
    assert out["peak_mb"] < baseline["peak_mb"] + 30


def test_real_100_megapixel_image_is_too_large_without_decoding(tmp_path, baseline):
    big = tmp_path / "big.png"
    write_grey_png(big, 10_000, 10_000)  # a valid 100 MP image of ~100 KB
    assert big.stat().st_size < 1_000_000
    with pytest.raises(ImageTooLarge, match="10000x10000 exceeds 50000000 pixels"):
        image_size(big)  # under Pillow's refusal (2x the cap): the header check rejects it
    out = run_probe(big, tmp_path / "stored")
    assert out["rec"]["error"] == "too_large" and "10000x10000" in out["rec"]["detail"]
    assert out["peak_mb"] < baseline["peak_mb"] + 30  # decoding it would add >= 100 MB (greyscale) + RGB copy
