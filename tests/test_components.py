"""Component loading: offline failures are one clear MissingWeightsError, local paths load for real."""

from __future__ import annotations

import pytest
import torch

from bolid import components as comp
from bolid.config import ComponentsConfig, check_keys


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    for spec in comp.COMPONENTS.values():
        monkeypatch.delenv(spec.env_var, raising=False)


@pytest.mark.parametrize("name", sorted(comp.COMPONENTS))
def test_offline_missing_weights_fail_fast_with_a_clear_message(offline, name):
    loaders = {
        "sdxl": lambda: comp.load_sdxl(),
        "sdxl_lightning_unet": lambda: comp.load_lightning_unet(None),
        "sdxl_lightning_lora": lambda: comp.load_lightning_lora(None),
        "person_detector": comp.load_person_detector,
        "vitpose": comp.load_vitpose,
        "blip2": comp.load_blip2,
        "eva_clip": comp.load_eva_clip,
        "clip": comp.load_clip,
    }
    with pytest.raises(comp.MissingWeightsError) as info:
        loaders[name]()
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
        comp.load_vitpose()


def test_a_broken_local_folder_is_reported_not_traced(offline, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(comp.MissingWeightsError, match="clip"):
        comp.load_clip(str(tmp_path))


def test_sdxl_loads_from_a_local_folder(offline, tmp_path):
    from bolid.tiny import save_tiny_sdxl, tiny_lightning_unet

    path = save_tiny_sdxl(tmp_path / "sdxl")
    pipe = comp.load_sdxl(str(path))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    # The Lightning loader takes a single safetensors file of the same UNet shape.
    from safetensors.torch import save_file

    lightning = tiny_lightning_unet(pipe.unet)
    save_file(lightning.state_dict(), tmp_path / "sdxl_lightning_4step_unet.safetensors")
    unet = comp.load_lightning_unet(pipe.unet, str(tmp_path))
    for (k, a), b in zip(lightning.state_dict().items(), unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert comp.lightning_scheduler(pipe.scheduler).config.timestep_spacing == "trailing"


def test_transformers_components_load_from_local_folders(offline, tmp_path):
    from bolid import tiny

    model, processor = tiny.tiny_vitpose()
    model.save_pretrained(tmp_path / "vitpose")
    processor.save_pretrained(tmp_path / "vitpose")
    loaded, _ = comp.load_vitpose(str(tmp_path / "vitpose"))
    assert type(loaded) is type(model)
    path = tiny.save_tiny_clip(tmp_path / "clip")
    clip, clip_proc = comp.load_clip(str(path))
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
    with pytest.raises(ValueError, match="unknown component"):
        ComponentsConfig.parse({"kind": "real", "overrides": {"sdxl_base": "x"}})
    with pytest.raises(ValueError, match="did you mean train.lr"):
        check_keys({"lr": 1, "lrr": 2}, {"lr", "steps"}, "train")
