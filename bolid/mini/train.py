"""Train the mini kit's components from scratch on a rendered BoLID-mini world (``python -m bolid.mini.train``).

One function per component, each a plain PyTorch loop on the real class (no Lightning: these are the
*pretrained* parts BoLID itself takes as given). Every loop is resumable: it saves model + optimiser +
step to ``<work>/<name>.pt`` every ``save_every`` steps and continues from there; a finished component is
written to ``<out>/<name>.safetensors`` (atomically) and skipped on the next run.

* ``vitpose_train`` / ``vitpose_eval``: heatmap regression (Gaussian targets, MSE) on the exact keypoints;
  the eval model trains on a *different* world seed.
* ``clip`` (transformers) and ``eva_clip`` (open_clip): contrastive loss on render/caption pairs. The EVA-CLIP
  is BoLID's identity image encoder, so it also learns *who* is in a photo: an identity-contrastive term
  (open_clip's ``ClipLoss`` between two photos of each person in the batch) on the face and person crops
  BoLID cuts from references (:func:`bolid.crops.crop_reference`). Captions never name skin, hair or build,
  so without it the encoder tells people apart at chance.
* ``vae``: reconstruction (MSE + L1) plus a small KL term; its ``scaling_factor`` (1 / latent std) is stored
  in the file's metadata.
* ``unet``: epsilon-prediction diffusion loss (min-SNR-5 weighted) on the VAE's latents with the (frozen,
  random) text encoders' embeddings of the captions, 10% captions dropped for classifier-free guidance. Half of
  its captions also name who is in the photo (``"a photo of a tall slim person with dark skin and short black
  hair on a beach, ..."``), as real text-to-image data names people's looks: without that the UNet never learns
  to let anything but the noise decide skin, hair and build, and an identity adapter has nothing to steer.
  BoLID's own captions (the datapipe's) never name the look: the identity has to come from the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bolid.files import atomic_write
from bolid.kits import mini
from bolid.mini.world import make_identity, make_photo, read_labels, write_world

log = logging.getLogger(__name__)

#: keypoint confidence that counts as visible for Body Sim (configs/eval/mini.yaml metrics.body_min_score).
BODY_MIN_SCORE = 0.05
#: name -> default steps (batch 16 to 64): about 2 hours on 2 CPU cores in all (bolid/mini/weights/README.md).
STEPS = {"vitpose_train": 3000, "vitpose_eval": 3000, "clip": 200, "eva_clip": 3000, "vae": 2000, "unet": 6000}
#: name -> batch size.
BATCH = {"vitpose_train": 32, "vitpose_eval": 32, "clip": 64, "eva_clip": 64, "vae": 16, "unet": 32}
#: Min-SNR loss weighting (Hang et al. 2023) for the UNet: gamma.
MIN_SNR_GAMMA = 5.0
#: Fraction of the UNet's training captions that also name the person's look (skin, hair, build, stature).
LOOK_CAPTIONS = 0.5


class World:
    """A rendered world in memory: images ``(N, 3, 64, 64)`` in [-1, 1], labels, keypoints ``(N, 17, 3)``."""

    def __init__(self, root: Path):
        self.root = root
        self.labels = read_labels(root)
        ims = [np.asarray(Image.open(root / r["photo"]).convert("RGB")) for r in self.labels]
        self.pixels = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1
        self.keypoints = torch.tensor([r["keypoints"] for r in self.labels], dtype=torch.float32)
        self.captions = [r["caption"] for r in self.labels]
        #: the same captions naming who is in the photo (:attr:`bolid.mini.world.Identity.look`): the UNet learns
        #: from both, so that its text path has a handle on skin, hair, build and stature
        self.look_captions = self._look_captions()
        people: dict[str, list[int]] = {}
        for i, r in enumerate(self.labels):
            people.setdefault(r["identity"], []).append(i)
        #: row indices of each person's photos (people with at least two photos, for identity pairs)
        self.people = [torch.tensor(rows) for rows in people.values() if len(rows) >= 2]

    def _look_captions(self) -> list[str]:
        settings = json.loads((self.root / "world.json").read_text())
        seed, spread = settings["seed"], settings["spread"]
        out, people = [], {}
        for r in self.labels:
            i, j = int(r["identity"].rsplit("_", 1)[1]), int(Path(r["photo"]).stem)
            ident = people.setdefault(i, make_identity(seed, i, spread))
            photo = make_photo(seed, i, j)
            if ident.name != r["identity"] or photo.caption != r["caption"]:
                raise ValueError(f"{self.root}: {r['photo']} does not match world seed {seed} (re-render the world)")
            out.append(photo.describe(ident.look))
        return out

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, gen: torch.Generator, size: int) -> torch.Tensor:
        return torch.randint(len(self), (size,), generator=gen)

    def pairs(self, gen: torch.Generator, people: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of two different photos each of ``people`` different persons: ``(a, b)``, ``(people,)`` each."""
        if len(self.people) < people:
            raise ValueError(f"{self.root}: {len(self.people)} people with two photos or more, need {people}")
        chosen = torch.randperm(len(self.people), generator=gen)[:people]
        a, b = [], []
        for p in chosen.tolist():
            rows = self.people[p]
            first, second = torch.randperm(len(rows), generator=gen)[:2].tolist()
            a.append(int(rows[first]))
            b.append(int(rows[second]))
        return torch.tensor(a), torch.tensor(b)


def _loop(
    name: str,
    model: torch.nn.Module,
    params,
    step_fn: Callable[[torch.Generator], torch.Tensor],
    steps: int,
    work: Path,
    lr: float,
    save_every: int = 100,
) -> None:
    """Resumable AdamW loop with cosine decay; ``step_fn(generator)`` returns the loss of one batch."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))
    )
    state_file = work / f"{name}.pt"
    start = 0
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
        log.info("%s: resuming at step %d", name, start)
    model.train()
    t0, running = time.time(), None
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(step * 7919 + zlib.crc32(name.encode()) % 1000)
        loss = step_fn(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            rate = (time.time() - t0) / (step + 1 - start)
            print(f"{name}: step {step + 1}/{steps} loss {running:.4f} ({rate:.2f} s/step)", flush=True)
        if (step + 1) % save_every == 0 or step + 1 == steps:
            tmp = state_file.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step + 1}, tmp)  # fmt: skip
            tmp.replace(state_file)
    model.eval()


#: components stored in float16 (loaded back into float32 parameters) to keep the committed weights <= 20 MB.
HALF = ("unet",)


def _save(model: torch.nn.Module, out: Path, name: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    half = name in HALF
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().contiguous().clone()
        for k, v in model.state_dict().items()
    }
    tmp = out / f"{name}.safetensors.tmp"
    save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(out / f"{name}.safetensors")


def _augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Colour jitter (brightness/contrast), so the keypoint models also read generated images."""
    b = pixels.shape[0]
    gain = 1 + 0.2 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    bias = 0.2 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    noise = 0.05 * torch.randn(pixels.shape, generator=gen)
    return (pixels * gain + bias + noise).clamp(-1, 1)


def train_vitpose(world: World, kind: str, steps: int, work: Path, batch: int = 32):
    model, processor = mini.build_vitpose(trained=False, kind=kind)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        side = processor.size["height"]
        hm_h, hm_w = model(pixel_values=torch.zeros(1, 3, side, side)).heatmaps.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(hm_h).float(), torch.arange(hm_w).float(), indexing="ij")

    def step(gen):
        idx = world.batch(gen, batch)
        x = _augment(world.pixels[idx], gen)
        kp = world.keypoints[idx]
        cx = kp[..., 0] / 64 * hm_w - 0.5
        cy = kp[..., 1] / 64 * hm_h - 0.5
        sigma = hm_w / 32  # 1 heatmap px at 32x32, 2 px at 64x64
        target = torch.exp(-((xs - cx[..., None, None]) ** 2 + (ys - cy[..., None, None]) ** 2) / (2 * sigma**2))
        side = processor.size["height"]
        x = F.interpolate((x + 1) / 2, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        pred = model(pixel_values=(x - mean) / std).heatmaps
        return F.mse_loss(pred, target) * 1000

    _loop(f"vitpose_{kind}", model, model.parameters(), step, steps, work, lr=1e-3)
    return model


def _clip_pixels(x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    x = F.interpolate((x + 1) / 2, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _crop_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random crop of 60-100% of the side, resized back: CLIP sees whole frames and person crops."""
    b, _, h, w = x.shape
    out = []
    for i in range(b):
        s = int(h * (0.6 + 0.4 * torch.rand(1, generator=gen).item()))
        y0 = int(torch.randint(0, h - s + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - s + 1, (1,), generator=gen))
        out.append(F.interpolate(x[i : i + 1, :, y0 : y0 + s, x0 : x0 + s], size=(h, w), mode="bilinear"))
    return torch.cat(out)


def train_clip(world: World, steps: int, work: Path, batch: int = 64):
    model, processor = mini.build_clip(trained=False)
    ip = processor.image_processor
    size = ip.crop_size["height"]

    def step(gen):
        idx = world.batch(gen, batch)
        x = _clip_pixels(_crop_jitter(world.pixels[idx], gen), size, ip.image_mean, ip.image_std)
        tok = processor.tokenizer([world.captions[i] for i in idx], padding=True, return_tensors="pt")
        ids, mask = tok["input_ids"], tok["attention_mask"]
        return model(input_ids=ids, attention_mask=mask, pixel_values=x, return_loss=True).loss

    _loop("clip", model, model.parameters(), step, steps, work, lr=1e-3)
    return model


#: EVA-CLIP's identity term: its weight beside the caption loss, and the fixed logit scale (1 / temperature).
EVA_ID_WEIGHT, EVA_ID_LOGIT_SCALE = 1.0, 10.0


def _reference_crops(world: World, idx: torch.Tensor, gen: torch.Generator, size: int):
    """Face and person crops of rows ``idx`` as BoLID cuts them from a reference (pixels in [0, 1]).

    The exact keypoints get a keypoint reader's error (0.7 px per point) and a shift of the whole body of up
    to 1.5 px, so the crops vary as the datapipe's keypoints would make them.
    """
    from bolid.crops import crop_reference

    kp = world.keypoints[idx].clone()
    kp[..., 2] = (kp[..., 2] >= 2).float()
    kp[..., :2] += 0.7 * torch.randn(kp[..., :2].shape, generator=gen)
    kp[..., :2] += 3.0 * (torch.rand(len(idx), 1, 2, generator=gen) - 0.5)
    crops = crop_reference((world.pixels[idx] + 1) / 2, kp, None, size, min_score=BODY_MIN_SCORE)
    return crops.face, crops.person


def train_eva_clip(world: World, steps: int, work: Path, batch: int = 64):
    """Caption contrastive loss on whole-frame crops, plus :data:`EVA_ID_WEIGHT` x the identity-contrastive
    loss on face crops and on person crops: ``batch // 2`` people, two photos each, every other person of the
    batch a negative."""
    import open_clip

    model, _, tokenizer = mini.build_eva_clip(trained=False)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    loss_fn = open_clip.ClipLoss()
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD  # ClipImageEncoder's defaults
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    id_scale = torch.tensor(EVA_ID_LOGIT_SCALE)

    def identity_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa = F.normalize(model.encode_image((a - mean_t) / std_t), dim=-1)
        fb = F.normalize(model.encode_image((b - mean_t) / std_t), dim=-1)
        return loss_fn(fa, fb, id_scale)

    def step(gen):
        a, b = world.pairs(gen, batch // 2)
        idx = torch.cat([a, b])
        x = _clip_pixels(_crop_jitter(world.pixels[idx], gen), size, mean, std)
        out = model(x, tokenizer([world.captions[i] for i in idx]))
        if isinstance(out, dict):
            out = (out["image_features"], out["text_features"], out["logit_scale"])
        face_a, person_a = _reference_crops(world, a, gen, size)
        face_b, person_b = _reference_crops(world, b, gen, size)
        ident = identity_loss(face_a, face_b) + identity_loss(person_a, person_b)
        return loss_fn(*out[:3]) + EVA_ID_WEIGHT * ident

    _loop("eva_clip", model, model.parameters(), step, steps, work, lr=1e-3)
    return model


def train_vae(world: World, steps: int, work: Path, batch: int = 16):
    model = mini.build_vae(trained=False)

    def step(gen):
        x = world.pixels[world.batch(gen, batch)]
        dist = model.encode(x).latent_dist
        rec = model.decode(dist.sample(gen)).sample
        kl = dist.kl().mean() / dist.mean[0].numel()
        return F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl

    _loop("vae", model, model.parameters(), step, steps, work, lr=1e-3)
    with torch.no_grad():
        lat = torch.cat(
            [model.encode(world.pixels[i : i + 256]).latent_dist.mean for i in range(0, min(1024, len(world)), 256)]
        )
    return model, {"scaling_factor": round(1.0 / float(lat.std()), 5)}


@torch.no_grad()
def _text_embeddings(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt and pooled embeddings of ``captions`` (diffusers' ``encode_prompt``), batched."""
    from diffusers import StableDiffusionXLPipeline

    parts = mini.sdxl_components(trained=False)
    pipe = StableDiffusionXLPipeline(**parts)
    embeds, pooled = [], []
    for i in range(0, len(captions), 128):
        e, _, p, _ = pipe.encode_prompt(captions[i : i + 128], device="cpu", do_classifier_free_guidance=False)
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def train_unet(
    world: World, vae, steps: int, work: Path, batch: int = 32, drop_text: float = 0.1, look: float = LOOK_CAPTIONS
):
    """The mini SDXL UNet, text-to-image; a fraction ``look`` of the captions also name the person's look."""
    from diffusers import DDPMScheduler

    model = mini.build_unet(trained=False)
    scheduler = DDPMScheduler.from_config(mini.sdxl_components(trained=False)["scheduler"].config)
    with torch.no_grad():
        mean = torch.cat([vae.encode(world.pixels[i : i + 256]).latent_dist.mean for i in range(0, len(world), 256)])
    latents = mean * vae.config.scaling_factor
    unique = sorted(set(world.captions) | set(world.look_captions))
    emb, pooled = _text_embeddings(unique)
    # A dropped caption is the zero embedding: SDXL's negative for an empty prompt (force_zeros_for_empty_prompt).
    emb, pooled = torch.cat([emb, torch.zeros_like(emb[:1])]), torch.cat([pooled, torch.zeros_like(pooled[:1])])
    where = {c: k for k, c in enumerate(unique)}
    cap_idx = torch.tensor([where[c] for c in world.captions])
    look_idx = torch.tensor([where[c] for c in world.look_captions])
    empty = len(unique)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    alphas = scheduler.alphas_cumprod

    def step(gen):
        idx = world.batch(gen, batch)
        x0 = latents[idx]
        u = torch.rand(batch, generator=gen)
        c = torch.where(u < look, look_idx[idx], cap_idx[idx])
        c[torch.rand(batch, generator=gen) < drop_text] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = {"text_embeds": pooled[c], "time_ids": time_ids.expand(batch, -1)}
        pred = model(xt, t, encoder_hidden_states=emb[c], added_cond_kwargs=cond).sample
        snr = a / (1 - a)
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr  # epsilon-prediction's min-SNR weights
        return (weight * (pred - noise) ** 2).mean()

    _loop("unet", model, model.parameters(), step, steps, work, lr=1e-3)
    return model


def write_body_stats(world: World, out: Path) -> None:
    """``<out>/body_stats.json``: proportion mean/std read by the evaluation keypoint model on ``world``."""
    from bolid.metrics import keypoints_of, proportion_stats

    extractor = mini.pose_extractor("eval")
    kps = keypoints_of(extractor, [Image.open(world.root / r["photo"]).convert("RGB") for r in world.labels])
    exact_mean, exact_std = proportion_stats(world.keypoints, min_score=BODY_MIN_SCORE)
    d = {"exact_mean": exact_mean.tolist(), "exact_std": exact_std.tolist(), "source": "evaluation keypoint model"}
    try:
        mean, std = proportion_stats(kps, min_score=BODY_MIN_SCORE)
    except ValueError as e:  # an undertrained model (quick runs) sees too few bodies
        log.warning("body stats from the exact keypoints: the evaluation model %s", e)
        mean, std, d["source"] = exact_mean, exact_std, "exact keypoints (the evaluation model saw too few bodies)"
    d.update(mean=mean.tolist(), std=std.tolist())
    atomic_write(out / "body_stats.json", json.dumps(d, indent=1))
    print(f"body stats ({d['source']}): mean {d['mean']} std {d['std']}; exact keypoints: std {d['exact_std']}")


def _held_out_pairs(seed: int, people: int, photos: int) -> tuple[list, np.ndarray, np.ndarray, torch.Tensor]:
    """A world none of the components trained on (``seed``), and every pair of its photos: ``(world, i, j,
    same)`` with ``world`` the :func:`bolid.mini.world.iter_world` tuples, ``i < j`` the pairs' rows and ``same``
    1 where both photos show one person (long, for ``binary_auroc``)."""
    from bolid.mini.world import iter_world

    world = list(iter_world(seed, people, photos))
    ident = np.array([person.name for person, *_ in world])
    i, j = np.triu_indices(len(world), 1)
    return world, i, j, torch.from_numpy(ident[i] == ident[j]).long()


def measure_keypoints(out: Path, seed: int = 7, people: int = 40, photos: int = 3) -> dict:
    """How well each trained keypoint model reads a world none of them trained on (``seed``).

    Per model: median and 90th-percentile error of the 12 body keypoints (pixels of the 64 px render), the
    mean keypoint score, and Body Sim's same-vs-different-person ROC AUC over every pair of photos; the
    exact keypoints' AUC beside them is the ceiling. Written to ``<out>/keypoint_quality.json``.
    """
    from torchmetrics.functional.classification import binary_auroc

    from bolid.metrics import body_similarity, keypoints_of, proportion_stats

    world, i, j, same = _held_out_pairs(seed, people, photos)
    images = [im for *_, im, _ in world]
    exact = torch.tensor(np.stack([kp for *_, kp in world]))

    def auc(kp: torch.Tensor) -> float:
        mean, std = proportion_stats(kp, min_score=BODY_MIN_SCORE)
        sim, _ = body_similarity(kp[i], kp[j], mean, std, min_score=BODY_MIN_SCORE)
        sim = torch.nan_to_num(sim, nan=-1.0)  # failures count as the lowest score
        return float(binary_auroc(sim, same))

    report = {"world": {"seed": seed, "people": people, "photos": photos}, "exact": {"body_sim_auc": auc(exact)}}
    for kind in ("train", "eval"):
        kp = keypoints_of(mini.pose_extractor(kind), images)
        err = (kp[:, 5:, :2] - exact[:, 5:, :2]).norm(dim=-1)
        report[kind] = {
            "median_error_px": round(float(err.nanmedian()), 3),
            "p90_error_px": round(float(np.nanpercentile(err.numpy(), 90)), 3),
            "mean_score": round(float(kp[:, 5:, 2].nanmean()), 3),
            "body_sim_auc": round(auc(kp), 3),
        }
    report["exact"]["body_sim_auc"] = round(report["exact"]["body_sim_auc"], 3)
    atomic_write(out / "keypoint_quality.json", json.dumps(report, indent=1))
    print("keypoint quality:", json.dumps(report))
    return report


def measure_identity(out: Path, seed: int = 7, people: int = 40, photos: int = 3) -> dict:
    """Whether the trained EVA-CLIP tells people apart on a world it did not train on (``seed``).

    BoLID's identity tokens come from this encoder's embeddings of a reference's face and person crops. Per
    crop: the same-vs-different-person ROC AUC over every pair of photos, by the cosine of the embeddings
    (``raw``) and of the embeddings minus their mean over the photos (``centred``: raw cosines of one encoder
    sit near 1, and a linear projection, as the adapter's, can remove the common part). Crops are cut with
    the exact keypoints. Written to ``<out>/identity_quality.json``.
    """
    from torchmetrics.functional.classification import binary_auroc

    from bolid.crops import crop_reference
    from bolid.image_encoder import ClipImageEncoder

    world, i, j, same = _held_out_pairs(seed, people, photos)
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for *_, im, _ in world]))
    kp = torch.tensor(np.stack([k for *_, k in world]), dtype=torch.float32)
    kp[..., 2] = (kp[..., 2] >= 2).float()
    eva, _, _ = mini.build_eva_clip(trained=True)
    encoder = ClipImageEncoder(eva, mini.EVA_CLIP_NAME)
    crops = crop_reference(pixels.permute(0, 3, 1, 2), kp, None, encoder.image_size, min_score=BODY_MIN_SCORE)
    report: dict = {"world": {"seed": seed, "people": people, "photos": photos}}
    with torch.no_grad():
        for name, x in (("face", crops.face), ("person", crops.person)):
            f = encoder(x)
            report[name] = {}
            for how, g in (("raw", f), ("centred", f - f.mean(0))):
                g = F.normalize(g, dim=-1)
                sim = (g[i] * g[j]).sum(-1)
                report[name][how] = round(float(binary_auroc(sim, same)), 3)
    atomic_write(out / "identity_quality.json", json.dumps(report, indent=1))
    print("identity quality:", json.dumps(report))
    return report


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(out: Path, command: str) -> None:
    """``<out>/README.md``: how each component was trained, how well the keypoint models read a new world,
    and every weight file's size and sha256 (adapters in subfolders included)."""
    log_file, quality_file = out / "training.json", out / "keypoint_quality.json"
    identity_file = out / "identity_quality.json"
    trained = json.loads(log_file.read_text()) if log_file.exists() else {}
    lines = ["# BoLID-mini weights", "", "Trained from scratch on CPU by", "", "```", command, "```", ""]
    if trained:
        lines += ["| component | steps x batch | world seed | wall time |", "| --- | --- | --- | --- |"]
        lines += [
            f"| `{n}` | {r['steps']} x {r['batch']} | {r['world_seed']} | "
            + (f"{r['seconds'] / 60:.1f} min |" if r.get("seconds") is not None else "not recorded |")
            for n, r in sorted(trained.items())
        ]
        lines.append("")
        if "look_captions" in trained.get("unet", {}):
            share = trained["unet"]["look_captions"]
            lines += [f"`unet`: {share:.0%} of its training captions also name the look (`--look-captions`).", ""]
    if quality_file.exists():
        q = json.loads(quality_file.read_text())
        w = q["world"]
        lines += [
            f"Keypoint models on a world none of them trained on (seed {w['seed']}, {w['people']} people x "
            f"{w['photos']} photos; `keypoint_quality.json`); Body Sim AUC = same vs different person over every "
            f"pair, exact keypoints {q['exact']['body_sim_auc']}:",
            "",
            "| model | median error | 90th pct error | mean score | Body Sim AUC |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| `vitpose_{k}` | {q[k]['median_error_px']} px | {q[k]['p90_error_px']} px | {q[k]['mean_score']} "
            f"| {q[k]['body_sim_auc']} |"
            for k in ("train", "eval")
        ]
        lines.append("")
    if identity_file.exists():
        q = json.loads(identity_file.read_text())
        w = q["world"]
        lines += [
            f"`eva_clip` on the same kind of new world (seed {w['seed']}, {w['people']} people x {w['photos']} "
            "photos; `identity_quality.json`): same vs different person ROC AUC of its embeddings' cosine, on the "
            "face and person crops BoLID encodes (centred: minus the mean embedding; chance 0.5):",
            "",
            "| crop | AUC, raw | AUC, centred |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {c} | {q[c]['raw']} | {q[c]['centred']} |" for c in ("face", "person")]
        lines.append("")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))
    lines += ["| file | size | sha256 |", "| --- | --- | --- |"]
    lines += [f"| `{p.relative_to(out)}` | {p.stat().st_size / 1e6:.2f} MB | `{sha256(p)}` |" for p in files]
    atomic_write(out / "README.md", "\n".join(lines) + "\n")


def _record(out: Path, name: str, entry: dict) -> None:
    path = out / "training.json"
    log_ = json.loads(path.read_text()) if path.exists() else {}
    log_[name] = entry
    atomic_write(path, json.dumps(log_, indent=1, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bolid.mini.train", description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/mini/components", help="worlds and resumable training states")
    p.add_argument("--out", default=str(mini.weights_dir()), help="where the safetensors go ($BOLID_MINI_WEIGHTS)")
    p.add_argument("--identities", type=int, default=500)
    p.add_argument("--photos", type=int, default=8)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every component's steps (quick runs: 0.02)")
    p.add_argument("--only", nargs="*", choices=list(STEPS), help="train only these components")
    p.add_argument("--steps", nargs="*", default=[], metavar="NAME=N", help="set a component's steps (resumes past it)")
    p.add_argument(
        "--look-captions",
        type=float,
        default=LOOK_CAPTIONS,
        metavar="P",
        help="fraction of the UNet's captions that also name the person's look (0: scene and clothes only)",
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.look_captions <= 1.0:
        p.error(f"--look-captions: a fraction from 0 to 1, got {args.look_captions}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work, out = Path(args.work), Path(args.out)
    os.environ["BOLID_MINI_WEIGHTS"] = str(out)  # the UNet's latents come from the VAE just written there
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    # Components learn on worlds of their own seeds: none of their people is a BoLID training or test person.
    worlds = {
        seed: World(write_world(work / f"world_{seed}", seed, args.identities, args.photos, progress=tqdm))
        for seed in (101, 102)
    }
    todo = args.only or list(STEPS)
    steps = {k: max(2, int(v * args.scale)) for k, v in STEPS.items()}
    for item in args.steps:
        name, _, n = item.partition("=")
        if name not in STEPS or not n.isdigit():
            raise SystemExit(f"--steps: expected NAME=N with NAME in {list(STEPS)}, got {item!r}")
        steps[name] = int(n)
    w = worlds[101]
    for name in todo:
        if (out / f"{name}.safetensors").exists():
            print(f"{name}: done ({out / f'{name}.safetensors'})")
            continue
        meta, t0, n, b = None, time.time(), steps[name], BATCH[name]
        if name == "vitpose_train":
            model = train_vitpose(w, "train", n, work, batch=b)
        elif name == "vitpose_eval":
            model = train_vitpose(worlds[102], "eval", n, work, batch=b)
        elif name == "clip":
            model = train_clip(w, n, work, batch=b)
        elif name == "eva_clip":
            model = train_eva_clip(w, n, work, batch=b)
        elif name == "vae":
            model, meta = train_vae(w, n, work, batch=b)
        else:
            model = train_unet(w, mini.build_vae(trained=True), n, work, batch=b, look=args.look_captions)
        _save(model, out, name, meta)
        seed = 102 if name == "vitpose_eval" else 101
        entry = {"steps": n, "batch": b, "world_seed": seed, "seconds": round(time.time() - t0, 1)}
        _record(out, name, {**entry, "look_captions": args.look_captions} if name == "unet" else entry)
        print(f"{name}: wrote {out / f'{name}.safetensors'}")
    if (out / "vitpose_eval.safetensors").exists():
        write_body_stats(worlds[101], out)
        if (out / "vitpose_train.safetensors").exists():
            measure_keypoints(out)
    if (out / "eva_clip.safetensors").exists():
        measure_identity(out)
    write_manifest(out, "python -m bolid.mini.train " + " ".join(sys.argv[1:] if argv is None else argv))
    atomic_write(work / "settings.json", json.dumps({**vars(args), "steps": steps}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
