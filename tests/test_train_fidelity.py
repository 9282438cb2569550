"""Training-signal fidelity (issue 12): exact weights on init, shared reference crops, the person-cropped
differentiable pose, the ID chain by value (soft-argmax, keypoint mapping, body-ID and CLIP losses, the Lightning
branch against the stock pipeline), stage-2 memory options, and a mid-epoch resume."""

from __future__ import annotations

import torch

from bolid.train.module import BoLIDTrainingModule


def _module(**kw) -> BoLIDTrainingModule:
    args = dict(components="tiny", stage=2, w_id=0.3, w_clip=0.1, lightning_steps=2, grad_steps=1,
                branch_resolution=64, warmup_steps=0, lr=1e-3)  # fmt: skip
    args.update(kw)
    return BoLIDTrainingModule(**args)


# ------------------------------------------------------------------------------------ exact weights on init


def test_stage1_adapter_loads_bit_identical_into_a_bf16_stage2_module(tmp_path):
    stage1 = _module(stage=1, w_id=0.0, w_clip=0.0)
    with torch.no_grad():  # weights that bf16 cannot represent exactly
        for p in stage1.adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    saved = {k: v.clone() for k, v in stage1.adapter.adapter_state_dict().items()}
    stage1.adapter.save(tmp_path / "adapter")
    stage2 = _module(init_adapter=str(tmp_path / "adapter"), frozen_dtype="bf16")
    loaded = stage2.adapter.adapter_state_dict()
    assert loaded.keys() == saved.keys()
    for k, v in saved.items():
        assert loaded[k].dtype == torch.float32, k
        assert torch.equal(loaded[k], v), k
    # ...while the frozen parts are in bf16
    assert stage2.unet.conv_in.weight.dtype == torch.bfloat16
    assert stage2.lightning_unet.conv_in.weight.dtype == torch.bfloat16
    assert next(stage2.adapter.image_encoder.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------ reference crops, both paths


def _coco_person(fixtures, scale: float):
    """The COCO fixture photo upscaled by ``scale`` (a high-resolution stored image) and its annotated person."""
    import json

    import numpy as np
    from PIL import Image

    ann = json.loads((fixtures / "coco_000000000785.json").read_text())
    person = max((a for a in ann["annotations"] if a.get("num_keypoints")), key=lambda a: a["num_keypoints"])
    kp = np.asarray(person["keypoints"], np.float32).reshape(17, 3)
    kp[:, 2] = (kp[:, 2] > 0).astype(np.float32)  # COCO visibility -> a score of 1 or 0
    kp[:, :2] *= scale
    x, y, w, h = person["bbox"]
    box = np.asarray([x, y, x + w, y + h], np.float32) * scale
    image = Image.open(fixtures / "coco_000000000785.jpg").convert("RGB")
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    return image, kp, box


def _write_pair_shard(path, photos) -> None:
    """Two photos of one person through the real shard writer (``photos``: (image, keypoints, box))."""
    import hashlib
    import io

    from bolid.shards import ShardSample, sample_key
    from datapipe.writer import write_shard

    samples = []
    for i, (image, kp, box) in enumerate(photos):
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=95)
        sha = hashlib.sha256(buf.getvalue()).hexdigest()
        meta = ShardSample(
            identity="person-a", name="A", caption=f"a photo {i}", width=image.width, height=image.height,
            original_width=image.width, original_height=image.height, box=tuple(map(float, box)), score=0.9,
            keypoints=tuple(tuple(map(float, k)) for k in kp), face_box=None, num_persons=1, sha256=sha,
            url=None, page_url=None, source="test",
        )  # fmt: skip
        samples.append((sample_key("person-a", sha), buf.getvalue(), meta.to_json()))
    write_shard(path, samples)


def test_training_and_inference_give_the_same_reference_vectors(fixtures, tmp_path):
    """The data loader's crops of a stored photo and generate's crops of that photo give the same vectors."""
    import webdataset as wds

    from bolid.adapter import BodyConditionModule
    from bolid.data import PairDataset, batch_crops
    from bolid.image_encoder import ClipImageEncoder
    from bolid.images import load_image
    from bolid.kits.tiny import tiny_sdxl_components
    from bolid.pose import Person
    from bolid.reference import Reference, encode_references

    image, kp, box = _coco_person(fixtures, 2.5)  # 1600 x 1062
    flipped = image.transpose(0)
    flipped_kp = kp.copy()
    flipped_kp[:, 0] = image.width - kp[:, 0]
    _write_pair_shard(tmp_path / "s.tar", [(image, kp, box), (flipped, flipped_kp, box)])
    adapter = BodyConditionModule(tiny_sdxl_components()["unet"], ClipImageEncoder.from_components("tiny"))
    size = adapter.image_encoder.image_size
    ds = PairDataset([str(tmp_path / "s.tar")], {"person-a"}, 2, 1, train=False, resolution=64, crop_size=size,
                     batch_size=1)  # fmt: skip
    stored = {s["__key__"]: s["jpg"] for s in wds.tarfile_samples([{"url": str(tmp_path / "s.tar")}])}
    batches = list(ds)
    assert len(batches) == 2
    for batch in batches:
        with torch.no_grad():
            train = adapter.encode_crops(batch_crops(batch))
        photo = load_image(stored[batch["ref_key"][0]])  # what a user would pass to `bolid generate`
        ref_kp = kp if _is_unflipped(photo, image) else flipped_kp
        infer = encode_references(adapter, [Reference(photo, Person(box=box, score=0.9, keypoints=ref_kp), "ref")])
        assert bool(train.face_visible[0]) and bool(infer.face_visible[0])
        torch.testing.assert_close(train.face, infer.face, rtol=0, atol=1e-6)
        torch.testing.assert_close(train.body, infer.body, rtol=0, atol=1e-6)


def _is_unflipped(photo, image) -> bool:
    import numpy as np

    a, b = np.asarray(photo, np.float32), np.asarray(image, np.float32)
    return float(np.abs(a - b).mean()) < float(np.abs(a - b[:, ::-1]).mean())


def test_face_crop_from_the_full_resolution_photo_is_sharper_than_from_a_letterbox(fixtures):
    """The old path cut the face from a 512 px letterbox; at EVA-CLIP's 336 px the crop was an upsampled blur."""
    from bolid.crops import crop_reference, reference_crops
    from bolid.data import letterbox

    image, kp, box = _coco_person(fixtures, 2.5)
    full = reference_crops(image, kp, box, 336)
    small, small_kp, small_box = letterbox(image, kp, box, 512)
    old = crop_reference(small[None], small_kp[None], small_box[None], 336)

    def detail(x: torch.Tensor) -> float:  # mean absolute difference of neighbouring pixels
        return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())

    assert bool(full.face_visible[0]) and bool(old.face_visible[0])
    # The fixture is a 640 px photo upscaled 2.5x, so the full-resolution crop holds only its 640 px detail: 1.38x.
    assert detail(full.face) > 1.3 * detail(old.face), (detail(full.face), detail(old.face))


# ------------------------------------------------------------------------- person-cropped differentiable pose


class _BlobHeatmaps(torch.nn.Module):
    """A stand-in for ViTPose whose heatmap k (k < 3) is colour channel k of its input, 4x average-pooled: a
    Gaussian blob drawn in channel k of the image is keypoint k. Differentiable, like the real model."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a dtype

    def forward(self, pixel_values):
        from types import SimpleNamespace

        x = pixel_values * self.std + self.mean  # back to [0, 1]
        heat = torch.nn.functional.avg_pool2d(x, 4)  # (B, 3, 64, 48)
        pad = torch.zeros(x.shape[0], 14, *heat.shape[-2:], dtype=heat.dtype)
        return SimpleNamespace(heatmaps=torch.cat([heat, pad], 1))


def _blob_image(size: int, box: tuple[float, float, float, float], points) -> torch.Tensor:
    """A black ``size`` square in ``[-1, 1]`` with one Gaussian blob per point (channel k = point k); the blob's
    width scales with the person box (about 3 heatmap pixels of ViTPose's 64 x 48 once the person is cropped)."""
    x0, y0, x1, y1 = box
    sigma = 3.0 * 4 * 1.25 * (y1 - y0) / 256
    ys = torch.arange(size, dtype=torch.float64)[:, None] + 0.5  # pixel centres
    xs = torch.arange(size, dtype=torch.float64)[None, :] + 0.5
    img = torch.zeros(3, size, size, dtype=torch.float64)
    for k, (px, py) in enumerate(points):
        img[k] = torch.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2 * sigma**2))
    return (img * 2 - 1).float()[None]


def _person(size: int, height: float, cx: float, top: float):
    """A person box of ``height`` (width 0.3 of it) and three keypoints: head, hip and ankle."""
    box = (cx - 0.15 * height, top, cx + 0.15 * height, top + height)
    points = [(cx + 0.01 * height, top + 0.06 * height), (cx - 0.05 * height, top + 0.53 * height),
              (cx + 0.07 * height, top + 0.96 * height)]  # fmt: skip
    return box, points


def _synthetic_pose():
    from types import SimpleNamespace

    from bolid.losses import DifferentiablePose

    proc = SimpleNamespace(size={"height": 256, "width": 192}, image_mean=[0.485, 0.456, 0.406],
                           image_std=[0.229, 0.224, 0.225])  # fmt: skip
    return DifferentiablePose(_BlobHeatmaps(proc.image_mean, proc.image_std), proc)


def test_person_cropped_pose_recovers_keypoints_of_small_and_large_persons():
    pose = _synthetic_pose()
    for size, height, cx, top in ((512, 60.0, 140.3, 301.7), (1024, 900.0, 611.2, 50.4)):
        box, points = _person(size, height, cx, top)
        images = _blob_image(size, box, points).requires_grad_(True)
        kp = pose(images, torch.tensor([box]))
        err = (kp[0, :3, :2].double() - torch.tensor(points, dtype=torch.float64)).norm(dim=-1)
        assert float(err.max()) < 1.0, (height, err.detach())
        assert bool((kp[0, :3, 2] > 0.5).all())
        # gradients reach the image, where the keypoints are
        kp[0, :3, :2].sum().backward()
        g = images.grad[0].abs().sum(0)
        assert float(g.sum()) > 0
        px, py = map(int, points[1])
        assert float(g[py - 2 : py + 3, px - 2 : px + 3].sum()) > 0
        # ...and the box found without gradient (a coarse whole-frame pass) frames the same person
        found = pose.locate(images.detach())[0]
        assert abs(float(found[1] + found[3]) / 2 - (box[1] + box[3]) / 2) < 0.1 * height
        assert abs(float(found[3] - found[1]) - height) < 0.2 * height
        kp_auto = pose(images.detach())  # framed by that box the blobs are narrower than drawn for: 2 px
        assert float((kp_auto[0, :3, :2].double() - torch.tensor(points, dtype=torch.float64)).norm(dim=-1).max()) < 2.0


def test_whole_frame_pose_is_coarse_for_a_small_person():
    """Without the person crop (today's whole-frame read) a 60 px person's keypoints are off by pixels."""
    pose = _synthetic_pose()
    box, points = _person(512, 60.0, 140.3, 301.7)
    images = _blob_image(512, box, points)
    whole = pose(images, torch.tensor([[0.0, 0.0, 512.0, 512.0]]))
    cropped = pose(images, torch.tensor([box]))
    truth = torch.tensor(points)
    assert float((whole[0, :3, :2] - truth).norm(dim=-1).max()) > 2 * float(
        (cropped[0, :3, :2] - truth).norm(dim=-1).max()
    )


# ------------------------------------------------------------------------------- L_clip image half, diagnostics


def _batch(shards, module, batch_size: int = 2) -> dict:
    from bolid.data import PairDataset
    from bolid.shards import read_index

    ds = PairDataset.from_index(read_index(shards), "train", train=False, resolution=64,
                                crop_size=module.adapter.image_encoder.image_size, batch_size=batch_size)  # fmt: skip
    return next(iter(ds))


def test_clip_image_term_is_weighted_and_pulls_toward_the_reference(tiny_shards):
    module = _module(w_clip_image=0.5, grad_norm_every_n_steps=1)
    batch = _batch(tiny_shards, module)
    out = module.id_losses(batch, torch.Generator().manual_seed(0))
    assert set(out) >= {"loss_id", "loss_clip", "loss_clip_image", "id_valid", "kp_valid"}
    # by value: the image term is 1 - cos of the EVA-CLIP embeddings of the generated images and the references
    clip = module.clip_loss
    gen = module.lightning_branch(module._identity(batch), batch["caption"], torch.Generator().manual_seed(0), 64, 2)
    a = clip.image_encoder((gen + 1) / 2)
    b = clip.image_encoder(batch["ref_image"])
    torch.testing.assert_close(out["loss_clip_image"], (1 - torch.cosine_similarity(a, b, dim=-1)).mean())
    # an image equal to the reference has no image loss; the off switch drops the term
    torch.testing.assert_close(clip.image_loss(batch["ref_image"] * 2 - 1, batch["ref_image"]), torch.tensor(0.0),
                               atol=1e-5, rtol=0)  # fmt: skip
    assert "loss_clip_image" not in _module().id_losses(batch, torch.Generator().manual_seed(0))


def test_term_grad_norms_equal_separate_backward_passes(tiny_shards):
    module = _module(w_clip_image=0.5)
    batch = _batch(tiny_shards, module)
    g = torch.Generator().manual_seed(0)
    parts = {"loss_diff": module.diffusion_loss(batch, g)}
    out = module.id_losses(batch, g)
    parts.update({k: out[k] for k in ("loss_id", "loss_clip", "loss_clip_image")})
    norms = module.term_grad_norms(parts)
    params = list(module.trainable_named_parameters().values())
    for name, weight in (("diff", 1.0), ("id", 0.3), ("clip", 0.1), ("clip_image", 0.5)):
        module.zero_grad(set_to_none=True)
        (weight * parts[f"loss_{name}"]).backward(retain_graph=True)
        expected = torch.sqrt(sum((p.grad**2).sum() for p in params if p.grad is not None))
        torch.testing.assert_close(norms[f"grad_norm_{name}"], expected, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(norms["grad_ratio_id_diff"], norms["grad_norm_id"] / norms["grad_norm_diff"])


# ------------------------------------------------------------------- the Lightning branch against the stock pipeline


def _coco_identity(module, fixtures):
    """Face and body vectors (with gradients into the heads) of the COCO fixture's person; its face is visible."""
    from bolid.crops import reference_crops

    image, kp, box = _coco_person(fixtures, 0.25)
    embeds = module.adapter.encode_crops(reference_crops(image, kp, box, module.adapter.image_encoder.image_size))
    assert bool(embeds.face_visible.all())
    return embeds


def _stock(module, unet):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    p = module._prompt_pipe
    scheduler = EulerDiscreteScheduler.from_config(module.sample_scheduler.config)
    pipe = StableDiffusionXLPipeline(
        vae=module.vae, text_encoder=module.text_encoder, text_encoder_2=module.text_encoder_2, tokenizer=p.tokenizer,
        tokenizer_2=p.tokenizer_2, unet=unet, scheduler=scheduler,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_images(pipe, embeds, caption: str, seed: int, steps: int = 2, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = size // pipe.vae_scale_factor
    latents = torch.randn(1, 4, side, side, generator=g)  # as the branch draws them
    with torch.no_grad():
        out = pipe(prompt=[caption], height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
                   latents=latents, ip_adapter_image_embeds=[e.detach() for e in embeds.image_embeds()],
                   output_type="pt")  # fmt: skip
    return out.images


def test_lightning_branch_matches_the_stock_pipeline_and_reaches_every_trainable_group(fixtures):
    module = _module()
    embeds = _coco_identity(module, fixtures)
    images = module.lightning_branch(embeds, ["a person on a beach"], torch.Generator().manual_seed(5), 64, 2, 1)
    ours = (images / 2 + 0.5).clamp(0, 1)
    theirs = _stock_images(_stock(module, module.lightning_unet), embeds, "a person on a beach", 5)
    torch.testing.assert_close(ours.detach(), theirs, rtol=0, atol=1e-4)
    images.square().mean().backward()
    for group in (module.adapter.face_encoder, module.adapter.body_encoder, module.adapter.image_proj,
                  module.adapter.processors):  # fmt: skip
        grads = [p.grad for p in group.parameters() if p.requires_grad and p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), type(group).__name__


# ------------------------------------------------------------------------------------- stage-2 memory options


def test_lightning_lora_on_the_base_unet_matches_the_stock_pipeline_with_diffusers_lora(fixtures, tmp_path):
    """model.lightning_weights: lora holds one UNet; the branch equals a stock pipeline that loaded the same LoRA
    file with diffusers' load_lora_weights, and the diffusion loss still sees the plain base UNet."""
    from safetensors.torch import save_file

    from bolid.kits.tiny import tiny_lightning_lora, tiny_sdxl_components

    two = _module()
    one = _module(lightning_weights="lora")
    assert one.lightning_unet is None and one.lightning_lora

    def frozen(module, part=None) -> int:  # parameters held by the module (or one part of it), the adapter's aside
        mine = {id(p) for p in module.adapter.parameters()}
        return sum(p.numel() for p in (part or module).parameters() if id(p) not in mine)

    lora = sum(p.numel() for n, p in one.unet.named_parameters() if ".lightning." in n)
    assert frozen(one) == frozen(two) - frozen(two, two.lightning_unet) + lora
    assert lora < 0.2 * frozen(two, two.lightning_unet)
    assert lora > 0 and not any(p.requires_grad for n, p in one.unet.named_parameters() if ".lightning." in n)

    embeds = _coco_identity(one, fixtures)
    images = one.lightning_branch(embeds, ["a person in a park"], torch.Generator().manual_seed(2), 64, 2, 1)
    fresh = tiny_sdxl_components()["unet"]  # the same seeded base UNet, loaded the stock way
    save_file(tiny_lightning_lora(fresh), tmp_path / "lora.safetensors")
    pipe = _stock(one, fresh)
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    one.adapter.install(fresh)
    theirs = _stock_images(pipe, embeds, "a person in a park", 2)
    torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1).detach(), theirs, rtol=0, atol=1e-4)
    # outside the branch the UNet is the base again (the LoRA is off), and the LoRA does change the output
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    text = torch.randn(1, 77, one.unet.config.cross_attention_dim)
    added = one.adapter.unet_kwargs(embeds, x, added_cond_kwargs={
        "text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})  # fmt: skip
    base = tiny_sdxl_components()["unet"]
    one.adapter.install(base)
    with torch.no_grad():
        off = one.unet(x, t, text, **added).sample
        with one.lightning_lora_on():
            on = one.unet(x, t, text, **added).sample
        plain = base(x, t, text, **added).sample
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-6)
    assert float((on - plain).abs().max()) > 1e-2
    images.mean().backward(retain_graph=True)  # gradients through the LoRA-on UNet reach the adapter
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in one.adapter.processors.parameters())


def test_lightning_lora_loads_by_path_and_fails_fast_offline(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from bolid import components as comp
    from bolid.kits.tiny import tiny_lightning_lora, tiny_sdxl_components

    unet = tiny_sdxl_components()["unet"]
    folder = tmp_path / "lightning"
    folder.mkdir()
    save_file(tiny_lightning_lora(unet), folder / comp.COMPONENTS["sdxl_lightning_lora"].filename)
    comp.load("sdxl_lightning_lora", "real", str(folder), unet=unet)  # a folder holding the file
    assert any(".lightning." in n for n, _ in unet.named_parameters())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("BOLID_SDXL_LIGHTNING_LORA", raising=False)
    other = tiny_sdxl_components()["unet"]
    import pytest

    with pytest.raises(comp.MissingWeightsError, match="sdxl_lightning_lora.*ByteDance/SDXL-Lightning"):
        comp.load("sdxl_lightning_lora", "real", unet=other)
    with pytest.raises(comp.MissingWeightsError, match="no such file"):
        comp.load("sdxl_lightning_lora", "real", str(tmp_path / "nowhere.safetensors"), unet=other)


def test_vae_decoder_checkpointing_keeps_the_gradients_and_saves_activations(fixtures):
    plain, ckpt = _module(), _module(vae_checkpointing=True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    results = []
    for module in (plain, ckpt):
        x = latents.clone().requires_grad_(True)
        saved = []
        up_calls = []
        hook = module.vae.decoder.up_blocks[0].register_forward_pre_hook(lambda *a, calls=up_calls: calls.append(1))

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            images = module.decode(x)
        images.square().mean().backward()
        hook.remove()
        results.append((images.detach(), x.grad, sum(saved), len(up_calls)))
    (img_a, grad_a, bytes_a, calls_a), (img_b, grad_b, bytes_b, calls_b) = results
    torch.testing.assert_close(img_b, img_a)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-7)
    assert (calls_a, calls_b) == (1, 2)  # the up-blocks are recomputed in the backward pass
    assert bytes_b < 0.5 * bytes_a, (bytes_a, bytes_b)


# ------------------------------------------------------------------------------------- the ID chain by value


def test_soft_argmax_by_value():
    from bolid.losses import soft_argmax

    h, w = 16, 12
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    blob = torch.exp(-((xs - 5.3) ** 2 + (ys - 7.6) ** 2) / (2 * 2.0**2))  # a ViTPose-like peak (sigma 2)
    delta = torch.zeros(h, w, dtype=torch.float64)
    delta[4, 3] = 0.8
    twin = torch.zeros(h, w, dtype=torch.float64)
    twin[6, 2] = twin[6, 8] = 1.0
    maps = torch.stack([blob, delta, twin])[None].float().requires_grad_(True)  # (1, 3, h, w)
    xy, conf = soft_argmax(maps)
    # beta = 50 on a sigma-2 peak is close to a hard argmax: it leans toward the nearest heatmap pixel by 0.21 px
    torch.testing.assert_close(xy[0, 0], torch.tensor([5.3, 7.6]), atol=0.25, rtol=0)
    xy_soft, _ = soft_argmax(maps.detach(), beta=5.0)  # a softer one is sub-pixel (the background pulls a little)
    torch.testing.assert_close(xy_soft[0, 0], torch.tensor([5.3, 7.6]), atol=0.05, rtol=0)
    torch.testing.assert_close(xy[0, 1], torch.tensor([3.0, 4.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(xy[0, 2], torch.tensor([5.0, 6.0]), atol=1e-6, rtol=0)  # two equal peaks: midway
    torch.testing.assert_close(conf[0], torch.tensor([float(blob.max()), 0.8, 1.0]))
    xy[0, 0, 0].backward()  # raising the heatmap right of the peak moves x right
    g = maps.grad[0, 0]
    assert float(g[8, 7]) > 0 > float(g[8, 4])


def test_pose_crop_region_and_keypoint_mapping_by_value():
    from types import SimpleNamespace

    from bolid.losses import DifferentiablePose, pose_input_boxes

    # a 100 x 100 box grows to ViTPose's 3:4 (100 x 133.3), then by 1.25, around its centre (60, 250)
    region = pose_input_boxes(torch.tensor([[10.0, 200.0, 110.0, 300.0]]), (256, 192))
    torch.testing.assert_close(region, torch.tensor([[60 - 62.5, 250 - 250 / 3, 60 + 62.5, 250 + 250 / 3]]))
    wide = pose_input_boxes(torch.tensor([[0.0, 0.0, 300.0, 100.0]]), (256, 192))  # too wide: grows in height
    torch.testing.assert_close(wide, torch.tensor([[150 - 187.5, 50 - 250.0, 150 + 187.5, 50 + 250.0]]))

    class Peak(torch.nn.Module):  # heatmaps with one peak at heatmap pixel (x=10, y=40), whatever the input
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, pixel_values):
            maps = torch.zeros(pixel_values.shape[0], 17, 64, 48)
            maps[:, :, 40, 10] = 1.0
            return SimpleNamespace(heatmaps=maps + 0 * pixel_values.mean())

    proc = SimpleNamespace(size={"height": 256, "width": 192}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pose = DifferentiablePose(Peak(), proc)
    kp = pose(torch.zeros(1, 3, 400, 400), torch.tensor([[10.0, 200.0, 110.0, 300.0]]))
    # heatmap pixel centre (10.5, 40.5) of 48 x 64 -> region (125 x 166.7 px from (-2.5, 166.7))
    expected = torch.tensor([-2.5 + 10.5 * 125 / 48, 250 - 250 / 3 + 40.5 * (500 / 3) / 64])
    torch.testing.assert_close(kp[0, 0, :2], expected)


def _skeleton(scale: float = 1.0, shift=(0.0, 0.0), left_forearm: float = 25.0) -> torch.Tensor:
    """COCO-17 keypoints of a hand-built body: torso 100, upper arm 30, forearm 25, thigh 45, shin 45, shoulder
    and hip width 40 (proportions 0.3, 0.25, 0.45, 0.45, 0.4, 0.4); face points at score 0."""
    kp = torch.zeros(17, 3)
    for side, x in ((0, -20.0), (1, 20.0)):
        forearm = left_forearm if side == 0 else 25.0
        for idx, y in ((5, 0.0), (7, 30.0), (9, 30.0 + forearm), (11, 100.0), (13, 145.0), (15, 190.0)):
            kp[idx + side] = torch.tensor([x, y, 1.0])
    kp[:, :2] = kp[:, :2] * scale + torch.tensor(shift)
    return kp[None]


def test_body_identity_loss_by_value():
    """L_id compares body-shape estimates (bolid.body_shape, the "loss" network); see its docstring."""
    from bolid.body_shape import load
    from bolid.losses import body_identity_loss

    net = load("loss")
    ref = _skeleton()
    # the same build at another scale and place: the estimates are equal, no loss, the pair is valid
    loss, valid = body_identity_loss(_skeleton(3.0, (400.0, 50.0)), ref)
    assert float(loss) < 1e-10 and float(valid) == 1.0
    # a left forearm of 35 instead of 25: the formula, by value, on the network's own estimates
    gen = _skeleton(3.0, (400.0, 50.0), left_forearm=35.0).requires_grad_(True)
    loss, valid = body_identity_loss(gen, ref)
    eg, er = net(gen.detach(), 0.3), net(ref, 0.3)
    w = 1 / (eg.var + er.var)
    expected = torch.log1p((w * (eg.mean - er.mean) ** 2).sum() / (w * (2 - eg.var - er.var)).sum())
    torch.testing.assert_close(loss, expected)
    assert float(loss) > 1e-4
    loss.backward()
    assert float(gen.grad[0, 9, :2].abs().sum()) > 0  # the gradient reaches the moved wrist
    assert float(gen.grad[..., 2].abs().sum()) == 0  # the confidence is a detached mask
    # both ankles unsure in the generated image: the pair still counts, the estimate has less to go on
    low = _skeleton(3.0, (400.0, 50.0), left_forearm=35.0)
    low[0, 15:17, 2] = 0.1
    _, valid = body_identity_loss(low, ref)
    assert float(valid) == 1.0
    assert float(net(low, 0.3).var.mean()) > float(net(gen.detach(), 0.3).var.mean())


def test_clip_text_loss_by_value():
    from PIL import Image

    from bolid.image_encoder import ClipImageEncoder
    from bolid.kits.tiny import TINY_EVA_CLIP, tiny_eva_clip
    from bolid.losses import ClipTextLoss

    model, preprocess, tokenizer = tiny_eva_clip()
    loss_fn = ClipTextLoss(ClipImageEncoder(model, TINY_EVA_CLIP), model, tokenizer)
    size = loss_fn.image_encoder.image_size
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(1, 3, size, size, generator=g) * 255).round() / 255
    pil = Image.fromarray((pixels[0].permute(1, 2, 0) * 255).round().byte().numpy())
    captions = ["a person on a beach"]
    # open_clip's own preprocessing and towers: 1 - cos(image, text)
    with torch.no_grad():
        img = model.encode_image(preprocess(pil)[None])
        txt = model.encode_text(tokenizer(captions))
    expected = 1 - torch.cosine_similarity(img, txt)[0]
    images = (pixels * 2 - 1).requires_grad_(True)  # the loss takes [-1, 1] images, as the VAE decodes them
    loss = loss_fn(images, captions)
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=0)
    # differentiable in the image: a few gradient steps on the pixels lower it
    x = images.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        value = loss_fn(x, captions)
        value.backward()
        opt.step()
    assert float(loss_fn(x, captions)) < float(loss) - 0.01


# ----------------------------------------------------------------------------------------- mid-epoch resume


class _Kill(__import__("lightning").Callback):
    """Crash the run at the start of a given step (after that step's checkpoint was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def _fit(tmp, shards, max_steps: int, ckpt_path=None, kill_at=None) -> dict[str, torch.Tensor]:
    import lightning as L

    from bolid.train.datamodule import PairDataModule

    L.seed_everything(0)
    module = _module(ema_decay=0.9, w_clip_image=0.1)
    dm = PairDataModule(str(shards), resolution=64, batch_size=1, num_workers=0, shuffle_buffer=4, resampled=True,
                        epoch_pairs=8)  # fmt: skip
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp, save_last=True, every_n_train_steps=3, save_top_k=-1)
    callbacks = [ckpt] + ([_Kill(kill_at)] if kill_at is not None else [])
    trainer = L.Trainer(max_steps=max_steps, logger=False, callbacks=callbacks, enable_progress_bar=False,
                        limit_val_batches=0, num_sanity_val_steps=0, deterministic=True, default_root_dir=tmp,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    assert dm._datasets["train"].batches_per_epoch > max_steps  # all of it inside the first epoch
    return {k: v.detach().clone() for k, v in module.trainable_named_parameters().items()} | {
        f"ema.{k}": v for k, v in (module.ema_state_dict() or {}).items()
    }


@__import__("pytest").mark.slow
def test_a_run_killed_mid_epoch_resumes_to_exactly_the_same_weights(tiny_shards, tmp_path):
    """Stage 2 (all losses, EMA): killed after step 3's checkpoint, resumed, stopped at step 5 of the same epoch."""
    import pytest

    straight = _fit(tmp_path / "a", tiny_shards, 5)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(tmp_path / "b", tiny_shards, 5, kill_at=4)
    ckpt = tmp_path / "b" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    resumed = _fit(tmp_path / "b", tiny_shards, 5, ckpt_path=str(ckpt))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


# ------------------------------------------------------------------------- the real configs on the tiny kit


@__import__("pytest").mark.slow
@__import__("pytest").mark.parametrize("name", ["stage1.yaml", "stage2.yaml"])
def test_stage_configs_run_on_the_tiny_kit(name, tiny_shards, tmp_path, monkeypatch):
    """configs/fit/stage{1,2}.yaml with their own defaults (bf16 frozen weights, bf16-mixed, checkpointing; stage 2's
    Lightning LoRA, VAE checkpointing, k = 2, gradient-norm diagnostics) for two steps, swapped to the tiny kit
    and small images only."""
    from pathlib import Path

    from bolid.train.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "fit" / name
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(config), "--model.components", "tiny", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.callbacks", "null", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--model.sample_every_n_steps", "0", "--model.init_adapter",
            "null", "--data.shards", str(tiny_shards), "--data.resolution", "64", "--data.batch_size", "1",
            "--data.num_workers", "0", "--data.epoch_pairs", "4", "--model.grad_norm_every_n_steps", "1"]  # fmt: skip
    if name == "stage2.yaml":
        args += ["--model.branch_resolution", "64", "--model.lightning_steps", "2"]
    assert main(args) == 0


def test_gradient_checkpointing_with_the_lightning_lora_gives_the_same_gradients(fixtures):
    """One backward pass recomputes both the L_diff UNet (LoRA off) and the branch UNet (LoRA on): each block is
    recomputed with the LoRA as it was in its forward pass, so the gradients equal the un-checkpointed ones."""
    grads, state = [], None
    for ckpt in (False, True):
        module = _module(lightning_weights="lora", gradient_checkpointing=ckpt)
        if state is None:
            state = {k: v.clone() for k, v in module.adapter.adapter_state_dict().items()}
        module.adapter.load_state_dict(state, strict=False)
        embeds = _coco_identity(module, fixtures)
        images = module.lightning_branch(embeds, ["a person"], torch.Generator().manual_seed(0), 64, 2, 2)
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        added = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        text = torch.randn(1, 77, module.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
        diff = module._unet(module.unet, x, torch.tensor([300]), text, added["text_embeds"], added["time_ids"], embeds)
        (images.square().mean() + diff.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in module.trainable_named_parameters().items() if p.grad is not None})
        assert not any(p.requires_grad for n, p in module.unet.named_parameters() if ".lightning." in n)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-7, msg=k)
