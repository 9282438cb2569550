"""The random kit (``components: random``): every component at its real size, built on the meta device.

The parameter counts are checked against the published sizes, so a config that drifts from the real
checkpoint's (a layer count, a width, a vocabulary) fails here; the tokenizers are checked to be CLIP's own.
"""

from __future__ import annotations

import pytest
import torch

from bolid.components import load
from bolid.config import ComponentsConfig
from bolid.kits import random as kit


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sdxl():
    return kit.sdxl(device="meta")


def test_sdxl_parts_have_the_published_sizes_and_cost_no_memory(sdxl):
    published = kit.published_sizes()
    assert count(sdxl["unet"]) == published["unet"][0]  # 2,567,463,684: SDXL base 1.0's UNet, exactly
    assert count(sdxl["vae"]) == published["vae"][0]
    text = count(sdxl["text_encoder"]) + count(sdxl["text_encoder_2"])
    assert text == pytest.approx(published["text_encoders"][0], rel=0.005)  # 817M in the SDXL report
    assert count(sdxl["text_encoder"]) == 123_060_480  # OpenAI CLIP ViT-L/14's text tower
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert all(p.is_meta for p in sdxl[name].parameters()), name
    # The widths the rest of BoLID relies on: 2048 = 768 + 1280 text features, 2816 = 6 * 256 + 1280 pooled.
    assert sdxl["unet"].config.cross_attention_dim == 768 + 1280
    assert (
        sdxl["unet"].config.projection_class_embeddings_input_dim
        == 6 * 256 + sdxl["text_encoder_2"].config.projection_dim
    )
    assert sdxl["vae"].config.scaling_factor == 0.13025


def test_lightning_unet_is_a_second_unet_of_the_same_config(sdxl):
    lightning = load("sdxl_lightning_unet", "random", base_unet=sdxl["unet"])  # through the one loader
    assert lightning is not sdxl["unet"]
    assert count(lightning) == count(sdxl["unet"])
    assert dict(lightning.config) == dict(sdxl["unet"].config)


def test_lightning_unet_can_share_the_base_weights():
    base = kit.unet(torch_dtype=torch.bfloat16, device="meta")
    twin = kit.sdxl_lightning_unet(base_unet=base, share_weights=True)
    shared = {id(p) for p in base.parameters()} & {id(p) for p in twin.parameters()}
    assert len(shared) == len(list(base.parameters()))  # the same tensors, not copies


@pytest.mark.parametrize(
    "name",
    ["person_detector", "vitpose", "blip2", "clip"],
)
def test_transformers_models_have_the_published_sizes(name):
    model, processor = getattr(kit, name)(device="meta")
    expected, source = kit.published_sizes()[name]
    assert count(model) == pytest.approx(expected, rel=0.03), source
    assert processor is not None


def test_eva_clip_has_the_published_size():
    model, preprocess, tokenizer, name = kit.eva_clip(device="meta")
    assert name == "EVA02-L-14-336"  # the real architecture's name, recorded in adapters
    assert count(model) == pytest.approx(kit.published_sizes()["eva_clip"][0], rel=0.005)
    assert count(model.visual) == 304_432_832  # timm eva02_large_patch14_clip_336
    assert model.visual.image_size in (336, (336, 336))


def test_random_weights_are_seeded_initialised_and_in_the_asked_dtype():
    a, b, c = (kit.vitpose(seed=s, torch_dtype=torch.bfloat16)[0] for s in (3, 3, 4))
    wa, wb, wc = (m.backbone.encoder.layer[0].attention.attention.query.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert wa.float().std() > 0.005  # initialised, not left empty
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the build restores torch's default


def test_tokenizers_are_clips_own_vocabulary(sdxl):
    tok, tok2 = sdxl["tokenizer"], sdxl["tokenizer_2"]
    assert len(tok) == 49408
    # The ids OpenAI CLIP gives this sentence (start, a, photo, of, a, cat, end).
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407 and tok2.pad_token_id == 0  # SDXL pads with <|endoftext|> and with "!"
    assert tok2("a photo of a cat").input_ids == tok("a photo of a cat").input_ids


def test_blip2_tokenizer_keeps_the_image_token_id():
    _, processor = kit.blip2(device="meta")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 50265
    ids = processor.tokenizer("a photo of a person").input_ids
    assert max(ids) < 50265 and len(ids) < len("a photo of a person")  # merges apply


def test_the_loader_reaches_every_builder_of_the_kit():
    with kit.on_device("meta"):
        for name in ("person_detector", "vitpose", "blip2", "clip", "eva_clip"):
            model = load(name, ComponentsConfig.parse("random"))[0]
            assert count(model) == pytest.approx(kit.published_sizes()[name][0], rel=0.03), name
        parts = load("sdxl", "random", torch_dtype=torch.bfloat16)
    assert next(parts["unet"].parameters()).dtype == torch.bfloat16


def test_components_random_is_a_kind():
    assert ComponentsConfig.parse("random").kind == "random"
    assert ComponentsConfig.parse({"kind": "random"}).kind == "random"
    with pytest.raises(ValueError, match="components.kind"):
        ComponentsConfig.parse("randmo")


def test_every_shipped_config_names_its_source():
    import json

    files = kit.shipped_configs()
    assert len(files) >= 10
    for f in files:
        assert "_source" in json.loads(f.read_text()), f.name


def test_on_device_sends_only_the_kits_builds_there():
    with kit.on_device("meta"):
        model, _ = kit.vitpose()
        other = torch.zeros(1)  # the caller's own tensors stay where they were asked for
    assert all(p.is_meta for p in model.parameters())
    assert other.device.type == "cpu"


def test_random_detector_reports_persons():
    from PIL import Image

    model, processor = kit.person_detector()
    inputs = processor(images=[Image.new("RGB", (320, 240), (90, 120, 150))], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    found = processor.post_process_object_detection(out, target_sizes=torch.tensor([(240, 320)]), threshold=0.5)[0]
    assert len(found["labels"]) > 0 and (found["labels"] == 0).all()  # persons, so ViTPose and the filters run


def test_lightning_lora_goes_in_switched_off_and_changes_the_unet_when_on():
    """``lightning_weights: lora`` on the random kit: the LoRA (Kohya layout, diffusers' loader) sits in the base
    UNet switched off (output unchanged), and switched on it moves the output. A tiny UNet keeps this cheap; the
    builder is the random kit's own."""
    from bolid.kits.tiny import tiny_sdxl_components
    from bolid.lightning_lora import set_lora_enabled

    unet = tiny_sdxl_components()["unet"].eval()
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10])
    cond = {"encoder_hidden_states": torch.randn(1, 3, unet.config.cross_attention_dim),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.zeros(1, 6)}}  # fmt: skip
    with torch.no_grad():
        before = unet(x, t, **cond).sample
        load("sdxl_lightning_lora", "random", unet=unet, rank=4)
        off = unet(x, t, **cond).sample
        set_lora_enabled(unet, True)
        on = unet(x, t, **cond).sample
    torch.testing.assert_close(off, before, rtol=0, atol=0)
    assert (on - before).abs().max() > 1e-3
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora" in n)
