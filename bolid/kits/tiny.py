"""The tiny kit: small random-init versions of every pretrained component, built in-process.

Tests, the demo and the benchmarks run on these. Each builder uses the *same classes* as
the real component in :mod:`bolid.kits.real` (diffusers' ``UNet2DConditionModel`` and
``StableDiffusionXLPipeline``, transformers' RT-DETR / ViTPose / BLIP-2 / CLIP, open_clip's
EVA-CLIP on timm's ``Eva``), only with small configs, so code that works on the kit works on
real weights. Every builder is seeded and deterministic and takes well under a second or
two on a CPU. Nothing here touches the network: tokenizers are built from the CLIP BPE
vocabulary that ships inside the open_clip wheel.

The SDXL config follows diffusers' ``get_dummy_components`` for SDXL pipeline tests.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from pathlib import Path

import torch

from bolid.files import atomic_write

TINY_SEED = 0
_CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _cache_dir() -> Path:
    root = Path(os.environ.get("BOLID_CACHE", Path(tempfile.gettempdir()) / f"bolid-cache-{os.getuid()}"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-to-printable mapping (the public BPE convention both tokenizers use).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_tokenizer_files(num_merges: int = 2000) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` of a CLIP tokenizer truncated to the first ``num_merges`` merges.

    The merges are the real CLIP ones (open_clip's ``bpe_simple_vocab_16e6.txt.gz``), so common words
    tokenize as in CLIP; the vocabulary is ``512 + num_merges + 2`` tokens, which keeps embeddings tiny.
    """
    import open_clip

    out = _cache_dir() / f"clip-tokenizer-{num_merges}"
    if (out / "vocab.json").exists() and (out / "merges.txt").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 1 + num_merges]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + list(_CLIP_SPECIAL)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    atomic_write(out / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    atomic_write(out / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    return out


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` with real CLIP merges and a small vocabulary."""
    from transformers import CLIPTokenizer

    d = clip_tokenizer_files()
    return CLIPTokenizer(
        str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=model_max_length, pad_token="<|endoftext|>"
    )


def tiny_gpt2_tokenizer():
    """A byte-level BPE ``GPT2TokenizerFast`` for the tiny OPT language model inside BLIP-2.

    Built from the same CLIP merges, re-spelled in GPT-2's convention (a leading ``Ġ`` marks a space).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    out = _cache_dir() / "gpt2-tokenizer"
    file = out / "tokenizer.json"
    if not file.exists():
        out.mkdir(parents=True, exist_ok=True)
        byte_chars = list(_bytes_to_unicode().values())
        d = clip_tokenizer_files()
        merges = [tuple(m.split()) for m in (d / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if m]
        # CLIP marks word ends with </w>; GPT-2 marks word starts with Ġ. Keep merges that don't touch </w>.
        merges = [(a, b) for a, b in merges if "</w>" not in a + b]
        specials = ["</s>", "<pad>", "<unk>"]
        vocab_list = specials + byte_chars + ["".join(m) for m in merges]
        vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
        merges = [m for m in merges if m[0] in vocab and m[1] in vocab]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        atomic_write(file, tok.to_str(), fsync=False)
    return GPT2TokenizerFast(
        tokenizer_file=str(file), bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# ----------------------------------------------------------------------------------------------- SDXL


def tiny_sdxl_components(seed: int = TINY_SEED) -> dict:
    """UNet, VAE, two text encoders + tokenizers and scheduler for ``StableDiffusionXLPipeline(**components)``.

    The UNet has SDXL's structure (text_time conditioning, two cross-attention blocks, 64-wide
    cross-attention from the concatenated text encoders) at 32/64 channels; the VAE downsamples 2x,
    so the default image is 64x64 px from 32x32 latents.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    text_cfg = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
        hidden_act="gelu",
        projection_dim=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_cfg)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_cfg)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_clip_tokenizer(),
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sdxl_pipeline(seed: int = TINY_SEED):
    """A real ``StableDiffusionXLPipeline`` over :func:`tiny_sdxl_components`."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_lightning_unet(base_unet, seed: int = TINY_SEED + 7):
    """A second UNet of the same config with different random weights: the tiny stand-in for SDXL-Lightning."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(base_unet.config).eval()


def tiny_lightning_lora(unet, rank: int = 2, seed: int = TINY_SEED + 11) -> dict[str, torch.Tensor]:
    """A random rank-``rank`` LoRA for the tiny ``unet`` in the real file's layout (:func:`random_lightning_lora`)."""
    from bolid.lightning_lora import random_lightning_lora

    return random_lightning_lora(unet, rank, seed)


def save_tiny_sdxl(path: str | Path, seed: int = TINY_SEED) -> Path:
    """Save the tiny SDXL pipeline as a diffusers folder (for loader and export round-trip tests)."""
    path = Path(path)
    tiny_sdxl_pipeline(seed).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------- pose + detector


def tiny_person_detector(seed: int = TINY_SEED):
    """A random RT-DETR (ResNet backbone, 1 encoder and 1 decoder layer) and its image processor (64 px)."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor, RTDetrResNetConfig

    backbone = RTDetrResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
        out_indices=[2, 3, 4],
    )
    config = RTDetrConfig(
        backbone_config=backbone,
        encoder_in_channels=[16, 24, 32],
        encoder_hidden_dim=16,
        encoder_ffn_dim=32,
        encoder_attention_heads=2,
        d_model=16,
        decoder_in_channels=[16, 16, 16],
        decoder_ffn_dim=32,
        decoder_attention_heads=2,
        decoder_layers=1,
        num_queries=10,
        num_denoising=0,
        num_labels=1,
        id2label={0: "person"},
        label2id={"person": 0},
        anchor_image_size=[64, 64],
    )
    torch.manual_seed(seed)
    model = RTDetrForObjectDetection(config).eval()
    processor = RTDetrImageProcessor(size={"height": 64, "width": 64})
    return model, processor


def tiny_vitpose(seed: int = TINY_SEED):
    """A random ViTPose (2-layer ViT backbone, simple decoder, 17 keypoints, 64x48 input) and its processor."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor

    backbone = VitPoseBackboneConfig(
        image_size=[64, 48],
        patch_size=[8, 8],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        out_indices=[2],
    )
    config = VitPoseConfig(backbone_config=backbone, use_simple_decoder=True, scale_factor=4, num_labels=17)
    torch.manual_seed(seed)
    model = VitPoseForPoseEstimation(config).eval()
    processor = VitPoseImageProcessor(size={"height": 64, "width": 48})
    return model, processor


# ------------------------------------------------------------------------------------------------ BLIP-2


def tiny_blip2(seed: int = TINY_SEED):
    """A random BLIP-2 (tiny ViT + Q-Former + OPT) and a ``Blip2Processor``; it generates real tokens."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
    )

    tokenizer = tiny_gpt2_tokenizer()
    num_query_tokens = 4
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    # The processor adds the special <image> token the query embeddings are scattered into.
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        qformer_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "encoder_hidden_size": 32,
            "vocab_size": 128,
        },
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    return model, processor


# -------------------------------------------------------------------------------------- EVA-CLIP / CLIP

TINY_EVA_CLIP = "BoLID-EVA02-Tiny"


@functools.cache
def _register_tiny_eva() -> None:
    """Register a tiny EVA02 trunk with timm and its open_clip architecture config (idempotent)."""
    import open_clip
    from timm.models import register_model
    from timm.models.eva import Eva

    @register_model
    def bolid_eva02_tiny(pretrained: bool = False, **kwargs) -> Eva:  # noqa: ARG001 - timm's signature
        # Same options as timm's eva02_*_clip models (SwiGLU, rotary embeddings), at toy width.
        args = dict(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=4 * 2 / 3,
            qkv_fused=False,
            swiglu_mlp=True,
            scale_mlp=True,
            scale_attn_inner=True,
            use_rot_pos_emb=True,
            ref_feat_shape=(4, 4),
            global_pool="token",
        )
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory bookkeeping
            kwargs.pop(key, None)
        args.update(kwargs)
        return Eva(**args)

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "timm_model_name": "bolid_eva02_tiny",
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": None,  # as EVA02-L-14-336: the trunk's head is the projection
        },
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        "custom_text": True,
    }
    d = _cache_dir() / "open_clip"
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / f"{TINY_EVA_CLIP}.json", json.dumps(cfg))
    open_clip.add_model_config(d / f"{TINY_EVA_CLIP}.json")


def tiny_eva_clip(seed: int = TINY_SEED):
    """A random open_clip EVA02 model (timm ``Eva`` trunk, 32 px), its preprocess and tokenizer.

    Returns:
        ``(model, preprocess, tokenizer)`` like :func:`bolid.components.load_eva_clip`.
    """
    import open_clip

    _register_tiny_eva()
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_EVA_CLIP, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(TINY_EVA_CLIP)


def tiny_clip(seed: int = TINY_SEED):
    """A random transformers ``CLIPModel`` (32 px images) and a ``CLIPProcessor``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_tiny_clip(path: str | Path, seed: int = TINY_SEED) -> Path:
    """Save the tiny CLIP as a transformers folder (torchmetrics' ``CLIPScore`` loads models by path)."""
    path = Path(path)
    model, processor = tiny_clip(seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ------------------------------------------------------------------ the kit's builders (contract: bolid.kits)

#: The name adapters record for this kit's EVA-CLIP (:func:`bolid.components.image_encoder_kit`).
EVA_CLIP_NAME = TINY_EVA_CLIP


def sdxl(source: str | None = None, torch_dtype: torch.dtype | None = None, variant: str | None = None) -> dict:
    """:func:`tiny_sdxl_components` (float32; ``source``, ``torch_dtype`` and ``variant`` are ignored)."""
    return tiny_sdxl_components()


def sdxl_lightning_unet(source: str | None = None, *, base_unet):
    return tiny_lightning_unet(base_unet)


def sdxl_lightning_lora(source: str | None = None, *, unet) -> None:
    from bolid.lightning_lora import apply_lightning_lora

    apply_lightning_lora(unet, tiny_lightning_lora(unet))


def person_detector(source: str | None = None):
    return tiny_person_detector()


def vitpose(source: str | None = None):
    return tiny_vitpose()


def blip2(source: str | None = None, torch_dtype: torch.dtype | None = None):
    return tiny_blip2()


def eva_clip(source: str | None = None, pretrained: str | None = None):
    model, preprocess, tokenizer = tiny_eva_clip()
    return model, preprocess, tokenizer, EVA_CLIP_NAME


def clip(source: str | None = None):
    return tiny_clip()
