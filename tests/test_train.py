"""Training: identity pairs, the three losses, overfitting a fixed batch, exact resume, and the tiny config."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from bolid.data import PairDataset, crop_keypoints, identity_pairs, resize_and_crop
from bolid.train.datamodule import PairDataModule
from bolid.train.module import BoLIDTrainingModule, NonFiniteLossError, reference_swap

ROOT = Path(__file__).resolve().parents[1]


def _module(**kw) -> BoLIDTrainingModule:
    args = dict(components="tiny", stage=2, w_id=0.3, w_clip=0.1, lightning_steps=2, grad_steps=1,
                branch_resolution=64, warmup_steps=0, lr=1e-3)  # fmt: skip
    args.update(kw)
    return BoLIDTrainingModule(**args)


def _batch(shards: Path, split: str = "train", batch_size: int = 2) -> dict:
    from bolid.shards import read_index

    ds = PairDataset.from_index(
        read_index(shards), split, train=False, resolution=64, crop_size=32, batch_size=batch_size
    )
    return next(iter(ds))


# ----------------------------------------------------------------------------------------------- pairs


def test_pairs_never_self_and_never_cross_identities():
    samples = [{"identity": f"p{i}", "__key__": f"p{i}_{j}"} for i, n in enumerate([3, 1, 5, 2]) for j in range(n)]
    singles = []
    pairs = list(identity_pairs(iter(samples), random.Random(0), on_singleton=singles.append))
    assert singles == ["p1"]
    assert sorted(t["__key__"] for _, t in pairs) == sorted(s["__key__"] for s in samples if s["identity"] != "p1")
    for ref, target in pairs:
        assert ref["identity"] == target["identity"] and ref["__key__"] != target["__key__"]


def test_resampled_stream_never_pairs_a_photo_with_itself(tiny_shards):
    from bolid.shards import read_index

    ds = PairDataset.from_index(read_index(tiny_shards), "train", train=True, resolution=64, crop_size=32,
                                batch_size=1, resampled=True, epoch_pairs=300)  # fmt: skip
    pairs = [(b["key"][0], b["ref_key"][0]) for b in ds]
    assert len(pairs) == 300  # drawn with replacement: the same shard often comes twice in a row
    assert all(key != ref and key.rsplit("_", 1)[0] == ref.rsplit("_", 1)[0] for key, ref in pairs)


def test_shard_stream_pairs_each_sample_once_per_epoch(tiny_shards):
    from bolid.shards import read_index

    index = read_index(tiny_shards)
    ds = PairDataset.from_index(index, "train", train=True, resolution=64, crop_size=32, batch_size=1, shuffle_buffer=4)
    keys, refs = [], []
    for batch in ds:
        assert batch["identity"][0] == batch["key"][0].split("_")[0].replace("-", "-")
        keys.append(batch["key"][0])
        refs.append(batch["ref_key"][0])
        assert batch["key"][0] != batch["ref_key"][0]
        assert batch["key"][0].rsplit("_", 1)[0] == batch["ref_key"][0].rsplit("_", 1)[0]  # same identity
    train_ids = set(index.identities_in("train"))
    expected = sum(index.identities[i]["count"] for i in train_ids)
    assert len(keys) == len(set(keys)) == expected  # every train sample exactly once as a target
    assert {k.rsplit("_", 1)[0] for k in keys} == train_ids  # no validation/test person leaks in


def test_sdxl_time_ids_follow_the_crop():
    from PIL import Image

    img = Image.new("RGB", (300, 200))
    pixels, crop = resize_and_crop(img, 100, original_size=(2000, 3000), random_crop=False)
    assert pixels.shape == (3, 100, 100) and -1 <= pixels.min() and pixels.max() <= 1
    # resized to 150x100, centre crop starts at left=25; original size is the photo's, before any resize
    assert crop.time_ids().tolist() == [2000, 3000, 0, 25, 100, 100]
    _, flipped = resize_and_crop(img, 100, original_size=(2000, 3000), random_crop=False, flip=True)
    assert flipped.crop_top_left == (0, 150 - 25 - 100)


@pytest.mark.parametrize("flip", [False, True])
def test_target_keypoints_follow_the_crop(flip):
    """A bright pixel at each keypoint of the stored image is where the moved keypoint says, after the resize,
    a random crop and the flip."""
    import random

    import numpy as np
    from PIL import Image

    points = np.array([[40.0, 30.0, 0.9], [250.0, 170.0, 0.8], [160.0, 60.0, 0.0]], np.float32)
    kp = np.zeros((17, 3), np.float32)
    kp[[5, 9, 16]] = points
    for seed in range(3):
        arr = np.zeros((200, 300, 3), np.uint8)
        for x, y, _ in points:
            arr[int(y) - 6 : int(y) + 6, int(x) - 6 : int(x) + 6] = 255
        pixels, crop = resize_and_crop(Image.fromarray(arr), 100, random_crop=True, flip=flip, rng=random.Random(seed))
        moved = crop_keypoints(kp, (300, 200), crop, flip)
        assert torch.equal(moved[:, 2], torch.from_numpy(kp[:, 2]))
        for x, y in moved[[5, 9, 16], :2].tolist():
            if 1 <= x < 99 and 1 <= y < 99:  # inside the crop: on the bright square
                assert pixels[:, int(y), int(x)].min() > 0.5, (seed, x, y)


# ---------------------------------------------------------------------------------------------- losses


def test_body_weighted_mse_counts_the_body_more():
    from bolid.losses import body_weighted_mse

    pred, target = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    kp = torch.zeros(2, 17, 3)
    kp[:, 5:, :2] = torch.tensor([24.0, 20.0])  # every body point on latent pixel (6, 5) of a 64 px crop
    kp[:, 5:, 2] = 0.9
    plain = torch.nn.functional.mse_loss(pred, target)
    torch.testing.assert_close(body_weighted_mse(pred, target, kp, 64, 0.0, 0.05), plain)
    hidden = kp.clone()
    hidden[..., 2] = 0.0  # nobody visible: uniform weights
    torch.testing.assert_close(body_weighted_mse(pred, target, hidden, 64, 10.0, 0.05), plain)

    zero = torch.zeros(2, 4, 16, 16)
    on_body, off_body = zero.clone(), zero.clone()
    on_body[:, :, 5, 6] = 1.0
    off_body[:, :, 15, 0] = 1.0
    cost = {name: body_weighted_mse(e, zero, kp, 64, 10.0, 0.05).item() for name, e in
            (("body", on_body), ("background", off_body))}  # fmt: skip
    # The peak of W is 1 on the body and exp(-d^2 / 2 sigma^2) ~ 0 in the far corner: 11x the cost.
    assert cost["body"] / cost["background"] == pytest.approx(11.0, rel=1e-3), cost


def test_each_loss_is_finite_and_reaches_only_trainable_parameters(tiny_shards):
    module = _module()
    batch = _batch(tiny_shards)
    trainable = {id(p) for p in module.adapter.trainable_parameters()}
    assert trainable and all(p.requires_grad == (id(p) in trainable) for p in module.parameters())
    g = torch.Generator().manual_seed(0)
    losses = {"loss_diff": module.diffusion_loss(batch, g), **module.id_losses(batch, g)}
    for name in ("loss_diff", "loss_id", "loss_clip"):
        loss = losses[name]
        assert torch.isfinite(loss), name
        module.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        grads = [p for p in module.parameters() if p.grad is not None]
        assert grads, f"{name} reaches no parameter"
        assert all(id(p) in trainable for p in grads), f"{name} reaches a frozen parameter"
        assert any(p.grad.abs().sum() > 0 for p in grads), name


def test_reference_swap_uses_every_reference_once_and_never_the_same_person():
    """A permutation across people; the largest group is cut to the rest's size so that one exists."""
    for people in (list("AABB"), list("ABCAB"), list("AAAAAAAAAAAABBBB"), list("ABBBCCCCCD")):
        keep, other = reference_swap(people)
        assert sorted(other) == list(range(len(keep))), people  # every kept reference taken exactly once
        assert all(people[keep[i]] != people[keep[j]] for i, j in enumerate(other)), people
        assert keep == sorted(keep)
    keep, _ = reference_swap(list("AAAAAAAAAAAABBBB"))
    assert [list("AAAAAAAAAAAABBBB")[i] for i in keep] == list("AAAABBBB")  # 12 A cut to the 4 B
    assert len(reference_swap(list("ABBBCCCCCD"))[0]) == 10  # C is exactly half: nothing cut
    assert reference_swap(["A", "A", "A"]) is None


def test_reference_gain_compares_references_on_the_same_noise(tiny_shards):
    """val/ref_gain: L_diff with another person's reference minus with the right one, on the same noise,
    timesteps and text. It is exactly 0 when the identity terms are off, and exactly what two separate
    diffusion_loss calls with swapped references give when they are on."""
    from bolid.adapter import IdentityEmbeds

    module = _module(stage=1, w_id=0.0, w_clip=0.0).eval()
    a, b = _batch(tiny_shards, "train"), _batch(tiny_shards, "validation")  # the tiny splits hold one person each
    batch = {k: torch.cat([a[k], b[k]]) if isinstance(a[k], torch.Tensor) else a[k] + b[k] for k in a}
    people = batch["identity"]
    assert len(set(people)) >= 2, people
    for p in module.adapter.trainable_parameters():  # a trained-looking adapter: the references matter
        p.data.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    with torch.no_grad():
        gain = module.reference_gain(batch, seed=5)
        own = module._identity(batch)
        keep, other = reference_swap(people)
        assert keep == list(range(len(people)))  # two photos of each of two people: nothing to cut
        swapped = IdentityEmbeds(own.face[other], own.body[other], own.face_visible[other])
        by_hand = [module.diffusion_loss(batch, torch.Generator().manual_seed(5), False, identity=e)
                   for e in (own, swapped)]  # fmt: skip
        assert torch.equal(gain["loss_diff"], by_hand[0]) and torch.equal(gain["loss_diff_other_ref"], by_hand[1])
        assert abs(float(gain["ref_gain"])) > 1e-4  # the reference changes the prediction
        module.adapter.set_scales(face=0.0, body=0.0)  # identity off: who the reference shows cannot matter
        off = module.reference_gain(batch, seed=5)
        assert float(off["ref_gain"]) == 0.0, float(off["ref_gain"])
        one_person = {k: v[:1] if isinstance(v, (list, torch.Tensor)) else v for k, v in batch.items()}
        assert module.reference_gain(one_person, seed=5) is None


def test_caption_gain_compares_captions_on_the_same_noise(tiny_shards):
    """val/caption_gain, the scale for val/ref_gain: L_diff with the next sample's caption against the batch's own
    L_diff on the same noise and timesteps; exactly what a separate diffusion_loss call on rolled captions gives."""
    module = _module(stage=1, w_id=0.0, w_clip=0.0).eval()
    a, b = _batch(tiny_shards, "train"), _batch(tiny_shards, "validation")
    batch = {k: torch.cat([a[k], b[k]]) if isinstance(a[k], torch.Tensor) else a[k] + b[k] for k in a}
    batch["caption"] = [f"a photo of a person {place}" for place in ("on a beach", "in a city", "in a forest")] + [
        "a photo of a person in the snow"
    ] * (len(batch["caption"]) - 3)
    with torch.no_grad():
        own = module.diffusion_loss(batch, torch.Generator().manual_seed(5), False)
        gain = module.caption_gain(batch, seed=5, loss=own)
        rolled = batch["caption"][1:] + batch["caption"][:1]
        by_hand = module.diffusion_loss(batch, torch.Generator().manual_seed(5), False, text=module.encode_text(rolled))
        assert torch.equal(gain["loss_diff_other_caption"], by_hand)
        assert torch.allclose(gain["caption_gain"], (by_hand - own) / own)
        assert abs(float(gain["caption_gain"])) > 1e-4  # another caption changes the prediction
        same = {**batch, "caption": [batch["caption"][0]] * len(batch["caption"])}
        assert module.caption_gain(same, seed=5, loss=own) is None  # nothing to swap


def test_proportions_body_shape_drives_l_id_and_survives_the_adapter_file(tiny_shards, tmp_path):
    """With adapter.body_shape: proportions, L_id is 1 - cos of z-scored proportions (in [0, 2]) and reaches the body
    encoder; the statistics travel in adapter.json to the next stage."""
    from bolid.losses import proportion_identity_loss
    from bolid.metrics import BODY_STATS_MEAN

    module = _module(adapter={"body_shape": "proportions"}, min_score=0.0)
    cfg = module.adapter.config
    assert cfg.proportion_mean == list(BODY_STATS_MEAN)  # tiny / real: the real-photo statistics
    batch = _batch(tiny_shards)
    out = module.id_losses(batch, torch.Generator().manual_seed(0))
    assert 0.0 <= out["loss_id"].item() <= 2.0
    out["loss_id"].backward()
    assert module.adapter.body_encoder.body_in.weight.grad.abs().sum() > 0
    stats = torch.tensor(cfg.proportion_mean), torch.tensor(cfg.proportion_std)
    same, _ = proportion_identity_loss(batch["ref_keypoints"], batch["ref_keypoints"], *stats, 0.0)
    assert same.item() < 1e-5

    # The loss on the branch's keypoints is exactly this function: read the other person's keypoints as "generated".
    class OtherPerson(torch.nn.Module):
        def forward(self, images):
            return batch["ref_keypoints"].flip(0) + 0 * images.mean()

    real_pose = module.pose
    module.pose = OtherPerson()
    try:
        got = module.id_losses(batch, torch.Generator().manual_seed(0))["loss_id"]
    finally:
        module.pose = real_pose
    expected, _ = proportion_identity_loss(batch["ref_keypoints"].flip(0), batch["ref_keypoints"], *stats, 0.0)
    torch.testing.assert_close(got, expected)
    module.adapter.save(tmp_path / "adapter")
    again = _module(init_adapter=str(tmp_path / "adapter"))
    assert again.adapter.config.body_shape == "proportions"
    assert again.adapter.config.proportion_std == cfg.proportion_std
    with pytest.raises(ValueError, match="id_pose_weight needs adapter.body_shape: net"):
        _module(adapter={"body_shape": "proportions"}, id_pose_weight=0.5)


@pytest.mark.slow
def test_loss_decreases_when_overfitting_a_fixed_batch(tiny_shards):
    module = _module(stage=1, w_id=0.0, w_clip=0.0, drop_text=0, drop_face=0, drop_body=0, drop_all=0)
    batch = _batch(tiny_shards)
    opt = torch.optim.AdamW(module.adapter.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = module.diffusion_loss(batch, torch.Generator().manual_seed(0))  # same noise and t every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.93 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.grad_steps"):
        _module(grad_steps=5, lightning_steps=4)
    with pytest.raises(ValueError, match="model.stage"):
        _module(stage=1, w_id=0.5)
    with pytest.raises(ValueError, match="model.drop_face"):
        _module(drop_face=1.5)
    with pytest.raises(ValueError, match="data.resolution"):
        PairDataModule("x", resolution=100)


def test_nan_loss_stops_with_a_clear_message(tiny_shards):
    module = _module(stage=1, w_id=0.0, w_clip=0.0)
    with torch.no_grad():
        module.adapter.trainable_parameters()[0].fill_(float("nan"))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    dm = PairDataModule(str(tiny_shards), resolution=64, crop_size=32, batch_size=2, num_workers=0)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 0"):
        trainer.fit(module, dm)


# ---------------------------------------------------------------------------------------------- resume


def _fit(tmp: Path, shards: Path, max_steps: int, ckpt_path: str | None = None) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = _module(stage=1, w_id=0.0, w_clip=0.0, ema_decay=0.9)
    dm = PairDataModule(str(shards), resolution=64, crop_size=32, batch_size=2, num_workers=0, shuffle_buffer=4)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp, save_last=True, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=tmp,
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return {k: v.detach().clone() for k, v in module.trainable_named_parameters().items()} | {
        f"ema.{k}": v for k, v in (module.ema_state_dict() or {}).items()
    }


def test_runs_of_different_seeds_train_differently_and_are_validated_alike(tiny_shards):
    """The run's seed reorders the training pairs and redraws the training noise; validation's pairs, batches
    and noise stay fixed (EVAL_SEED), so val/loss_diff compares runs of different seeds on the same terms."""
    scores, orders, noise = [], [], []
    for seed in (0, 5):
        dm = PairDataModule(str(tiny_shards), resolution=64, crop_size=32, batch_size=2, num_workers=0,
                            shuffle_buffer=4, seed=seed)  # fmt: skip
        dm.setup("fit")
        orders.append([k for b in dm.train_dataloader() for k in b["key"]])
        L.seed_everything(0)  # the same adapter weights: only the seed hyperparameter differs
        module = _module(stage=1, w_id=0.0, w_clip=0.0, seed=seed)
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
        scores.append(trainer.validate(module, dm, verbose=False)[0]["val/loss_diff"])
        noise.append(torch.randn(4, generator=module._generator()))
    assert orders[0] != orders[1] and not torch.equal(noise[0], noise[1])
    assert scores[0] == scores[1] > 0


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_shards, tmp_path):
    steps = PairDataset.from_index(
        __import__("bolid.shards", fromlist=["read_index"]).read_index(tiny_shards),
        "train", train=True, resolution=64, crop_size=32, batch_size=2,
    ).batches_per_epoch  # fmt: skip
    straight = _fit(tmp_path / "a", tiny_shards, 2 * steps)
    _fit(tmp_path / "b", tiny_shards, steps)  # the run that was "killed" after its step-N checkpoint
    ckpt = tmp_path / "b" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["state_dict"] and all(k.startswith("adapter.") for k in saved["state_dict"])  # trainable only
    assert "optimizer_states" in saved and "ema" in saved
    resumed = _fit(tmp_path / "b", tiny_shards, 2 * steps, ckpt_path=str(ckpt))
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------ tiny config


def test_tiny_config_trains_end_to_end(tiny_shards, tmp_path, monkeypatch):
    from bolid.train.cli import main

    config = yaml.safe_load((ROOT / "configs" / "fit" / "tiny.yaml").read_text())
    config["trainer"]["max_steps"] = 4
    config["trainer"]["val_check_interval"] = 2
    config["trainer"]["enable_progress_bar"] = False
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if "RichProgressBar" not in c["class_path"]
    ]
    config["model"]["sample_every_n_steps"] = 2
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(path), "--data.shards", str(tiny_shards)]) == 0
    run = tmp_path / "runs" / "demo" / "train"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "adapter" / "adapter.safetensors").is_file() and (run / "adapter" / "adapter.json").is_file()
    assert (run / "adapter_ema" / "adapter.safetensors").is_file()
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"train/loss", "train/loss_diff", "train/loss_id", "train/loss_clip"} <= set(acc.Tags()["scalars"])
    diagnostics = {"train/id_valid", "train/kp_valid", "train/id_ran_fraction", "train/grad_norm_diff",
                   "train/grad_norm_id", "train/grad_norm_clip", "train/grad_ratio_id_diff"}  # fmt: skip
    assert diagnostics <= set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars("train/id_ran_fraction")][-1] == 1.0  # id_every_n_steps: 1
    assert acc.Tags()["images"]  # the sample grid
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]

    # `bolid export` turns the last checkpoint into the same adapter training wrote at its end.
    from safetensors.torch import load_file

    from bolid.__main__ import main as bolid_main

    out = tmp_path / "exported"
    assert bolid_main(["export", str(run / "checkpoints" / "last.ckpt"), "-o", str(out)]) == 0
    a, b = load_file(out / "adapter.safetensors"), load_file(run / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "diffusers" / "bolid_face.safetensors").is_file()
    assert bolid_main(["export", str(run / "checkpoints" / "last.ckpt"), "-o", str(tmp_path / "ema"), "--ema"]) == 0
    e = load_file(tmp_path / "ema" / "adapter.safetensors")
    assert any(not torch.equal(e[k], a[k]) for k in a)  # EMA weights differ from the raw ones
    # ... and so do its stock-diffusers files: they hold the EMA weights too
    fe = load_file(tmp_path / "ema" / "diffusers" / "bolid_face.safetensors")
    fa = load_file(out / "diffusers" / "bolid_face.safetensors")
    assert fe.keys() == fa.keys() and any(not torch.equal(fe[k], fa[k]) for k in fa)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tiny_shards, tmp_path):
    """The real DDP strategy (gloo, 2 processes): shards split by rank, both ranks step in lockstep to the end."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bolid", "fit", "--config", str(ROOT / "configs" / "fit" / "tiny.yaml"),
           "--data.shards", str(tiny_shards), "--data.resampled", "true", "--data.epoch_pairs", "4",
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "3",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.callbacks", "null",
           "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.limit_val_batches", "0", "--model.sample_every_n_steps", "0"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # this checkout
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Starting with 2 processes" in out.stderr + out.stdout
    assert "`Trainer.fit` stopped: `max_steps=3` reached." in out.stderr + out.stdout


def test_encoder_cache_gives_the_same_loss_and_is_reused(tiny_shards, tmp_path):
    plain = _module(stage=1, w_id=0.0, w_clip=0.0)
    cached = _module(stage=1, w_id=0.0, w_clip=0.0, cache_dir=str(tmp_path / "cache"))
    cached.adapter.load_state_dict(plain.adapter.state_dict())
    batch = _batch(tiny_shards)
    with torch.no_grad():
        ref = plain.diffusion_loss(batch, torch.Generator().manual_seed(3), dropout=False)
        first = cached.diffusion_loss(batch, torch.Generator().manual_seed(3), dropout=False)
        misses = cached.cache.misses
        second = cached.diffusion_loss(batch, torch.Generator().manual_seed(3), dropout=False)
    assert misses == 4 and cached.cache.hits == 4  # 2 latents + 2 captions, then all from disk
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 2 + len(set(batch["caption"]))  # one file per crop and per distinct caption
    torch.testing.assert_close(first, ref, rtol=2e-3, atol=2e-3)  # fp16 storage
    torch.testing.assert_close(second, first)


def test_a_corrupt_shard_sample_is_skipped_and_counted(tiny_shards, tmp_path):
    import io
    import shutil
    import tarfile

    from bolid.shards import read_index

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    index = read_index(shards)
    first = index.shard_paths("train")[0].replace(str(tiny_shards), str(shards))
    members = []
    with tarfile.open(first) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    victim = members[0][0].name.split(".")[0]
    with tarfile.open(first, "w") as tar:
        for m, data in members:
            if m.name == f"{victim}.jpg":
                data = data[: len(data) // 3]  # truncated JPEG
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    ds = PairDataset.from_index(read_index(shards), "train", train=True, resolution=64, crop_size=32, batch_size=1)
    keys = [b["key"][0] for b in ds]
    assert victim not in keys and ds.corrupt.count == 1
    assert len(keys) == ds.num_samples - 1 or len(keys) == ds.batches_per_epoch
