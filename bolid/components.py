"""Every pretrained component BoLID uses, and the one loader for all of them: :func:`load`.

``load(name, kit)`` returns component ``name`` from a *kit*: ``real`` (the pretrained weights,
:mod:`bolid.kits.real`), ``tiny`` (small random-init twins, :mod:`bolid.kits.tiny`), ``random``
(real-size, random init) or ``mini`` (a small trained world). Every kit provides the same builders
(the contract is in :mod:`bolid.kits`), so callers never branch on the kit. :func:`build_parts`
assembles what training and generation share (SDXL, the SDXL-Lightning UNet, EVA-CLIP).

Each real component loads by hub id or by local path. A path (a directory holding what
``from_pretrained`` expects, or a single checkpoint file where noted) always wins. The
order of precedence for a component's source is:

1. an explicit ``source`` argument (from a YAML config's ``components.overrides`` or a CLI flag);
2. the environment variable ``BOLID_<NAME>`` (e.g. ``BOLID_SDXL=/models/sdxl-base``);
3. the default hub id below, taken from the local Hugging Face cache when present.

When the weights are in neither place and the hub cannot be reached (offline, or
``HF_HUB_OFFLINE=1``), loading stops at once with :class:`MissingWeightsError`, which
names the component, the id or path tried and how to provide it, instead of a stack
trace from deep inside the hub client after a minute of retries.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "COMPONENTS",
    "KITS",
    "ComponentSpec",
    "MissingWeightsError",
    "Parts",
    "DTYPES",
    "build_parts",
    "load_unet",
    "image_encoder_kit",
    "kit_module",
    "load",
    "resolve",
]

#: Config names of the dtypes frozen weights may be cast to (``model.frozen_dtype``).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: The kits :func:`load` knows, each a module ``bolid.kits.<kit>`` with the builders of :mod:`bolid.kits`.
KITS = ("real", "tiny", "random", "mini")


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


def lightning_scheduler(scheduler):
    """SDXL-Lightning's prescribed sampler: Euler with trailing timestep spacing, from any SDXL scheduler config."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(scheduler.config, timestep_spacing="trailing")


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


# ------------------------------------------------------------------------------------------ one loader


def kit_module(kit: str | ModuleType) -> ModuleType:
    """The module of ``kit`` (a name in :data:`KITS`, or a module that provides the builders itself).

    Raises:
        ValueError: an unknown kit, or one whose module is not in this installation.
    """
    if isinstance(kit, ModuleType):
        return kit
    if kit not in KITS:
        raise ValueError(f"unknown components kit {kit!r}; known kits: {', '.join(KITS)}")
    try:
        return importlib.import_module(f"bolid.kits.{kit}")
    except ModuleNotFoundError as e:
        if e.name != f"bolid.kits.{kit}":
            raise
        raise ValueError(f"components kit {kit!r} is not available here (no module bolid.kits.{kit})") from None


def load(name: str, kit: Any = "real", source: str | None = None, **kwargs):
    """Component ``name`` from ``kit``: ``kit.<name>(source, **kwargs)`` (builder contract: :mod:`bolid.kits`).

    Args:
        name: a key of :data:`COMPONENTS` (``sdxl``, ``sdxl_lightning_unet``, ``sdxl_lightning_lora``,
            ``person_detector``, ``vitpose``, ``blip2``, ``eva_clip``, ``clip``).
        kit: a kit name (:data:`KITS`), a kit module, or a :class:`bolid.config.ComponentsConfig` (its ``kind``,
            and its override for ``name`` when ``source`` is not given).
        source: hub id or local path for kits that load weights; kits built in-process ignore it.
        kwargs: the builder's own options (``torch_dtype``, ``base_unet``, ``unet``, ``pretrained``).

    Raises:
        ValueError: an unknown component or kit, or a kit without a builder for ``name``.
    """
    if hasattr(kit, "kind") and hasattr(kit, "source"):  # a ComponentsConfig
        source = source or kit.source(name)
        kit = kit.kind
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; known: {', '.join(COMPONENTS)}")
    module = kit_module(kit)
    builder = getattr(module, name, None)
    if not callable(builder):
        raise ValueError(f"components kit {module.__name__.rsplit('.', 1)[-1]!r} has no builder for {name!r}")
    return builder(source, **kwargs)


def image_encoder_kit(name: str) -> str:
    """The kit whose EVA-CLIP is called ``name`` (as an adapter records it): the kit that sets that
    ``EVA_CLIP_NAME``, else ``real`` (a real architecture name or path)."""
    for kit in KITS:
        try:
            module = kit_module(kit)
        except ValueError:
            continue
        if getattr(module, "EVA_CLIP_NAME", None) == name:
            return kit
    return "real"


def load_unet(kit: Any, torch_dtype: torch.dtype = torch.float32):
    """Only the SDXL base UNet (for what needs its shape and weights alone, e.g. ``bolid export``): the kit's
    optional ``sdxl_unet(source, torch_dtype)`` builder, else the ``unet`` of its ``sdxl`` builder."""
    source = None
    if hasattr(kit, "kind") and hasattr(kit, "source"):  # a ComponentsConfig
        source, kit = kit.source("sdxl"), kit.kind
    module = kit_module(kit)
    if callable(getattr(module, "sdxl_unet", None)):
        return module.sdxl_unet(source, torch_dtype=torch_dtype)
    return load("sdxl", module, source, torch_dtype=torch_dtype)["unet"]


@dataclass
class Parts:
    """What training and generation both build: SDXL, optionally the SDXL-Lightning UNet, and EVA-CLIP."""

    sdxl: dict[str, Any]  # StableDiffusionXLPipeline(**sdxl) components; ``unet`` is the base UNet
    lightning_unet: Any | None
    eva_clip: tuple[Any, Any, Any, str]  # (model, preprocess, tokenizer, name)


def build_parts(kit: Any, lightning: bool, torch_dtype: torch.dtype = torch.float32) -> Parts:
    """Build the shared parts from ``kit`` (a kit name or a ``ComponentsConfig``), in one fixed order.

    Args:
        kit: as in :func:`load`.
        lightning: also build the SDXL-Lightning UNet (for the base UNet's config).
        torch_dtype: dtype for the SDXL weights where the kit loads them (callers cast afterwards anyway).
    """
    sdxl = load("sdxl", kit, torch_dtype=torch_dtype)
    lightning_unet = load("sdxl_lightning_unet", kit, base_unet=sdxl["unet"]) if lightning else None
    return Parts(sdxl, lightning_unet, load("eva_clip", kit))
