"""BoLIDPipeline: SDXL (or SDXL-Lightning) + the Body-Condition Module + a pose model, reference photos in, images out.

It wraps a stock diffusers ``StableDiffusionXLPipeline`` whose UNet carries the installed
:class:`bolid.adapter.BodyConditionModule`; generation *is* the stock pipeline's ``__call__`` with BoLID's
face and body vectors passed as ``ip_adapter_image_embeds`` (and, for a reference without a visible face,
a zero face mask in ``ip_adapter_masks``). That is why a plain ``StableDiffusionXLPipeline`` with the
exported adapters (:meth:`bolid.adapter.BodyConditionModule.export_diffusers`) and the same embeddings
reproduces BoLID's images.

Sampling defaults: with the Lightning UNet, SDXL-Lightning's prescription (4 steps, Euler with trailing
timestep spacing, classifier-free guidance off); with the base UNet, 30 steps and guidance 5.0 on the
base scheduler. Image ``i`` of a call uses seed ``seed + i``, so any image can be regenerated alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bolid.adapter import AdapterConfig, BodyConditionModule, IdentityEmbeds, face_masks
from bolid.config import ComponentsConfig
from bolid.image_encoder import ClipImageEncoder
from bolid.pose import PoseExtractor, VitPoseExtractor
from bolid.reference import Reference, encode_references, load_references

log = logging.getLogger(__name__)

LIGHTNING_STEPS = 4
BASE_STEPS = 30
BASE_GUIDANCE = 5.0


@dataclass
class GenerationResult:
    """Images of one call, the identity they were conditioned on, and every setting used."""

    images: list[Image.Image] | np.ndarray
    embeds: IdentityEmbeds | None
    references: list[Reference] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


class BoLIDPipeline:
    """Identity-preserving text-to-image: SDXL + :class:`BodyConditionModule` + a pose extractor.

    Args:
        sdxl: a ``StableDiffusionXLPipeline``; the adapter is installed into its UNet.
        adapter: the Body-Condition Module, made for ``sdxl.unet``'s shape.
        extractor: finds the person and keypoints in reference photos.
        lightning: the UNet is SDXL-Lightning (sets the sampling defaults).
        pose_threshold: the extractor's person-detection threshold (reported in errors and settings).
        info: free-form provenance recorded in the settings (component kind, adapter path, ...).
        distilled_steps: the step count the Lightning UNet was distilled for (a warning names other counts);
            ``None`` for a few-step stand-in that is not distilled (the mini kit's).
    """

    def __init__(
        self,
        sdxl,
        adapter: BodyConditionModule,
        extractor: PoseExtractor,
        lightning: bool = True,
        pose_threshold: float | None = None,
        info: dict | None = None,
        distilled_steps: int | None = LIGHTNING_STEPS,
    ):
        self.sdxl = sdxl
        self.distilled_steps = distilled_steps
        self.adapter = adapter
        self.extractor = extractor
        self.lightning = lightning
        self.pose_threshold = pose_threshold
        self.info = dict(info or {})
        for module in (sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2):
            module.requires_grad_(False)
        adapter.install(sdxl.unet)

    @classmethod
    def from_components(
        cls,
        components: str | dict | ComponentsConfig = "real",
        lightning: bool = True,
        adapter: str | Path | None = None,
        adapter_config: AdapterConfig | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        pose_threshold: float = 0.5,
        extractor: PoseExtractor | None = None,
    ) -> BoLIDPipeline:
        """Build from real weights or the tiny kit.

        Args:
            components: ``"real"``, ``"tiny"`` or a :class:`ComponentsConfig` (per-component local paths).
            lightning: use the SDXL-Lightning UNet and its sampler; ``False`` runs the SDXL base UNet.
            adapter: an adapter folder written by :meth:`BodyConditionModule.save`; ``None`` builds a freshly
                initialised (untrained) adapter.
            adapter_config: settings of a fresh adapter (ignored when ``adapter`` is given).
            device: torch device.
            dtype: weights dtype; default float32 on CPU, bfloat16 on CUDA.
            pose_threshold: person-detection threshold for reference photos.
            extractor: a pose extractor to use instead of the default ViTPose one.

        Raises:
            bolid.components.MissingWeightsError: real weights are not available.
            bolid.adapter.AdapterShapeError: the adapter was made for another UNet.
        """
        from diffusers import StableDiffusionXLPipeline

        from bolid import components as comp

        cfg = ComponentsConfig.parse(components)
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if adapter is not None:
            BodyConditionModule.read_config(adapter)  # fail on a bad path before loading gigabytes
        built = comp.build_parts(cfg, lightning=lightning, torch_dtype=dtype)
        parts = dict(built.sdxl)
        base_unet = parts["unet"]
        if lightning:
            parts["unet"] = built.lightning_unet
            parts["scheduler"] = comp.lightning_scheduler(parts["scheduler"])
        eva, _, _, eva_name = built.eva_clip
        image_encoder = ClipImageEncoder(eva, eva_name)
        del built
        sdxl = StableDiffusionXLPipeline(**parts)
        if sdxl.unet.dtype != dtype:
            sdxl.to(device, dtype)
        else:  # no cast: diffusers warns on any dtype .to(), even a no-op one
            sdxl.to(device)
        sdxl.set_progress_bar_config(disable=True)
        image_encoder.to(device, dtype)
        # The adapter is made for (and its low-rank K/V are relative to) the base UNet, also under Lightning;
        # module.to() below moves the only parts of it the adapter keeps (the cross-attention to_k / to_v).
        if adapter is not None:
            module = BodyConditionModule.load(adapter, base_unet, image_encoder)
        else:
            if not cfg.tiny:
                log.warning("no adapter given: using a freshly initialised, untrained adapter (identity will not hold)")
            module = BodyConditionModule(base_unet, image_encoder, adapter_config)
        module.to(device, dtype)
        del base_unet
        if extractor is None:
            extractor = VitPoseExtractor.from_components(
                cfg.kind,
                detector=cfg.source("person_detector"),
                vitpose=cfg.source("vitpose"),
                device=device,
                threshold=pose_threshold,
            )
        info = {"components": cfg.kind, "overrides": dict(cfg.overrides), "adapter": str(adapter) if adapter else None}
        distilled = getattr(comp.kit_module(cfg.kind), "LIGHTNING_DISTILLED_STEPS", LIGHTNING_STEPS)
        return cls(sdxl, module, extractor, lightning=lightning, pose_threshold=pose_threshold, info=info,
                   distilled_steps=distilled)  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.sdxl.unet.device

    def encode_references(self, images: Sequence) -> tuple[IdentityEmbeds, list[Reference]]:
        """One identity (batch of 1) from one or more reference photos of one person (mean of vectors)."""
        refs = load_references(images, self.extractor, self.pose_threshold)
        return encode_references(self.adapter, refs), refs

    def __call__(
        self,
        prompt: str,
        references: Sequence | None = None,
        embeds: IdentityEmbeds | None = None,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scale_face: float | None = None,
        scale_body: float | None = None,
        seed: int = 0,
        num_images: int = 1,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
    ) -> GenerationResult:
        """Generate ``num_images`` images of the referenced person.

        Args:
            prompt: the text prompt.
            references: reference photos (paths, bytes or PIL images) of one person; combined by the mean.
            embeds: precomputed identity (one row) instead of ``references``. With neither, the identity
                terms are off (both scales 0) and the output is the base model's.
            negative_prompt: used only with classifier-free guidance.
            steps: sampling steps; 4 with Lightning, 30 otherwise.
            guidance_scale: CFG scale; 0 (off) with Lightning, 5.0 otherwise.
            scale_face: lambda_face for this call; default the adapter's current value.
            scale_body: lambda_body for this call; default the adapter's current value.
            seed: image ``i`` is sampled from seed ``seed + i``.
            num_images: images to generate.
            height: image height in pixels (default the UNet's native size).
            width: image width in pixels.
            output_type: ``"pil"`` (PIL images) or ``"np"`` (one float array ``(N, H, W, 3)`` in ``[0, 1]``).
        """
        steps = self.check_inputs(prompt, references, embeds, steps, num_images)
        if guidance_scale is None:
            guidance_scale = 0.0 if self.lightning else BASE_GUIDANCE
        embeds, refs, identity = self.prepare_identity(references, embeds)
        if not identity:  # no identity: both terms switched off = the base model
            scale_face, scale_body = 0.0, 0.0
        saved = self.adapter.scales
        self.adapter.set_scales(face=scale_face, body=scale_body)
        scales = self.adapter.scales
        do_cfg = guidance_scale > 1.0
        unet = self.sdxl.unet
        height = height or unet.config.sample_size * self.sdxl.vae_scale_factor
        width = width or unet.config.sample_size * self.sdxl.vae_scale_factor
        kwargs = self.prepare_face_masks(embeds, num_images * (2 if do_cfg else 1), height, width)
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
        try:
            images = self.sdxl(
                prompt=prompt,
                negative_prompt=negative_prompt if do_cfg else None,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images,
                height=height,
                width=width,
                generator=generators,
                output_type=output_type,
                ip_adapter_image_embeds=[e.to(self.device, unet.dtype) for e in embeds.image_embeds(do_cfg)],
                **kwargs,
            ).images
        finally:
            self.adapter.set_scales(face=saved["face"], body=saved["body"])
        settings = self.settings(
            prompt=prompt,
            negative_prompt=negative_prompt if do_cfg else None,
            steps=steps,
            guidance_scale=guidance_scale,
            scales=scales,
            identity=identity,
            face_used=bool(embeds.face_visible.all()) and identity,
            seed=seed,
            num_images=num_images,
            height=height,
            width=width,
            refs=refs,
        )
        return GenerationResult(images, embeds, refs, settings)

    # ------------------------------------------------------------------------------- steps of __call__

    def check_inputs(
        self,
        prompt: str,
        references: Sequence | None,
        embeds: IdentityEmbeds | None,
        steps: int | None,
        num_images: int,
    ) -> int:
        """Raise ``ValueError`` on bad arguments; returns the number of sampling steps (default for the UNet)."""
        if not prompt or not isinstance(prompt, str):
            raise ValueError("prompt must be a non-empty string")
        if references is not None and embeds is not None:
            raise ValueError("pass references or embeds, not both")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        steps = steps or (LIGHTNING_STEPS if self.lightning else BASE_STEPS)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if self.lightning and self.distilled_steps is not None and steps != self.distilled_steps:
            log.warning("the SDXL-Lightning UNet is distilled for %d steps; running %d", self.distilled_steps, steps)
        return steps

    def prepare_identity(
        self, references: Sequence | None, embeds: IdentityEmbeds | None
    ) -> tuple[IdentityEmbeds, list[Reference], bool]:
        """The identity to condition on: ``(embeds, references used, whether there is an identity)``.

        From ``references`` (encoded), or ``embeds`` as given; with neither, zero vectors (the caller switches
        both identity terms off, which gives the base model's output).
        """
        refs: list[Reference] = []
        if references is not None:
            embeds, refs = self.encode_references(references)
        identity = embeds is not None
        if embeds is None:
            cfg = self.adapter.config
            zeros = torch.zeros(1, self.adapter.image_encoder.embed_dim), torch.zeros(1, cfg.body_dim)
            embeds = IdentityEmbeds(*zeros, torch.zeros(1, dtype=torch.bool))
        if len(embeds) != 1:
            raise ValueError(f"embeds must hold one identity (combine references with .mean()), got {len(embeds)}")
        return embeds, refs, identity

    def prepare_face_masks(self, embeds: IdentityEmbeds, batch: int, height: int, width: int) -> dict:
        """``cross_attention_kwargs`` that drop the face term where no face is visible (diffusers'
        ``ip_adapter_masks``); empty when every face is visible. ``batch``: rows in the UNet batch (with CFG)."""
        if bool(embeds.face_visible.all()):
            return {}
        latent = (height // self.sdxl.vae_scale_factor, width // self.sdxl.vae_scale_factor)
        mask = face_masks(embeds.face_visible.repeat(batch).cpu(), latent)
        return {"cross_attention_kwargs": {"ip_adapter_masks": [mask.to(self.device), None]}}

    def settings(
        self,
        *,
        prompt: str,
        negative_prompt: str | None,
        steps: int,
        guidance_scale: float,
        scales: dict[str, float],
        identity: bool,
        face_used: bool,
        seed: int,
        num_images: int,
        height: int,
        width: int,
        refs: list[Reference],
    ) -> dict:
        """Every setting of one call, as ``settings.json`` records it."""
        return {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "scale_face": scales["face"],
            "scale_body": scales["body"],
            "identity": identity,
            "face_used": face_used,
            "seed": seed,
            "seeds": [seed + i for i in range(num_images)],
            "num_images": num_images,
            "height": height,
            "width": width,
            "lightning": self.lightning,
            "scheduler": {
                "class": type(self.sdxl.scheduler).__name__,
                **{k: v for k, v in self.sdxl.scheduler.config.items() if not k.startswith("_")},
            },
            "device": str(self.device),
            "dtype": str(self.sdxl.unet.dtype).replace("torch.", ""),
            "references_combined_by": "mean of per-reference embedding vectors (face: over visible faces)",
            "references": [r.to_dict() for r in refs],
            "pose_threshold": self.pose_threshold,
            "adapter_config": {k: v for k, v in vars(self.adapter.config).items()},
            "image_encoder": self.adapter.image_encoder.name,
            **self.info,
        }
