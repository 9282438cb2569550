"""Peer methods as rows of BoLID's comparison: IP-Adapter Plus Face, IP-Adapter FaceID and InstantID on SDXL.

Each peer runs through stock diffusers on the SDXL base model, loaded by hub id or local folder, and becomes a
:class:`bolid.evaluate.Variant` whose ``generate(prompt, references, seeds)`` draws image k from its own CPU
generator seeded ``seeds[k]``, as BoLID's pipeline does, so every row starts from the same noise for the same
prompt and seed at the same size.

* **IP-Adapter Plus Face** (``kind: ip_adapter``; ``h94/IP-Adapter``,
  ``sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors`` with the ViT-H encoder in
  ``models/image_encoder``): stock ``load_ip_adapter``. It is conditioned on a cropped face, so the
  reference's largest face (InsightFace ``buffalo_l``) is cropped as InsightFace aligns faces, at 224 px.
* **IP-Adapter FaceID SDXL** (``kind: ip_adapter_faceid``; ``h94/IP-Adapter-FaceID``,
  ``ip-adapter-faceid_sdxl.bin``): stock ``load_ip_adapter``; the ``buffalo_l`` normed embedding of the
  largest face goes in as ``ip_adapter_image_embeds`` (zeros for the unconditional half under CFG). If the
  checkpoint carries LoRA weights, diffusers applies them too (needs ``peft``).
* **InstantID** (``kind: instantid``; ``InstantX/InstantID``: ``ControlNetModel/`` and ``ip-adapter.bin``):
  its ``ip-adapter.bin`` is in IP-Adapter Plus's layout (a Perceiver Resampler over the 512-d ``antelopev2``
  embedding, 16 tokens, ``to_kv`` fused; ``to_k_ip``/``to_v_ip`` at the odd processor indices) and loads
  with stock ``load_ip_adapter`` unchanged: diffusers' loader splits ``to_kv`` itself, so no converter is
  needed (tests/test_peers.py checks it by value). IdentityNet is a ``ControlNetModel`` whose
  cross-attention sees the 16 face tokens instead of the prompt (:class:`IdentityNet`), fed an image of the
  5 face keypoints drawn as InstantID draws them (:func:`draw_face_keypoints`), on
  ``StableDiffusionXLControlNetPipeline``.
* **PuLID** has no package or diffusers integration; README.md ("Evaluation") gives a ``Variant`` recipe
  for a user with its code. None of its code is here.

Several references are combined as BoLID combines them, by the mean of the embedding vectors (FaceID:
renormalised to unit length); IP-Adapter Plus Face gets every face crop (diffusers concatenates their
tokens). A reference with no face gives the base model's image (identity scale 0), recorded as
``face_found: false``; Face Sim counts it as a failure.

The scale at 0 (and InstantID's ``controlnet_scale`` at 0) gives exactly the base SDXL's image: tested.
"""

from __future__ import annotations

import logging
import os
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import ControlNetModel
from jsonargparse.typing import NonNegativeFloat, PositiveInt
from PIL import Image, ImageDraw

import configkit
from bolid.components import MissingWeightsError
from bolid.config import ComponentsConfig
from bolid.evaluate import Variant
from bolid.face_id import FaceAnalyzer, align_face

log = logging.getLogger(__name__)

PeerKind = Literal["ip_adapter", "ip_adapter_faceid", "instantid"]
PEER_KINDS: tuple[str, ...] = typing.get_args(PeerKind)

#: Per kind: where the weights are and the settings its authors use; a YAML entry overrides any of them.
PEER_DEFAULTS: dict[str, dict] = {
    "ip_adapter": {
        "weights": "h94/IP-Adapter",
        "subfolder": "sdxl_models",
        "weight_name": "ip-adapter-plus-face_sdxl_vit-h.safetensors",
        "image_encoder": "models/image_encoder",
        "face_pack": "buffalo_l",
        "scale": 1.0,
        "steps": 30,
        "guidance_scale": 5.0,
    },
    "ip_adapter_faceid": {
        "weights": "h94/IP-Adapter-FaceID",
        "weight_name": "ip-adapter-faceid_sdxl.bin",
        "face_pack": "buffalo_l",
        "scale": 1.0,
        "steps": 30,
        "guidance_scale": 7.5,
    },
    "instantid": {
        "weights": "InstantX/InstantID",
        "weight_name": "ip-adapter.bin",
        "controlnet": "ControlNetModel",
        "face_pack": "antelopev2",
        "scale": 0.8,
        "controlnet_scale": 0.8,
        "steps": 30,
        "guidance_scale": 5.0,
    },
}


@dataclass(frozen=True)
class PeerSpec:
    """One peer row of the eval YAML's ``models`` (defaults from :data:`PEER_DEFAULTS` by ``kind``).

    Args:
        name: the row name.
        kind: ``ip_adapter``, ``ip_adapter_faceid`` or ``instantid``.
        weights: hub id or local folder laid out like the hub repository.
        subfolder: folder of the adapter file inside ``weights``.
        weight_name: the adapter file.
        image_encoder: ``ip_adapter`` only: the CLIP image encoder's folder inside ``weights``.
        controlnet: ``instantid`` only: IdentityNet's folder inside ``weights``.
        face_pack: InsightFace pack for the face embedding / crop (``antelopev2`` or ``buffalo_l``).
        face_pack_path: the pack's local folder (default: ``$BOLID_<PACK>`` or ``~/.insightface/models/<pack>``).
        scale: the IP-Adapter scale (0 = the base model).
        controlnet_scale: ``instantid`` only: IdentityNet's conditioning scale.
        steps: sampling steps.
        guidance_scale: classifier-free guidance (> 1 runs the UNet twice per step).
        negative_prompt: used under CFG (default none, as for every other row).
        source: where the settings come from (recorded in the results).
    """

    name: str
    kind: PeerKind
    weights: str | None = None
    subfolder: str = ""
    weight_name: str | None = None
    image_encoder: str | None = None
    controlnet: str | None = None
    face_pack: str | None = None
    face_pack_path: str | None = None
    scale: NonNegativeFloat | None = None
    controlnet_scale: NonNegativeFloat | None = None
    steps: PositiveInt | None = None
    guidance_scale: NonNegativeFloat | None = None
    negative_prompt: str | None = None
    source: str | None = None

    def __post_init__(self):
        """Fill the kind's defaults (types and ranges are checked by :func:`configkit.parse`)."""
        if self.kind not in PEER_KINDS:
            raise ValueError(f"models[{self.name!r}].kind must be one of {PEER_KINDS}, got {self.kind!r}")
        defaults = PEER_DEFAULTS[self.kind]
        for key, value in defaults.items():
            if getattr(self, key) in (None, "") and value is not None:
                object.__setattr__(self, key, value)
        for key in ("image_encoder", "controlnet", "controlnet_scale"):
            if getattr(self, key) is not None and key not in defaults:
                raise ValueError(f"models[{self.name!r}].{key} does not apply to kind {self.kind!r}")

    @classmethod
    def from_dict(cls, entry: dict, where: str) -> PeerSpec:
        """A ``models`` entry: unknown keys, types and ranges are errors naming ``where`` (:mod:`configkit`)."""
        return configkit.parse(cls, entry, where)

    @property
    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name"}


# ------------------------------------------------------------------------------------------ weights


def _files(spec: PeerSpec) -> list[str]:
    main = f"{spec.subfolder}/{spec.weight_name}" if spec.subfolder else spec.weight_name
    return [main] + [f"{d}/*" for d in (spec.image_encoder, spec.controlnet) if d]


def resolve_peer(spec: PeerSpec, kit: str = "real") -> Path:
    """The local folder holding ``spec``'s files (the tiny kit's twin with ``kit="tiny"``), downloading a hub id
    when the hub is reachable.

    Raises:
        MissingWeightsError: a local folder lacks the files, or a hub id is neither cached nor reachable.
    """
    if kit == "tiny":
        from bolid.kits import tiny_peers

        build = {
            "ip_adapter": tiny_peers.tiny_ip_adapter_repo,
            "ip_adapter_faceid": tiny_peers.tiny_faceid_repo,
            "instantid": tiny_peers.tiny_instantid_repo,
        }
        return build[spec.kind]()
    what = f"peer {spec.name!r} ({spec.kind})"
    files = _files(spec)
    how = (
        f"\n  To provide it: `huggingface-cli download {PEER_DEFAULTS[spec.kind]['weights']} "
        f"{' '.join(f.rstrip('/*') for f in files)}` on a machine with internet, then copy the Hugging Face cache "
        "or set the model's `weights:` to the downloaded folder."
    )
    weights = os.path.expanduser(spec.weights)
    if weights.startswith(("/", ".", "~")) or Path(weights).exists():
        folder = Path(weights)
        missing = [f for f in files if not (folder / f.removesuffix("/*")).exists()]
        if missing:
            raise MissingWeightsError(what, f"path {folder}", f"missing {', '.join(missing)}{how}")
        return folder
    from huggingface_hub import snapshot_download

    from bolid.components import _hub_reachable

    try:
        return Path(snapshot_download(weights, allow_patterns=files, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means "not local"
        pass
    if not _hub_reachable():
        raise MissingWeightsError(
            what, f"hub id {weights}", f"not in the local Hugging Face cache, hub unreachable{how}"
        )
    return Path(snapshot_download(weights, allow_patterns=files))


def _sdxl_parts(components: ComponentsConfig, dtype: torch.dtype) -> dict:
    """The SDXL base pipeline's components from the configured kit."""
    from bolid.components import load

    return load("sdxl", components, torch_dtype=dtype)


def _place(pipe, device: str, dtype: torch.dtype):
    pipe.to(device, dtype) if pipe.unet.dtype != dtype else pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------- InstantID


class IdentityNet(ControlNetModel):
    """InstantID's IdentityNet: a diffusers ``ControlNetModel`` whose cross-attention attends to the face tokens
    (the IP-Adapter projection of the face embedding) instead of the prompt, as InstantID trains and runs it.

    The stock ``StableDiffusionXLControlNetPipeline`` passes the prompt embeddings; this class replaces them
    with :attr:`face_tokens`, set per call to a ``(B, tokens, dim)`` tensor batched like the UNet's input.
    """

    face_tokens: torch.Tensor | None = None

    def forward(self, sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        tokens = self.face_tokens
        if tokens is None:
            raise RuntimeError("IdentityNet has no face tokens: set .face_tokens before calling the pipeline")
        if tokens.shape[0] != sample.shape[0]:
            raise RuntimeError(f"IdentityNet: {tokens.shape[0]} face-token rows for a batch of {sample.shape[0]}")
        return super().forward(sample, timestep, tokens.to(sample.device, sample.dtype), *args, **kwargs)


#: InstantID's keypoint colours (left eye, right eye, nose, left and right mouth corner) and limbs to the nose.
KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KPS_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))


def draw_face_keypoints(size: tuple[int, int], kps: np.ndarray, stick: float = 4.0, radius: int = 10) -> Image.Image:
    """IdentityNet's condition image: on black, each eye and mouth corner joined to the nose by a thin ellipse
    (half-width ``stick``, in the start point's colour, at 60% brightness), then a dot of ``radius`` px per point."""
    canvas = Image.new("RGB", size, "black")
    limbs = Image.new("RGB", size, "black")
    draw = ImageDraw.Draw(limbs)
    t = np.linspace(0, 2 * np.pi, 72)
    for a, b in KPS_LIMBS:
        (x0, y0), (x1, y1) = kps[a], kps[b]
        centre, half = ((x0 + x1) / 2, (y0 + y1) / 2), np.hypot(x1 - x0, y1 - y0) / 2
        angle = np.arctan2(y1 - y0, x1 - x0)
        ex, ey = half * np.cos(t), stick * np.sin(t)  # the ellipse before rotation
        xs = centre[0] + ex * np.cos(angle) - ey * np.sin(angle)
        ys = centre[1] + ex * np.sin(angle) + ey * np.cos(angle)
        draw.polygon(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=KPS_COLORS[a])
    canvas = Image.eval(limbs, lambda v: int(v * 0.6))
    draw = ImageDraw.Draw(canvas)
    for (x, y), color in zip(kps, KPS_COLORS, strict=True):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    return canvas


def cover_transform(src: tuple[int, int], dst: tuple[int, int]) -> tuple[float, np.ndarray]:
    """Scale and offset mapping ``src`` (w, h) onto ``dst`` by resizing to cover it and cropping the centre."""
    scale = max(dst[0] / src[0], dst[1] / src[1])
    offset = (np.array(dst, np.float64) - scale * np.array(src, np.float64)) / 2
    return scale, offset


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class PeerResult:
    """Images of one call and the settings it ran with (recorded with every image)."""

    images: list[Image.Image]
    settings: dict = field(default_factory=dict)


@dataclass
class _Condition:
    """What one identity gives a peer: embeddings, crops or keypoints, computed once per identity."""

    found: bool
    embedding: torch.Tensor | None = None  # (512,)
    crops: list[Image.Image] | None = None
    kps: np.ndarray | None = None  # (5, 2) in the first reference's pixels
    ref_size: tuple[int, int] | None = None
    faces: list[dict] = field(default_factory=list)


class PeerRunner:
    """A loaded peer: ``runner(prompt, references, seeds, scale=None)`` -> :class:`PeerResult`."""

    def __init__(
        self,
        spec: PeerSpec,
        components: ComponentsConfig | str = "real",
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        height: int | None = None,
        width: int | None = None,
    ):
        from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

        self.spec, self.components = spec, ComponentsConfig.parse(components)
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.faces = FaceAnalyzer.from_pack(spec.face_pack, spec.face_pack_path, kit=self.components.kind)
        folder = resolve_peer(spec, self.components.kind)
        self.folder = folder
        parts = _sdxl_parts(self.components, self.dtype)
        if spec.kind == "instantid":
            net = IdentityNet.from_pretrained(folder / spec.controlnet, torch_dtype=self.dtype)
            self.pipe = StableDiffusionXLControlNetPipeline(**parts, controlnet=net)
        else:
            self.pipe = StableDiffusionXLPipeline(**parts)
        self.pipe.load_ip_adapter(
            str(folder), subfolder=spec.subfolder, weight_name=spec.weight_name, image_encoder_folder=spec.image_encoder
        )
        _place(self.pipe, str(self.device), self.dtype)
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.height, self.width = height or size, width or size
        self._conditions: dict[tuple[int, ...], tuple[list, _Condition]] = {}

    # --------------------------------------------------------------------------------------- identity

    def condition(self, references: Sequence[Image.Image]) -> _Condition:
        """Faces of ``references`` (cached per reference list)."""
        key = tuple(id(r) for r in references)
        if key not in self._conditions:
            self._conditions[key] = (list(references), self._encode(references))  # keep refs alive: ids stay unique
        return self._conditions[key][1]

    def _encode(self, references: Sequence[Image.Image]) -> _Condition:
        found = [(im.convert("RGB"), self.faces.largest(im)) for im in references]
        found = [(im, f) for im, f in found if f is not None]
        if not found:
            log.warning("%s: no face in any of %d reference(s); generating at scale 0", self.spec.name, len(references))
            return _Condition(False)
        faces = [{"box": f.box.round(1).tolist(), "score": round(f.score, 4)} for _, f in found]
        if self.spec.kind == "ip_adapter":
            return _Condition(True, crops=[align_face(im, f.kps, 224) for im, f in found], faces=faces)
        if self.spec.kind == "ip_adapter_faceid":
            e = torch.from_numpy(np.stack([f.normed_embedding for _, f in found]).astype(np.float32)).mean(0)
            return _Condition(True, embedding=e / e.norm().clamp(min=1e-12), faces=faces)
        e = torch.from_numpy(np.stack([f.embedding for _, f in found]).astype(np.float32)).mean(0)
        im, f = found[0]
        return _Condition(True, embedding=e, kps=f.kps, ref_size=im.size, faces=faces)

    # ------------------------------------------------------------------------------------- generation

    def __call__(
        self, prompt: str, references: Sequence[Image.Image] | None, seeds: Sequence[int], scale: float | None = None
    ) -> PeerResult:
        spec = self.spec
        cond = self.condition(references) if references else _Condition(False)
        scale = spec.scale if scale is None else scale
        if not cond.found:
            scale = 0.0
        do_cfg = spec.guidance_scale > 1.0
        kwargs: dict = {
            "prompt": prompt,
            "negative_prompt": spec.negative_prompt if do_cfg else None,
            "num_inference_steps": spec.steps,
            "guidance_scale": spec.guidance_scale,
            "num_images_per_prompt": len(seeds),
            "height": self.height,
            "width": self.width,
            "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
        }
        self.pipe.set_ip_adapter_scale(scale)
        controlnet_scale = None
        if spec.kind == "ip_adapter":
            crops = cond.crops or [Image.new("RGB", (224, 224), "black")]
            kwargs["ip_adapter_image"] = [crops]
            images = self.pipe(**kwargs).images
        else:
            e = cond.embedding if cond.found else torch.zeros(512)
            e = e.view(1, 1, -1) if spec.kind == "ip_adapter_faceid" else e.view(1, 1, 1, -1)
            embeds = [torch.cat([torch.zeros_like(e), e]) if do_cfg else e]
            embeds = [x.to(self.device, self.dtype) for x in embeds]
            if spec.kind == "ip_adapter_faceid":
                images = self.pipe(ip_adapter_image_embeds=embeds, **kwargs).images
            else:
                controlnet_scale = spec.controlnet_scale if scale > 0 else 0.0  # scale 0: no identity path at all
                images = self._instantid(embeds, cond, controlnet_scale, do_cfg, kwargs)
        settings = {
            **spec.settings,
            "scale": scale,
            "controlnet_scale": controlnet_scale,
            "face_found": cond.found,
            "faces": cond.faces,
            "face_model": self.faces.settings,
            "weights_folder": str(self.folder),
            "height": self.height,
            "width": self.width,
            "unet_evaluations_per_step": 2 if do_cfg else 1,
            "scheduler": type(self.pipe.scheduler).__name__,
            "dtype": str(self.dtype).replace("torch.", ""),
        }
        return PeerResult(list(images), settings)

    def _instantid(self, embeds, cond: _Condition, controlnet_scale: float, do_cfg: bool, kwargs: dict):
        n = kwargs["num_images_per_prompt"]
        prepared = self.pipe.prepare_ip_adapter_image_embeds(None, embeds, self.device, n, do_cfg)
        with torch.no_grad():
            tokens = self.pipe.unet.encoder_hid_proj(prepared)[0]  # (B, 1, 16, D)
        size = (self.width, self.height)
        if cond.found:
            scale, offset = cover_transform(cond.ref_size, size)
            kps_image = draw_face_keypoints(size, cond.kps * scale + offset)
        else:
            kps_image = Image.new("RGB", size, "black")
        net = self.pipe.controlnet
        net.face_tokens = tokens.flatten(1, 2)  # (B, 16, D)
        try:
            return self.pipe(
                image=kps_image,
                controlnet_conditioning_scale=controlnet_scale,
                ip_adapter_image_embeds=embeds,
                **kwargs,
            ).images
        finally:
            net.face_tokens = None


def sdxl_base_generate(
    components: ComponentsConfig | str,
    steps: int,
    guidance_scale: float,
    negative_prompt: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    height: int | None = None,
    width: int | None = None,
):
    """The SDXL base model with no identity, sampled as a peer samples: ``generate(prompt, references, seeds)``."""
    from diffusers import StableDiffusionXLPipeline

    components = ComponentsConfig.parse(components)
    device_t = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device_t.type == "cuda" else torch.float32)
    pipe = _place(StableDiffusionXLPipeline(**_sdxl_parts(components, dtype)), device, dtype)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or size, width or size

    def generate(prompt, references, seeds):
        do_cfg = guidance_scale > 1.0
        images = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt if do_cfg else None,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=len(seeds),
            height=height,
            width=width,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
        ).images
        settings = {"kind": "sdxl_base", "steps": steps, "guidance_scale": guidance_scale, "height": height}
        return PeerResult(list(images), {**settings, "width": width, "unet_evaluations_per_step": 2 if do_cfg else 1})

    return generate


def peer_variant(
    spec: PeerSpec,
    components: ComponentsConfig | str = "real",
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    height: int | None = None,
    width: int | None = None,
) -> Variant:
    """The :class:`Variant` of a peer row; its ``no_identity`` is SDXL base sampled with the peer's settings
    (CLIP-I compares each peer with its own base model, as the peers' papers define it)."""
    base_name = f"SDXL ({spec.steps} steps, CFG {spec.guidance_scale:g})"
    base_settings = {"kind": "sdxl_base", "steps": spec.steps, "guidance_scale": spec.guidance_scale}
    base = Variant(
        base_name,
        lambda: sdxl_base_generate(
            components, spec.steps, spec.guidance_scale, spec.negative_prompt, device, dtype, height, width
        ),
        uses_identity=False,
        settings={**base_settings, "negative_prompt": spec.negative_prompt},
    )

    def build():
        runner = PeerRunner(spec, components, device, dtype, height, width)
        return lambda prompt, references, seeds: runner(prompt, references, seeds)

    return Variant(spec.name, build, uses_identity=True, settings=spec.settings, no_identity=base)


def with_scale(spec: PeerSpec, scale: float) -> PeerSpec:
    """``spec`` at another identity scale (0: the base model)."""
    return replace(spec, scale=scale)
