"""The random kit: every pretrained component at its **real size**, from the real configs, with random weights.

``components: random`` builds the same classes as ``components: real`` (diffusers' SDXL UNet, VAE and
scheduler, transformers' CLIP text encoders, RT-DETR, ViTPose, BLIP-2 and CLIP, open_clip's EVA02-L-14-336)
from the configs shipped in :mod:`bolid.kits.configs`, each copied from the public checkpoint's config and
naming its source. Nothing is downloaded: the tokenizers are rebuilt from the CLIP BPE file inside the
open_clip wheel, which holds CLIP's full 49408-token vocabulary.

What it is for: shapes, dtypes, memory and step time of the real models, with no weights on the machine
(the CPU shape check, ``make check-real-size``, and the GPU benchmark, ``make bench-gpu``). Outputs are
noise. Every builder takes

* ``device``: ``"meta"`` builds instantly with no memory (parameter counts, shapes); ``"cpu"`` / ``"cuda"``
  allocates and initialises there (initialising SDXL's 2.6B-parameter UNet on a GPU takes a second);
  ``None`` uses the device set by :func:`on_device` (so ``with on_device("cuda"):`` around any caller, such as
  the training module, builds this kit's models on the GPU), else torch's default device;
* ``torch_dtype``: the parameters are created in this dtype (bf16 halves the memory of the build itself);
* ``seed``: the same seed gives the same weights.

The builders follow the kit contract of :mod:`bolid.kits` (``sdxl``, ``sdxl_lightning_unet``,
``person_detector``, ``vitpose``, ``blip2``, ``eva_clip``, ``clip``; ``source`` is accepted and ignored), so
``bolid.components.load(name, "random")`` and ``components: random`` in any config reach them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch

SEED = 0
#: CLIP's vocabulary: 256 byte tokens, 256 end-of-word byte tokens, 48894 merges and 2 specials.
CLIP_MERGES = 49408 - 512 - 2
#: Added to the random RT-DETR's "person" logit (label 0) so that it reports persons (see person_detector).
PERSON_LOGIT_BOOST = 6.0
#: OPT's vocabulary size before BLIP-2 appends ``<image>`` (its id in Salesforce/blip2-opt-2.7b).
OPT_VOCAB = 50265


def config(name: str) -> dict[str, Any]:
    """One shipped config (``bolid/kits/configs/NAME.json``), without its ``_``-prefixed notes."""
    data = json.loads(resources.files("bolid.kits").joinpath("configs", f"{name}.json").read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _extra(name: str, key: str) -> dict[str, Any]:
    data = json.loads(resources.files("bolid.kits").joinpath("configs", f"{name}.json").read_text(encoding="utf-8"))
    return data.get(key, {})


_DEVICE: list[torch.device] = []


@contextlib.contextmanager
def on_device(device: str | torch.device) -> Iterator[None]:
    """Build this kit's models on ``device`` when a builder is called without one (e.g. inside the training module).

    Only the kit's own builders are affected, unlike ``with torch.device(...)``, which would also move tensors
    that the caller's code creates on purpose on the CPU.
    """
    _DEVICE.append(torch.device(device))
    try:
        yield
    finally:
        _DEVICE.pop()


def _where(device) -> torch.device | str:
    if device is not None:
        return device
    return _DEVICE[-1] if _DEVICE else torch.get_default_device()


@contextlib.contextmanager
def _building(device: str | torch.device | None, dtype: torch.dtype | None, seed: int) -> Iterator[None]:
    """Create parameters on ``device`` in ``dtype``, seeded; restores torch's defaults afterwards."""
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(_where(device)):
            yield
    finally:
        torch.set_default_dtype(previous)


def _done(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Eval mode, and any stray buffer or parameter created outside the default dtype brought in line."""
    module.eval()
    if str(_where(device)) != "meta" and dtype is not None:
        tensors = [*module.parameters(), *module.buffers()]
        if any(t.is_floating_point() and t.dtype != dtype for t in tensors):
            module.to(dtype=dtype)
    return module


# ------------------------------------------------------------------------------------------------- tokenizers


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """CLIP's tokenizer (transformers ``CLIPTokenizer``) with its full vocabulary, built offline."""
    from transformers import CLIPTokenizer

    from bolid.kits.tiny import clip_tokenizer_files

    d = clip_tokenizer_files(CLIP_MERGES)
    return CLIPTokenizer(
        str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=model_max_length, pad_token=pad_token
    )


def opt_tokenizer():
    """A byte-level BPE ``GPT2TokenizerFast`` in OPT's layout: ``<s> <pad> </s> <unk>`` = 0..3, 50265 tokens.

    OPT's own BPE files are not available offline; this one is built from CLIP's merges (re-spelled in GPT-2's
    leading-space convention) and padded with unused tokens to OPT's size, so BLIP-2's ``<image>`` token gets
    the real id 50265.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    from bolid.kits.tiny import _bytes_to_unicode, _cache_dir, clip_tokenizer_files

    file = _cache_dir() / f"opt-tokenizer-{OPT_VOCAB}" / "tokenizer.json"
    if not file.exists():
        from bolid.files import atomic_write

        file.parent.mkdir(parents=True, exist_ok=True)
        lines = (clip_tokenizer_files(CLIP_MERGES) / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
        merges = [tuple(m.split()) for m in lines if m]
        merges = [(a, b) for a, b in merges if "</w>" not in a + b]
        vocab_list = ["<s>", "<pad>", "</s>", "<unk>", *_bytes_to_unicode().values()]
        vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
        kept = []
        for a, b in merges:
            if a in vocab and b in vocab and a + b not in vocab:
                vocab[a + b] = len(vocab)
                kept.append((a, b))
        for i in range(len(vocab), OPT_VOCAB):
            vocab[f"<unused{i}>"] = i
        tok = Tokenizer(models.BPE(vocab=vocab, merges=kept))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        atomic_write(file, tok.to_str(), fsync=False)
    return GPT2TokenizerFast(
        tokenizer_file=str(file), bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# ------------------------------------------------------------------------------------------------------ SDXL
# Builders follow the kit contract (bolid.kits): ``source`` first (ignored: nothing is loaded), then the
# contract's options; ``seed`` and ``device`` are this kit's own, keyword-only.


def unet(seed: int = SEED, device=None, torch_dtype: torch.dtype | None = None):
    """SDXL base 1.0's UNet (2.567B parameters), random weights."""
    from diffusers import UNet2DConditionModel

    with _building(device, torch_dtype, seed):
        model = UNet2DConditionModel.from_config(config("sdxl_unet"))
    return _done(model, device, torch_dtype)


def sdxl(
    source: str | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    *,
    seed: int = SEED,
    device=None,
) -> dict:
    """UNet, VAE, both text encoders + tokenizers and scheduler for ``StableDiffusionXLPipeline(**components)``.

    ``torch_dtype`` is the dtype the weights are created in (default float32); ``variant`` is ignored.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dtype = torch_dtype
    tokenizers = _extra("sdxl_tokenizers", "tokenizer"), _extra("sdxl_tokenizers", "tokenizer_2")
    parts: dict[str, Any] = {"unet": unet(seed, device, dtype)}
    with _building(device, dtype, seed + 1):
        parts["vae"] = _done(AutoencoderKL.from_config(config("sdxl_vae")), device, dtype)
    with _building(device, dtype, seed + 2):
        parts["text_encoder"] = _done(CLIPTextModel(CLIPTextConfig(**config("sdxl_text_encoder"))), device, dtype)
    with _building(device, dtype, seed + 3):
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**config("sdxl_text_encoder_2")))
        parts["text_encoder_2"] = _done(te2, device, dtype)
    parts["tokenizer"] = clip_tokenizer(tokenizers[0]["pad_token"], tokenizers[0]["model_max_length"])
    parts["tokenizer_2"] = clip_tokenizer(tokenizers[1]["pad_token"], tokenizers[1]["model_max_length"])
    parts["scheduler"] = EulerDiscreteScheduler.from_config(config("sdxl_scheduler"))
    parts["image_encoder"] = None
    parts["feature_extractor"] = None
    return parts


def sdxl_pipeline(seed: int = SEED, device=None, torch_dtype: torch.dtype | None = None):
    """A real ``StableDiffusionXLPipeline`` over :func:`sdxl`."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**sdxl(None, torch_dtype, seed=seed, device=device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_lightning_unet(
    source: str | None = None, *, base_unet, seed: int = SEED + 7, share_weights: bool | None = None
):
    """The SDXL-Lightning UNet: SDXL's UNet config (the distilled checkpoint loads into it), random weights.

    Args:
        source: ignored.
        base_unet: the base UNet; its config, device and dtype are reused.
        seed: weights seed (different from the base's, as the real distilled weights differ).
        share_weights: a second module object over the *same* parameter tensors (no extra memory). Shapes and
            wiring are those of two UNets, memory is one: for the CPU shape check, never for memory figures.
            ``None`` reads ``$BOLID_RANDOM_SHARE_LIGHTNING`` (``1`` = share).
    """
    from diffusers import UNet2DConditionModel

    if share_weights is None:
        share_weights = os.environ.get("BOLID_RANDOM_SHARE_LIGHTNING", "0") == "1"
    if share_weights:
        with torch.device("meta"):
            twin = UNet2DConditionModel.from_config(base_unet.config)
        for name, tensor in [*base_unet.named_parameters(), *base_unet.named_buffers()]:
            owner, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(owner), attr, tensor)  # the same Parameter objects
        return twin.eval()
    p = next(base_unet.parameters())
    device = "meta" if p.is_meta else p.device
    return unet(seed, device, p.dtype)


def sdxl_lightning_lora(source: str | None = None, *, unet, rank: int = 64, seed: int = SEED + 11) -> None:
    """SDXL-Lightning as a LoRA on the base ``unet``: a random one in the layout of ByteDance's
    ``sdxl_lightning_4step_lora.safetensors`` (every transformer-block linear layer and resnet convolution), put in
    switched off as the real kit does. The rank is a stand-in: the real file's rank is not recorded here."""
    from bolid.lightning_lora import apply_lightning_lora, random_lightning_lora

    p = next(unet.parameters())
    lora = random_lightning_lora(unet, rank, seed)
    apply_lightning_lora(unet, {k: v.to(p.dtype) for k, v in lora.items()})


# -------------------------------------------------------------------------------------- pose and detection


def person_detector(source: str | None = None, *, seed: int = SEED, device=None, torch_dtype=None):
    """RT-DETR r50vd (COCO + Objects365 config, 80 labels, 0 = person) and its 640x640 image processor."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor

    cfg = config("rtdetr_r50vd_coco_o365")
    id2label = {int(k): v for k, v in cfg.pop("id2label").items()}
    with _building(device, torch_dtype, seed):
        model = RTDetrForObjectDetection(RTDetrConfig(**cfg, id2label=id2label))
        # Random class heads never rank "person" first, and then nothing downstream (ViTPose, the identity
        # filters, reference photos) would run. Raise the person logit in every class head so that the random
        # detector reports persons, at random places, as the real one does on BoLID's photos.
        heads = {id(m): m for n, m in model.named_modules() if n.endswith("enc_score_head") or ".class_embed." in n}
        with torch.no_grad():
            for head in heads.values():
                if not head.bias.is_meta:
                    head.bias[0] += PERSON_LOGIT_BOOST
    processor = RTDetrImageProcessor(**_extra("rtdetr_r50vd_coco_o365", "_processor"))
    return _done(model, device, torch_dtype), processor


def vitpose(source: str | None = None, *, seed: int = SEED, device=None, torch_dtype=None):
    """ViTPose-base with the simple decoder (17 COCO keypoints, 256x192 input) and its image processor."""
    from transformers import VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor

    with _building(device, torch_dtype, seed):
        model = VitPoseForPoseEstimation(VitPoseConfig(**config("vitpose_base_simple")))
    processor = VitPoseImageProcessor(**_extra("vitpose_base_simple", "_processor"))
    return _done(model, device, torch_dtype), processor


# ---------------------------------------------------------------------------------------------------- BLIP-2


def blip2(source: str | None = None, torch_dtype: torch.dtype | None = None, *, seed: int = SEED, device=None):
    """BLIP-2 OPT-2.7b (ViT-g, Q-Former, OPT-2.7b; 3.7B parameters) and a ``Blip2Processor`` (224 px).

    ``torch_dtype`` is the dtype the weights are created in (bf16: 7.5 GB instead of 15 GB).
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    cfg = config("blip2_opt_2.7b")
    tokenizer = opt_tokenizer()
    size = _extra("blip2_opt_2.7b", "_processor")["image_size"]
    image_processor = BlipImageProcessor(size={"height": size, "width": size})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=cfg["num_query_tokens"])
    if tokenizer.convert_tokens_to_ids("<image>") != cfg["image_token_index"]:
        raise RuntimeError("random kit: the OPT tokenizer's <image> id does not match blip2_opt_2.7b.json")
    with _building(device, torch_dtype, seed):
        model = Blip2ForConditionalGeneration(Blip2Config(**cfg))
    return _done(model, device, torch_dtype), processor


# ------------------------------------------------------------------------------------------ EVA-CLIP / CLIP


def eva_clip(
    source: str | None = None, pretrained: str | None = None, *, seed: int = SEED, device=None, torch_dtype=None
):
    """open_clip's EVA02-L-14-336 (timm ``Eva`` image tower at 336 px), its preprocess, tokenizer and name.

    The name is the real architecture's, so an adapter made with this kit records what the real kit loads.
    """
    import open_clip

    name = config("eva02_l_14_336")["open_clip_model"]
    with _building(device, torch_dtype, seed):
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=_where(device))
    return _done(model, device, torch_dtype), preprocess, open_clip.get_tokenizer(name), name


def clip(source: str | None = None, *, seed: int = SEED, device=None, torch_dtype=None):
    """transformers CLIP ViT-L/14 (224 px) and its ``CLIPProcessor``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    with _building(device, torch_dtype, seed):
        model = CLIPModel(CLIPConfig(**config("clip_vit_large_patch14")))
    image_processor = CLIPImageProcessor(**_extra("clip_vit_large_patch14", "_processor"))
    return _done(model, device, torch_dtype), CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())


@functools.cache
def published_sizes() -> dict[str, tuple[float, str]]:
    """Published parameter counts: component -> (count, where it is published), for the tests and the docs."""
    return {
        "unet": (2_567_463_684, "SDXL base 1.0 UNet as diffusers counts it (SDXL report: 2.6B)"),
        "vae": (83_653_863, "SDXL VAE (AutoencoderKL, 83.7M)"),
        "text_encoders": (817e6, "SDXL report: CLIP ViT-L + OpenCLIP ViT-bigG text encoders, 817M together"),
        "person_detector": (42e6, "RT-DETR paper, R50 model: 42M"),
        "vitpose": (86e6, "ViT-B/16 backbone 86M (ViTPose paper's ViTPose-B: 90M with the classic decoder)"),
        "blip2": (3.8e9, "BLIP-2 paper, ViT-g + OPT-2.7B: 3.8B total"),
        "eva_clip": (428e6, "open_clip model profile, EVA02-L-14-336: 428M (304M image + 124M text)"),
        "clip": (428e6, "OpenAI CLIP ViT-L/14: 428M"),
    }


def shipped_configs() -> list[Path]:
    """The config files of this kit (for documentation and packaging checks)."""
    root = resources.files("bolid.kits").joinpath("configs")
    return sorted(Path(str(p)) for p in root.iterdir() if str(p).endswith(".json"))
