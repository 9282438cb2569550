"""``bolid app``'s work, called directly: overlays, bad uploads, the shape chart, generation = ``bolid generate``,
Body Sim, private and cleaned files, and that the core imports without Gradio. The page itself is tested in a
real browser in ``test_app_browser.py``."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from bolid.__main__ import main
from bolid.app.draw import (
    BODY_POINT_COLOUR,
    BOX_COLOUR,
    FACE_BOX_COLOUR,
    FACE_POINT_COLOUR,
    draw_reference,
    shape_chart,
    shape_rows,
)
from bolid.app.engine import AppEngine, AppError, GenerationRequest
from bolid.body import body_features
from bolid.cli.generate import add_model_arguments
from bolid.metrics import BODY_STATS_MEAN, BODY_STATS_STD
from bolid.pose import BlazePoseExtractor, Person
from bolid.reference import Reference

PROMPT = "a photo of a person walking on a beach"


def model_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(["--components", "tiny", "--device", "cpu", *argv])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The tiny kit with BlazePose finding the person in the references (a real model, offline)."""
    engine = AppEngine(model_args("--pose", "blazepose"), workdir=tmp_path_factory.mktemp("app"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def photo_path(fixtures):
    return fixtures / "coco_000000000785.jpg"


@pytest.fixture
def bad_uploads(tmp_path, photo_path):
    """One file per kind of bad upload, by the name the user gave it."""
    files = {}
    files["notes.jpg"] = tmp_path / "notes.jpg"
    files["notes.jpg"].write_text("this is not a photo")
    data = photo_path.read_bytes()
    files["cut.jpg"] = tmp_path / "cut.jpg"
    files["cut.jpg"].write_bytes(data[: len(data) // 2])
    files["huge.png"] = tmp_path / "huge.png"
    Image.new("L", (10_000, 10_000), 128).save(files["huge.png"], compress_level=1)  # 100 MP
    files["empty-room.png"] = tmp_path / "empty-room.png"
    grey = np.linspace(60, 200, 480 * 640, dtype=np.float32).reshape(480, 640).astype(np.uint8)
    Image.fromarray(grey).convert("RGB").save(files["empty-room.png"])
    files["zero.jpg"] = tmp_path / "zero.jpg"
    files["zero.jpg"].write_bytes(b"")
    return files


# ------------------------------------------------------------------------------------------------ drawing


def test_overlay_draws_box_keypoints_and_face_box_where_they_are():
    image = Image.new("RGB", (1536, 1024), (128, 128, 128))
    kp = np.zeros((17, 3), np.float32)
    kp[:, 0] = np.linspace(500, 1000, 17)
    kp[:, 1] = np.linspace(200, 900, 17)
    kp[:, 2] = 0.9
    kp[0] = (700, 150, 0.9)  # nose and eyes close together: a face box around them
    kp[1] = (680, 140, 0.9)
    kp[2] = (720, 140, 0.9)
    kp[16, 2] = 0.1  # right ankle not visible: not drawn
    person = Person(np.array([400, 100, 1100, 1000], np.float32), 0.9, kp)
    ref = Reference(image, person, "p.jpg")
    out = np.asarray(draw_reference(ref, max_side=768)).astype(int)
    scale = 768 / 1536
    assert out.shape == (512, 768, 3)

    def at(x, y):
        return tuple(out[round(y * scale), round(x * scale)])

    assert at(*kp[8, :2]) == BODY_POINT_COLOUR  # a body keypoint
    assert at(*kp[1, :2]) == FACE_POINT_COLOUR  # a face keypoint
    assert at(*kp[16, :2]) == (128, 128, 128)  # the invisible ankle is left alone
    assert at(400, 550) == BOX_COLOUR  # left edge of the person box
    face = person.face_box()
    assert at(face[0], (face[1] + face[3]) / 2) == FACE_BOX_COLOUR  # left edge of the face box
    assert (np.asarray(ref.image) == 128).all()  # the reference itself is not drawn on


def test_shape_rows_are_the_body_features_with_missing_proportions_as_nan(photo_path):
    image = Image.open(photo_path).convert("RGB")
    kp = BlazePoseExtractor()([image])[0][0].keypoints
    hidden = kp.copy()
    hidden[[7, 9], 2] = 0.0  # left elbow and wrist hidden: the arms are measured on the right side only
    hidden[[8, 10, 14, 16], 2] = 0.0  # right arm and leg hidden too: no forearm, no upper arm on either side
    refs = [Reference(image, Person(np.zeros(4, np.float32), 1.0, k), n) for k, n in ((kp, "a"), (hidden, "b"))]
    rows = shape_rows(refs)
    feats = body_features(torch.from_numpy(np.stack([kp, hidden])).double(), min_score=0.3)
    assert [r["name"] for r in rows] == ["a", "b"]
    for row, props, mask in zip(rows, feats.proportions, feats.proportions_mask, strict=True):
        for value, z, p, m, mean, std in zip(row["proportions"], row["z"], props, mask, BODY_STATS_MEAN,
                                             BODY_STATS_STD, strict=True):  # fmt: skip
            if m:
                assert value == pytest.approx(float(p)) and z == pytest.approx((float(p) - mean) / std)
            else:
                assert math.isnan(value) and math.isnan(z)
    assert not any(math.isnan(v) for v in rows[0]["proportions"])
    assert math.isnan(rows[1]["proportions"][0]) and math.isnan(rows[1]["proportions"][1])
    assert shape_chart(rows) is not None and shape_chart([]) is None


# --------------------------------------------------------------------------------------------- references


def test_inspect_finds_the_person_and_reports_every_bad_upload_by_name(engine, photo_path, bad_uploads):
    paths = [photo_path, *bad_uploads.values()]
    engine.max_references = 10
    views = engine.inspect([str(p) for p in paths], names=["skier.jpg", *bad_uploads])
    by_name = {v.name: v for v in views}
    ok = by_name["skier.jpg"]
    assert ok.usable and ok.error is None and ok.warnings == []
    assert ok.reference.num_persons == 1 and ok.reference.face_visible
    box = ok.reference.person.box  # BlazePose's skier: the whole person, inside the photo
    assert 250 < box[0] < 330 and 30 < box[1] < 80 and 450 < box[2] < 520 and 360 < box[3] <= 425
    assert ok.overlay.size == (640, 425)
    assert "1 person, face visible" in ok.summary()
    expected = {
        "notes.jpg": "not a readable image",
        "cut.jpg": "not a readable image",
        "huge.png": "10000x10000 is 100 MP, over this app's limit of 50 MP",
        "empty-room.png": "no person found",
        "zero.jpg": "empty file",
    }
    for name, text in expected.items():
        view = by_name[name]
        assert not view.usable and view.overlay is None
        assert text in view.error, (name, view.error)
        assert str(bad_uploads[name].parent) not in view.summary()  # the server's paths are not shown
        assert view.summary().startswith(f"{name}: ")


def test_several_persons_and_a_hidden_face_are_warnings_not_errors(photo_path):
    """The tiny kit's random ViTPose finds two 'persons' in the photo; a face turned away drops the face term."""
    engine = AppEngine(model_args("--pose", "vitpose"))
    try:
        (view,) = engine.inspect([str(photo_path)])
        assert view.usable and view.reference.num_persons == 2
        assert view.warnings[0] == "2 persons found: the largest (green box) is used"
        persons = engine.current_pipeline().extractor([Image.open(photo_path)])[0]
        np.testing.assert_allclose(view.reference.person.box, persons[0].box)  # the largest is the one kept
        assert persons[0].area >= persons[1].area
    finally:
        engine.close()

    class FaceTurnedAway(BlazePoseExtractor):  # the real model, as if the face keypoints were not seen
        def __call__(self, images):
            found = super().__call__(images)
            for persons in found:
                for p in persons:
                    p.keypoints[:5, 2] = 0.0
            return found

    engine = AppEngine(model_args("--pose", "blazepose"))
    try:
        pipe = engine.current_pipeline()
        pipe.extractor = FaceTurnedAway()
        (view,) = engine.inspect([str(photo_path)])
        assert view.usable and view.warnings == ["face not visible: only the body term is used for this photo"]
        assert "no face" in view.summary()
    finally:
        engine.close()


def test_too_many_photos_is_a_message(engine, photo_path):
    with pytest.raises(AppError, match="at most 10 are used"):
        engine.inspect([str(photo_path)] * 11)


# --------------------------------------------------------------------------------------------- generation


def test_app_generation_is_bolid_generate_plus_the_base_images(engine, photo_path, tmp_path, monkeypatch):
    request = GenerationRequest(PROMPT, scale_face=0.7, scale_body=1.3, seed=5, num_images=2, compare_base=True)
    calls = []
    view = engine.generate([str(photo_path)], request, progress=lambda f, d: calls.append(f), names=["skier.jpg"])
    assert calls == sorted(calls) and calls[0] == 0.0 and len(calls) >= 4
    # Gallery: BoLID and base image of each seed side by side.
    assert [label for _, label in view.images] == [
        "BoLID, seed 5", "base model, seed 5", "BoLID, seed 6", "base model, seed 6"
    ]  # fmt: skip
    names = [f.name for f in view.files]
    assert names == ["image_000.png", "image_001.png", "settings.json", "embeds.safetensors"]
    settings = json.loads(view.files[2].read_text())
    assert settings["command"] == "app" and settings["argv"][:2] == ["bolid", "generate"]
    assert (settings["scale_face"], settings["scale_body"], settings["seeds"]) == (0.7, 1.3, [5, 6])
    assert settings["pose"] == "blazepose" and settings["components"] == "tiny"

    # The equivalent command, run through the CLI, writes the same images, embeddings and settings.
    out = tmp_path / "cli"
    argv = settings["argv"][1:]
    monkeypatch.setattr(sys, "argv", ["bolid", *argv])
    assert main([*argv[: argv.index("--")], "-o", str(out), *argv[argv.index("--") :]]) == 0
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"image_00{i}.png")),
                                      np.asarray(Image.open(view.files[i])))  # fmt: skip
    cli_embeds, app_embeds = load_file(out / "embeds.safetensors"), load_file(view.files[3])
    assert cli_embeds.keys() == app_embeds.keys()
    for key in cli_embeds:
        torch.testing.assert_close(cli_embeds[key], app_embeds[key], rtol=0, atol=0)
    cli_settings = json.loads((out / "settings.json").read_text())
    assert cli_settings.pop("command") == "generate"
    settings.pop("command")
    for s in (cli_settings, settings):
        s.pop("argv")  # the command line itself: the app records the equivalent one
    assert cli_settings == settings
    assert view.command.startswith("python -m bolid generate '--prompt=a photo of a person walking on a beach'")
    assert view.command.endswith("-o OUT -- skier.jpg")

    # The base images are the pipeline with no identity, and the identity does change the image.
    pipe = engine.pipeline(True, None)
    base = pipe(PROMPT, seed=5, num_images=2).images
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(view.images[2 * i + 1][0]), np.asarray(base[i]))
        assert np.abs(np.asarray(view.images[2 * i][0], float) - np.asarray(base[i], float)).max() > 2
    # Body Sim: the tiny kit paints noise, so every image is a counted failure, not a silent gap.
    assert [row["image"] for row in view.body_sim] == [label for _, label in view.images]
    for row in view.body_sim:
        assert math.isnan(row["Body Sim"]) and row["vs skier.jpg"] == "no_body"
        assert row["note"] == "no body found in the generated image"


def test_base_unet_and_sliders_reach_the_pipeline(engine, photo_path):
    request = GenerationRequest(PROMPT, scale_face=0.0, scale_body=2.0, steps=3, guidance=2.0, seed=1,
                                negative_prompt="blurry", lightning=False, width=48, height=80)  # fmt: skip
    view = engine.generate([str(photo_path)], request)
    s = view.settings
    assert (s["lightning"], s["steps"], s["guidance_scale"], s["negative_prompt"]) == (False, 3, 2.0, "blurry")
    assert (s["scale_face"], s["scale_body"], s["width"], s["height"]) == (0.0, 2.0, 48, 80)
    assert view.images[0][0].size == (48, 80)
    assert engine.pipeline(False, None) is engine.pipeline(False, None)  # cached while the choice stays


def test_adapter_folder_from_the_command_line_and_the_page(engine, photo_path, tmp_path):
    folder = tmp_path / "adapter"
    engine.pipeline(True, None).adapter.save(folder)
    started = AppEngine(model_args("--pose", "blazepose", "--adapter", str(folder)))
    try:
        assert started.default_pipeline().info["adapter"] == str(folder)  # --adapter is loaded at start
        view = started.generate([str(photo_path)], GenerationRequest(PROMPT, adapter=str(folder)))
        assert view.settings["adapter"] == str(folder) and f"--adapter={folder}" in view.command
        view = started.generate([str(photo_path)], GenerationRequest(PROMPT, adapter=None))  # field emptied
        assert view.settings["adapter"] is None and "--adapter" not in view.command
    finally:
        started.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": "  "}, "the prompt is empty"),
        ({"num_images": 0}, "number of images must be 1..8"),
        ({"width": 50}, "--width must be a positive multiple of 8"),
        ({"steps": 0}, "--steps must be >= 1"),
        ({"adapter": "/nonexistent/adapter"}, "/nonexistent/adapter"),
    ],
)
def test_bad_requests_are_messages(engine, photo_path, change, message):
    request = GenerationRequest(**{"prompt": PROMPT, **change})
    with pytest.raises((AppError, FileNotFoundError, ValueError), match=message):
        engine.generate([str(photo_path)], request)


def test_generation_without_references_is_a_message(engine):
    with pytest.raises(AppError, match="no usable reference photo"):
        engine.generate([], GenerationRequest(PROMPT))


# ----------------------------------------------------------------------------------------------- Body Sim


def test_body_sim_of_the_reference_itself_is_one_and_failures_are_named(engine, photo_path):
    photo = Image.open(photo_path).convert("RGB")
    mirrored = ImageOps.mirror(photo)  # the same body: proportions are left/right averaged
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    sims, reasons = engine.body_sim_matrix([photo, mirrored, noise], [photo, mirrored])
    assert sims.shape == (3, 2)
    assert sims[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert sims[1, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert sims[0, 1].item() > 0.95 and sims[1, 0].item() > 0.95
    assert reasons[:2].tolist() == [[-1, -1], [-1, -1]] and reasons[2].tolist() == [0, 0]
    rows, note = engine.body_sim_rows([(photo, "self"), (noise, "noise")], [(photo, "a.jpg"), (mirrored, "b.jpg")])
    assert note is None
    assert rows[0]["Body Sim"] == pytest.approx((1.0 + sims[0, 1].item()) / 2, abs=1e-6)
    assert rows[0]["note"] == ""
    assert rows[1]["vs a.jpg"] == "no_body" and math.isnan(rows[1]["Body Sim"])


# ------------------------------------------------------------------------------------------- files, imports


def test_each_generation_has_its_own_folder_and_old_ones_are_deleted(photo_path, tmp_path):
    engine = AppEngine(model_args("--pose", "blazepose"), keep_s=3600)
    root = engine.workdir
    try:
        first = engine.generate([str(photo_path)], GenerationRequest(PROMPT)).files[0].parent
        second = engine.generate([str(photo_path)], GenerationRequest(PROMPT, seed=1)).files[0].parent
        assert first != second and first.parent == second.parent == root
        assert (first / "image_000.png").read_bytes() != (second / "image_000.png").read_bytes()
        old = time.time() - 7200
        os.utime(first, (old, old))
        third = engine.new_run_dir()
        assert not first.exists() and second.exists() and third.exists()  # only the stale folder went
    finally:
        engine.close()
    assert not root.exists()


@pytest.mark.slow  # a fresh interpreter imports torch, diffusers and transformers
def test_bolid_imports_and_runs_without_gradio():
    code = (
        "import sys; sys.modules['gradio'] = None\n"  # makes `import gradio` fail as if it were not installed
        "import bolid, bolid.pipeline, bolid.app.engine, bolid.app.draw, bolid.cli.app, bolid.cli.generate\n"
        "from bolid.__main__ import main\n"
        "sys.exit(main(['app', '--components', 'tiny']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "bolid app needs Gradio: pip install 'bolid[app]'" in proc.stderr


def test_app_options_are_checked():
    assert main(["app", "--max-images", "0"]) == 2
