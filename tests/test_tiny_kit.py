"""The tiny kit: the same classes as the real components, seeded, deterministic and offline."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from bolid.kits import tiny


def _image(seed=0, size=(96, 128)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def test_tiny_sdxl_runs_a_real_sdxl_pipeline_deterministically(tiny_pipe):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    assert isinstance(tiny_pipe, StableDiffusionXLPipeline) and isinstance(tiny_pipe.unet, UNet2DConditionModel)
    kw = dict(num_inference_steps=2, output_type="np", guidance_scale=5.0)
    a = tiny_pipe("a photo of a person", generator=torch.Generator().manual_seed(1), **kw).images
    b = tiny.tiny_sdxl_pipeline()("a photo of a person", generator=torch.Generator().manual_seed(1), **kw).images
    c = tiny_pipe("a photo of a person", generator=torch.Generator().manual_seed(2), **kw).images
    assert a.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(a, b)  # seeded build + seeded sampling = same image
    assert np.abs(a - c).max() > 1e-4


def test_tiny_lightning_unet_differs_but_is_swappable(tiny_pipe):
    lightning = tiny.tiny_lightning_unet(tiny_pipe.unet)
    assert lightning.config == tiny_pipe.unet.config
    a, b = next(iter(lightning.parameters())), next(iter(tiny_pipe.unet.parameters()))
    assert a.shape == b.shape and not torch.equal(a, b)


def test_tokenizers_work_offline():
    tok = tiny.tiny_clip_tokenizer()
    ids = tok("a woman in a red dress").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) < 12
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a woman in a red dress"
    gpt = tiny.tiny_gpt2_tokenizer()
    assert gpt.decode(gpt("a man standing").input_ids) == "a man standing"


def test_tiny_vitpose_takes_rtdetr_boxes():
    from bolid.pose import VitPoseExtractor

    extractor = VitPoseExtractor.from_components("tiny", threshold=0.0, max_persons=3)
    persons = extractor([_image(0), _image(1, (64, 64))])
    assert [len(p) for p in persons] == [3, 3]
    areas = [p.area for p in persons[0]]
    assert areas == sorted(areas, reverse=True)
    for p in persons[0]:
        assert p.keypoints.shape == (17, 3)
        assert (p.keypoints[:, 0] >= -1).all() and (p.keypoints[:, 0] <= 97).all()  # image pixels
    again = VitPoseExtractor.from_components("tiny", threshold=0.0, max_persons=3)([_image(0)])
    np.testing.assert_allclose(again[0][0].keypoints, persons[0][0].keypoints)


def test_tiny_detector_threshold_gives_empty_results_not_errors():
    from bolid.pose import VitPoseExtractor

    extractor = VitPoseExtractor.from_components("tiny", threshold=0.99)
    assert extractor([_image(3)]) == [[]]


def test_tiny_blip2_generates_tokens():
    model, processor = tiny.tiny_blip2()
    inputs = processor(images=[_image(0), _image(1)], text=["a photo of"] * 2, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]
    text = processor.batch_decode(out, skip_special_tokens=True)
    assert all(t.startswith("a photo of") and len(t) > len("a photo of") for t in text)


def test_tiny_eva_clip_and_clip_embed_images_and_text():
    model, preprocess, tokenizer = tiny.tiny_eva_clip()
    from timm.models.eva import Eva

    assert isinstance(model.visual.trunk, Eva)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(_image(0)), preprocess(_image(1))]))
        txt = model.encode_text(tokenizer(["a man", "a woman"]))
    assert img.shape == txt.shape == (2, 32) and torch.isfinite(img).all()
    clip, processor = tiny.tiny_clip()
    inputs = processor(text=["a man"], images=[_image(0)], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = clip(**inputs)
    assert out.image_embeds.shape == out.text_embeds.shape == (1, 32)
