"""BoLIDPipeline and ``bolid generate`` on the tiny kit: stock-diffusers export, references, bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from bolid.__main__ import main
from bolid.adapter import BodyConditionModule, IdentityEmbeds
from bolid.pipeline import BoLIDPipeline
from bolid.pose import BlazePoseExtractor, Person, VitPoseExtractor
from bolid.reference import NoPersonError, Reference, encode_references, load_references

PROMPT = "a photo of a person walking on a beach"


@pytest.fixture(scope="module")
def pipe():
    """Tiny SDXL-Lightning + a fresh adapter; references through the real (offline) BlazePose model."""
    extractor = BlazePoseExtractor()
    yield BoLIDPipeline.from_components("tiny", lightning=True, extractor=extractor)
    extractor.close()


@pytest.fixture(scope="module")
def photo(fixtures) -> Image.Image:
    return Image.open(fixtures / "coco_000000000785.jpg").convert("RGB")


@pytest.fixture(scope="module")
def adapter_trained(pipe):
    """Perturb the fresh adapter's weights, as training would, so every part of it matters in the outputs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in pipe.adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return pipe.adapter


def _stock_pipeline(pipe, tmp_path):
    """A plain StableDiffusionXLPipeline from the tiny SDXL saved to disk, with BoLID's exported adapters."""
    from diffusers import StableDiffusionXLPipeline

    pipe.adapter.uninstall(pipe.sdxl.unet)
    try:
        pipe.sdxl.save_pretrained(tmp_path / "sdxl")
    finally:
        pipe.adapter.install(pipe.sdxl.unet)
    pipe.adapter.export_diffusers(tmp_path / "export")
    stock = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl")
    stock.set_progress_bar_config(disable=True)
    stock.load_ip_adapter(
        str(tmp_path / "export"),
        subfolder="",
        weight_name=["bolid_face.safetensors", "bolid_body.safetensors"],
        image_encoder_folder=None,
    )
    return stock


def test_stock_diffusers_export_reproduces_bolid_images(pipe, adapter_trained, photo, tmp_path):
    stock = _stock_pipeline(pipe, tmp_path)
    # Lightning's CFG-off with two images, and CFG with diffusers' zero negative embeddings.
    for guidance, n in ((0.0, 2), (4.0, 1)):
        negative = "blurry" if guidance > 1 else None
        ours = pipe(PROMPT, references=[photo], scale_face=0.6, scale_body=1.3, seed=3, num_images=n,
                    guidance_scale=guidance, negative_prompt=negative, output_type="np")  # fmt: skip
        stock.set_ip_adapter_scale([0.6, 1.3])
        theirs = stock(
            PROMPT,
            negative_prompt=negative,
            ip_adapter_image_embeds=ours.embeds.image_embeds(do_classifier_free_guidance=guidance > 1),
            num_inference_steps=4,
            guidance_scale=guidance,
            num_images_per_prompt=n,
            generator=[torch.Generator().manual_seed(3 + i) for i in range(n)],
            output_type="np",
        ).images
        assert ours.images.shape == theirs.shape == (n, 64, 64, 3)
        np.testing.assert_allclose(ours.images, theirs, atol=1e-5)
    stock.set_ip_adapter_scale([0.0, 0.0])
    plain = stock(PROMPT, negative_prompt="blurry", ip_adapter_image_embeds=ours.embeds.image_embeds(True),
                  num_inference_steps=4, guidance_scale=4.0, output_type="np",
                  generator=torch.Generator().manual_seed(3)).images  # fmt: skip
    assert np.abs(plain - theirs).max() > 1e-3  # the identity terms do act in the stock pipeline


def test_reference_without_a_visible_face_still_generates(pipe, adapter_trained, photo):
    (ref,) = load_references([photo], pipe.extractor)
    assert ref.face_visible
    kp = ref.person.keypoints.copy()
    kp[:5, 2] = 0.0  # the same person with the face turned away: no face keypoint visible
    faceless = Reference(photo, Person(ref.person.box, ref.person.score, kp), "faceless")
    assert not faceless.face_visible
    with_face, without = encode_references(pipe.adapter, [ref]), encode_references(pipe.adapter, [faceless])
    assert without.face_visible.tolist() == [False]
    torch.testing.assert_close(without.body, with_face.body)  # the body term does not depend on the face
    image = pipe(PROMPT, embeds=without, seed=1)
    assert image.images[0].size == (64, 64) and image.settings["face_used"] is False
    out = pipe(PROMPT, embeds=without, seed=1, output_type="latent").images
    face_off = pipe(PROMPT, embeds=with_face, scale_face=0.0, seed=1, output_type="latent").images
    full = pipe(PROMPT, embeds=with_face, seed=1, output_type="latent").images
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, face_off, atol=1e-5, rtol=0)  # exactly the face term is dropped
    assert (full - out).abs().max() > 1e-3
    assert pipe.adapter.scales == {"face": 1.0, "body": 1.0}  # per-call scales do not stick


def test_two_references_average_their_vectors(pipe, adapter_trained, photo):
    mirrored = ImageOps.mirror(photo)
    both, refs = pipe.encode_references([photo, mirrored])
    one, two = (encode_references(pipe.adapter, [r]) for r in refs)
    assert len(both) == 1 and len(refs) == 2
    assert (one.body - two.body).abs().max() > 1e-4  # two different views ...
    torch.testing.assert_close(both.body, (one.body + two.body) / 2)  # ... averaged, per modality
    torch.testing.assert_close(both.face, (one.face + two.face) / 2)
    result = pipe(PROMPT, references=[photo, mirrored], seed=0)
    assert len(result.images) == 1 and len(result.settings["references"]) == 2
    assert result.settings["references_combined_by"].startswith("mean")


def test_no_identity_is_the_base_model(pipe, photo):
    plain = pipe(PROMPT, seed=2, output_type="latent")
    zero = pipe(PROMPT, references=[photo], scale_face=0.0, scale_body=0.0, seed=2, output_type="latent")
    assert torch.equal(plain.images, zero.images)
    assert plain.settings["identity"] is False


def test_photo_without_a_person_is_a_clear_error(pipe, photo):
    blank = Image.new("RGB", (256, 256), (128, 128, 128))
    with pytest.raises(NoPersonError, match="no person found"):
        pipe(PROMPT, references=[blank])
    strict = VitPoseExtractor.from_components("tiny", threshold=0.99)  # a score the random detector never reaches
    with pytest.raises(NoPersonError, match=r"reference <Image.*no person found at detection threshold 0.99"):
        load_references([photo], strict, threshold=0.99)


def test_several_persons_use_the_largest_and_say_so(photo, caplog):
    extractor = VitPoseExtractor.from_components("tiny", threshold=0.0, max_persons=3)
    with caplog.at_level(logging.WARNING, logger="bolid.reference"):
        (ref,) = load_references([photo], extractor)
    assert ref.num_persons == 3
    assert ref.person.area == max(p.area for p in extractor([photo])[0])
    assert "3 persons found; using the largest" in caplog.text


def test_generate_writes_images_and_settings(fixtures, tmp_path):
    out = tmp_path / "gen"
    ref = str(fixtures / "coco_000000000785.jpg")
    argv = ["generate", ref, ref, "-p", PROMPT, "--components", "tiny", "--num-images", "2", "--seed", "5",
            "--scale-face", "0.8", "--scale-body", "1.2", "--pose-threshold", "0.0", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "embeds.safetensors",
        "image_000.png",
        "image_001.png",
        "settings.json",
    ]
    assert Image.open(out / "image_001.png").size == (64, 64)
    s = json.loads((out / "settings.json").read_text())
    assert s["images"] == ["image_000.png", "image_001.png"] and s["seeds"] == [5, 6]
    assert (s["steps"], s["guidance_scale"], s["scale_face"], s["scale_body"]) == (4, 0.0, 0.8, 1.2)
    assert s["lightning"] and s["scheduler"]["timestep_spacing"] == "trailing" and s["components"] == "tiny"
    assert len(s["references"]) == 2 and s["references"][0]["persons_found"] >= 1
    assert len(IdentityEmbeds.load(out / "embeds.safetensors")) == 1


def test_generate_reports_bad_adapter_and_missing_base_model(fixtures, tmp_path, monkeypatch, capsys, tiny_pipe):
    from diffusers import UNet2DConditionModel

    from bolid.image_encoder import ClipImageEncoder

    ref = str(fixtures / "coco_000000000785.jpg")
    base = ["generate", ref, "-p", PROMPT, "-o", str(tmp_path / "out")]
    other = UNet2DConditionModel.from_config({**tiny_pipe.unet.config, "cross_attention_dim": 32})
    BodyConditionModule(other, ClipImageEncoder.from_components("tiny")).save(tmp_path / "other")
    assert main([*base, "--components", "tiny", "--adapter", str(tmp_path / "other")]) == 2
    assert "was made for a UNet with cross_attention_dim 32" in capsys.readouterr().err
    assert main([*base, "--components", "tiny", "--adapter", str(tmp_path / "nowhere")]) == 2
    assert "must hold adapter.safetensors" in capsys.readouterr().err
    monkeypatch.setenv("BOLID_SDXL", str(tmp_path / "no-sdxl-here"))
    assert main([*base, "--components", "real"]) == 2
    assert "Missing weights for component 'sdxl'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_step_count_warning_only_for_a_distilled_unet(pipe, caplog):
    """The tiny kit stands for SDXL-Lightning (distilled for 4 steps): other counts are named. A stand-in that is
    not distilled (the mini kit's base UNet) has no special count, so nothing is said."""
    with caplog.at_level(logging.WARNING, logger="bolid.pipeline"):
        pipe("a person", steps=2, height=64, width=64)
    assert "distilled for 4 steps; running 2" in caplog.text
    caplog.clear()
    pipe.distilled_steps = None
    try:
        with caplog.at_level(logging.WARNING, logger="bolid.pipeline"):
            pipe("a person", steps=2, height=64, width=64)
    finally:
        pipe.distilled_steps = 4
    assert "distilled" not in caplog.text
    from bolid.kits import mini

    assert mini.LIGHTNING_DISTILLED_STEPS is None
