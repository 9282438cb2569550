"""The tiny kit's peers (``components: tiny``): random-init checkpoints of IP-Adapter, IP-Adapter FaceID and
InstantID in their stock layouts, and random InsightFace ONNX packs, written to folders and loaded by the same
code as the real ones.

Each builder writes, once, under the tiny kit's cache folder (:func:`bolid.kits.tiny._cache_dir`), a folder laid
out like the real download, so :mod:`bolid.peers` and :mod:`bolid.face_id` read them through the stock paths
(``load_ip_adapter``, ``ControlNetModel.from_pretrained``, onnxruntime):

* :func:`tiny_ip_adapter_repo`: ``h94/IP-Adapter``'s layout, ``sdxl_models/ip-adapter-plus-face_sdxl_vit-h
  .safetensors`` (a Resampler "Plus" projection) and ``models/image_encoder/`` (a transformers
  ``CLIPVisionModelWithProjection``);
* :func:`tiny_faceid_repo`: ``h94/IP-Adapter-FaceID``'s ``ip-adapter-faceid_sdxl.bin`` (FaceID MLP projection);
* :func:`tiny_instantid_repo`: ``InstantX/InstantID``'s ``ControlNetModel/`` (a diffusers ``ControlNetModel`` of
  the tiny SDXL UNet) and ``ip-adapter.bin`` (a Resampler over the 512-d face embedding, ``to_kv`` fused as
  InstantID ships it);
* :func:`tiny_face_pack`: an InsightFace pack (``antelopev2`` or ``buffalo_l``) of two ONNX graphs built with
  the ``onnx`` package: an SCRFD-style detector (9 outputs: score, box and keypoint maps for strides 8/16/32,
  2 anchors) and an ArcFace-style recogniser (112 x 112 in, 512 out). The tiny ``antelopev2`` recogniser
  normalises its input inside the graph (``Sub``/``Mul``), the tiny ``buffalo_l`` one does not, so both
  InsightFace conventions run in tests. The detector's score bias is negative, so a flat image has no face.

The IP-Adapter weights are random tensors with the shapes of the original checkpoints' keys (the layouts
are in ANCHORS and diffusers' ``_convert_ip_adapter_image_proj_to_diffusers``); nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bolid.kits.tiny import TINY_SEED, _cache_dir, tiny_sdxl_components

__all__ = [
    "FACE_EMBED_DIM",
    "resampler_state",
    "tiny_face_pack",
    "tiny_faceid_repo",
    "tiny_instantid_repo",
    "tiny_ip_adapter_repo",
]

FACE_EMBED_DIM = 512
_VERSION = "v1"  # bump when a builder changes, so stale cached folders are not reused
SCORE_STD, SCORE_BIAS = 0.5, -3.0  # tiny detector: a photo has a few faces, a flat image none


def _materialise(name: str, build: Callable[[Path], None]) -> Path:
    """``build`` into a temporary folder, renamed into place when complete (safe with parallel test workers)."""
    out = _cache_dir() / "peers" / f"{name}-{_VERSION}"
    if out.is_dir():
        return out
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _randn(g: torch.Generator, *shape: int, fan_in: int | None = None) -> torch.Tensor:
    return torch.randn(*shape, generator=g) / (fan_in or shape[-1]) ** 0.5


# ------------------------------------------------------------------------------------- IP-Adapter layouts


def _ip_attention_state(unet, num_adapters_dim: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """``{"1.to_k_ip.weight", "1.to_v_ip.weight", "3...."}``: one pair per cross-attention layer, odd indices."""
    state = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        hidden, cross = attn.to_k.weight.shape  # (inner dim, cross-attention dim)
        assert cross == num_adapters_dim
        state[f"{key_id}.to_k_ip.weight"] = _randn(g, hidden, cross)
        state[f"{key_id}.to_v_ip.weight"] = _randn(g, hidden, cross)
        key_id += 2
    return state


def resampler_state(
    embed_dim: int, dim: int, output_dim: int, depth: int, num_queries: int, g: torch.Generator, ff_mult: int = 4
) -> dict[str, torch.Tensor]:
    """Random weights of IP-Adapter's Perceiver Resampler in its original key layout (fused ``to_kv``).

    Heads are ``dim // 64`` and depth is 4 in every released checkpoint, which diffusers' loader assumes:
    ``dim`` must be a multiple of 64 and ``depth`` 4 for the stock loader.
    """
    assert dim % 64 == 0
    s = {
        "latents": torch.randn(1, num_queries, dim, generator=g) / dim**0.5,
        "proj_in.weight": _randn(g, dim, embed_dim),
        "proj_in.bias": torch.zeros(dim),
        "proj_out.weight": _randn(g, output_dim, dim),
        "proj_out.bias": torch.zeros(output_dim),
        "norm_out.weight": torch.ones(output_dim),
        "norm_out.bias": torch.zeros(output_dim),
    }
    for i in range(depth):
        p = f"layers.{i}"
        for norm in ("norm1", "norm2"):
            s[f"{p}.0.{norm}.weight"], s[f"{p}.0.{norm}.bias"] = torch.ones(dim), torch.zeros(dim)
        s[f"{p}.0.to_q.weight"] = _randn(g, dim, dim)
        s[f"{p}.0.to_kv.weight"] = _randn(g, 2 * dim, dim)
        s[f"{p}.0.to_out.weight"] = _randn(g, dim, dim)
        s[f"{p}.1.0.weight"], s[f"{p}.1.0.bias"] = torch.ones(dim), torch.zeros(dim)
        s[f"{p}.1.1.weight"] = _randn(g, ff_mult * dim, dim)
        s[f"{p}.1.3.weight"] = _randn(g, dim, ff_mult * dim)
    return s


def _tiny_unet():
    return tiny_sdxl_components()["unet"]


def tiny_image_encoder(seed: int = TINY_SEED):
    """A random transformers ``CLIPVisionModelWithProjection`` (32 px, hidden 32): the ViT-H stand-in."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(config).eval()


def tiny_ip_adapter_repo(seed: int = TINY_SEED) -> Path:
    """A folder in ``h94/IP-Adapter``'s layout holding a tiny IP-Adapter Plus Face for the tiny SDXL UNet."""

    def build(root: Path) -> None:
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(seed + 100)
        unet = _tiny_unet()
        encoder = tiny_image_encoder(seed)
        encoder.save_pretrained(root / "models" / "image_encoder")
        cross = unet.config.cross_attention_dim
        proj = resampler_state(encoder.config.hidden_size, 64, cross, depth=4, num_queries=16, g=g)
        state = {f"image_proj.{k}": v for k, v in proj.items()}
        state.update({f"ip_adapter.{k}": v for k, v in _ip_attention_state(unet, cross, g).items()})
        (root / "sdxl_models").mkdir()
        save_file(state, root / "sdxl_models" / "ip-adapter-plus-face_sdxl_vit-h.safetensors")

    return _materialise(f"ip-adapter-{seed}", build)


def tiny_faceid_repo(seed: int = TINY_SEED) -> Path:
    """A folder in ``h94/IP-Adapter-FaceID``'s layout: ``ip-adapter-faceid_sdxl.bin`` (4 tokens from 512-d)."""

    def build(root: Path) -> None:
        g = torch.Generator().manual_seed(seed + 200)
        unet = _tiny_unet()
        cross, tokens = unet.config.cross_attention_dim, 4
        proj = {
            "proj.0.weight": _randn(g, 2 * FACE_EMBED_DIM, FACE_EMBED_DIM),
            "proj.0.bias": torch.zeros(2 * FACE_EMBED_DIM),
            "proj.2.weight": _randn(g, cross * tokens, 2 * FACE_EMBED_DIM),
            "proj.2.bias": torch.zeros(cross * tokens),
            "norm.weight": torch.ones(cross),
            "norm.bias": torch.zeros(cross),
        }
        state = {"image_proj": proj, "ip_adapter": _ip_attention_state(unet, cross, g)}
        torch.save(state, root / "ip-adapter-faceid_sdxl.bin")

    return _materialise(f"ip-adapter-faceid-{seed}", build)


def tiny_instantid_repo(seed: int = TINY_SEED) -> Path:
    """A folder in ``InstantX/InstantID``'s layout: ``ControlNetModel/`` and ``ip-adapter.bin``.

    The ControlNet starts as a copy of the tiny UNet's encoder (``ControlNetModel.from_unet``, as ControlNets are
    initialised) with random, not zero, output convolutions, so it changes the image as a trained one does.
    """

    def build(root: Path) -> None:
        from diffusers import ControlNetModel

        g = torch.Generator().manual_seed(seed + 300)
        unet = _tiny_unet()
        # The tiny VAE downsamples 2x, so the keypoint image is embedded with one stride-2 step (SDXL's: three).
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        zero_init = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        with torch.no_grad():
            for conv in [*zero_init, controlnet.controlnet_cond_embedding.conv_out]:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
        controlnet.save_pretrained(root / "ControlNetModel")
        cross = unet.config.cross_attention_dim
        proj = resampler_state(FACE_EMBED_DIM, 64, cross, depth=4, num_queries=16, g=g)
        torch.save({"image_proj": proj, "ip_adapter": _ip_attention_state(unet, cross, g)}, root / "ip-adapter.bin")

    return _materialise(f"instantid-{seed}", build)


# -------------------------------------------------------------------------------------- InsightFace packs


def _conv(name: str, x: str, out: str, w: np.ndarray, b: np.ndarray, stride: int, nodes: list, inits: list) -> str:
    from onnx import helper, numpy_helper

    inits += [numpy_helper.from_array(w.astype(np.float32), f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]
    k = w.shape[-1]
    nodes.append(
        helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [out], kernel_shape=[k, k], strides=[stride] * 2)
    )
    return out


def _detector_graph(rng: np.random.Generator):
    """SCRFD's interface: input ``(1, 3, H, W)``; outputs ``(1, N_s, 1)`` scores (sigmoid), ``(1, N_s, 4)`` box
    distances and ``(1, N_s, 10)`` keypoint offsets for strides 8, 16, 32, in stride units, 2 anchors a cell."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list = []
    inits: list = []
    c = 8
    stem = rng.normal(0, 0.15, (c, 3, 8, 8))
    stem -= stem.mean(axis=(1, 2, 3), keepdims=True)  # zero-mean filters: a flat area (or the padding) gives 0
    x = _conv("stem", "input.1", "f8pre", stem, np.zeros(c, np.float32), 8, nodes, inits)
    nodes.append(helper.make_node("Relu", ["f8pre"], ["f8"]))
    x = _conv("down16", "f8", "f16pre", rng.normal(0, 0.4, (c, c, 2, 2)), np.zeros(c, np.float32), 2, nodes, inits)
    nodes.append(helper.make_node("Relu", ["f16pre"], ["f16"]))
    x = _conv("down32", "f16", "f32pre", rng.normal(0, 0.4, (c, c, 2, 2)), np.zeros(c, np.float32), 2, nodes, inits)
    nodes.append(helper.make_node("Relu", ["f32pre"], ["f32"]))
    del x
    # Keypoint offsets of a frontal face around the anchor centre (eyes, nose, mouth corners), stride units.
    face = np.array([[-0.5, -0.4], [0.5, -0.4], [0.0, 0.1], [-0.4, 0.6], [0.4, 0.6]], np.float32).ravel()
    outputs: dict[str, list] = {"score": [], "bbox": [], "kps": []}
    heads = {
        "score": (1, SCORE_STD, np.full(2, SCORE_BIAS, np.float32)),
        "bbox": (4, 0.05, np.full(8, 1.5, np.float32)),
        "kps": (10, 0.05, np.tile(face, 2)),
    }
    inits.append(numpy_helper.from_array(np.array([1, -1, 0], np.int64), "shape3"))
    for s in (8, 16, 32):
        for head, (ch, std, bias) in heads.items():
            pre = _conv(
                f"{head}{s}", f"f{s}", f"{head}{s}.map", rng.normal(0, std, (2 * ch, c, 1, 1)), bias, 1, nodes, inits
            )
            nodes.append(helper.make_node("Transpose", [pre], [f"{head}{s}.t"], perm=[0, 2, 3, 1]))
            shape = f"shape{head}"
            if shape not in {i.name for i in inits}:
                inits.append(numpy_helper.from_array(np.array([1, -1, ch], np.int64), shape))
            name = f"{head}_{s}"
            if head == "score":
                nodes.append(helper.make_node("Reshape", [f"{head}{s}.t", shape], [f"{head}{s}.r"]))
                nodes.append(helper.make_node("Sigmoid", [f"{head}{s}.r"], [name]))
            else:
                nodes.append(helper.make_node("Reshape", [f"{head}{s}.t", shape], [name]))
            outputs[head].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, None, ch]))
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, None, None])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        inits,
    )
    return graph


def _recognizer_graph(rng: np.random.Generator, normalise_inside: bool):
    """ArcFace's interface: input ``(N, 3, 112, 112)``, output ``(N, 512)``."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list = []
    inits: list = []
    x = "input.1"
    if normalise_inside:  # as some InsightFace exports: (x - 127.5) * (1 / 127.5) in the graph
        inits += [
            numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
            numpy_helper.from_array(np.array(1 / 127.5, np.float32), "inv_std"),
        ]
        nodes += [
            helper.make_node("Sub", [x, "mean"], ["centred"], name="Sub_0"),
            helper.make_node("Mul", ["centred", "inv_std"], ["normed"], name="Mul_1"),
        ]
        x = "normed"
    c = 8
    _conv("rec_stem", x, "r1", rng.normal(0, 0.1, (c, 3, 8, 8)), np.zeros(c, np.float32), 8, nodes, inits)
    nodes.append(helper.make_node("Relu", ["r1"], ["r1a"]))
    nodes.append(helper.make_node("Flatten", ["r1a"], ["flat"], axis=1))
    inits += [
        numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(c * 14 * 14), (c * 14 * 14, 512)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(np.zeros(512, np.float32), "fc.b"),
    ]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["embedding"]))
    return helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [None, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [None, 512])],
        inits,
    )


def tiny_face_pack(name: str = "buffalo_l", seed: int = TINY_SEED) -> Path:
    """A folder with a random detector and recogniser under pack ``name``'s real file names."""
    from bolid.face_id import FACE_PACKS

    pack = FACE_PACKS[name]

    def build(root: Path) -> None:
        import onnx
        from onnx import helper

        rng = np.random.default_rng(seed + (0 if name == "buffalo_l" else 1))
        opset = [helper.make_opsetid("", 13)]
        for graph, file in (
            (_detector_graph(rng), pack.detector),
            (_recognizer_graph(rng, normalise_inside=name == "antelopev2"), pack.recognizer),
        ):
            model = helper.make_model(graph, opset_imports=opset, producer_name="bolid-tiny")
            model.ir_version = 8
            onnx.checker.check_model(model)
            onnx.save(model, root / file)

    return _materialise(f"insightface-{name}-{seed}", build)
