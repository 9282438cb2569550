"""The mini kit: every BoLID component at small size, trained from scratch on the BoLID-mini world.

Same classes as the real components (diffusers ``AutoencoderKL`` / ``UNet2DConditionModel`` with SDXL's
text_time conditioning, transformers ``VitPoseForPoseEstimation`` and ``CLIPModel``, open_clip EVA02 on
timm's ``Eva``), small configs, weights from ``bolid/mini/weights/*.safetensors`` (trained by
``python -m bolid.mini.train``; sizes, sha256 and the command are in ``bolid/mini/weights/README.md``).

* SDXL: a 4x ``AutoencoderKL`` (64 px images <-> 16x16x8 latents) and an SDXL-shaped UNet trained
  text-to-image on the renders; the two text encoders are the tiny kit's frozen random CLIP text models.
* SDXL-Lightning stand-in: the same UNet sampled with few trailing-Euler steps (no separate distillation).
* Keypoints: a ViTPose (simple decoder) for the datapipe, the generation pipeline and the ID loss, and a
  *different* ViTPose (other width, depth, feature layer and seed, trained on a different
  world) for Body Sim. Both run full-frame (one person per render): see :mod:`bolid.mini.pose`.
* CLIP for CLIP-T / CLIP-I and the captioner, and the EVA-CLIP image encoder of the identity tokens (also
  the stage-2 text loss): both trained contrastively on render/caption pairs; the EVA-CLIP also on pairs of
  photos of one person (face and person crops), so that its embeddings tell people apart.

Builders that cannot find their weights raise ``FileNotFoundError`` naming the file and the command that
makes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bolid.kits import tiny

WEIGHTS = Path(__file__).resolve().parents[1] / "mini" / "weights"


def weights_dir() -> Path:
    """``$BOLID_MINI_WEIGHTS`` or the committed ``bolid/mini/weights``."""
    return Path(os.environ.get("BOLID_MINI_WEIGHTS") or WEIGHTS)


def adapter_dir() -> Path:
    """The shipped BoLID-mini adapter (``make mini``'s stage 2, the one whose bodies follow the reference;
    stage 1's is in ``bolid_stage1`` beside it): what ``bolid generate --components mini``, the demo's gallery
    and the learning tests use."""
    return weights_dir() / "bolid_stage2"


MINI_SEED = 0
EVA_CLIP_NAME = "BoLID-mini-EVA02"  # the tiny kit's open_clip architecture with trained weights
EVA_NAME = EVA_CLIP_NAME


def weights_file(name: str) -> Path:
    """Path of a trained component's safetensors; an error naming how to make it when missing."""
    path = weights_dir() / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"mini kit: missing weights {path}; train them with `python -m bolid.mini.train` (see bolid/mini/README)"
        )
    return path


def _load(module: torch.nn.Module, name: str, trained: bool) -> torch.nn.Module:
    if trained:
        from safetensors.torch import load_file

        missing, unexpected = module.load_state_dict(load_file(weights_file(name)), strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise ValueError(
                f"mini kit: {name}.safetensors does not match its config ({missing[:3]}, {unexpected[:3]})"
            )
    return module.eval()


#: Latent channels of the mini VAE (see :func:`build_vae`).
LATENT_CHANNELS = 8


def build_vae(trained: bool = True):
    """4x ``AutoencoderKL``: 64x64x3 <-> 16x16x8.

    Eight latent channels, not SDXL's four: at 64 px an arm is 2 px wide, and a 4-channel latent (12x
    compression) blurs forearms away entirely, so neither the UNet nor a keypoint model could see them.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(MINI_SEED)
    model = AutoencoderKL(
        block_out_channels=[16, 32, 32],
        layers_per_block=1,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.0,
    )
    if trained:
        from safetensors import safe_open

        with safe_open(str(weights_file("vae")), "pt") as f:
            scale = float((f.metadata() or {}).get("scaling_factor", 1.0))
        model.register_to_config(scaling_factor=scale)
    return _load(model, "vae", trained)


def build_unet(trained: bool = True):
    """SDXL-shaped ``UNet2DConditionModel`` (text_time addition embeddings) on 16x16 latents."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(MINI_SEED)
    model = UNet2DConditionModel(
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        sample_size=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32 (pooled text)
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    return _load(model, "unet", trained)


def sdxl_components(trained: bool = True) -> dict:
    """UNet, VAE, the tiny kit's frozen text encoders and tokenizers, scheduler: ``StableDiffusionXLPipeline(**c)``."""
    parts = tiny.tiny_sdxl_components()
    parts["unet"] = build_unet(trained)
    parts["vae"] = build_vae(trained)
    return parts


# ------------------------------------------------------------------ builders (contract: bolid.kits docstring)


def sdxl(source: str | None = None, torch_dtype: torch.dtype | None = None, variant: str | None = None) -> dict:
    """The trained mini SDXL (``source``, ``torch_dtype`` and ``variant`` are ignored: float32)."""
    return sdxl_components(trained=True)


#: The mini "Lightning" is not distilled (see sdxl_lightning_unet): no step count is special.
LIGHTNING_DISTILLED_STEPS = None


def sdxl_lightning_unet(source: str | None = None, *, base_unet):
    """The few-step stand-in for SDXL-Lightning: the base UNet itself, sampled with few trailing-Euler steps."""
    return base_unet


def person_detector(source: str | None = None):
    """One person per render: a full-frame "detector" (:class:`bolid.mini.pose.FullFrameDetector`)."""
    from bolid.mini.pose import FullFrameDetector, FullFrameDetectorProcessor

    return FullFrameDetector(), FullFrameDetectorProcessor()


#: the mini keypoint models' input side (the 64 px render, upsampled).
INPUT_SIDE = 80


def _vitpose_config(kind: str):
    from transformers import VitPoseBackboneConfig, VitPoseConfig

    # 5 px patches on an 80 px input: a 16x16 token grid and 64x64 heatmaps, one heatmap pixel per render pixel
    # (ViTPose's patch embedding pads by 2, so only patches >= 5 px give the token grid its position embeddings
    # expect). The first kit read 6 px patches of a 60 px input (10x10 tokens, 40x40 heatmaps) at a median error
    # of 1.4-1.7 px, as large as the differences between people (bolid/mini/weights/README.md).
    if kind == "train":  # ViTPose-simple: the datapipe, the pipeline and the ID loss
        backbone = VitPoseBackboneConfig(
            image_size=[INPUT_SIDE, INPUT_SIDE], patch_size=[5, 5], hidden_size=64, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=128, out_indices=[4],
        )  # fmt: skip
        return VitPoseConfig(backbone_config=backbone, use_simple_decoder=True, scale_factor=4, num_labels=17)
    # evaluation: another network (other width, depth, feature layer and seed; trained on another world)
    backbone = VitPoseBackboneConfig(
        image_size=[INPUT_SIDE, INPUT_SIDE], patch_size=[5, 5], hidden_size=48, num_hidden_layers=4,
        num_attention_heads=3, intermediate_size=144, out_indices=[3],
    )  # fmt: skip
    return VitPoseConfig(backbone_config=backbone, use_simple_decoder=True, scale_factor=4, num_labels=17)


def build_vitpose(trained: bool = True, kind: str = "train"):
    """``VitPoseForPoseEstimation`` + ``VitPoseImageProcessor`` (the full frame at ``INPUT_SIDE`` px).

    Args:
        kind: ``"train"`` (the datapipe's, the pipeline's and the ID loss's model) or ``"eval"`` (Body Sim's).
    """
    from transformers import VitPoseForPoseEstimation, VitPoseImageProcessor

    if kind not in ("train", "eval"):
        raise ValueError(f"vitpose kind must be 'train' or 'eval', got {kind!r}")
    torch.manual_seed(MINI_SEED + (0 if kind == "train" else 11))
    model = VitPoseForPoseEstimation(_vitpose_config(kind))
    processor = VitPoseImageProcessor(size={"height": INPUT_SIDE, "width": INPUT_SIDE})
    return _load(model, f"vitpose_{kind}", trained), processor


def vitpose(source: str | None = None):
    """The trained keypoint model of the datapipe, the pipeline and the ID loss."""
    return build_vitpose(True, "train")


def pose_extractor(kind: str = "train", **kwargs):
    """A :class:`bolid.pose.VitPoseExtractor`: the full-frame detector + the trained ViTPose of ``kind``
    (``"eval"``: Body Sim's model)."""
    from bolid.pose import VitPoseExtractor

    kwargs.setdefault("threshold", 0.5)  # the full-frame detector scores 1
    return VitPoseExtractor(*person_detector(), *build_vitpose(True, kind), **kwargs)


def body_stats(exact: bool = False) -> tuple[list[float], list[float]]:
    """Population mean and std of the 6 body proportions as the *evaluation* keypoint model reads the world.

    Body Sim z-scores with these (the real-photo constants of :mod:`bolid.metrics` describe BlazePose on
    real people, not this world); written by ``python -m bolid.mini.train`` to ``body_stats.json``. With
    ``exact=True``: the world's own statistics, from its exact keypoints; training uses these (the body
    encoder and ``L_id`` with ``adapter.body_shape: proportions``), so nothing in training comes from the
    evaluation model.
    """
    import json

    path = weights_dir() / "body_stats.json"
    if not path.exists():
        raise FileNotFoundError(f"mini kit: missing {path}; run `python -m bolid.mini.train`")
    d = json.loads(path.read_text())
    return (d["exact_mean"], d["exact_std"]) if exact else (d["mean"], d["std"])


def proportion_stats() -> tuple[list[float], list[float]]:
    """The population an adapter with ``body_shape: proportions`` z-scores with, unless its config names one:
    this world's own (:func:`body_stats` with ``exact=True``). Kits without this hook use the real-photo ones."""
    return body_stats(exact=True)


def build_eva_clip(trained: bool = True):
    """open_clip EVA02 (the tiny kit's architecture, 32 px) trained on render/caption pairs and on pairs of
    photos of one person (``bolid.mini.train.train_eva_clip``)."""
    model, preprocess, tokenizer = tiny.tiny_eva_clip()
    return _load(model, "eva_clip", trained), preprocess, tokenizer


def eva_clip(source: str | None = None, pretrained: str | None = None):
    model, preprocess, tokenizer = build_eva_clip(True)
    return model, preprocess, tokenizer, EVA_CLIP_NAME


def build_clip(trained: bool = True):
    """transformers ``CLIPModel`` (the tiny kit's architecture, 32 px) trained on render/caption pairs."""
    model, processor = tiny.tiny_clip()
    return _load(model, "clip", trained), processor


def clip(source: str | None = None):
    return build_clip(True)
