"""End to end: ``datapipe build`` on the tiny kit over a generated folder, read back with webdataset.

The folder holds good photos of five people plus one of each case a stage must reject: a small image, a
corrupt (truncated) JPEG, a text file named .jpg, a byte-identical duplicate, a re-encoded near-duplicate,
an image with two people, and people with too few photos; plus EXIF-rotated, CMYK, greyscale and RGBA inputs.
The model-independent stages have hard-coded expected counts. The tiny kit's detector is random, so which
images pass the pose rules cannot be known by looking at them; an oracle runs the same tiny extractor on the
stored images (same batches) and applies the documented rules independently, and the pipeline must agree
with it exactly. Also: idempotent re-runs, adding images, SIGKILL + resume, a damaged shard, the crawler's
manifest layout, and a two-part scale-out run with merge.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from bolid.body import visible_body_count
from bolid.pose import VitPoseExtractor
from bolid.shards import SPLITS, ShardSample, read_index, sample_key
from datapipe.build import build
from datapipe.config import BuildConfig
from datapipe.index import merge
from datapipe.resize import decode_stored, encode_stored_file
from demo.synthetic import jpeg_bytes, synthetic_photo

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "shards" / "tiny.yaml"
# Plain photos per identity (before the special cases below); dave has too few, erin only a small one.
PLAIN = {"alice": 9, "bob": 8, "carol": 6, "dave": 2}
# Files every ingest rule must reject, by relative path.
INGEST_REJECTS = {
    "alice/small.jpg": "too_small",
    "erin/thumb.jpg": "too_small",
    "alice/near_copy.jpg": "near_duplicate",
    # the same photo under two people (bytes, or a grey re-encode): every copy dropped, before the split
    "alice/01.jpg": "multi_identity",
    "bob/copy_of_alice_01.jpg": "multi_identity",
    "bob/02.jpg": "multi_identity",
    "carol/grey_copy_of_bob_02.jpg": "multi_identity",
    "bob/broken.jpg": "corrupt",
    "bob/notes.jpg": "unreadable",
}


def make_input(root: Path) -> None:
    """Write the test folder (layout ``<identity>/<image>``)."""
    seed = 1000
    for identity, n in PLAIN.items():
        (root / identity).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            seed += 1
            img = synthetic_photo(200 + 8 * (i % 3), 240, seed, figures=1)
            (root / identity / f"{i:02d}.jpg").write_bytes(jpeg_bytes(img, 90))
    (root / "erin").mkdir()
    (root / "erin" / "thumb.jpg").write_bytes(jpeg_bytes(synthetic_photo(90, 90, 7)))
    (root / "alice" / "small.jpg").write_bytes(jpeg_bytes(synthetic_photo(100, 120, 8)))
    near = Image.open(root / "alice" / "00.jpg").resize((180, 216), Image.Resampling.BICUBIC)
    (root / "alice" / "near_copy.jpg").write_bytes(jpeg_bytes(near, 70))
    shutil.copyfile(root / "alice" / "01.jpg", root / "bob" / "copy_of_alice_01.jpg")
    grey = Image.open(root / "bob" / "02.jpg").convert("L")
    (root / "carol" / "grey_copy_of_bob_02.jpg").write_bytes(jpeg_bytes(grey, 85))
    whole = jpeg_bytes(synthetic_photo(220, 260, 9, figures=1))
    (root / "bob" / "broken.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    (root / "bob" / "notes.jpg").write_text("not an image\n")
    (root / "bob" / "readme.txt").write_text("ignored: not an image file name\n")
    (root / "carol" / "two_people.jpg").write_bytes(jpeg_bytes(synthetic_photo(260, 200, 10, figures=2)))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90 degrees clockwise
    upright = synthetic_photo(200, 240, 11, figures=1)
    (root / "carol" / "rotated.jpg").write_bytes(jpeg_bytes(upright.rotate(90, expand=True), 90, exif=exif))
    (root / "carol" / "cmyk.jpg").write_bytes(jpeg_bytes(synthetic_photo(210, 250, 12, figures=1).convert("CMYK")))
    (root / "carol" / "grey.jpg").write_bytes(jpeg_bytes(synthetic_photo(150, 180, 13, figures=1).convert("L")))
    synthetic_photo(230, 240, 14, figures=1).convert("RGBA").save(root / "carol" / "alpha.png")


def image_files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".png")
    )


def write_config(tmp: Path) -> Path:
    """configs/shards/tiny.yaml with small model batches (more batches: more points to kill at)."""
    data = yaml.safe_load(TINY_YAML.read_text())
    data["pose"]["batch_size"] = 2
    data["caption"]["batch_size"] = 2
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def oracle(in_dir: Path, config: BuildConfig) -> dict:
    """Expected decisions, computed without the pipeline's stage code."""
    files = image_files(in_dir)
    accepted = [f for f in files if f not in INGEST_REJECTS]
    by_sha = sorted((f.split("/")[0], sha256_file(in_dir / f), f) for f in accepted)
    sh = config.shards
    stored = {f: encode_stored_file(in_dir / f, sh.resolution, sh.quality, sh.resample) for _, _, f in by_sha}
    extractor = VitPoseExtractor.from_components(
        "tiny", threshold=config.pose.threshold, batch_size=config.pose.batch_size
    )
    images = [decode_stored(stored[f].data) for _, _, f in by_sha]
    persons = []
    bs = config.pose.batch_size
    for start in range(0, len(images), bs):
        persons += extractor(images[start : start + bs])  # the pipeline's batches: (identity, sha256) order
    verdict, main = {}, {}
    rules = config.pose
    for (_, _, f), found in zip(by_sha, persons, strict=True):
        found = [p.to_dict() for p in found]
        if not found:
            verdict[f] = "no_person"
            continue
        areas = [(p["box"][2] - p["box"][0]) * (p["box"][3] - p["box"][1]) for p in found]
        top = int(np.argmax(areas))
        main[f] = (found[top], len(found))
        if sum(a >= rules.prominent_area * areas[top] for a in areas) > rules.max_persons:
            verdict[f] = "multiple_persons"
        elif visible_body_count(torch.tensor(found[top]["keypoints"]), rules.keypoint_score) < rules.min_body_keypoints:
            verdict[f] = "too_few_keypoints"
        else:
            verdict[f] = None
    posed = Counter(f.split("/")[0] for f, v in verdict.items() if v is None)
    kept = {i for i, n in posed.items() if n >= config.identities.min_photos}
    return {
        "files": files,
        "sha": {f: s for _, s, f in by_sha},
        "stored": stored,
        "verdict": verdict,
        "main": main,
        "posed": posed,
        "kept": kept,
        "kept_files": [f for _, _, f in by_sha if verdict[f] is None and f.split("/")[0] in kept],
    }


def expected_stats(expect: dict) -> dict:
    ingest = Counter(INGEST_REJECTS.values())
    n_in = len(expect["files"])
    n_ingest = n_in - sum(ingest.values())
    pose = Counter(v for v in expect["verdict"].values() if v is not None)
    n_pose = n_ingest - sum(pose.values())
    n_kept = len(expect["kept_files"])
    reasons = (
        "missing",
        "unreadable",
        "too_large",
        "too_small",
        "corrupt",
        "duplicate",
        "near_duplicate",
        "multi_identity",
    )
    return {
        "stages": {
            "ingest": {"in": n_in, "out": n_ingest, "rejected": {r: ingest.get(r, 0) for r in reasons}},
            "pose": {
                "in": n_ingest,
                "out": n_pose,
                "rejected": {r: pose.get(r, 0) for r in ("no_person", "multiple_persons", "too_few_keypoints")},
            },
            "identities": {"in": n_pose, "out": n_kept, "rejected": {"too_few_photos": n_pose - n_kept}},
            "caption": {"in": n_kept, "out": n_kept, "rejected": {}},
            "shards": {"in": n_kept, "out": n_kept, "rejected": {"removed": 0}},
        },
        "identities": {"found": len(PLAIN) + 1, "kept": len(expect["kept"])},
    }


def read_shards(out: Path) -> list[tuple[str, dict]]:
    """Every sample of the dataset, in shard order, read with webdataset (raw bytes per member)."""
    index = read_index(out)
    samples = []
    for url in index.shard_paths():
        for s in wds.WebDataset(url, shardshuffle=False, empty_check=False):
            samples.append((Path(url).name, s))
    return samples


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One clean in-process build; its output is the reference for the other tests.

    Torch runs single-threaded here and in the subprocess runs (OMP_NUM_THREADS=1): the same kernels give the
    same floats, and the tiny models gain nothing from threads on a busy 2-core machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("datapipe")
    in_dir = tmp / "in"
    make_input(in_dir)
    config_path = write_config(tmp)
    config = BuildConfig.from_yaml(config_path)
    out = tmp / "out"
    build(config, in_dir, out)
    yield {
        "tmp": tmp,
        "in": in_dir,
        "out": out,
        "config_path": config_path,
        "config": config,
        "expect": oracle(in_dir, config),
    }
    torch.set_num_threads(threads)


def test_stats_exact_counts(run):
    stats = json.loads((run["out"] / "stats.json").read_text())
    expect = expected_stats(run["expect"])
    assert stats["stages"] == expect["stages"]
    assert stats["identities"] == expect["identities"]
    assert stats["shards"] == len(read_index(run["out"]).shards)
    assert run["expect"]["verdict"]["carol/two_people.jpg"] in (
        None,
        "no_person",
        "multiple_persons",
        "too_few_keypoints",
    )
    assert len(run["expect"]["kept"]) >= 1, "the test data must leave someone to shard"
    assert "dave" not in run["expect"]["kept"] and "erin" not in run["expect"]["kept"]
    rejects = [json.loads(line) for line in (run["out"] / "rejects.jsonl").read_text().splitlines()]
    by_path = {(r["path"], r["stage"]): r["reason"] for r in rejects}
    for path, reason in INGEST_REJECTS.items():
        assert by_path[(path, "ingest")] == reason
    for path, verdict in run["expect"]["verdict"].items():
        if verdict is not None:
            assert by_path[(path, "pose")] == verdict


def test_every_sample_read_back(run):
    out, config, expect = run["out"], run["config"], run["expect"]
    samples = read_shards(out)
    assert [json.loads(s["json"])["source"] for _, s in samples] == expect["kept_files"]
    seen_identities: list[str] = []
    for _, s in samples:
        key = s["__key__"]
        assert "." not in key and set(s) >= {"jpg", "json"}
        meta = ShardSample.from_json(s["json"])
        assert s["json"] == meta.to_json(), "the stored json is the canonical encoding"
        f = meta.source
        assert key == sample_key(meta.identity, meta.sha256) == meta.key
        assert meta.identity == f.split("/")[0] and meta.name == meta.identity
        assert meta.sha256 == expect["sha"][f] and meta.url is None and meta.page_url is None
        stored = expect["stored"][f]
        assert s["jpg"] == stored.data, f"{f}: stored bytes differ from the CPU path's"
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.mode == "RGB" and img.size == (meta.width, meta.height)
        assert min(img.size) <= config.shards.resolution
        assert (meta.original_width, meta.original_height) == (stored.original_width, stored.original_height)
        person, n = expect["main"][f]
        assert meta.num_persons == n
        assert list(meta.box) == person["box"] and meta.score == person["score"]
        assert [list(k) for k in meta.keypoints] == person["keypoints"]
        assert (None if meta.face_box is None else list(meta.face_box)) == person["face_box"]
        kp = meta.keypoints_array()
        assert kp.shape == (17, 3)
        assert isinstance(meta.caption, str) and meta.caption == " ".join(meta.caption.split())
        if not seen_identities or seen_identities[-1] != meta.identity:
            assert meta.identity not in seen_identities, "an identity's samples must be contiguous"
            seen_identities.append(meta.identity)
    # The rotated input is stored upright; greyscale smaller than the resolution is not upscaled.
    metas = {ShardSample.from_json(s["json"]).source: ShardSample.from_json(s["json"]) for _, s in samples}
    if "carol/rotated.jpg" in metas:
        assert (metas["carol/rotated.jpg"].original_width, metas["carol/rotated.jpg"].original_height) == (200, 240)
    if "carol/grey.jpg" in metas:
        assert (metas["carol/grey.jpg"].width, metas["carol/grey.jpg"].height) == (150, 180)


def test_index_matches_shards(run):
    out, config = run["out"], run["config"]
    index = read_index(out)
    samples = read_shards(out)
    per_identity = Counter(ShardSample.from_json(s["json"]).identity for _, s in samples)
    assert {i: info["count"] for i, info in index.identities.items()} == dict(per_identity)
    assert index.totals == {"samples": len(samples), "identities": len(per_identity), "shards": len(index.shards)}
    k = config.shards.samples_per_shard
    for identity, info in index.identities.items():
        holders = sorted({shard for shard, s in samples if ShardSample.from_json(s["json"]).identity == identity})
        assert sorted(info["shards"]) == holders
        assert len(holders) == -(-info["count"] // k), "an identity spans no more shards than needed"
    for shard in index.shards:
        assert shard["count"] <= k and (out / shard["name"]).stat().st_size == shard["bytes"]
    members = [set(index.identities_in(s)) for s in SPLITS]
    assert set().union(*members) == set(index.identities) and sum(map(len, members)) == len(index.identities)
    for split in SPLITS:
        for identity in index.identities_in(split):
            assert index.split_of(identity) == split
            assert {str(out / n) for n in index.identities[identity]["shards"]} <= set(index.shard_paths(split))


def test_rerun_is_idempotent_and_does_no_work(run):
    out = run["out"]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.tar")}
    caches = {p: p.read_bytes() for p in (out / "cache").glob("*.jsonl") if not p.name.startswith("shards")}
    index = (out / "index.json").read_bytes()
    build(run["config"], run["in"], out)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.tar")} == before
    assert {p: p.read_bytes() for p in caches} == caches, "a re-run must not run a model or probe again"
    assert (out / "index.json").read_bytes() == index


def _journal_keys(path: Path, key: str) -> list[str]:
    keys = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        keys += [r[key] for r in (rec if isinstance(rec, list) else [rec])]
    return keys


def test_adding_images_does_no_model_work_twice(run):
    tmp = run["tmp"] / "grow"
    in_dir, out = tmp / "in", tmp / "out"
    shutil.copytree(run["in"], in_dir)
    shutil.copytree(run["out"], out)
    for i, seed in enumerate((501, 502)):
        (in_dir / "alice" / f"new{i}.jpg").write_bytes(jpeg_bytes(synthetic_photo(208, 240, seed, figures=1)))
    build(run["config"], in_dir, out)
    for path in (out / "cache").glob("*.jsonl"):
        key = "path" if path.name.startswith("ingest") else "name" if path.name.startswith("shards") else "sha256"
        keys = _journal_keys(path, key)
        if key != "name":  # shards are rewritten when their content changes
            assert len(keys) == len(set(keys)), f"{path.name}: some image was processed twice"
    pose = next((out / "cache").glob("pose-*.jsonl"))
    assert len(_journal_keys(pose, "sha256")) == len(run["expect"]["verdict"]) + 2
    stats = json.loads((out / "stats.json").read_text())
    assert stats["stages"]["ingest"]["out"] == expected_stats(run["expect"])["stages"]["ingest"]["out"] + 2


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _has_line(out: Path, pattern: str) -> bool:
    return any(p.stat().st_size > 0 for p in (out / "cache").glob(pattern))


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_shards(run):
    out = run["tmp"] / "killed"
    cmd = [
        sys.executable,
        "-m",
        "datapipe",
        "build",
        "--config",
        str(run["config_path"]),
        "--in",
        str(run["in"]),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels as the reference run
    kills = 0
    for pattern in ("pose-*.jsonl", "caption-*.jsonl"):  # kill in the pose stage, then in the caption stage
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if _wait_for(lambda p=pattern: _has_line(out, p), proc):
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-3000:]
        if proc.returncode == -signal.SIGKILL:
            assert not (out / "index.json").exists()
    assert kills >= 1, "the build finished before it could be killed"
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert shard_bytes(out) == shard_bytes(run["out"])
    assert (out / "index.json").read_bytes() == (run["out"] / "index.json").read_bytes()
    assert (out / "stats.json").read_bytes() == (run["out"] / "stats.json").read_bytes()
    assert not list(out.glob(".*.tmp"))


def test_damaged_and_leftover_shards_are_repaired(run):
    out = run["tmp"] / "damaged"
    shutil.copytree(run["out"], out)
    first = sorted(out.glob("shard-*.tar"))[0]
    first.write_bytes(first.read_bytes()[:1000])  # e.g. a disk error after the rename
    (out / f".{first.name}.12345.tmp").write_bytes(b"partial tar of a killed run")
    (out / "shard-00999.tar").write_bytes(b"a shard of an earlier, larger dataset")
    build(run["config"], run["in"], out)
    assert shard_bytes(out) == shard_bytes(run["out"])
    assert not list(out.glob(".*.tmp"))


def test_crawler_manifest_layout(tmp_path):
    """The crawler's OUT: images/<identity>/<sha256>.jpg + manifest.jsonl (a missing file, a torn last line)."""
    crawl = tmp_path / "crawl"
    lines = []
    for i, (identity, name) in enumerate([("anna-k", "Anna K."), ("anna-k", "Anna K."), ("boris.b", "Boris B.")]):
        data = jpeg_bytes(synthetic_photo(200, 240, 300 + i, figures=1))
        sha = hashlib.sha256(data).hexdigest()
        rel = f"images/{identity}/{sha}.jpg"
        (crawl / rel).parent.mkdir(parents=True, exist_ok=True)
        (crawl / rel).write_bytes(data)
        lines.append(
            {
                "identity": identity,
                "name": name,
                "image_url": f"https://x.test/{i}.jpg",
                "page_url": f"https://x.test/p/{i}",
                "path": rel,
                "width": 200,
                "height": 240,
                "sha256": sha,
            }
        )
    gone = {**lines[0], "path": "images/anna-k/" + "0" * 64 + ".jpg", "image_url": "https://x.test/gone.jpg"}
    text = "".join(json.dumps(r) + "\n" for r in [*lines, gone]) + '{"identity": "torn'
    (crawl / "manifest.jsonl").write_text(text)
    config = BuildConfig.from_yaml(TINY_YAML).replace(
        workers=0, identities__min_photos=1, pose__max_persons=10, pose__min_body_keypoints=0
    )
    build(config, crawl, tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["stages"]["ingest"]["in"] == 4 and stats["stages"]["ingest"]["rejected"]["missing"] == 1
    assert stats["stages"]["shards"]["out"] == 3 - stats["stages"]["pose"]["rejected"]["no_person"]
    samples = read_shards(tmp_path / "out")
    by_url = {r["image_url"]: r for r in lines}
    for _, s in samples:
        meta = ShardSample.from_json(s["json"])
        rec = by_url[meta.url]
        assert (meta.identity, meta.name, meta.page_url, meta.source, meta.sha256) == (
            rec["identity"],
            rec["name"],
            rec["page_url"],
            rec["path"],
            rec["sha256"],
        )
        assert "." not in s["__key__"]  # boris.b's key has its dot replaced
    assert read_index(tmp_path / "out").identities["anna-k"]["name"] == "Anna K."


def test_scale_out_parts_merge_to_the_single_run(run):
    """Two parts built one after the other into one folder, then merged. The parts reuse the single run's model
    cache (caches are shared across partitions), so their samples must equal the single run's byte for byte."""
    out = run["tmp"] / "parts"
    shutil.copytree(run["out"] / "cache", out / "cache")
    config = run["config"]
    for part in range(2):
        content = build(config, run["in"], out, part=part, num_parts=2)
        assert not (out / "index.json").exists() or part == 1
        assert all(n.startswith(f"shard-p{part:04d}of0002-") for n in (s["name"] for s in content["shards"]))
    with pytest.raises(FileNotFoundError):
        merge(out, 3)
    index = merge(out)
    single = read_index(run["out"])
    assert index["totals"]["samples"] == single.totals["samples"]
    assert index["identities"].keys() == single.identities.keys()
    for identity, info in index["identities"].items():
        assert info["count"] == single.identities[identity]["count"]
        assert info["split"] == single.split_of(identity), "the split must not depend on the partition"
    assert json.loads((out / "stats.json").read_text()) == json.loads((run["out"] / "stats.json").read_text()) | {
        "shards": len(index["shards"])
    }

    def by_key(folder: Path) -> dict:
        return {s["__key__"]: (s["jpg"], s["json"]) for _, s in read_shards(folder)}

    assert by_key(out) == by_key(run["out"])
    pose = next((out / "cache").glob("pose-*.part-0000-of-0002.jsonl"), None)
    assert pose is None or pose.stat().st_size == 0, "the parts found every model output in the shared cache"


@pytest.mark.slow
def test_part_count_does_not_change_the_result(run, tmp_path):
    """A person's folder copied under another name is the same photos under two identities: every copy is dropped
    (multi_identity) whichever part each name lands in, so 1, 2 and 3 parts give the same samples, splits and
    stats (parts decide ingest over every identity; before, each part kept its own copy)."""
    from datapipe.balance import assign_sources
    from datapipe.ingest import discover

    single = read_index(run["out"])
    source = next(iter(single.identities))
    in_dir = tmp_path / "in"
    shutil.copytree(run["in"], in_dir)
    clone = "clone"
    shutil.copytree(in_dir / source, in_dir / clone)
    parts = assign_sources((s.identity for s in discover(in_dir)[0]), 2)
    assert parts[clone] != parts[source], "the copy must land in the other part for this test to mean anything"
    results = {}
    for num_parts in (1, 2, 3):
        out = tmp_path / f"out{num_parts}"
        shutil.copytree(run["out"] / "cache", out / "cache")
        for part in range(num_parts):
            build(run["config"], in_dir, out, part=part, num_parts=num_parts)
        index = merge(out)
        assert index["duplicates"] == []
        samples = {s["__key__"]: (s["jpg"], s["json"]) for _, s in read_shards(out)}
        splits = {name: info["split"] for name, info in index["identities"].items()}
        stats = json.loads((out / "stats.json").read_text()) | {"shards": 0}
        results[num_parts] = (samples, splits, stats)
        rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
        multi = {r["identity"] for r in rejects if r["reason"] == "multi_identity"}
        assert {source, clone} <= multi
    assert source not in results[1][1] and clone not in results[1][1]
    assert results[1] == results[2] == results[3]


def test_index_checksums_and_verify_catch_a_damaged_shard(run, tmp_path):
    from datapipe.__main__ import main

    out = tmp_path / "out"
    shutil.copytree(run["out"], out, ignore=shutil.ignore_patterns("cache"))
    index = read_index(out)
    assert all(s["sha256"] == sha256_file(out / s["name"]) for s in index.shards)
    assert main(["verify", str(out)]) == 0
    shard = out / index.shards[0]["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's bytes: same size, other content
    shard.write_bytes(bytes(data))
    shutil.copyfile(shard, out / "shard-09999.tar")
    from datapipe.verify import verify

    problems = verify(out)
    assert problems == [
        f"{shard.name}: sha256 differs from index.json (changed or damaged)",
        "shard-09999.tar: not listed in index.json",
    ]
    assert main(["verify", str(out)]) == 1


def test_samples_parquet_has_one_row_per_input_photo(run):
    import pyarrow.parquet as pq

    rows = pq.read_table(run["out"] / "samples.parquet").to_pylist()
    index = read_index(run["out"])
    assert [r["path"] for r in rows] == sorted(run["expect"]["files"], key=lambda f: (f.split("/")[0], f))
    kept = [r for r in rows if r["status"] == "kept"]
    assert sorted(r["path"] for r in kept) == sorted(run["expect"]["kept_files"])
    in_shards = {s["__key__"]: name for name, s in read_shards(run["out"])}
    for row in kept:
        assert in_shards[row["key"]] == row["shard"]
        assert row["split"] == index.split_of(row["identity"]) and row["caption"] and row["person_score"] > 0
        assert row["sha256"] == run["expect"]["sha"][row["path"]]
    by_path = {r["path"]: r for r in rows}
    for path, reason in INGEST_REJECTS.items():
        assert (by_path[path]["status"], by_path[path]["stage"], by_path[path]["reason"]) == (
            "rejected",
            "ingest",
            reason,
        )
        assert by_path[path]["shard"] is None and by_path[path]["split"] is None


def test_dataset_card_is_written(run):
    card = (run["out"] / "DATASET_CARD.md").read_text()
    stats = json.loads((run["out"] / "stats.json").read_text())
    ingest = stats["stages"]["ingest"]
    assert card.startswith("---\nlicense: other\n")
    assert f"| ingest | {ingest['in']} | {ingest['out']} |" in card and "multi_identity 4" in card
    index = read_index(run["out"])
    for split in SPLITS:
        info = index.data["splits"][split]
        assert f"| {split} | {len(info['identities'])} | {info['samples']} |" in card
    for section in ("## Sources", "## Known biases", "research use only", "## Removal"):
        assert section in card


def test_adding_one_identity_rewrites_only_its_shards(run, tmp_path):
    in_dir, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(run["in"], in_dir)
    shutil.copytree(run["out"], out)
    (in_dir / "zoe").mkdir()
    for i in range(10):  # the tiny random pose model keeps about a third
        img = synthetic_photo(200 + 8 * (i % 3), 240, 7001 + i, figures=1)
        (in_dir / "zoe" / f"{i:02d}.jpg").write_bytes(jpeg_bytes(img, 90))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.tar")}
    journal = next((out / "cache").glob("shards.*.jsonl"))
    writes_before = len(_journal_keys(journal, "name"))
    old = read_index(out)
    build(run["config"], in_dir, out)
    index = read_index(out)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.tar")}
    written = _journal_keys(journal, "name")[writes_before:]
    assert "zoe" in index.identities, "the new person's photos must pass the tiny pipeline"
    assert written == index.identities["zoe"]["shards"] == sorted(set(after) - set(before))
    assert len(written) == math.ceil(index.identities["zoe"]["count"] / 4)  # samples_per_shard 4
    assert {name: after[name] for name in before} == before  # names, bytes and mtimes of the others unchanged
    for identity, info in old.identities.items():
        assert index.identities[identity]["shards"] == info["shards"]  # (splits may move: 3 people fill 3 splits)
    assert all(s["sha256"] == sha256_file(out / s["name"]) for s in index.shards)


def test_remove_rewrites_only_the_affected_shards_and_sticks(run, tmp_path):
    import pyarrow.parquet as pq

    from datapipe.remove import remove
    from datapipe.verify import verify

    in_dir, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(run["in"], in_dir)
    shutil.copytree(run["out"], out)
    index = read_index(out)
    gone_identity, other = sorted(index.identities)[:2]
    other_sample = next(
        json.loads(s["json"]) for _, s in read_shards(out) if json.loads(s["json"])["identity"] == other
    )
    holding = set(index.identities[gone_identity]["shards"]) | {
        name for name, s in read_shards(out) if json.loads(s["json"])["sha256"] == other_sample["sha256"]
    }
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    touched = remove(out, [gone_identity], [other_sample["sha256"]])
    assert set(touched) == holding
    after = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    assert {n: b for n, b in after.items() if n not in holding} == {n: b for n, b in before.items() if n not in holding}
    assert verify(out) == []
    new = read_index(out)
    assert gone_identity not in new.identities
    assert new.identities[other]["count"] == index.identities[other]["count"] - 1
    removed = index.identities[gone_identity]["count"] + 1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["stages"]["shards"]["rejected"] == {"removed": removed}
    rows = pq.read_table(out / "samples.parquet").to_pylist()
    assert sum(r["reason"] == "removed" for r in rows) == removed
    assert all(r["status"] == "rejected" for r in rows if r["identity"] == gone_identity)
    assert all(
        sample["identity"] != gone_identity for _, sample in ((n, json.loads(s["json"])) for n, s in read_shards(out))
    )
    # a later build of the same input honours the removal and writes nothing new
    snapshot = {name: (out / name).read_bytes() for name in ("index.json", "stats.json", "rejects.jsonl")}
    build(run["config"], in_dir, out)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == after
    assert {name: (out / name).read_bytes() for name in snapshot} == snapshot
