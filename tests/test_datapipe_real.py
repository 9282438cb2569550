"""The pipeline on real photos with a real pose model (MediaPipe BlazePose, offline), where the rules have meaning.

Twelve full-body video frames of one person (plus a re-encoded, downscaled copy of one frame) must all pass,
the copy must go as a near-duplicate, and head-and-shoulders portraits must fail the body-keypoint rule (a
small one fails the size check first). Keypoints in the shards must match BlazePose run on the full-size
originals, scaled to the stored size. Uses the shared photos (not in the repo); skips when they are absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from bolid.pose import BlazePoseExtractor
from bolid.shards import ShardSample, read_index
from datapipe.build import build
from datapipe.config import BuildConfig
from demo.synthetic import jpeg_bytes

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "shards" / "tiny.yaml"

HEADSHOTS = {  # file -> why it must be rejected
    "portraits/examples_knn_examples_test_obama1.jpg": ("pose", "too_few_keypoints"),
    "portraits/examples_knn_examples_train_biden_biden2.jpg": ("pose", "too_few_keypoints"),
    "portraits/examples_knn_examples_train_kit_harington_john1.jpeg": ("ingest", "too_small"),  # 1200x599
}


@pytest.fixture(scope="module")
def real_run(shared_testdata, tmp_path_factory):
    pytest.importorskip("mediapipe")
    tmp = tmp_path_factory.mktemp("real")
    in_dir = tmp / "in"
    (in_dir / "akun").mkdir(parents=True)
    (in_dir / "headshots").mkdir()
    frames = sorted((shared_testdata / "posevaried").glob("*.jpg"))
    assert len(frames) == 12
    for f in frames:
        (in_dir / "akun" / f.name).symlink_to(f)
    copy = Image.open(frames[0]).resize((1600, 900), Image.Resampling.BICUBIC)
    (in_dir / "akun" / "near_copy.jpg").write_bytes(jpeg_bytes(copy, 80))
    for rel in HEADSHOTS:
        (in_dir / "headshots" / rel.split("/")[1]).symlink_to(shared_testdata / rel)
    config = BuildConfig.from_yaml(TINY_YAML).replace(
        pose__backend="blazepose",
        pose__threshold=0.5,
        pose__keypoint_score=0.3,
        pose__min_body_keypoints=6,
        pose__prominent_area=0.25,
        ingest__min_size=800,
        shards__resolution=512,
        shards__samples_per_shard=5,
    )
    out = tmp / "out"
    build(config, in_dir, out)
    return {"in": in_dir, "out": out, "frames": frames, "config": config}


def test_real_photos_stats_and_rejects(real_run):
    stats = json.loads((real_run["out"] / "stats.json").read_text())
    stages = stats["stages"]
    assert (stages["ingest"]["in"], stages["ingest"]["out"]) == (16, 14)
    assert stages["ingest"]["rejected"]["too_small"] == 1 and stages["ingest"]["rejected"]["near_duplicate"] == 1
    assert stages["pose"] == {
        "in": 14,
        "out": 12,
        "rejected": {"no_person": 0, "multiple_persons": 0, "too_few_keypoints": 2},
    }
    assert stages["identities"] == {"in": 12, "out": 12, "rejected": {"too_few_photos": 0}}
    assert stats["identities"] == {"found": 2, "kept": 1} and stats["shards"] == 3
    rejects = {
        r["path"]: (r["stage"], r["reason"]) for r in map(json.loads, (real_run["out"] / "rejects.jsonl").open())
    }
    assert rejects.pop("akun/near_copy.jpg") == ("ingest", "near_duplicate")
    assert rejects == {f"headshots/{rel.split('/')[1]}": why for rel, why in HEADSHOTS.items()}


def test_real_keypoints_are_in_stored_pixels(real_run):
    index = read_index(real_run["out"])
    assert index.identities["akun"]["count"] == 12 and len(index.identities["akun"]["shards"]) == 3
    blaze = BlazePoseExtractor(min_detection_confidence=0.5)
    try:
        originals = {f.name: blaze([f])[0][0] for f in real_run["frames"]}
    finally:
        blaze.close()
    for url in index.shard_paths():
        for s in wds.WebDataset(url, shardshuffle=False, empty_check=False).decode("pil"):
            meta = ShardSample.from_json(s["json"])
            assert s["jpg"].size == (meta.width, meta.height) == (910, 512)
            assert (meta.original_width, meta.original_height) == (1920, 1080)
            kp = meta.keypoints_array()
            assert ((kp[:, 0] >= 0) & (kp[:, 0] <= 910) & (kp[:, 1] >= 0) & (kp[:, 1] <= 512)).mean() > 0.9
            full = originals[meta.source.split("/")[1]].keypoints
            err = np.linalg.norm(kp[5:, :2] - full[5:, :2] * (512 / 1080), axis=1)  # the 12 body points
            assert np.median(err) < 6.0, (meta.source, err)
            box = np.asarray(meta.box)
            assert box[0] <= np.median(kp[5:, 0]) <= box[2] and box[1] <= np.median(kp[5:, 1]) <= box[3]
            assert meta.face_box is not None and meta.num_persons == 1
