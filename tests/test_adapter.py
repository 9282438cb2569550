"""The Body-Condition Module in the tiny SDXL UNet: on/off, exact scale 0, face drop, training surface, files."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bolid.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    AdapterShapeError,
    BodyConditionModule,
    IdentityEmbeds,
    LowRankLinear,
    cross_attention_layers,
)
from bolid.attention import linear_weight
from bolid.image_encoder import ClipImageEncoder
from bolid.kits import tiny

SIZE = (120, 80)  # reference photo scaled to (width, height)


@pytest.fixture(scope="module")
def image_encoder():
    return ClipImageEncoder.from_components("tiny")


@pytest.fixture
def unet(tiny_pipe):
    return copy.deepcopy(tiny_pipe.unet)  # never touch the shared pipeline's UNet


@pytest.fixture(scope="module")
def reference(fixtures):
    """The COCO photo and its annotated person, scaled down, as a batch of 2 (second one without a face)."""
    image = Image.open(fixtures / "coco_000000000785.jpg").convert("RGB")
    sx, sy = SIZE[0] / image.width, SIZE[1] / image.height
    pixels = torch.from_numpy(np.asarray(image.resize(SIZE), np.float32) / 255).permute(2, 0, 1)
    ann = json.loads((fixtures / "coco_000000000785.json").read_text())["annotations"][0]
    kp = torch.tensor(ann["keypoints"], dtype=torch.float32).reshape(17, 3)
    kp[:, 2] = (kp[:, 2] == 2).float()
    kp[:, 0] *= sx
    kp[:, 1] *= sy
    no_face = kp.clone()
    no_face[:5, 2] = 0.0
    return torch.stack([pixels, pixels]), torch.stack([kp, no_face])


def _inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 16, 16, generator=g)
    text = torch.randn(batch, 7, 64, generator=g)
    added = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    return sample, torch.tensor([500] * batch), text, added


def _run(unet, adapter, embeds, seed=0):
    sample, t, text, added = _inputs(len(embeds), seed)
    return unet(sample, t, text, **adapter.unet_kwargs(embeds, sample, added)).sample


def test_processors_cover_every_cross_attention_layer(unet, image_encoder):
    adapter = BodyConditionModule(unet, image_encoder)
    layers = cross_attention_layers(unet)
    assert len(layers) == len(adapter.processors) == sum(n.endswith("attn2.processor") for n in unet.attn_processors)
    for (name, hidden), proc in zip(layers, adapter.processors, strict=True):
        attn = unet.get_submodule(name[: -len(".processor")])
        assert proc.hidden_size == hidden and proc.num_tokens == [4, 4]
        for k_ip, v_ip in zip(proc.to_k_ip, proc.to_v_ip, strict=True):  # IP-Adapter init: the layer's own K/V
            assert isinstance(k_ip, LowRankLinear) and k_ip.base is attn.to_k and v_ip.base is attn.to_v  # shared
            assert torch.equal(linear_weight(k_ip), attn.to_k.weight)
            assert torch.equal(linear_weight(v_ip), attn.to_v.weight)


def test_adapter_changes_output_and_scale_zero_is_exactly_the_base_unet(unet, image_encoder, reference):
    adapter = BodyConditionModule(unet, image_encoder)
    pixels, kp = reference
    with torch.no_grad():
        embeds = adapter.encode(pixels[:1], kp[:1])
        sample, t, text, added = _inputs(1)
        base = unet(sample, t, text, added_cond_kwargs=added).sample
        adapter.install(unet)
        on = _run(unet, adapter, embeds)
        adapter.set_scales(face=0.0, body=0.0)
        off = _run(unet, adapter, embeds)
        adapter.set_scales(face=1.0)
        face_only = _run(unet, adapter, embeds)
        adapter.set_scales(face=0.0, body=1.0)
        body_only = _run(unet, adapter, embeds)
        adapter.uninstall(unet)
        after = unet(sample, t, text, added_cond_kwargs=added).sample
    assert (on - base).abs().max() > 1e-3
    assert torch.equal(off, base)
    assert (face_only - base).abs().max() > 1e-3 and (body_only - base).abs().max() > 1e-3
    assert (face_only - body_only).abs().max() > 1e-3
    assert torch.equal(after, base)
    with pytest.raises(ValueError, match="finite"):
        adapter.set_scales(face=float("nan"))


def test_a_sample_without_a_visible_face_drops_only_its_face_term(unet, image_encoder, reference):
    adapter = BodyConditionModule(unet, image_encoder)
    adapter.install(unet)
    pixels, kp = reference
    with torch.no_grad():
        embeds = adapter.encode(pixels, kp)
        assert embeds.face_visible.tolist() == [True, False]
        assert embeds.face[1].abs().max() == 0 and embeds.body[1].abs().max() > 0
        mixed = _run(unet, adapter, embeds)
        adapter.set_scales(face=0.0)
        no_face = _run(unet, adapter, embeds)
    torch.testing.assert_close(mixed[1], no_face[1], atol=1e-6, rtol=0)  # face term gone, body term kept
    assert (mixed[0] - no_face[0]).abs().max() > 1e-3  # the visible face still counts
    forced = adapter.encode(pixels[:1], kp[:1], face_visible=torch.tensor([False]))  # face dropout in training
    assert forced.face_visible.tolist() == [False]


def test_only_adapter_and_encoder_heads_train(unet, image_encoder, reference):
    adapter = BodyConditionModule(unet, image_encoder)
    adapter.install(unet)
    trainable = {id(p) for p in adapter.trainable_parameters()}
    assert all(p.requires_grad for p in adapter.trainable_parameters())
    assert not any(p.requires_grad for p in adapter.image_encoder.parameters())
    in_unet = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert in_unet and all(id(dict(unet.named_parameters())[n]) in trainable for n in in_unet)
    assert all("processor.to_" in n or n.startswith("encoder_hid_proj.") for n in in_unet)
    pixels, kp = reference
    _run(unet, adapter, adapter.encode(pixels, kp)).pow(2).mean().backward()
    assert all(p.grad is not None for p in adapter.trainable_parameters())
    for part in (adapter.body_encoder, adapter.image_proj):
        assert all(p.grad.abs().max() > 0 for p in part.parameters())
    ups = [p for n, p in adapter.processors.named_parameters() if n.endswith(".up")]
    assert len(ups) == 4 * len(adapter.processors) and all(p.grad.abs().max() > 0 for p in ups)  # (down: 0 at init)
    assert all(p.grad is None for n, p in unet.named_parameters() if id(p) not in trainable)
    n_adapter = sum(p.numel() for p in adapter.trainable_parameters())
    n_unet = sum(p.numel() for p in unet.parameters()) - sum(
        p.numel() for p in adapter.parameters() if id(p) in trainable
    )
    assert 0 < n_adapter < n_unet


def test_same_adapter_runs_in_base_and_lightning_unets(unet, image_encoder, reference):
    lightning = tiny.tiny_lightning_unet(unet)
    adapter = BodyConditionModule(unet, image_encoder)
    pixels, kp = reference
    with torch.no_grad():
        embeds = adapter.encode(pixels[:1], kp[:1])
        sample, t, text, added = _inputs(1)
        bases = [u(sample, t, text, added_cond_kwargs=added).sample for u in (unet, lightning)]
        adapter.install(unet)
        adapter.install(lightning)
        outs = [_run(u, adapter, embeds) for u in (unet, lightning)]
    assert all((o - b).abs().max() > 1e-3 for o, b in zip(outs, bases, strict=True))
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # different UNets, one set of adapter weights
    assert (
        unet.attn_processors[adapter.signature["layers"][0][0]]
        is lightning.attn_processors[adapter.signature["layers"][0][0]]
    )


def test_state_dict_round_trip_and_clear_errors(unet, image_encoder, reference, tmp_path):
    torch.manual_seed(3)
    adapter = BodyConditionModule(unet, image_encoder, AdapterConfig(scale_face=0.7, sigma=0.15))
    with torch.no_grad():  # stand-in for training: move every weight away from its initial value
        for p in adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    adapter.save(tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {ADAPTER_WEIGHTS, ADAPTER_CONFIG}
    loaded = BodyConditionModule.load(tmp_path / "a", unet)
    assert loaded.config == adapter.config and loaded.scales == {"face": 0.7, "body": 1.0}
    a, b = adapter.adapter_state_dict(), loaded.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("image_encoder.") for k in a)
    pixels, kp = reference
    with torch.no_grad():
        e1, e2 = adapter.encode(pixels, kp), loaded.encode(pixels, kp)
        assert torch.equal(e1.face, e2.face) and torch.equal(e1.body, e2.body)
        adapter.install(unet)
        out1 = _run(unet, adapter, e1)
        adapter.uninstall(unet)
        loaded.install(unet)
        out2 = _run(unet, loaded, e2)
    assert torch.equal(out1, out2)

    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel.from_config({**unet.config, "cross_attention_dim": 32})
    with pytest.raises(AdapterShapeError, match="cross_attention_dim 64.*this UNet has cross_attention_dim 32"):
        BodyConditionModule.load(tmp_path / "a", other)
    with pytest.raises(AdapterShapeError, match="trained for this base model"):
        adapter.install(other)
    with pytest.raises(FileNotFoundError, match="adapter.safetensors"):
        BodyConditionModule.load(tmp_path / "missing", unet)
    with pytest.raises(AdapterShapeError, match="load with the base UNet, then install"):
        BodyConditionModule.load(tmp_path / "a", tiny.tiny_lightning_unet(unet))  # same shape, other K/V


def test_installing_over_another_ip_adapter_is_refused(unet, image_encoder):
    first, second = BodyConditionModule(unet, image_encoder), BodyConditionModule(unet, image_encoder)
    first.install(unet)
    first.install(unet)  # idempotent
    with pytest.raises(ValueError, match="already has an image projection"):
        second.install(unet)
    first.uninstall(unet)
    with pytest.raises(ValueError, match="not installed"):
        first.uninstall(unet)


def test_several_references_average_their_vectors():
    face = torch.tensor([[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]])
    body = torch.tensor([[1.0], [2.0], [6.0]])
    refs = IdentityEmbeds(face * torch.tensor([[1.0], [1.0], [0.0]]), body, torch.tensor([True, True, False]))
    one = refs.mean()
    assert len(one) == 1 and one.face_visible.tolist() == [True]
    torch.testing.assert_close(one.face, torch.tensor([[2.0, 3.0]]))  # mean over visible faces only
    torch.testing.assert_close(one.body, torch.tensor([[3.0]]))  # mean over all references
    none = IdentityEmbeds(torch.zeros(2, 2), body[:2], torch.tensor([False, False])).mean()
    assert none.face_visible.tolist() == [False] and none.face.abs().max() == 0
    neg, pos = one.image_embeds(do_classifier_free_guidance=True)[0]  # diffusers: negatives (zeros) first
    assert neg.abs().max() == 0 and torch.equal(pos, one.face)


def test_export_layout_is_the_stock_ip_adapter_one(unet, image_encoder, tmp_path):
    from safetensors import safe_open

    adapter = BodyConditionModule(unet, image_encoder)
    with torch.no_grad():
        for proc in adapter.processors:  # a trained low-rank update, merged into the exported weight
            for layer in (*proc.to_k_ip, *proc.to_v_ip):
                layer.up.normal_()
    paths = adapter.export_diffusers(tmp_path)
    n = len(adapter.processors)
    for j, modality in enumerate(("face", "body")):
        with safe_open(str(paths[modality]), "pt") as f:
            keys = set(f.keys())
            proj = adapter.image_proj.image_projection_layers[j]
            assert torch.equal(f.get_tensor("image_proj.proj.weight"), proj.image_embeds.weight)
            v_ip = adapter.processors[1].to_v_ip[j]
            assert torch.equal(f.get_tensor("ip_adapter.3.to_v_ip.weight"), v_ip.base.weight + v_ip.up @ v_ip.down)
        ip = {f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight" for i in range(n) for kv in "kv"}
        assert keys == {f"image_proj.{k}" for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")} | ip
    with pytest.raises(ValueError, match="exactly 4 tokens"):
        BodyConditionModule(unet, image_encoder, AdapterConfig(num_tokens=8)).export_diffusers(tmp_path / "x")


def test_low_rank_kv_trains_a_fraction_of_full_copies(unet, image_encoder):
    low = BodyConditionModule(unet, image_encoder, AdapterConfig(kv_rank=4))
    full = BodyConditionModule(unet, image_encoder, AdapterConfig(kv_rank=None))

    def kv(adapter):
        return sum(p.numel() for n, p in adapter.named_parameters() if "_ip." in n and adapter._trainable(n))

    layers = cross_attention_layers(unet)
    assert kv(low) == sum(2 * 2 * 4 * (64 + hidden) for _, hidden in layers)  # 2 modalities x (K, V) x r(in+out)
    assert kv(full) == sum(2 * 2 * 64 * hidden for _, hidden in layers)
    proc = full.processors[0]
    attn = unet.get_submodule(layers[0][0][: -len(".processor")])
    assert type(proc.to_k_ip[0]) is torch.nn.Linear and torch.equal(proc.to_k_ip[0].weight, attn.to_k.weight)
    assert proc.to_k_ip[0].weight.data_ptr() != attn.to_k.weight.data_ptr()  # a trainable copy
