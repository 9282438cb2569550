"""The real kit: every pretrained component from its hub id or a local path (see :mod:`bolid.components`).

Builders follow the contract in :mod:`bolid.kits`. Where each component comes from (``source``, then
``$BOLID_<NAME>``, then the default hub id from the local cache) and the one clear
:class:`~bolid.components.MissingWeightsError` when the weights are missing are :func:`bolid.components.resolve`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bolid.components import COMPONENTS, MissingWeightsError, _call, _eva_weights, resolve


def sdxl(source: str | None = None, torch_dtype: torch.dtype = torch.float32, variant: str | None = None) -> dict:
    """The SDXL base pipeline's components (UNet, VAE, two text encoders and tokenizers, scheduler)."""
    from diffusers import StableDiffusionXLPipeline

    path = resolve("sdxl", source)
    pipe = _call(
        "sdxl", path, StableDiffusionXLPipeline.from_pretrained, path, torch_dtype=torch_dtype, variant=variant
    )
    return dict(pipe.components)


def sdxl_unet(source: str | None = None, torch_dtype: torch.dtype = torch.float32):
    """Only the SDXL base UNet (``unet/`` of the SDXL folder): no VAE, text encoders or tokenizers."""
    from diffusers import UNet2DConditionModel

    path = resolve("sdxl", source)
    return _call("sdxl", path, UNet2DConditionModel.from_pretrained, path, subfolder="unet", torch_dtype=torch_dtype)


def sdxl_lightning_unet(source: str | None = None, *, base_unet):
    """Build an SDXL-Lightning UNet: the base UNet's config with the distilled weights loaded.

    Args:
        base_unet: the SDXL base ``UNet2DConditionModel`` (its config and dtype are reused).
        source: the ``.safetensors`` file, a folder holding it, or the hub repo id.
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    spec = COMPONENTS["sdxl_lightning_unet"]
    path = Path(resolve("sdxl_lightning_unet", source))
    if path.is_dir():
        path = path / spec.filename
    if not path.exists():
        from huggingface_hub import hf_hub_download

        path = Path(_call("sdxl_lightning_unet", str(path), hf_hub_download, str(path), spec.filename))
    unet = UNet2DConditionModel.from_config(base_unet.config).to(base_unet.dtype)
    state = _call("sdxl_lightning_unet", str(path), load_file, str(path))
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MissingWeightsError(
            "sdxl_lightning_unet", str(path), f"checkpoint does not match the SDXL UNet ({len(missing)} missing keys)"
        )
    return unet


def sdxl_lightning_lora(source: str | None = None, *, unet) -> None:
    """Load the SDXL-Lightning LoRA (file, folder holding it, or hub id) into ``unet``, switched off
    (:func:`bolid.lightning_lora.apply_lightning_lora`)."""
    from bolid.lightning_lora import apply_lightning_lora

    spec = COMPONENTS["sdxl_lightning_lora"]
    path = Path(resolve("sdxl_lightning_lora", source))
    if path.is_dir():
        path = path / spec.filename
    if not path.exists():
        from huggingface_hub import hf_hub_download

        path = Path(_call("sdxl_lightning_lora", str(path), hf_hub_download, str(path), spec.filename))
    apply_lightning_lora(unet, path)


def person_detector(source: str | None = None):
    """RT-DETR detector and its image processor."""
    from transformers import AutoProcessor, RTDetrForObjectDetection

    path = resolve("person_detector", source)
    processor = _call("person_detector", path, AutoProcessor.from_pretrained, path)
    return _call("person_detector", path, RTDetrForObjectDetection.from_pretrained, path), processor


def vitpose(source: str | None = None):
    """ViTPose model and its image processor."""
    from transformers import AutoProcessor, VitPoseForPoseEstimation

    path = resolve("vitpose", source)
    processor = _call("vitpose", path, AutoProcessor.from_pretrained, path)
    return _call("vitpose", path, VitPoseForPoseEstimation.from_pretrained, path), processor


def blip2(source: str | None = None, torch_dtype: torch.dtype = torch.float32):
    """BLIP-2 captioner and its processor."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    path = resolve("blip2", source)
    processor = _call("blip2", path, Blip2Processor.from_pretrained, path)
    model = _call("blip2", path, Blip2ForConditionalGeneration.from_pretrained, path, torch_dtype=torch_dtype)
    return model, processor


def eva_clip(source: str | None = None, pretrained: str | None = None) -> tuple[Any, Any, Any, str]:
    """EVA-CLIP through open_clip.

    Args:
        source: an open_clip architecture name (default ``EVA02-L-14-336``) or a ``local-dir:`` folder.
        pretrained: an open_clip pretrained tag or a local checkpoint file; defaults to
            ``$BOLID_EVA_CLIP_WEIGHTS`` or the spec's tag.

    Returns:
        ``(model, preprocess, tokenizer, name)``; ``name`` (``source`` or the default architecture) is what an
        adapter records and what rebuilds this encoder.
    """
    import open_clip

    name = resolve("eva_clip", source)
    if Path(name).exists():
        name = f"local-dir:{name}"
    kwargs: dict[str, Any] = {}
    if not name.startswith("local-dir:"):
        kwargs["pretrained"] = _eva_weights(name, pretrained)
    model, _, preprocess = _call("eva_clip", name, open_clip.create_model_and_transforms, name, **kwargs)
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess, tokenizer, source or COMPONENTS["eva_clip"].default


def clip(source: str | None = None):
    """transformers CLIP model and processor (used by the CLIP-T / CLIP-I metrics)."""
    from transformers import CLIPModel, CLIPProcessor

    path = resolve("clip", source)
    processor = _call("clip", path, CLIPProcessor.from_pretrained, path)
    return _call("clip", path, CLIPModel.from_pretrained, path), processor
