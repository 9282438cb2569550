"""The Body-Condition Module: decoupled face and body cross-attention in a frozen SDXL UNet, and its files.

BoLID adds two IP-Adapter terms beside the text in every cross-attention layer of the UNet:

    Z' = Attn(Q, K_t, V_t) + lambda_face * Attn(Q, K_face, V_face) + lambda_body * Attn(Q, K_body, V_body)

It extends diffusers rather than forking it (IP-Adapter, Ye et al. 2023, as implemented in diffusers):

* each modality's encoder ends in a *vector* (:class:`bolid.face_encoder.FaceEncoder`,
  :class:`bolid.body_encoder.BodyIDEncoder`), and diffusers' ``ImageProjection`` (``Linear`` -> N tokens
  x cross-attention width, ``LayerNorm``) turns it into tokens; the two projections sit in a
  ``MultiIPAdapterImageProjection`` that becomes the UNet's ``encoder_hid_proj``;
* every cross-attention layer (``attn2``) gets diffusers' multi-adapter ``IPAdapterAttnProcessor2_0``
  with ``num_tokens=[N, N]`` and ``scale=[lambda_face, lambda_body]``; its ``to_k_ip`` / ``to_v_ip``
  start equal to the layer's own ``to_k`` / ``to_v`` (IP-Adapter practice) and train as low-rank updates
  of them (:mod:`bolid.attention`; ``kv_rank=None`` trains full copies instead);
* the UNet's own weights are frozen; only the encoders' heads, the projections and the identity K/V
  train. The same module installs into the SDXL base UNet and the Lightning UNet (same shape); it is
  built or loaded with the base UNet, whose ``to_k`` / ``to_v`` the low-rank updates are relative to.

Dropping the face term per sample (a reference whose face is not visible, or face dropout in training)
uses diffusers' own ``ip_adapter_masks``: the face adapter gets a per-sample mask of 0 (dropped) or 1
(kept), passed through ``cross_attention_kwargs``; the body adapter gets no mask. All-visible batches
pass no mask at all.

API for training and evaluation::

    adapter = BodyConditionModule(base_unet, ClipImageEncoder.from_components("real"))  # or .load(path, base_unet)
    adapter.install(unet)                              # base or Lightning UNet: frozen, processors + projection
    embeds = adapter.encode(ref_pixels, ref_keypoints, face_visible=keep)  # grads flow into the heads
    kwargs = adapter.unet_kwargs(embeds, noisy, added_cond_kwargs={"text_embeds": ..., "time_ids": ...})
    noise_pred = unet(noisy, t, encoder_hidden_states=text, **kwargs).sample
    optimizer = torch.optim.AdamW(adapter.trainable_parameters())
    adapter.save(dir)                                  # adapter.safetensors + adapter.json
    adapter.export_diffusers(dir)                      # bolid_face.safetensors + bolid_body.safetensors

Files: ``adapter.safetensors`` holds every trainable weight (never the frozen image encoder) and
``adapter.json`` the settings to rebuild the module plus the UNet shape it was made for (and a sketch of
that UNet's K/V weights), so that loading into another UNet fails with a clear error.
:meth:`BodyConditionModule.export_diffusers` writes the two adapters in the stock diffusers IP-Adapter
checkpoint layout (``image_proj.proj.weight`` ..., ``ip_adapter.{1,3,5,...}.to_k_ip.weight`` with the
low-rank K/V merged into plain weights), which stock ``load_ip_adapter`` reads as plain IP-Adapters; that
layout fixes N at 4 tokens per adapter, hence the default.
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from jsonargparse.typing import ClosedUnitInterval, PositiveInt
from torch import nn

import configkit
from bolid.attention import (  # noqa: F401 - face_masks and LowRankLinear are part of this module's API
    LowRankLinear,
    cross_attention_layers,
    face_masks,
    identity_processor,
    linear_weight,
)
from bolid.body import BODY_INDICES
from bolid.body_encoder import BodyIDEncoder, gaussian_keypoint_weights, weight_pixels
from bolid.crops import ReferenceCrops, crop_reference
from bolid.embeds import IdentityEmbeds
from bolid.face_encoder import FaceEncoder
from bolid.files import atomic_write
from bolid.image_encoder import ClipImageEncoder
from configkit import number

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
EXPORT_FILES = {"face": "bolid_face.safetensors", "body": "bolid_body.safetensors"}
FORMAT = "bolid-adapter"
FORMAT_VERSION = 1
#: Tokens per adapter that stock diffusers assumes for the ``proj.weight`` (ImageProjection) layout.
DIFFUSERS_IMAGE_PROJ_TOKENS = 4


class AdapterShapeError(ValueError):
    """An adapter file does not fit the UNet (or image encoder) it is being loaded into."""


@dataclass
class AdapterConfig:
    """Settings of a :class:`BodyConditionModule`; saved in ``adapter.json``.

    Widths left ``None`` are derived from the image encoder's ``embed_dim`` (E): face head hidden E,
    body vector E, body hidden E.

    Args:
        num_tokens: tokens per modality (4 keeps the stock-diffusers export possible).
        kv_rank: rank of the trainable update of each identity K/V projection over the UNet's own frozen
            ``to_k`` / ``to_v`` (0: the UNet's own, untrained); ``None``: full trainable copies, as the
            original IP-Adapter (about 13% of SDXL's UNet per modality).
        face_hidden_dim: hidden width of the face head.
        body_dim: width of the body vector.
        body_hidden_dim: hidden width of the body encoder.
        include_pose: feed the raw reference keypoint coordinates to the body encoder (off: pose-free identity).
        body_shape: the body encoder's shape input. ``"net"``: the frozen 3D body-shape network
            (:mod:`bolid.body_shape`, pose- and viewpoint-invariant; for real photos). ``"proportions"``: the six
            2D proportions of Body Sim v1, z-scored with ``proportion_mean`` / ``proportion_std``; for worlds
            without foreshortening, such as BoLID-mini, where they carry more identity than the network.
            ``L_id`` in stage 2 uses the same representation.
        proportion_mean: population mean of the six proportions (``None``: the real-photo statistics
            :data:`bolid.metrics.BODY_STATS_MEAN`); used with ``body_shape: proportions``.
        proportion_std: their population standard deviation (``None``: :data:`bolid.metrics.BODY_STATS_STD`).
        appearance: feed the Gaussian-weighted person crop's CLIP embedding to the body encoder.
        sigma: Gaussian keypoint weighting sigma, as a fraction of the person crop's side.
        alpha: weight of pixels far from keypoints, ``I_w = I * (alpha + (1 - alpha) * W)``.
        min_score: keypoints scoring below this count as not visible (faces and bodies).
        scale_face: default lambda_face.
        scale_body: default lambda_body.
    """

    num_tokens: PositiveInt = DIFFUSERS_IMAGE_PROJ_TOKENS
    kv_rank: PositiveInt | None = 16
    face_hidden_dim: PositiveInt | None = None
    body_dim: PositiveInt | None = None
    body_hidden_dim: PositiveInt | None = None
    include_pose: bool = False
    body_shape: Literal["net", "proportions"] = "net"
    proportion_mean: list[float] | None = None
    proportion_std: list[float] | None = None
    appearance: bool = True
    sigma: number(float, (">", 0), ("<=", 1)) = 0.1
    alpha: ClosedUnitInterval = 0.3
    min_score: ClosedUnitInterval = 0.3
    scale_face: float = 1.0
    scale_body: float = 1.0

    def __post_init__(self):
        """Types and ranges are checked by :meth:`from_dict` (:mod:`configkit`); the scales must also be finite."""
        _check_scale("scale_face", self.scale_face)
        _check_scale("scale_body", self.scale_body)
        for name in ("proportion_mean", "proportion_std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 6 or not all(math.isfinite(v) for v in value)):
                raise ValueError(f"adapter.{name} must be 6 finite numbers, got {value!r}")
        if self.proportion_std is not None and min(self.proportion_std) <= 0:
            raise ValueError(f"adapter.proportion_std must be > 0, got {self.proportion_std!r}")

    def resolved(self, embed_dim: int) -> AdapterConfig:
        """A copy with every width filled in for an image encoder of width ``embed_dim``."""
        d = asdict(self)
        d["face_hidden_dim"] = self.face_hidden_dim or embed_dim
        d["body_dim"] = self.body_dim or embed_dim
        d["body_hidden_dim"] = self.body_hidden_dim or embed_dim
        if self.body_shape == "proportions":
            from bolid.metrics import BODY_STATS_MEAN, BODY_STATS_STD

            d["proportion_mean"] = list(self.proportion_mean or BODY_STATS_MEAN)
            d["proportion_std"] = list(self.proportion_std or BODY_STATS_STD)
        return AdapterConfig(**d)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        """Settings from a config or ``adapter.json``: errors name ``adapter.<key>`` ("did you mean" for typos)."""
        return configkit.parse(cls, d, "adapter")


def _check_scale(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def unet_signature(unet) -> dict:
    """What an adapter must match in a UNet: the cross-attention width and every cross-attention layer."""
    return {
        "cross_attention_dim": int(unet.config.cross_attention_dim),
        "layers": [[name, hidden] for name, hidden in cross_attention_layers(unet)],
    }


def kv_fingerprint(unet) -> dict[str, list[float]]:
    """A sketch of ``to_k`` / ``to_v`` in the first and last cross-attention layer: ``P @ W @ p`` (16 numbers each).

    ``P`` and ``p`` are fixed seeded Gaussians. Low-rank identity K/V are updates *of these weights*, so an
    adapter records the sketch and refuses a UNet whose K/V differ (e.g. the Lightning UNet given where the
    base UNet is needed).
    """
    layers = cross_attention_layers(unet)
    out = {}
    for name, _ in (layers[0], layers[-1]):
        attn = unet.get_submodule(name[: -len(".processor")])
        for proj in ("to_k", "to_v"):
            w = getattr(attn, proj).weight.detach()
            if w.is_meta:  # a UNet built for its shape only (benchmark counts): nothing to record
                return {}
            w = w.to("cpu", torch.float64)
            g = torch.Generator().manual_seed(0)
            p_in = torch.randn(w.shape[1], generator=g, dtype=torch.float64)
            p_out = torch.randn(16, w.shape[0], generator=g, dtype=torch.float64)
            out[f"{name[: -len('.processor')]}.{proj}"] = (p_out @ (w @ p_in)).tolist()
    return out


def _same_kv(a: dict, b: dict, rtol: float = 5e-3) -> bool:
    # 5x bfloat16's rounding noise on the sketch: a bf16 / fp16 copy passes, different weights do not.
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = torch.tensor(a[k]), torch.tensor(b[k])
        if float((x - y).norm()) > rtol * float(x.norm()):
            return False
    return True


def _describe(sig: dict) -> str:
    widths = sorted({h for _, h in sig["layers"]})
    n = len(sig["layers"])
    return f"cross_attention_dim {sig['cross_attention_dim']}, {n} cross-attention layers (widths {widths})"


class BodyConditionModule(nn.Module):
    """BoLID's trainable part: face and body encoders' heads, their token projections, and the
    ``to_k_ip`` / ``to_v_ip`` of every cross-attention layer (see the module docstring).

    Args:
        unet: the SDXL-shaped ``UNet2DConditionModel`` this adapter is made for (the SDXL *base* UNet, also
            when it will run in the Lightning UNet). Its layer shapes fix the adapter's, and its ``to_k`` /
            ``to_v`` start ``to_k_ip`` / ``to_v_ip``: with ``kv_rank`` set they stay the frozen base of the
            low-rank updates (shared, not copied; their ``requires_grad`` is switched off).
        image_encoder: the frozen CLIP / EVA-CLIP tower for face crops and appearance.
        config: settings; defaults as :class:`AdapterConfig`.
    """

    def __init__(self, unet, image_encoder: ClipImageEncoder, config: AdapterConfig | None = None):
        super().__init__()
        self.image_encoder = image_encoder
        embed = image_encoder.embed_dim
        self.config = cfg = (config or AdapterConfig()).resolved(embed)
        self.signature = unet_signature(unet)
        cross = self.signature["cross_attention_dim"]
        self.face_encoder = FaceEncoder(embed, cfg.face_hidden_dim)
        self.body_encoder = BodyIDEncoder(
            cfg.body_dim,
            cfg.body_hidden_dim,
            embed if cfg.appearance else 0,
            cfg.include_pose,
            cfg.min_score,
            body_shape=cfg.body_shape,
            proportion_stats=(cfg.proportion_mean, cfg.proportion_std) if cfg.body_shape == "proportions" else None,
        )
        self.image_proj = MultiIPAdapterImageProjection(
            [ImageProjection(embed, cross, cfg.num_tokens), ImageProjection(cfg.body_dim, cross, cfg.num_tokens)]
        )
        scales = (cfg.scale_face, cfg.scale_body)
        self.processors = nn.ModuleList(
            identity_processor(
                unet.get_submodule(name[: -len(".processor")]), hidden, cfg.num_tokens, scales, cfg.kv_rank
            )
            for name, hidden in self.signature["layers"]
        )
        for part in (self.face_encoder, self.body_encoder, self.image_proj, self.processors):
            part.to(device=unet.device, dtype=unet.dtype)
        self.base_kv = kv_fingerprint(unet) if cfg.kv_rank is not None else None
        self._installed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # UNet -> what install replaced

    # ------------------------------------------------------------------------------------------ UNet

    def install(self, unet) -> None:
        """Freeze ``unet`` and put the face/body attention processors and projections into it.

        The UNet can be the one the adapter was made for or any UNet of the same shape (SDXL base and
        Lightning). Undo with :meth:`uninstall`.

        Raises:
            AdapterShapeError: the UNet has another shape.
            ValueError: the UNet already carries an image projection (another IP-Adapter) or sits on
                another device.
        """
        if unet in self._installed:
            return
        self.check_unet(unet)
        if unet.encoder_hid_proj is not None:
            raise ValueError("the UNet already has an image projection (an IP-Adapter is loaded); uninstall it first")
        if self.device != unet.device:
            raise ValueError(f"adapter is on {self.device}, the UNet on {unet.device}; move it with .to() first")
        unet.requires_grad_(False)
        original = dict(unet.attn_processors)
        procs = dict(original)
        for (name, _), proc in zip(self.signature["layers"], self.processors, strict=True):
            procs[name] = proc
        unet.set_attn_processor(procs)
        self._installed[unet] = (original, unet.config.encoder_hid_dim_type)
        unet.encoder_hid_proj = self.image_proj
        # As diffusers' own IP-Adapter loader does (loaders/unet.py, _load_ip_adapter_weights).
        unet.config.encoder_hid_dim_type = "ip_image_proj"

    def uninstall(self, unet) -> None:
        """Restore ``unet``'s original attention processors and remove the image projection."""
        if unet not in self._installed:
            raise ValueError("this adapter is not installed in that UNet")
        original, hid_type = self._installed.pop(unet)
        unet.set_attn_processor(dict(original))
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = hid_type

    def check_unet(self, unet, source: str = "this adapter") -> None:
        """Raise :class:`AdapterShapeError` unless ``unet`` has the shape the adapter was made for."""
        sig = unet_signature(unet)
        if sig != self.signature:
            raise AdapterShapeError(
                f"{source} was made for a UNet with {_describe(self.signature)}, but this UNet has {_describe(sig)}; "
                "use an adapter trained for this base model (BoLID adapters need the SDXL-shaped UNet they were "
                "trained with; SDXL base and SDXL-Lightning share one shape)"
            )

    @property
    def device(self) -> torch.device:
        return self.image_proj.image_projection_layers[0].image_embeds.weight.device

    @property
    def scales(self) -> dict[str, float]:
        return {"face": self.config.scale_face, "body": self.config.scale_body}

    def set_scales(self, face: float | None = None, body: float | None = None) -> None:
        """Set lambda_face and/or lambda_body in every layer (0 drops that term exactly)."""
        if face is not None:
            _check_scale("scale_face", face)
            self.config.scale_face = float(face)
        if body is not None:
            _check_scale("scale_body", body)
            self.config.scale_body = float(body)
        for proc in self.processors:
            proc.scale = [self.config.scale_face, self.config.scale_body]

    @staticmethod
    def _trainable(name: str) -> bool:
        # Frozen and never saved: the image encoder, and the UNet's own to_k / to_v under low-rank K/V.
        return not name.startswith("image_encoder.") and ".base." not in name

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Encoder heads, projections and the identity K/V weights: all that trains, nothing frozen."""
        return [p for name, p in self.named_parameters() if self._trainable(name)]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights only (what :meth:`save` writes)."""
        return {k: v for k, v in self.state_dict().items() if self._trainable(k)}

    # ---------------------------------------------------------------------------------------- encode

    def encode(
        self,
        pixels: torch.Tensor,
        keypoints: torch.Tensor,
        face_visible: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> IdentityEmbeds:
        """Face and body vectors of a batch of reference images, with gradients into the trainable heads.

        Args:
            pixels: ``(B, 3, H, W)`` reference images, values in ``[0, 1]``.
            keypoints: ``(B, 17, 3)`` COCO keypoints ``(x, y, score)`` of the reference person, in pixels of
                ``pixels``.
            face_visible: optional ``(B,)`` bool; ``False`` drops the face for that sample (face dropout)
                even when its face keypoints are visible. Faces whose keypoints are not visible are always
                dropped.
            boxes: optional ``(B, 4)`` person boxes xyxy (the detector's); by default the visible keypoints'
                extent.
        """
        crops = crop_reference(pixels, keypoints, boxes, self.image_encoder.image_size, self.config.min_score)
        return self.encode_crops(crops, face_visible)

    def encode_crops(self, crops: ReferenceCrops, face_visible: torch.Tensor | None = None) -> IdentityEmbeds:
        """Face and body vectors from the face and person crops (:mod:`bolid.crops`; training and inference).

        Args:
            crops: the references' crops, at the image encoder's input size.
            face_visible: as in :meth:`encode`.
        """
        cfg, n = self.config, crops.face.shape[0]
        visible = crops.face_visible.to(torch.bool)
        if face_visible is not None:
            visible = visible & face_visible.to(visible.device, torch.bool)
        images = [crops.face.float()]
        body_kp = crops.keypoints.float()
        if cfg.appearance:
            side = crops.person.shape[-1]  # the keypoints are in these crop pixels
            weights = gaussian_keypoint_weights(
                body_kp[:, list(BODY_INDICES)], (side, side), cfg.sigma * side, cfg.min_score
            )
            images.append(weight_pixels(crops.person.float(), weights, cfg.alpha))
        with torch.no_grad():
            clip = self.image_encoder(torch.cat(images))  # (B or 2B, E): face crops, then person crops
        face = self.face_encoder(clip[:n]) * visible[:, None].to(clip.dtype)
        body = self.body_encoder(body_kp, clip[n:] if cfg.appearance else None)
        return IdentityEmbeds(face, body, visible)

    def unet_kwargs(
        self,
        embeds: IdentityEmbeds,
        sample: torch.Tensor,
        added_cond_kwargs: dict | None = None,
        cross_attention_kwargs: dict | None = None,
    ) -> dict:
        """Keyword arguments for ``unet(sample, t, encoder_hidden_states, **kwargs)`` carrying the identity.

        Returns ``{"added_cond_kwargs": {..., "image_embeds": [face, body]}, "cross_attention_kwargs": ...}``,
        where the cross-attention kwargs hold the per-sample face mask when some face is dropped.
        ``len(embeds)`` must equal the batch of ``sample``.
        """
        if len(embeds) != sample.shape[0]:
            raise ValueError(f"embeds hold {len(embeds)} samples but the UNet batch is {sample.shape[0]}")
        added = dict(added_cond_kwargs or {})
        added["image_embeds"] = embeds.image_embeds()
        extra = dict(cross_attention_kwargs or {})
        if not bool(embeds.face_visible.all()):
            extra["ip_adapter_masks"] = [face_masks(embeds.face_visible, sample.shape[-2:], sample.dtype), None]
        return {"added_cond_kwargs": added, "cross_attention_kwargs": extra or None}

    # ----------------------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> Path:
        """Write ``adapter.safetensors`` (trainable weights) and ``adapter.json`` (settings) into folder ``path``."""
        from safetensors.torch import save

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.adapter_state_dict().items()}
        # Each file goes to a temporary name and is renamed when complete: a killed save leaves no torn file.
        atomic_write(path / ADAPTER_WEIGHTS, save(state, metadata={"format": "pt"}))
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": asdict(self.config),
            "image_encoder": {
                "name": self.image_encoder.name,
                "embed_dim": self.image_encoder.embed_dim,
                "image_size": self.image_encoder.image_size,
            },
            "unet": self.signature,
            "base_kv": self.base_kv,
        }
        atomic_write(path / ADAPTER_CONFIG, json.dumps(meta, indent=1))
        return path

    @staticmethod
    def read_config(path: str | Path) -> dict:
        """The parsed ``adapter.json`` of an adapter folder, checked to be a BoLID adapter."""
        path = Path(path)
        if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"adapter folder {path} must hold {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}")
        meta = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path / ADAPTER_CONFIG}: not a BoLID adapter of format version {FORMAT_VERSION} "
                f"(format {meta.get('format')!r}, version {meta.get('version')!r})"
            )
        return meta

    @classmethod
    def load(cls, path: str | Path, unet, image_encoder: ClipImageEncoder | None = None) -> BodyConditionModule:
        """Rebuild an adapter saved by :meth:`save` for ``unet`` (not installed yet).

        Args:
            path: the adapter folder.
            unet: the UNet it will run in; must have the shape recorded in ``adapter.json``.
            image_encoder: the frozen image encoder; by default built from the name in ``adapter.json``
                (from the kit that built it, :func:`bolid.components.image_encoder_kit`).

        Raises:
            FileNotFoundError: the folder lacks the files.
            AdapterShapeError: the UNet or image encoder does not match the file.
        """
        from safetensors.torch import load_file

        path = Path(path)
        meta = cls.read_config(path)
        sig = unet_signature(unet)
        if sig != meta["unet"]:
            raise AdapterShapeError(
                f"adapter {path} was made for a UNet with {_describe(meta['unet'])}, but this UNet has "
                f"{_describe(sig)}; use an adapter trained for this base model"
            )
        if meta["config"].get("kv_rank") is not None and not _same_kv(meta["base_kv"], kv_fingerprint(unet)):
            raise AdapterShapeError(
                f"adapter {path} holds low-rank updates of the to_k / to_v weights of the UNet it was made for, and "
                "this UNet's differ: load it with that UNet (the SDXL base UNet, also for SDXL-Lightning: load with "
                "the base UNet, then install() into the Lightning UNet)"
            )
        enc = meta["image_encoder"]
        if image_encoder is None:
            from bolid.components import image_encoder_kit

            image_encoder = ClipImageEncoder.from_components(image_encoder_kit(enc["name"]), enc["name"])
            image_encoder.to(unet.device)
        if image_encoder.embed_dim != enc["embed_dim"]:
            raise AdapterShapeError(
                f"adapter {path} was made for image encoder {enc['name']} (embed_dim {enc['embed_dim']}), "
                f"got {image_encoder.name} (embed_dim {image_encoder.embed_dim})"
            )
        module = cls(unet, image_encoder, AdapterConfig.from_dict(meta["config"]))
        state = load_file(str(path / ADAPTER_WEIGHTS))
        expected = module.adapter_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise AdapterShapeError(
                f"{path / ADAPTER_WEIGHTS} does not match its adapter.json: {len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors "
                f"(first: {(missing + unexpected + wrong)[:3]})"
            )
        module.load_state_dict(state, strict=False)
        return module

    def export_diffusers(self, out_dir: str | Path) -> dict[str, Path]:
        """Write the face and body adapters in stock diffusers' IP-Adapter checkpoint format.

        Each file holds ``image_proj.proj.{weight,bias}``, ``image_proj.norm.{weight,bias}`` (an
        ``ImageProjection``) and ``ip_adapter.{k}.to_k_ip.weight`` / ``.to_v_ip.weight`` with ``k`` the odd
        attention-processor index of each cross-attention layer (1, 3, 5, ...), which is how stock
        ``load_ip_adapter`` numbers them. The encoders' heads are not part of the export: pass the vectors
        BoLID computes (``IdentityEmbeds.image_embeds()``) as ``ip_adapter_image_embeds``.

        Returns:
            ``{"face": path, "body": path}``.
        """
        from safetensors.torch import save_file

        if self.config.num_tokens != DIFFUSERS_IMAGE_PROJ_TOKENS:
            raise ValueError(
                f"stock diffusers reads the ImageProjection layout with exactly {DIFFUSERS_IMAGE_PROJ_TOKENS} tokens "
                f"per adapter; this adapter has num_tokens={self.config.num_tokens}, so it cannot be exported"
            )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for j, (modality, filename) in enumerate(EXPORT_FILES.items()):
            proj = self.image_proj.image_projection_layers[j]
            state = {
                "image_proj.proj.weight": proj.image_embeds.weight,
                "image_proj.proj.bias": proj.image_embeds.bias,
                "image_proj.norm.weight": proj.norm.weight,
                "image_proj.norm.bias": proj.norm.bias,
            }
            for i, proc in enumerate(self.processors):  # low-rank K/V merged: W + up @ down
                state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = linear_weight(proc.to_k_ip[j])
                state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = linear_weight(proc.to_v_ip[j])
            paths[modality] = out / filename
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(paths[modality]))
        info = {
            "adapters": {m: p.name for m, p in paths.items()},
            "load": "pipe.load_ip_adapter(dir, subfolder='', weight_name=['bolid_face.safetensors', "
            "'bolid_body.safetensors'], image_encoder_folder=None); "
            "pipe.set_ip_adapter_scale([scale_face, scale_body])",
            "embeds": "ip_adapter_image_embeds=IdentityEmbeds.image_embeds(do_classifier_free_guidance) "
            "(face (B,1,D_face), body (B,1,D_body)); no visible face: face scale 0",
            "scales": self.scales,
            "image_encoder": self.image_encoder.name,
            "unet": _describe(self.signature),
        }
        (out / "bolid_export.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        return paths
