"""Component loading: offline failures are one clear MissingWeightsError, local paths load for real."""

from __future__ import annotations

import pytest
import torch

from bolid import components as comp
from bolid.config import ComponentsConfig
from bolid.kits import real


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    for spec in comp.COMPONENTS.values():
        monkeypatch.delenv(spec.env_var, raising=False)


@pytest.mark.parametrize("name", sorted(comp.COMPONENTS))
def test_offline_missing_weights_fail_fast_with_a_clear_message(offline, name):
    kwargs = {"sdxl_lightning_unet": {"base_unet": None}, "sdxl_lightning_lora": {"unet": None}}.get(name, {})
    with pytest.raises(comp.MissingWeightsError) as info:
        comp.load(name, "real", **kwargs)
    msg = str(info.value)
    spec = comp.COMPONENTS[name]
    assert f"'{name}'" in msg and spec.default in msg and spec.env_var in msg and "components: tiny" in msg
    assert info.value.__cause__ is None  # no chained hub-client traceback


def test_an_unreachable_hub_is_detected_before_any_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not comp._hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.bolid-test.invalid")  # .invalid never resolves (RFC 2606)
    assert not comp._hub_reachable()


def test_env_var_and_missing_local_path(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("BOLID_VITPOSE", str(tmp_path / "nope"))
    with pytest.raises(comp.MissingWeightsError, match="no such file"):
        real.vitpose()


def test_a_broken_local_folder_is_reported_not_traced(offline, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(comp.MissingWeightsError, match="clip"):
        real.clip(str(tmp_path))


def test_sdxl_loads_from_a_local_folder(offline, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from bolid.kits.tiny import save_tiny_sdxl, tiny_lightning_unet

    path = save_tiny_sdxl(tmp_path / "sdxl")
    parts = comp.load("sdxl", "real", str(path))
    pipe = StableDiffusionXLPipeline(**parts)
    assert type(parts["unet"]).__name__ == "UNet2DConditionModel" and parts["text_encoder_2"] is not None
    # The Lightning loader takes a single safetensors file of the same UNet shape.
    from safetensors.torch import save_file

    lightning = tiny_lightning_unet(pipe.unet)
    save_file(lightning.state_dict(), tmp_path / "sdxl_lightning_4step_unet.safetensors")
    unet = comp.load("sdxl_lightning_unet", "real", str(tmp_path), base_unet=pipe.unet)
    for (k, a), b in zip(lightning.state_dict().items(), unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert comp.lightning_scheduler(pipe.scheduler).config.timestep_spacing == "trailing"


def test_transformers_components_load_from_local_folders(offline, tmp_path):
    from bolid.kits import tiny

    model, processor = tiny.tiny_vitpose()
    model.save_pretrained(tmp_path / "vitpose")
    processor.save_pretrained(tmp_path / "vitpose")
    loaded, _ = comp.load("vitpose", "real", str(tmp_path / "vitpose"))
    assert type(loaded) is type(model)
    path = tiny.save_tiny_clip(tmp_path / "clip")
    clip, clip_proc = comp.load("clip", ComponentsConfig("real", {"clip": str(path)}))
    assert (
        clip.config.projection_dim == 32
        and clip_proc.tokenizer("a man").input_ids[0] == clip_proc.tokenizer.bos_token_id
    )


def test_components_config_validation():
    assert ComponentsConfig.parse("tiny").tiny
    cfg = ComponentsConfig.parse({"kind": "real", "overrides": {"sdxl": "/m/sdxl"}})
    assert cfg.source("sdxl") == "/m/sdxl" and cfg.source("clip") is None
    with pytest.raises(ValueError, match="components.kind"):
        ComponentsConfig.parse("small")
    with pytest.raises(
        ValueError, match=r"unknown component.*overrides\.sdxl_base \(did you mean .*overrides\.sdxl\?\)"
    ):
        ComponentsConfig.parse({"kind": "real", "overrides": {"sdxl_base": "x"}})
    with pytest.raises(ValueError, match=r"components\.knd \(did you mean components\.kind\?\)"):
        ComponentsConfig.parse({"knd": "real"})
    with pytest.raises(ValueError, match=r"components\.kind must be one of 'real'"):
        ComponentsConfig.parse({"kind": "small"})


def test_one_loader_for_every_kit(tmp_path):
    """load(name, kit) dispatches by kit; unknown kits and missing builders are clear errors."""
    import types

    from bolid.kits import tiny

    model, _, _, name = comp.load("eva_clip", "tiny")
    again, _, _, _ = comp.load("eva_clip", ComponentsConfig.parse("tiny"))
    assert name == tiny.EVA_CLIP_NAME and comp.image_encoder_kit(name) == "tiny"
    assert comp.image_encoder_kit("EVA02-L-14-336") == "real"
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # the same seeded twin both ways
    every = {n for n in comp.COMPONENTS if callable(getattr(real, n, None)) and callable(getattr(tiny, n, None))}
    assert every == set(comp.COMPONENTS)
    with pytest.raises(ValueError, match="unknown components kit 'small'"):
        comp.load("clip", "small")
    with pytest.raises(ValueError, match="unknown component 'unet'"):
        comp.load("unet", "tiny")
    partial = types.ModuleType("bolid.kits.partial")
    partial.clip = lambda source: ("model", source)
    assert comp.load("clip", partial, "/x") == ("model", "/x")
    with pytest.raises(ValueError, match="kit 'partial' has no builder for 'vitpose'"):
        comp.load("vitpose", partial)
