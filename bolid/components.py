"""Every pretrained component BoLID uses: its default hub id, how to override it, and its loader.

Each component loads by hub id or by local path. A path (a directory holding what
``from_pretrained`` expects, or a single checkpoint file where noted) always wins. The
order of precedence for a component's source is:

1. an explicit ``source`` argument (from a YAML config's ``components.overrides`` or a CLI flag);
2. the environment variable ``BOLID_<NAME>`` (e.g. ``BOLID_SDXL=/models/sdxl-base``);
3. the default hub id below, taken from the local Hugging Face cache when present.

When the weights are in neither place and the hub cannot be reached (offline, or
``HF_HUB_OFFLINE=1``), loading stops at once with :class:`MissingWeightsError`, which
names the component, the id or path tried and how to provide it, instead of a stack
trace from deep inside the hub client after a minute of retries.

The tiny random-init twins of all of these live in :mod:`bolid.tiny`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "COMPONENTS",
    "ComponentSpec",
    "MissingWeightsError",
    "resolve",
    "load_sdxl",
    "load_lightning_unet",
    "load_lightning_lora",
    "apply_lightning_lora",
    "set_lora_enabled",
    "load_person_detector",
    "load_vitpose",
    "load_blip2",
    "load_eva_clip",
    "load_clip",
]


@dataclass(frozen=True)
class ComponentSpec:
    """One pretrained component: where it comes from by default and what a local copy must hold."""

    name: str
    default: str
    library: str
    what: str
    local_layout: str
    filename: str | None = None  # a single file inside the repo (SDXL-Lightning)
    open_clip_pretrained: str | None = None  # open_clip pretrained tag (EVA-CLIP)
    download: str | None = None  # the hub repo to download, when it is not ``default`` (EVA-CLIP)

    @property
    def env_var(self) -> str:
        return f"BOLID_{self.name.upper()}"


COMPONENTS: dict[str, ComponentSpec] = {
    spec.name: spec
    for spec in (
        ComponentSpec(
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "diffusers",
            "SDXL base: UNet, VAE, both text encoders and tokenizers, scheduler",
            "a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, ...)",
        ),
        ComponentSpec(
            "sdxl_lightning_unet",
            "ByteDance/SDXL-Lightning",
            "diffusers",
            "SDXL-Lightning distilled UNet (epsilon prediction, trailing Euler)",
            "the file sdxl_lightning_4step_unet.safetensors, or a folder holding it",
            filename="sdxl_lightning_4step_unet.safetensors",
        ),
        ComponentSpec(
            "sdxl_lightning_lora",
            "ByteDance/SDXL-Lightning",
            "diffusers",
            "SDXL-Lightning as a LoRA on the SDXL base UNet (training: one resident UNet instead of two)",
            "the file sdxl_lightning_4step_lora.safetensors, or a folder holding it",
            filename="sdxl_lightning_4step_lora.safetensors",
        ),
        ComponentSpec(
            "person_detector",
            "PekingU/rtdetr_r50vd_coco_o365",
            "transformers",
            "RT-DETR person detector (label 0 = person)",
            "a transformers folder (config.json, model.safetensors, preprocessor_config.json)",
        ),
        ComponentSpec(
            "vitpose",
            "usyd-community/vitpose-base-simple",
            "transformers",
            "ViTPose top-down pose model, 17 COCO keypoints",
            "a transformers folder (config.json, model.safetensors, preprocessor_config.json)",
        ),
        ComponentSpec(
            "blip2",
            "Salesforce/blip2-opt-2.7b",
            "transformers",
            "BLIP-2 captioner",
            "a transformers folder (config.json, weights, processor and tokenizer files)",
        ),
        ComponentSpec(
            "eva_clip",
            "EVA02-L-14-336",
            "open_clip",
            "EVA-CLIP image/text encoder (open_clip architecture name)",
            "an open_clip checkpoint file (open_clip_pytorch_model.bin / .safetensors) or 'local-dir:' folder",
            open_clip_pretrained="merged2b_s6b_b61k",
            download="timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k",
        ),
        ComponentSpec(
            "clip",
            "openai/clip-vit-large-patch14",
            "transformers",
            "CLIP for the CLIP-T / CLIP-I metrics",
            "a transformers folder (config.json, weights, processor and tokenizer files)",
        ),
    )
}


class MissingWeightsError(RuntimeError):
    """Raised when a component's weights are neither local nor downloadable."""

    def __init__(self, component: str, tried: str, reason: str):
        spec = COMPONENTS.get(component)
        how = ""
        if spec is not None:
            how = (
                f"\n  To provide it: download '{spec.download or spec.default}' on a machine with internet "
                f"(e.g. `huggingface-cli download {spec.download or spec.default}`"
                + (f" {spec.filename}" if spec.filename else "")
                + ") and copy the cache, or point BoLID at a local copy with "
                f"`{spec.env_var}=/path` or `components.overrides.{component}: /path` in the config."
                f"\n  A local copy is {spec.local_layout}."
                "\n  To run without real weights use the tiny kit: `components: tiny`."
            )
        super().__init__(f"Missing weights for component '{component}' ({tried}): {reason}.{how}")
        self.component = component
        self.tried = tried


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap check (DNS + TCP connect) so that offline machines fail fast instead of retrying for minutes."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or Path(s).expanduser().exists()


def resolve(name: str, source: str | None = None) -> str:
    """Return a local path for component ``name``, or a hub id that can be downloaded now.

    Args:
        name: a key of :data:`COMPONENTS`.
        source: hub id or local path; ``None`` means ``$BOLID_<NAME>`` or the default id.

    Raises:
        ValueError: ``name`` is not a known component.
        MissingWeightsError: the weights are neither local nor downloadable.
    """
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; known: {', '.join(COMPONENTS)}")
    spec = COMPONENTS[name]
    source = source or os.environ.get(spec.env_var) or spec.default
    if _looks_like_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise MissingWeightsError(name, f"path {path}", "no such file or directory")
        return str(path)
    if spec.library == "open_clip":
        _eva_weights(source, None)  # an architecture name: check that its weights can be had
        return source
    from huggingface_hub import snapshot_download

    try:
        patterns = [spec.filename] if spec.filename else None
        return snapshot_download(source, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - any cache miss means "not local"
        pass
    if not _hub_reachable():
        raise MissingWeightsError(
            name, f"hub id {source}", "not in the local Hugging Face cache and the hub is unreachable"
        )
    return source


def _call(name: str, tried: str, fn, *args, **kwargs):
    """Run a from_pretrained-like call, turning hub/file errors into one clear MissingWeightsError."""
    try:
        return fn(*args, **kwargs)
    except MissingWeightsError:
        raise
    except (OSError, ValueError) as e:  # hub client errors subclass OSError; bad folders raise either
        raise MissingWeightsError(name, tried, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def load_sdxl(source: str | None = None, torch_dtype: torch.dtype = torch.float32, variant: str | None = None):
    """Load the SDXL base pipeline (UNet, VAE, two text encoders and tokenizers, scheduler)."""
    from diffusers import StableDiffusionXLPipeline

    path = resolve("sdxl", source)
    return _call(
        "sdxl", path, StableDiffusionXLPipeline.from_pretrained, path, torch_dtype=torch_dtype, variant=variant
    )


def load_lightning_unet(base_unet, source: str | None = None):
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


#: The adapter name under which the SDXL-Lightning LoRA sits in the UNet (toggled with enable_lora / disable_lora).
LIGHTNING_LORA = "lightning"


def apply_lightning_lora(unet, lora: str | Path | dict, what: str = "sdxl_lightning_lora") -> None:
    """Put an SDXL-Lightning LoRA into ``unet`` as adapter :data:`LIGHTNING_LORA`, switched *off*.

    diffusers' own LoRA loading (``StableDiffusionXLPipeline.lora_state_dict`` converts the Kohya-style file that
    ByteDance publishes, ``load_lora_into_unet`` injects it with PEFT); :func:`set_lora_enabled` switches between
    SDXL-Lightning and the base UNet. The LoRA weights are frozen.

    Args:
        unet: the SDXL base ``UNet2DConditionModel``.
        lora: a ``.safetensors`` file or a state dict in any format ``lora_state_dict`` reads.
        what: the component name for error messages.
    """
    from diffusers import StableDiffusionXLPipeline

    state, alphas = _call(what, str(lora) if not isinstance(lora, dict) else "state dict",
                          StableDiffusionXLPipeline.lora_state_dict, lora)  # fmt: skip
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet, adapter_name=LIGHTNING_LORA)
    set_lora_enabled(unet, False)


def set_lora_enabled(module, enabled: bool) -> None:
    """Switch the LoRA layers inside ``module`` on or off, keeping their weights frozen.

    Like ``unet.enable_lora()`` / ``disable_lora()`` (PEFT's ``enable_adapters``), which would also make the LoRA
    weights trainable, but for any submodule: gradient checkpointing calls it per recomputed block.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)
            for name in m.adapter_layer_names:
                getattr(m, name).requires_grad_(False)


def load_lightning_lora(unet, source: str | None = None) -> None:
    """Load the SDXL-Lightning LoRA (hub id or local file/folder) into ``unet``, switched off (see
    :func:`apply_lightning_lora`). Fails at once with :class:`MissingWeightsError` when it is not available."""
    spec = COMPONENTS["sdxl_lightning_lora"]
    path = Path(resolve("sdxl_lightning_lora", source))
    if path.is_dir():
        path = path / spec.filename
    if not path.exists():
        from huggingface_hub import hf_hub_download

        path = Path(_call("sdxl_lightning_lora", str(path), hf_hub_download, str(path), spec.filename))
    apply_lightning_lora(unet, path)


def lightning_scheduler(scheduler):
    """SDXL-Lightning's prescribed sampler: Euler with trailing timestep spacing, from any SDXL scheduler config."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(scheduler.config, timestep_spacing="trailing")


def load_person_detector(source: str | None = None):
    """RT-DETR detector and its image processor."""
    from transformers import AutoProcessor, RTDetrForObjectDetection

    path = resolve("person_detector", source)
    processor = _call("person_detector", path, AutoProcessor.from_pretrained, path)
    return _call("person_detector", path, RTDetrForObjectDetection.from_pretrained, path), processor


def load_vitpose(source: str | None = None):
    """ViTPose model and its image processor."""
    from transformers import AutoProcessor, VitPoseForPoseEstimation

    path = resolve("vitpose", source)
    processor = _call("vitpose", path, AutoProcessor.from_pretrained, path)
    return _call("vitpose", path, VitPoseForPoseEstimation.from_pretrained, path), processor


def load_blip2(source: str | None = None, torch_dtype: torch.dtype = torch.float32):
    """BLIP-2 captioner and its processor."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    path = resolve("blip2", source)
    processor = _call("blip2", path, Blip2Processor.from_pretrained, path)
    model = _call("blip2", path, Blip2ForConditionalGeneration.from_pretrained, path, torch_dtype=torch_dtype)
    return model, processor


def _eva_weights(name: str, pretrained: str | None) -> str:
    """The open_clip ``pretrained`` tag or file for EVA-CLIP, checked to be local or downloadable."""
    import open_clip

    pretrained = pretrained or os.environ.get("BOLID_EVA_CLIP_WEIGHTS") or COMPONENTS["eva_clip"].open_clip_pretrained
    if Path(name).exists() or Path(pretrained).exists():
        return pretrained
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise MissingWeightsError("eva_clip", f"{name} / {pretrained}", "open_clip knows no such pretrained tag")
    hub = (cfg.get("hf_hub") or "").rstrip("/")
    if hub and not _hub_reachable():
        from huggingface_hub import try_to_load_from_cache

        cached = [
            try_to_load_from_cache(hub, f) for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        ]
        if not any(isinstance(c, str) for c in cached):
            raise MissingWeightsError(
                "eva_clip",
                f"{name} / {pretrained} (hub {hub})",
                "weights not cached locally and the hub is unreachable; or set BOLID_EVA_CLIP_WEIGHTS=/path/to/file",
            )
    return pretrained


def load_eva_clip(source: str | None = None, pretrained: str | None = None) -> tuple[Any, Any, Any]:
    """EVA-CLIP through open_clip.

    Args:
        source: an open_clip architecture name (default ``EVA02-L-14-336``) or a ``local-dir:`` folder.
        pretrained: an open_clip pretrained tag or a local checkpoint file; defaults to
            ``$BOLID_EVA_CLIP_WEIGHTS`` or the spec's tag.

    Returns:
        ``(model, preprocess, tokenizer)``.
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
    return model, preprocess, tokenizer


def load_clip(source: str | None = None):
    """transformers CLIP model and processor (used by the CLIP-T / CLIP-I metrics)."""
    from transformers import CLIPModel, CLIPProcessor

    path = resolve("clip", source)
    processor = _call("clip", path, CLIPProcessor.from_pretrained, path)
    return _call("clip", path, CLIPModel.from_pretrained, path), processor


def describe() -> list[dict[str, str]]:
    """One row per component: name, what, default id, env var and where it resolves now (no downloads)."""
    rows = []
    for spec in COMPONENTS.values():
        src = os.environ.get(spec.env_var) or spec.default
        if _looks_like_path(src):
            status = "local path" if Path(src).expanduser().exists() else "MISSING path"
        elif spec.library == "open_clip":
            try:
                _eva_weights(src, None)
                status = "weights available"
            except MissingWeightsError:
                status = "weights not cached"
        else:
            from huggingface_hub import snapshot_download

            try:
                snapshot_download(src, local_files_only=True, allow_patterns=[spec.filename] if spec.filename else None)
                status = "in HF cache"
            except Exception:  # noqa: BLE001
                status = "not cached"
        rows.append({"name": spec.name, "what": spec.what, "source": src, "env": spec.env_var, "status": status})
    return rows
