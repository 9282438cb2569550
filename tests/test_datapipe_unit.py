"""Unit tests of the data pipeline's parts: hashing, resizing, rules, planning, splits, caches, config, format."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bolid.images import ImageError
from bolid.pose import Person
from bolid.shards import SHARD_FORMAT, ShardSample, read_index, sample_key
from datapipe.annotate import Captioner, judge_persons
from datapipe.cache import Journal, PartLock
from datapipe.config import BuildConfig, PoseConfig, Resample
from datapipe.index import assign_splits
from datapipe.phash import hamming, phash
from datapipe.resize import RESAMPLE, decode_stored, encode_stored_file, stored_size
from datapipe.writer import plan_shards, plan_stable, write_shard
from demo.synthetic import jpeg_bytes, synthetic_photo

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ pHash


def test_phash_near_copies_are_close_and_different_photos_far():
    a = synthetic_photo(320, 240, 1, figures=1)
    copy = Image.open(io.BytesIO(jpeg_bytes(a.resize((250, 188), Image.Resampling.BICUBIC), 60)))
    brighter = Image.fromarray(np.clip(np.asarray(a, np.int16) + 12, 0, 255).astype(np.uint8))
    assert hamming(phash(a), phash(copy)) <= 2
    assert hamming(phash(a), phash(brighter)) <= 2
    others = [hamming(phash(a), phash(synthetic_photo(320, 240, s, figures=1))) for s in range(2, 12)]
    assert min(others) >= 16, others


# ----------------------------------------------------------------------------------------------- resize


def test_stored_size_scales_the_short_side_down_only():
    assert stored_size(4000, 3000, 1024) == (1365, 1024)
    assert stored_size(2000, 3000, 1024) == (1024, 1536)
    assert stored_size(900, 1200, 1024) == (900, 1200)
    assert stored_size(1024, 1024, 1024) == (1024, 1024)


def test_encode_stored_applies_exif_orientation_and_converts_modes():
    upright = synthetic_photo(300, 400, 3, figures=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # the pixels are stored turned 90 degrees counter-clockwise
    data = jpeg_bytes(upright.rotate(90, expand=True), 95, exif=exif)
    out = encode_stored_file(data, 200)
    assert (out.width, out.height, out.original_width, out.original_height) == (200, 267, 300, 400)
    got = np.asarray(decode_stored(out.data), np.float32)
    want = np.asarray(upright.resize((200, 267), Image.Resampling.BILINEAR), np.float32)
    assert np.abs(got - want).mean() < 6, "the stored image must be upright"
    for mode in ("CMYK", "L", "RGBA", "P"):
        buf = io.BytesIO()
        upright.convert(mode).save(buf, "PNG" if mode in ("RGBA", "P") else "JPEG")
        out = encode_stored_file(buf.getvalue(), 200)
        assert decode_stored(out.data).mode == "RGB" and (out.width, out.height) == (200, 267)


def test_encode_stored_rejects_truncated_and_non_images():
    data = jpeg_bytes(synthetic_photo(600, 400, 4))
    with pytest.raises(ImageError):
        encode_stored_file(data[: len(data) // 2], 128)  # a draft decode still reads every scan
    with pytest.raises(ImageError):
        encode_stored_file(b"<html>404</html>", 128)


def test_decode_stored_with_draft_stays_at_least_the_asked_size():
    stored = encode_stored_file(jpeg_bytes(synthetic_photo(1600, 1200, 5)), 512)  # decoded at 1/2 scale
    assert (stored.width, stored.height, stored.original_width, stored.original_height) == (683, 512, 1600, 1200)
    data = encode_stored_file(jpeg_bytes(synthetic_photo(1600, 1200, 5)), 1024).data
    small = decode_stored(data, (224, 224))
    assert min(small.size) >= 224 and small.size[0] < 1365


# -------------------------------------------------------------------------------------------- pose rules


def _person(box, visible: int = 12, score: float = 0.9) -> dict:
    kp = np.zeros((17, 3), np.float32)
    kp[:, 0] = np.linspace(box[0], box[2], 17)
    kp[:, 1] = np.linspace(box[1], box[3], 17)
    kp[:5, 2] = 0.9
    kp[5 : 5 + visible, 2] = 0.8
    return Person(np.asarray(box, np.float32), score, kp).to_dict()


def test_judge_persons_rules():
    rules = PoseConfig(max_persons=1, prominent_area=0.25, keypoint_score=0.3, min_body_keypoints=6)
    assert judge_persons([], rules).reason == "no_person"
    two = [_person([0, 0, 100, 200]), _person([150, 0, 240, 190])]
    assert judge_persons(two, rules).reason == "multiple_persons"
    with_bystander = [_person([0, 0, 100, 200]), _person([300, 0, 330, 60])]  # 9% of the main person's area
    v = judge_persons(with_bystander, rules)
    assert v.reason is None and v.person["box"] == [0, 0, 100, 200] and v.num_persons == 2
    assert judge_persons([_person([0, 0, 100, 200], visible=5)], rules).reason == "too_few_keypoints"
    assert judge_persons([_person([0, 0, 100, 200], visible=6)], rules).reason is None
    # The largest box is the main person, whatever order the detector listed them in.
    small_first = [_person([300, 0, 330, 60], visible=2), _person([0, 0, 100, 200])]
    assert judge_persons(small_first, rules).person["box"] == [0, 0, 100, 200]
    assert judge_persons(two, PoseConfig(max_persons=2)).reason is None


# -------------------------------------------------------------------------------------- shard planning


def test_plan_shards_keeps_identities_contiguous_in_the_fewest_shards():
    rng = random.Random(0)
    for _ in range(200):
        k = rng.randint(1, 9)
        counts = [(f"id{i:03d}", rng.randint(1, 25)) for i in range(rng.randint(1, 12))]
        plan = plan_shards(counts, k)
        flat = [(ident, a, b) for shard in plan for ident, a, b in shard]
        assert all(0 < sum(b - a for _, a, b in shard) <= k for shard in plan)
        # Order and coverage: every identity's samples, in order, exactly once.
        assert [i for i, _, _ in flat] == sorted(i for i, _, _ in flat)
        for ident, n in counts:
            spans = [(a, b) for i, a, b in flat if i == ident]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(spans[j][1] == spans[j + 1][0] for j in range(len(spans) - 1))
            held = sum(1 for shard in plan if any(i == ident for i, _, _ in shard))
            assert held == -(-n // k), (ident, n, k, plan)


def test_plan_shards_examples():
    assert plan_shards([("a", 3), ("b", 2), ("c", 1)], 4) == [[("a", 0, 3)], [("b", 0, 2), ("c", 0, 1)]]
    # 'b' (6 > 4) starts in the free slot: it still spans the 2 shards it needs.
    assert plan_shards([("a", 2), ("b", 6)], 4) == [[("a", 0, 2), ("b", 0, 2)], [("b", 2, 6)]]
    # 'b' (7) would span 3 shards from the 2 free slots, so it starts a fresh one and spans 2.
    assert plan_shards([("a", 2), ("b", 7)], 4) == [[("a", 0, 2)], [("b", 0, 4)], [("b", 4, 7)]]


def test_write_shard_is_deterministic_and_rejects_dotted_keys(tmp_path):
    samples = [(sample_key("a.b", "ab" * 32), b"jpgbytes", b'{"x":1}')]
    write_shard(tmp_path / "one.tar", samples)
    write_shard(tmp_path / "two.tar", samples)
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    assert samples[0][0] == "a-b_" + "ab" * 8
    with pytest.raises(ValueError, match="dot"):
        write_shard(tmp_path / "bad.tar", [("a.b", b"", b"")])
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------ splits


def test_assign_splits_is_stable_and_fills_every_split():
    names = [f"person{i:03d}" for i in range(200)]
    split = assign_splits(names, 0.1, 0.1)
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "validation", "test")}
    assert 140 <= counts["train"] <= 180 and counts["validation"] >= 8 and counts["test"] >= 8
    grown = assign_splits([*names, *(f"new{i}" for i in range(50))], 0.1, 0.1)
    assert all(grown[n] == split[n] for n in names), "adding people must not move anyone"
    for n in range(3, 8):
        small = assign_splits(names[:n], 0.05, 0.05)
        assert set(small.values()) == {"train", "validation", "test"}, small
        assert small == assign_splits(list(reversed(names[:n])), 0.05, 0.05)
    assert set(assign_splits(names[:2], 0.05, 0.05).values()) <= {"train", "validation", "test"}
    assert set(assign_splits(names[:10], 0.0, 0.0).values()) == {"train"}


# ------------------------------------------------------------------------------------------------ caches


def test_journal_survives_a_torn_line_and_reads_every_writer(tmp_path):
    j = Journal(tmp_path, "pose-abc", "part-0000-of-0002", key="sha256")
    j.append_group([{"sha256": "a", "v": 1}, {"sha256": "b", "v": 2}])
    j.close()
    with open(j.path, "ab") as fh:
        fh.write(b'[{"sha256": "c", "v"')  # a kill in the middle of a write
    other = Journal(tmp_path, "pose-abc", "part-0001-of-0002", key="sha256")
    other.append([], fsync=True)  # nothing to write: no file, no error
    other.append([{"sha256": "d", "v": 4}], fsync=True)
    other.close()
    j = Journal(tmp_path, "pose-abc", "part-0000-of-0002", key="sha256")
    assert sorted(j.load()) == ["a", "b", "d"]
    j.append_group([{"sha256": "c", "v": 3}])
    j.close()
    assert {k: r["v"] for k, r in j.load().items()} == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert all(json.loads(line) for line in j.path.read_text().splitlines())


def test_part_lock_excludes_a_second_build(tmp_path):
    with PartLock(tmp_path / "x.lock"):
        with pytest.raises(RuntimeError, match="another build"):
            with PartLock(tmp_path / "x.lock"):
                pass
    with PartLock(tmp_path / "x.lock"):
        pass


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "shards").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shards_config_parses(path):
    config = BuildConfig.from_yaml(path)
    assert config.shards.resolution >= 16


def test_config_errors_name_the_key(tmp_path):
    base = (ROOT / "configs" / "shards" / "real.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(base.replace("min_photos: 100", "min_photo: 100"))
    with pytest.raises(ValueError, match=r"identities\.min_photo .*did you mean identities\.min_photos"):
        BuildConfig.from_yaml(bad)
    bad.write_text(base.replace("prominent_area: 0.25", "prominent_area: 2"))
    with pytest.raises(ValueError, match=r"bad\.yaml: pose\.prominent_area must be a number in \(0, 1\], got 2$"):
        BuildConfig.from_yaml(bad)
    bad.write_text(base.replace("resample: bilinear", "resample: nearest"))
    with pytest.raises(ValueError, match=r"shards\.resample"):
        BuildConfig.from_yaml(bad)
    bad.write_text(base.replace("batch_size: 16", "batch_size: '16'", 1))
    with pytest.raises(ValueError, match=r"pose\.batch_size must be an int > 0, got '16'"):
        BuildConfig.from_yaml(bad)
    assert set(typing.get_args(Resample)) == set(RESAMPLE)  # the annotation lists exactly the filters resize knows
    config = BuildConfig.from_yaml(ROOT / "configs" / "shards" / "real.yaml")
    changed = config.replace(components="tiny", workers=0, pose__batch_size=3, device=None)
    assert changed.components.tiny and changed.workers == 0 and changed.pose.batch_size == 3
    assert changed.device == config.device and config.pose.batch_size == 16
    with pytest.raises(ValueError, match=r"pose\.batch_size must be an int > 0, got 0"):  # flags are checked too
        config.replace(pose__batch_size=0)


# --------------------------------------------------------------------------------------------- the format


def test_shard_sample_round_trip_and_validation():
    kp = [[float(i), float(2 * i), 0.5] for i in range(17)]
    d = {
        "identity": "a",
        "name": "A",
        "caption": "a man",
        "width": 10,
        "height": 20,
        "original_width": 100,
        "original_height": 200,
        "box": [0, 1, 2, 3],
        "score": 0.9,
        "keypoints": kp,
        "face_box": None,
        "num_persons": 1,
        "sha256": "f" * 64,
        "url": None,
        "page_url": None,
        "source": "a/1.jpg",
    }
    s = ShardSample.from_json(json.dumps(d))
    assert ShardSample.from_json(s.to_json()) == s == ShardSample.from_json(d)
    assert s.keypoints_array().shape == (17, 3) and s.keypoints_array()[3, 1] == 6.0
    with pytest.raises(ValueError, match="missing fields"):
        ShardSample.from_json({k: v for k, v in d.items() if k != "caption"})
    with pytest.raises(ValueError, match="keypoints"):
        ShardSample.from_json({**d, "keypoints": kp[:12]})
    for field in ("identity", "caption", "keypoints", "face_box", "index.json", "samples_per_shard"):
        assert field in SHARD_FORMAT


def test_read_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="merge"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="bolid-shards"):
        read_index(tmp_path)


# ----------------------------------------------------------------------------------------------- caption


def test_captioner_returns_the_continuation_of_the_prompt():
    import torch

    from bolid.kits.tiny import tiny_blip2

    config = BuildConfig.from_yaml(ROOT / "configs" / "shards" / "tiny.yaml")
    images = [synthetic_photo(64, 64, s) for s in range(3)]
    captions = [r["caption"] for r in Captioner(config)(images)]
    model, processor = tiny_blip2()
    prompt = config.caption.prompt
    inputs = processor(images=images, text=[prompt] * 3, return_tensors="pt")
    with torch.inference_mode():
        full = model.generate(**inputs, max_new_tokens=config.caption.max_length, do_sample=False)
    assert full.shape[1] - inputs["input_ids"].shape[1] <= config.caption.max_length
    for text, caption in zip(processor.batch_decode(full, skip_special_tokens=True), captions, strict=True):
        assert " ".join(text.split()) == " ".join(f"{prompt} {caption}".split()) or text.strip() == prompt + caption
        assert not caption.startswith(prompt)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_help_and_errors(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "datapipe", *args], cwd=ROOT, capture_output=True, text=True)

    help_ = cli("build", "--help")
    assert help_.returncode == 0
    for flag in (
        "--config",
        "--in",
        "--out",
        "--components",
        "--device",
        "--batch-size",
        "--workers",
        "--num-parts",
        "--part",
    ):
        assert flag in help_.stdout
    assert "merge" in cli("--help").stdout
    bad = cli("build", "--config", "configs/shards/tiny.yaml", "--in", str(tmp_path / "nope"), "--out", str(tmp_path))
    assert bad.returncode == 2 and "not a folder" in bad.stderr
    missing = cli("merge", str(tmp_path))
    assert missing.returncode == 2 and "no part indexes" in missing.stderr


def test_non_utf8_file_names_are_skipped_with_a_warning(tmp_path, caplog):
    import os

    from datapipe.ingest import discover
    from demo.synthetic import jpeg_bytes, synthetic_photo

    (tmp_path / "anna").mkdir()
    (tmp_path / "anna" / "ok.jpg").write_bytes(jpeg_bytes(synthetic_photo(64, 64, 1)))
    bad = os.path.join(os.fsencode(tmp_path / "anna"), "Привет.jpg".encode("cp1251"))
    with open(bad, "wb") as fh:
        fh.write(jpeg_bytes(synthetic_photo(64, 64, 2)))
    with caplog.at_level("WARNING"):
        sources, layout = discover(tmp_path)
    assert layout == "folders" and [s.rel for s in sources] == ["anna/ok.jpg"]
    assert "not valid UTF-8" in caplog.text


def test_plan_stable_keeps_unchanged_identities_in_place():
    previous = [{"number": 0, "identities": {"a": 2, "b": 2}}, {"number": 1, "identities": {"c": 3}}]
    now = [("a", 2), ("b", 3), ("c", 3), ("d", 1)]  # b grew, d is new
    assert plan_stable(previous, now, 4) == [
        (0, [("a", 0, 2)]),  # rewritten without b
        (1, [("c", 0, 3)]),  # untouched
        (2, [("b", 0, 3), ("d", 0, 1)]),  # changed and new identities, packed after the last shard
    ]
    assert plan_stable([], now, 4) == list(enumerate(plan_shards(now, 4)))
    big = [{"number": 3, "identities": {"e": 4}}, {"number": 4, "identities": {"e": 1}}]
    assert plan_stable(big, [("e", 5)], 4) == [(3, [("e", 0, 4)]), (4, [("e", 4, 5)])]
    assert plan_stable(big, [("f", 1)], 4) == [(5, [("f", 0, 1)])]  # e gone: its shards disappear
