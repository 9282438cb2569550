"""The LightningModule that trains BoLID's Body-Condition Module on a frozen SDXL.

Objective (paper draft; PuLID's Lightning-branch recipe for the ID terms)::

    L = w_diff · L_diff + w_id · L_id + w_clip · L_clip

* ``L_diff``: the SDXL diffusion loss on the *target* photo, conditioned on its caption and on the face
  and body vectors of a *reference* photo of the same person (:mod:`bolid.data`). Conditions are
  dropped at random for classifier-free guidance (text, face, body, or all at once); a dropped
  face or body is the zero vector with its attention term on, exactly the negative that CFG uses at
  inference (a face that is not visible is masked out instead, in training and at inference alike).
* ``L_id`` and ``L_clip`` (stage 2): a few-step SDXL-Lightning branch (the distilled UNet, or its LoRA
  switched on in the base UNet: ``lightning_weights``) generates from pure noise with the same adapter and
  the target's caption, keeping gradients only through the last ``grad_steps`` of its ``lightning_steps``
  Euler steps; the VAE decodes, then ViTPose reads the body from a person crop with a soft-argmax
  (:class:`bolid.losses.DifferentiablePose`) and EVA-CLIP scores the text, and optionally the reference
  photo (``w_clip_image``; :class:`bolid.losses.ClipTextLoss`).

Guarding against reward hacking (an ID loss that blurs images or bends poses to game the keypoint
model): (1) ``L_diff`` stays on in every step, so a degraded generator is still penalised on real
photos; (2) the ID terms compare *pose-invariant proportions* by default, which a blur cannot fake
(blurred keypoints lose confidence and are masked out, and the mask is detached); (3) the ID branch
runs only every ``id_every_n_steps`` steps and only after ``id_start_step``, once the adapter gives
useful tokens; (4) defaults ``w_id = 0.3``, ``w_clip = 0.1`` in ``configs/fit/stage2.yaml`` keep the ID
terms below the diffusion loss, as PuLID weights its alignment losses; (5) evaluation measures Body
Sim with a *different* pose model (BlazePose).

Everything frozen (UNets, VAE, text encoders, EVA-CLIP, ViTPose) stays in eval mode and in
``frozen_dtype``; only :meth:`bolid.adapter.BodyConditionModule.trainable_parameters` get gradients,
and checkpoints hold only those plus the optimiser (and EMA) state. Randomness per step (noise,
timesteps, condition dropout) is drawn from a generator seeded by ``(seed, global_step, rank)``, so a
resumed run continues exactly where the killed one would have gone.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from bolid.adapter import AdapterConfig, BodyConditionModule, IdentityEmbeds
from bolid.body import BODY_INDICES
from bolid.components import DTYPES as _DTYPES
from bolid.config import ComponentsConfig
from bolid.data import EVAL_SEED, batch_crops
from bolid.image_encoder import ClipImageEncoder
from bolid.lightning_lora import set_lora_enabled
from bolid.losses import (
    ClipTextLoss,
    DifferentiablePose,
    body_identity_loss,
    body_weighted_mse,
    diffusion_target,
    proportion_identity_loss,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stops and the last good checkpoint is kept."""


def reference_swap(people: list[str]) -> tuple[list[int], list[int]] | None:
    """Whose reference each sample takes in :meth:`BoLIDTrainingModule.reference_gain`: ``(keep, other)``,
    ``other[i]`` (a position in ``keep``) showing another person than ``keep[i]``.

    ``other`` is a permutation, so every kept reference is used once as its own and once as another's: a
    reference that disturbs the UNet more than others then weighs on both losses alike, whatever the mix of
    people in the batch. That needs no person in more than half the samples, so the largest group is cut to
    the size of the rest. ``None`` when the batch shows one person.
    """
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(people):
        groups.setdefault(p, []).append(i)
    largest = max(groups.values(), key=len)
    rest = len(people) - len(largest)
    if rest == 0:
        return None
    del largest[rest:]
    grouped = [i for g in groups.values() for i in g]  # batch indices by person; each group at most half of them
    n = len(grouped)
    # half-way round the grouped list: never inside the same contiguous group
    partner = {grouped[i]: grouped[(i + n // 2) % n] for i in range(n)}
    keep = sorted(grouped)
    position = {b: i for i, b in enumerate(keep)}
    return keep, [position[partner[b]] for b in keep]


class BoLIDTrainingModule(L.LightningModule):
    """Trains the Body-Condition Module (adapter + encoder heads) on a frozen SDXL.

    Args:
        components: ``tiny``, ``real`` or ``{kind: real, overrides: {sdxl: /path, ...}}``.
        stage: 1 = reconstruction only on the SDXL base UNet; 2 = adds the body-ID and CLIP losses on the
            Lightning branch (needs the SDXL-Lightning UNet, ViTPose and EVA-CLIP).
        adapter: settings of a new adapter (see :class:`bolid.adapter.AdapterConfig`).
        init_adapter: start from this adapter folder (e.g. stage 1's output for stage 2).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warmup from 0, in optimiser steps.
        w_diff: weight of the diffusion loss.
        w_id: weight of the body-identity loss (stage 2).
        w_clip: weight of the EVA-CLIP text loss (stage 2).
        w_clip_image: weight of the EVA-CLIP image loss ``1 - cos(EVA-CLIP(x_gen), EVA-CLIP(reference photo))``
            (stage 2), the "overall style of the input image" half of the paper's ``L_clip``. Off by default: it
            pulls the whole generated frame (background, clothes, framing) toward the reference photo, i.e.
            toward copy-paste; see the README.
        id_pose_weight: weight of the optional keypoint-position term (same-pose training); 0 = proportions only.
        drop_text: probability of dropping the caption (zero text embedding).
        drop_face: probability of dropping the face vector.
        drop_body: probability of dropping the body vector.
        drop_all: probability of dropping text, face and body together.
        lightning_steps: Euler steps of the Lightning branch (the checkpoint's step count: 2, 4 or 8).
        grad_steps: keep gradients through the last this many branch steps (k).
        body_loss_weight: weight ``λ`` of the target's body in ``L_diff``: each latent pixel's squared error is
            weighted by ``1 + λ·W``, ``W`` the Gaussian map of the target's 12 body keypoints (as the body
            encoder's, sigma ``body_loss_sigma`` x the latent side), normalised per image; 0 = plain MSE.
            The body is a small part of a photo, and its proportions a smaller part of that error.
        body_loss_sigma: that map's sigma as a fraction of the latent side.
        id_every_n_steps: run the Lightning branch every this many training steps.
        id_start_step: first training step that runs the Lightning branch.
        branch_resolution: image side of the Lightning branch (768 as PuLID; smaller on small GPUs).
        min_score: keypoint confidence below which a keypoint counts as missing in ``L_id``.
        frozen_dtype: dtype of the frozen models: ``fp32``, ``bf16`` or ``fp16`` (needs a mixed-precision
            Trainer).
        gradient_checkpointing: recompute UNet activations in the backward pass (less memory, ~30% slower).
        compile_unet: ``torch.compile`` the frozen UNets in place (``nn.Module.compile``; the first steps are slow
            while it compiles; ``make bench-gpu`` reports whether it pays off on your GPU).
        ema_decay: keep an exponential moving average of the adapter weights with this decay (``null`` = off).
        seed: base seed for per-step training randomness (`seed_everything`); validation and test noise use
            :data:`bolid.data.EVAL_SEED`, so runs of different seeds are scored alike.
        sample_every_n_steps: log a sample grid (reference | with ID | without ID) every this many steps
            (0 = off).
        sample_steps: sampler steps for the grid (the Lightning UNet's count when present).
        cache_dir: cache the frozen VAE's latent distributions and the text embeddings here
            (:mod:`bolid.train.cache`; best with ``data.random_crop: false``); ``null`` = off.
        grad_norm_every_n_steps: every this many steps, log each weighted loss term's gradient norm on the
            adapter and ``w_id·L_id`` / ``w_diff·L_diff`` (one extra backward pass per term); 0 = off.
        lightning_weights: how the Lightning branch gets SDXL-Lightning: ``unet`` = the distilled UNet as a second
            resident UNet; ``lora`` = ByteDance's SDXL-Lightning LoRA on the base UNet, switched on only inside the
            branch (one UNet fewer in memory: ~5 GB in bf16).
        vae_checkpointing: recompute the VAE decoder's activations in the backward pass of the branch (stage 2's
            largest activation memory at 1024 px; see the README).
    """

    def __init__(
        self,
        components: str | dict = "real",
        stage: int = 1,
        adapter: dict | None = None,
        init_adapter: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 500,
        w_diff: float = 1.0,
        w_id: float = 0.0,
        w_clip: float = 0.0,
        w_clip_image: float = 0.0,
        id_pose_weight: float = 0.0,
        drop_text: float = 0.05,
        drop_face: float = 0.05,
        drop_body: float = 0.05,
        drop_all: float = 0.05,
        lightning_steps: int = 4,
        grad_steps: int = 1,
        body_loss_weight: float = 0.0,
        body_loss_sigma: float = 0.05,
        id_every_n_steps: int = 1,
        id_start_step: int = 0,
        branch_resolution: int = 768,
        min_score: float = 0.3,
        frozen_dtype: str = "fp32",
        gradient_checkpointing: bool = False,
        compile_unet: bool = False,
        ema_decay: float | None = None,
        seed: int = 0,
        sample_every_n_steps: int = 0,
        sample_steps: int = 4,
        cache_dir: str | None = None,
        grad_norm_every_n_steps: int = 0,
        lightning_weights: str = "unet",
        vae_checkpointing: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = ComponentsConfig.parse(components)
        if stage not in (1, 2):
            raise ValueError(f"model.stage must be 1 or 2, got {stage}")
        for name in ("drop_text", "drop_face", "drop_body", "drop_all"):
            if not 0.0 <= locals()[name] <= 1.0:
                raise ValueError(f"model.{name} must be a probability in [0, 1], got {locals()[name]}")
        if body_loss_weight < 0 or not body_loss_sigma > 0:
            raise ValueError(
                f"model.body_loss_weight must be >= 0 and model.body_loss_sigma > 0, got {body_loss_weight}, "
                f"{body_loss_sigma}"
            )
        if min(w_diff, w_id, w_clip, w_clip_image, id_pose_weight) < 0:
            raise ValueError(
                "model.w_diff, model.w_id, model.w_clip, model.w_clip_image and model.id_pose_weight must be >= 0"
            )
        if stage == 1 and (w_id > 0 or w_clip > 0 or w_clip_image > 0):
            raise ValueError(
                "model.w_id / model.w_clip / model.w_clip_image need the Lightning branch: set model.stage: 2"
            )
        if lightning_weights not in ("unet", "lora"):
            raise ValueError(f"model.lightning_weights must be 'unet' or 'lora', got {lightning_weights!r}")
        if grad_norm_every_n_steps < 0:
            raise ValueError(f"model.grad_norm_every_n_steps must be >= 0, got {grad_norm_every_n_steps}")
        if not 1 <= grad_steps <= lightning_steps:
            raise ValueError(f"model.grad_steps must be in [1, lightning_steps={lightning_steps}], got {grad_steps}")
        if frozen_dtype not in _DTYPES:
            raise ValueError(f"model.frozen_dtype must be one of {sorted(_DTYPES)}, got {frozen_dtype!r}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"model.ema_decay must be in (0, 1) or null, got {ema_decay}")
        if id_every_n_steps < 1 or warmup_steps < 0 or sample_every_n_steps < 0:
            raise ValueError("model.id_every_n_steps must be >= 1; warmup_steps and sample_every_n_steps >= 0")
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self._build(adapter, init_adapter)

    # ------------------------------------------------------------------------------------------ build

    def _build(self, adapter_settings: dict | None, init_adapter: str | None) -> None:
        from diffusers import DDPMScheduler, StableDiffusionXLPipeline

        from bolid import components as comp

        hp = self.hparams
        wants_lightning = hp.stage == 2 or bool(hp.sample_every_n_steps)
        # bf16 frozen weights are built (random kit) or loaded in bf16 directly: half the peak memory of a cast.
        build_dtype = torch.bfloat16 if hp.frozen_dtype == "bf16" else torch.float32
        parts = comp.build_parts(
            self.cfg, lightning=wants_lightning and hp.lightning_weights == "unet", torch_dtype=build_dtype
        )
        eva, _, eva_tok, eva_name = parts.eva_clip
        self.unet = parts.sdxl["unet"]
        self.vae = parts.sdxl["vae"]
        self.text_encoder = parts.sdxl["text_encoder"]
        self.text_encoder_2 = parts.sdxl["text_encoder_2"]
        self._prompt_pipe = StableDiffusionXLPipeline(
            **{**parts.sdxl, "image_encoder": None, "feature_extractor": None}
        )
        self.noise_scheduler = DDPMScheduler.from_config(parts.sdxl["scheduler"].config)
        self.lightning_unet = parts.lightning_unet
        self.pose = None
        self.clip_loss = None
        self.lightning_lora = False  # SDXL-Lightning as a LoRA in self.unet, switched on only in the branch
        self.sample_scheduler = comp.lightning_scheduler(parts.sdxl["scheduler"])
        if hp.stage == 2:
            pose_model, pose_proc = comp.load("vitpose", self.cfg)
            self.pose = DifferentiablePose(pose_model, pose_proc, min_score=hp.min_score)
        image_encoder = ClipImageEncoder(eva, eva_name)
        if hp.stage == 2:
            self.clip_loss = ClipTextLoss(image_encoder, eva, eva_tok)
        if init_adapter:
            self.adapter = BodyConditionModule.load(init_adapter, self.unet, image_encoder)
            if adapter_settings:
                log.warning("model.adapter settings are ignored: the adapter comes from %s", init_adapter)
        else:
            settings = dict(adapter_settings or {})
            kit_stats = getattr(comp.kit_module(self.cfg.kind), "proportion_stats", None)
            if settings.get("body_shape") == "proportions" and kit_stats and "proportion_mean" not in settings:
                # The kit's own population (BoLID-mini: its world's exact keypoints), not the real-photo statistics.
                settings["proportion_mean"], settings["proportion_std"] = kit_stats()
            self.adapter = BodyConditionModule(self.unet, image_encoder, AdapterConfig.from_dict(settings))
        if self.adapter.config.body_shape == "proportions" and hp.id_pose_weight > 0:
            raise ValueError(
                "model.id_pose_weight needs adapter.body_shape: net (the proportions L_id has no pose term)"
            )
        if wants_lightning and hp.lightning_weights == "lora":
            # After the adapter is built: its low-rank K/V stay relative to the base to_k / to_v, as with the UNet.
            comp.load("sdxl_lightning_lora", self.cfg, unet=self.unet)
            self.lightning_lora = True
        # Freeze everything and cast only the frozen modules, *before* the adapter goes into the UNets: a cast
        # after install would round the trainable weights (they live inside the UNet then) to frozen_dtype.
        self.requires_grad_(False)
        dtype = _DTYPES[hp.frozen_dtype]
        if dtype != torch.float32:
            # The SDXL VAE overflows in fp16 (its config sets force_upcast): it stays fp32 unless bf16 is asked for.
            vae = self.vae if dtype == torch.bfloat16 else None
            frozen = (self.unet, vae, self.text_encoder, self.text_encoder_2, self.lightning_unet, self.pose)
            for module in (*frozen, image_encoder, self.clip_loss.model if self.clip_loss is not None else None):
                if module is not None:
                    module.to(dtype)
        self.adapter.install(self.unet)
        if self.lightning_unet is not None:
            self.adapter.install(self.lightning_unet)
        for p in self.adapter.trainable_parameters():
            assert p.dtype == torch.float32, "trainable weights must stay in fp32"
            p.requires_grad_(True)
        self._lora_on = False
        if hp.gradient_checkpointing:
            if self.lightning_lora:
                self.unet.enable_gradient_checkpointing(self._checkpoint_lora_aware)
            else:
                self.unet.enable_gradient_checkpointing()
            if self.lightning_unet is not None:
                self.lightning_unet.enable_gradient_checkpointing()
        if hp.vae_checkpointing:
            self.vae.enable_gradient_checkpointing()  # the decoder recomputes each up-block in the backward pass
        if hp.compile_unet:
            for unet in (self.unet, self.lightning_unet):
                if unet is not None:
                    unet.compile()
        self._ema: dict[str, torch.Tensor] | None = None
        self._id_counts = torch.zeros(3)  # steps, steps that ran the ID branch, steps with a valid L_id
        self.cache = None
        if hp.cache_dir:
            from bolid.train.cache import EncodingCache

            self.cache = EncodingCache(hp.cache_dir, f"{self.cfg!r} frozen_dtype={hp.frozen_dtype}")

    def trainable_named_parameters(self) -> dict[str, torch.nn.Parameter]:
        ids = {id(p) for p in self.adapter.trainable_parameters()}
        return {f"adapter.{n}": p for n, p in self.adapter.named_parameters() if id(p) in ids}

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen models always run in eval mode (dropout off, norms fixed); only the adapter follows `mode`.
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.lightning_unet):
            if module is not None:
                module.eval()
        self.adapter.train(mode)
        return self

    # ---------------------------------------------------------------------------------------- helpers

    def _generator(self, salt: int = 0, batch_idx: int = 0) -> torch.Generator:
        """Per-step randomness, seeded by (seed, global_step, micro-batch within an accumulation window, rank)."""
        rank = self.global_rank if self._trainer is not None else 0
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        micro = batch_idx % max(accumulate, 1)
        seed = (self.hparams.seed * 1_000_003 + self.global_step * 9_176 + micro * 7 + rank * 131 + salt) % (2**63)
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL prompt embeddings ``(B, 77, 2048)`` and pooled ``(B, 1280)`` (diffusers' own ``encode_prompt``)."""
        if self.cache is None:
            return self._encode_text(captions)
        found = [self.cache.get_text(c) for c in captions]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            embeds, pooled = self._encode_text([captions[i] for i in todo])
            for j, i in enumerate(todo):
                self.cache.put_text(captions[i], embeds[j], pooled[j])
                found[i] = (embeds[j], pooled[j])
        dtype = next(self.text_encoder_2.parameters()).dtype
        return (
            torch.stack([f[0] for f in found]).to(self.device, dtype),
            torch.stack([f[1] for f in found]).to(self.device, dtype),
        )

    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self._prompt_pipe.encode_prompt(
            captions, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled

    @torch.no_grad()
    def target_latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Latents of the target crops, from the cache of latent distributions when one is configured."""
        if self.cache is None:
            return self.encode_latents(batch["pixels"], generator)
        flips = [bool(f) for f in batch["flip"]]
        found = [
            self.cache.get_latents(k, t, f) for k, t, f in zip(batch["key"], batch["time_ids"], flips, strict=True)
        ]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            vae_dtype = next(self.vae.parameters()).dtype
            dist = self.vae.encode(batch["pixels"][todo].to(vae_dtype)).latent_dist
            for j, i in enumerate(todo):
                self.cache.put_latents(batch["key"][i], batch["time_ids"][i], flips[i], dist.mean[j], dist.logvar[j])
                found[i] = (dist.mean[j], dist.logvar[j])
        mean = torch.stack([f[0] for f in found]).to(self.device, torch.float32)
        logvar = torch.stack([f[1] for f in found]).to(self.device, torch.float32)
        noise = torch.randn(mean.shape, generator=generator, device=self.device)  # as latent_dist.sample draws
        return (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels.to(vae_dtype)).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in ``[-1, 1]`` (differentiable; the VAE's weights are frozen)."""
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).sample.float()

    def _identity(self, batch: dict) -> IdentityEmbeds:
        return self.adapter.encode_crops(batch_crops(batch))

    def _unet(self, unet, latents, t, text, pooled, time_ids, embeds: IdentityEmbeds) -> torch.Tensor:
        dtype = next(unet.parameters()).dtype
        kwargs = self.adapter.unet_kwargs(
            embeds.to(dtype=dtype),
            latents,
            added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)},
        )
        return unet(latents.to(dtype), t, encoder_hidden_states=text.to(dtype), **kwargs).sample.float()

    # ---------------------------------------------------------------------------------------- losses

    def diffusion_loss(
        self,
        batch: dict,
        generator: torch.Generator,
        dropout: bool = True,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
        identity: IdentityEmbeds | None = None,
    ) -> torch.Tensor:
        """Diffusion loss on the target; ``text`` (prompt and pooled embeddings of the captions) and ``identity``
        (the references' vectors) are computed here unless the caller already has them."""
        hp, b = self.hparams, batch["pixels"].shape[0]
        latents = self.target_latents(batch, generator).float()
        text, pooled = text if text is not None else self.encode_text(batch["caption"])
        u = torch.rand(b, 4, generator=generator, device=self.device)
        drop_all = u[:, 0] < hp.drop_all if dropout else torch.zeros(b, dtype=torch.bool, device=self.device)
        drop_text = (u[:, 1] < hp.drop_text) | drop_all if dropout else drop_all
        keep_face = ~((u[:, 2] < hp.drop_face) | drop_all) if dropout else ~drop_all
        drop_body = (u[:, 3] < hp.drop_body) | drop_all if dropout else drop_all
        text = text * (~drop_text).to(text.dtype)[:, None, None]
        pooled = pooled * (~drop_text).to(pooled.dtype)[:, None]
        # Dropped face / body = the zero vector with the term on: exactly the negative that CFG uses at inference
        # (IP-Adapter practice). A face that is not visible is masked out instead, in training and inference alike.
        embeds = identity if identity is not None else self._identity(batch)
        embeds = IdentityEmbeds(
            embeds.face * keep_face.to(embeds.face.dtype)[:, None],
            embeds.body * (~drop_body).to(embeds.body.dtype)[:, None],
            embeds.face_visible,
        )
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), generator=generator, device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = diffusion_target(self.noise_scheduler, latents, noise, t)
        pred = self._unet(self.unet, noisy, t, text, pooled, batch["time_ids"], embeds)
        if not hp.body_loss_weight:
            return F.mse_loss(pred, target.float())
        return body_weighted_mse(
            pred, target.float(), batch["keypoints"].to(self.device), batch["pixels"].shape[-1],
            hp.body_loss_weight, hp.body_loss_sigma, hp.min_score,
        )  # fmt: skip

    @contextlib.contextmanager
    def lightning_lora_on(self):
        """Inside: ``self.unet`` is SDXL-Lightning (its LoRA on); outside it is the SDXL base UNet."""
        set_lora_enabled(self.unet, True)
        self._lora_on = True
        try:
            yield self.unet
        finally:
            set_lora_enabled(self.unet, False)
            self._lora_on = False

    def _checkpoint_lora_aware(self, block, *args):
        """Gradient checkpointing for a UNet that toggles its LoRA: the backward pass recomputes ``block`` with the
        LoRA switched as it was in the forward pass (the ``L_diff`` pass without it, the Lightning branch with it),
        whatever the switch says when the recomputation runs."""
        on = self._lora_on

        def run(*inputs):
            if on == self._lora_on:
                return block(*inputs)
            set_lora_enabled(block, on)
            try:
                return block(*inputs)
            finally:
                set_lora_enabled(block, self._lora_on)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    def lightning_branch(
        self,
        embeds: IdentityEmbeds,
        captions: list[str],
        generator: torch.Generator,
        resolution: int,
        steps: int,
        grad_steps: int = 0,
        unet=None,
        guidance: float = 1.0,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Generate images ``(B, 3, R, R)`` in ``[-1, 1]`` from pure noise with trailing Euler.

        Gradients flow only through the last ``grad_steps`` steps and the VAE decode (0 = none). ``text``: the
        captions' embeddings when the caller already has them.
        """
        from diffusers import EulerDiscreteScheduler

        if unet is None and self.lightning_lora:
            with self.lightning_lora_on():
                return self.lightning_branch(embeds, captions, generator, resolution, steps, grad_steps, self.unet,
                                             guidance, text)  # fmt: skip
        unet = unet or self.lightning_unet or self.unet
        b = len(captions)
        scheduler = EulerDiscreteScheduler.from_config(self.sample_scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (b, unet.config.in_channels, resolution // factor, resolution // factor)
        latents = torch.randn(shape, generator=generator, device=self.device) * scheduler.init_noise_sigma
        text, pooled = text if text is not None else self.encode_text(captions)
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=self.device)
        time_ids = time_ids[None].repeat(b, 1).float()
        zero = embeds.negative()
        for i, t in enumerate(scheduler.timesteps):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= steps - grad_steps):
                x = scheduler.scale_model_input(latents, t)
                if guidance > 1.0:
                    both = IdentityEmbeds(
                        torch.cat([zero.face, embeds.face]),
                        torch.cat([zero.body, embeds.body]),
                        torch.cat([embeds.face_visible, embeds.face_visible]),
                    )
                    out = self._unet(
                        unet,
                        torch.cat([x, x]),
                        t,
                        torch.cat([torch.zeros_like(text), text]),
                        torch.cat([torch.zeros_like(pooled), pooled]),
                        torch.cat([time_ids, time_ids]),
                        both,
                    )
                    uncond, cond = out.chunk(2)
                    pred = uncond + guidance * (cond - uncond)
                else:
                    pred = self._unet(unet, x, t, text, pooled, time_ids, embeds)
                latents = scheduler.step(pred, t, latents).prev_sample
        with torch.set_grad_enabled(torch.is_grad_enabled() and grad_steps > 0):
            return self.decode(latents)

    def id_losses(
        self,
        batch: dict,
        generator: torch.Generator,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
        identity: IdentityEmbeds | None = None,
    ) -> dict[str, torch.Tensor]:
        """Body-ID and CLIP losses on the Lightning branch's images; ``text`` / ``identity`` as in diffusion_loss."""
        hp = self.hparams
        embeds = identity if identity is not None else self._identity(batch)
        images = self.lightning_branch(
            embeds, batch["caption"], generator, hp.branch_resolution, hp.lightning_steps, hp.grad_steps, text=text
        )
        kp = self.pose(images)
        encoder = self.adapter.body_encoder
        if encoder.body_shape == "proportions":  # the representation the body encoder reads, with its statistics
            stats = encoder.proportion_mean.float(), encoder.proportion_std.float()
            l_id, valid = proportion_identity_loss(kp, batch["ref_keypoints"], *stats, hp.min_score)
        else:
            l_id, valid = body_identity_loss(kp, batch["ref_keypoints"], hp.min_score, pose_weight=hp.id_pose_weight)
        body = kp[:, list(BODY_INDICES), 2].detach()
        out = {"loss_id": l_id, "id_valid": valid.detach(), "kp_valid": (body >= hp.min_score).float().mean()}
        if hp.w_clip > 0:
            out["loss_clip"] = self.clip_loss(images, batch["caption"])
        if hp.w_clip_image > 0:
            out["loss_clip_image"] = self.clip_loss.image_loss(images, batch["ref_image"])
        return out

    # ------------------------------------------------------------------------------------------ steps

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        generator = self._generator(batch_idx=batch_idx)
        # The captions and references are encoded once and shared by both branches.
        text, identity = self.encode_text(batch["caption"]), self._identity(batch)
        parts = {"loss_diff": self.diffusion_loss(batch, generator, text=text, identity=identity)}
        step = self.global_step
        ran = hp.stage == 2 and step >= hp.id_start_step and step % hp.id_every_n_steps == 0
        diagnostics: dict[str, torch.Tensor | float] = {}
        if ran:
            id_generator = self._generator(salt=1, batch_idx=batch_idx)
            out = self.id_losses(batch, id_generator, text=text, identity=identity)
            diagnostics.update({k: out.pop(k) for k in ("id_valid", "kp_valid")})
            parts.update(out)
        loss = sum(self._weights()[k] * v for k, v in parts.items())
        if not torch.isfinite(loss):
            values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items())
            raise NonFiniteLossError(
                f"non-finite loss at step {step} ({values}); stopping. The last good checkpoint is kept "
                "(resume with --ckpt_path last); lower model.lr or check the data."
            )
        self._id_counts += torch.tensor([1.0, float(ran), float(ran and float(diagnostics["id_valid"]) > 0)])
        diagnostics["id_ran_fraction"] = self._id_counts[1] / self._id_counts[0]
        diagnostics["id_effective_fraction"] = self._id_counts[2] / self._id_counts[0]
        if hp.grad_norm_every_n_steps and step % hp.grad_norm_every_n_steps == 0:
            diagnostics.update(self.term_grad_norms(parts))
        bs = batch["pixels"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in (parts | diagnostics).items():
            self.log(f"train/{k}", v, batch_size=bs)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, batch_size=bs)
        return loss

    def _weights(self) -> dict[str, float]:
        hp = self.hparams
        return {"loss_diff": hp.w_diff, "loss_id": hp.w_id, "loss_clip": hp.w_clip, "loss_clip_image": hp.w_clip_image}

    def term_grad_norms(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L2 norm of each *weighted* loss term's gradient on the adapter, and ``w_id·L_id`` over ``w_diff·L_diff``.

        One extra backward pass per term (the graph is kept for the real one): a diagnostic, run every
        ``grad_norm_every_n_steps`` steps. Returns ``grad_norm_<term>`` and ``grad_ratio_id_diff``.
        """
        params = [p for p in self.trainable_named_parameters().values() if p.requires_grad]
        weights, out = self._weights(), {}
        for name, value in parts.items():
            if not weights[name] or not value.requires_grad:
                continue
            grads = torch.autograd.grad(weights[name] * value, params, retain_graph=True, allow_unused=True)
            sq = sum((g.float() ** 2).sum() for g in grads if g is not None)
            out[f"grad_norm_{name.removeprefix('loss_')}"] = torch.as_tensor(sq, dtype=torch.float32).sqrt()
        if "grad_norm_id" in out and "grad_norm_diff" in out:
            out["grad_ratio_id_diff"] = out["grad_norm_id"] / out["grad_norm_diff"].clamp(min=1e-12)
        return out

    def reference_gain(self, batch: dict, seed: int) -> dict[str, torch.Tensor] | None:
        """How much the right reference is worth to the diffusion loss.

        ``L_diff`` of the batch (no dropout) with each sample's own reference, and again with the reference of
        another person in the batch (:func:`reference_swap`), on the same noise, timesteps and text.
        ``ref_gain`` is their difference relative to the first: 0 when the adapter ignores who the reference
        shows, and what stage 1 learns identity from (0.8% for BoLID-mini's stage 1, docs/mini/README.md).
        ``samples``: how many of the batch's samples were compared. ``None`` for a batch of one person.
        """
        pairs = reference_swap(batch["identity"])
        if pairs is None:
            return None
        keep, other = pairs
        if len(keep) < len(batch["identity"]):
            batch = {k: v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep] if isinstance(v, list) else v
                     for k, v in batch.items()}  # fmt: skip
        own = self._identity(batch)
        swapped = IdentityEmbeds(own.face[other], own.body[other], own.face_visible[other])
        losses = [
            self.diffusion_loss(batch, torch.Generator(device=self.device).manual_seed(seed), False, identity=e)
            for e in (own, swapped)
        ]
        return {"loss_diff": losses[0], "loss_diff_other_ref": losses[1],
                "ref_gain": (losses[1] - losses[0]) / losses[0].clamp(min=1e-12), "samples": len(keep)}  # fmt: skip

    def caption_gain(self, batch: dict, seed: int, loss: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """How much the right caption is worth to the diffusion loss: the scale for ``ref_gain``.

        ``L_diff`` with each sample's caption replaced by the next sample's (rolled by one), on the noise and
        timesteps that gave ``loss`` (the batch's own ``L_diff`` with ``seed``), relative to ``loss``. 5-6% for
        BoLID-mini's stage 1, where the caption names scene and clothes. ``None`` when the batch has a single caption.
        """
        captions = list(batch["caption"])
        if len(set(captions)) < 2:
            return None
        text = self.encode_text(captions[1:] + captions[:1])
        other = self.diffusion_loss(batch, torch.Generator(device=self.device).manual_seed(seed), False, text=text)
        return {"loss_diff_other_caption": other, "caption_gain": (other - loss) / loss.clamp(min=1e-12)}

    @staticmethod
    def _eval_seed(batch_idx: int) -> int:
        """The noise seed of validation/test batch ``batch_idx``: the same for every run, whatever its seed."""
        return EVAL_SEED + 7919 * batch_idx

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        seed, bs = self._eval_seed(batch_idx), batch["pixels"].shape[0]
        gain = self.reference_gain(batch, seed)
        if gain is not None and gain["samples"] == bs:  # its own-reference pass is this batch's L_diff
            loss = gain["loss_diff"]
        else:
            loss = self.diffusion_loss(batch, torch.Generator(device=self.device).manual_seed(seed), dropout=False)
        self.log("val/loss_diff", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        caption = self.caption_gain(batch, seed, loss)
        if caption is not None or self.trainer.world_size > 1:  # every rank logs the same keys (see below)
            self.log("val/caption_gain", loss.new_zeros(()) if caption is None else caption["caption_gain"].detach(),
                     batch_size=0 if caption is None else bs, sync_dist=True)  # fmt: skip
        if gain is None and self.trainer.world_size == 1:
            return loss
        # A batch of one person has no other reference. Under DDP it still logs, with weight 0, so that every rank
        # logs the same keys (the epoch means are sums synced over ranks) and it counts for nothing.
        n = 0 if gain is None else int(gain["samples"])  # the samples the swap compared
        zero = loss.new_zeros(())
        # own / other: the same samples (reference_swap may leave some out), comparable with each other
        for key, name in (("loss_diff", "loss_diff_own_ref"), ("loss_diff_other_ref", "loss_diff_other_ref"),
                          ("ref_gain", "ref_gain")):  # fmt: skip
            value = zero if gain is None else gain[key].detach()
            self.log(f"val/{name}", value, prog_bar=name == "ref_gain", batch_size=n, sync_dist=True)
        return loss

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(self._eval_seed(batch_idx))
        loss = self.diffusion_loss(batch, generator, dropout=False)
        self.log("test/loss_diff", loss, batch_size=batch["pixels"].shape[0], sync_dist=True)
        return loss

    # --------------------------------------------------------------------------------------- optimiser

    def configure_optimizers(self):
        hp = self.hparams
        params = list(self.trainable_named_parameters().values())
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = max(hp.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "configure_reference_crops"):
            dm.configure_reference_crops(self.adapter.image_encoder.image_size, self.adapter.config.min_score)

    def on_fit_start(self) -> None:
        precision = str(self.trainer.precision)
        if self.hparams.frozen_dtype != "fp32" and "mixed" not in precision and "true" not in precision:
            raise ValueError(
                f"model.frozen_dtype={self.hparams.frozen_dtype} needs a mixed-precision trainer "
                f"(trainer.precision: bf16-mixed), got trainer.precision={precision}"
            )

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "sync_to_trainer"):
            dm.sync_to_trainer()

    # -------------------------------------------------------------------------------------------- EMA

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Inside the step (not in on_train_batch_end), so a checkpoint taken after this batch includes it.
        self._update_ema()

    def _update_ema(self) -> None:
        decay = self.hparams.ema_decay
        if decay is None:
            return
        params = self.trainable_named_parameters()
        if self._ema is None:
            self._ema = {k: p.detach().clone() for k, p in params.items()}
            return
        with torch.no_grad():
            for k, p in params.items():
                if self._ema[k].device != p.device:  # restored from a checkpoint before the model moved to the GPU
                    self._ema[k] = self._ema[k].to(p.device)
                self._ema[k].lerp_(p.detach(), 1.0 - decay)

    def ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights in :meth:`BodyConditionModule.adapter_state_dict` naming, or ``None``."""
        if self._ema is None:
            return None
        return {k.removeprefix("adapter."): v.detach().clone() for k, v in self._ema.items()}

    # ------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.trainable_named_parameters())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # The adapter's full settings (also when it came from model.init_adapter), for `bolid export`.
        checkpoint["adapter_config"] = asdict(self.adapter.config)
        if self._ema is not None:
            checkpoint["ema"] = {k: v.cpu() for k, v in self._ema.items()}
        checkpoint["id_counts"] = self._id_counts.clone()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected = set(self.trainable_named_parameters())
        missing = expected - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} adapter weights (e.g. {sorted(missing)[0]}): "
                "it was made for another model configuration"
            )
        if "ema" in checkpoint:
            self._ema = {k: v.to(self.device) for k, v in checkpoint["ema"].items()}
        if "id_counts" in checkpoint:
            self._id_counts = checkpoint["id_counts"].clone()

    def save_adapter(self, path: str | Path, ema: bool = False) -> Path:
        """Write the adapter folder (weights + settings); ``ema=True`` writes the EMA weights instead."""
        if not ema or self._ema is None:
            return self.adapter.save(path)
        current = {k: v.detach().clone() for k, v in self.adapter.adapter_state_dict().items()}
        try:
            self.adapter.load_state_dict(self.ema_state_dict(), strict=False)
            return self.adapter.save(path)
        finally:
            self.adapter.load_state_dict(current, strict=False)
