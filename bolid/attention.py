"""The identity cross-attention layers: diffusers' multi-adapter IP-Adapter processor with low-rank K/V.

Every cross-attention layer (``attn2``) of the UNet gets one ``IPAdapterAttnProcessor2_0`` (diffusers,
unchanged) with two adapters, face and body. Its ``to_k_ip[i]`` / ``to_v_ip[i]`` are, by default,
:class:`LowRankLinear`: the layer's own frozen ``to_k`` / ``to_v`` (shared, not copied) plus a trainable
rank-``r`` update whose up-projection starts at zero. At the start each identity K/V projection therefore
equals the UNet's own (IP-Adapter practice), and training touches ``r * (in + out)`` weights per projection
instead of ``in * out`` (LoRA, Hu et al. 2021): for SDXL's 70 cross-attention layers and two adapters,
14.5M instead of 681M. ``kv_rank=None`` gives the classic IP-Adapter instead: full trainable copies.

Both forms export exactly to the stock IP-Adapter layout, whose ``to_k_ip`` is a plain ``Linear``:
:meth:`LowRankLinear.merged_weight` is ``W + up @ down``.

The helpers walk ``unet.attn_processors`` as diffusers' ``loaders/unet.py`` does, and
:func:`face_masks` builds the per-sample ``ip_adapter_masks`` entry that drops the face term.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from torch import nn


class LowRankLinear(nn.Module):
    """``y = x W^T + (x down^T) up^T``: a frozen base projection plus a trainable low-rank update.

    Args:
        base: the frozen ``Linear`` (no bias) this projection starts from; it is registered as a submodule
            (so that ``.to()`` moves it) but shared, never copied, and its weights never train.
        rank: rank of the update; 0 leaves the base projection alone.
    """

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LowRankLinear expects a projection without bias (as attention to_k / to_v)")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        base.requires_grad_(False)
        self.base = base
        self.rank = rank
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        self.down = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.up = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        if rank and w.device.type != "meta":
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's default init, as LoRA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base.weight
        out = F.linear(x.to(w.dtype), w)
        if self.rank:
            out = out + F.linear(F.linear(x.to(self.down.dtype), self.down), self.up).to(out.dtype)
        return out

    def merged_weight(self) -> torch.Tensor:
        """The equivalent plain ``Linear`` weight ``W + up @ down`` (computed in float32, returned in W's dtype)."""
        w = self.base.weight
        if not self.rank:
            return w.detach().clone()
        return (w.float() + self.up.float() @ self.down.float()).to(w.dtype).detach()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The plain-``Linear`` weight of an identity K/V projection (either form)."""
    return layer.merged_weight() if isinstance(layer, LowRankLinear) else layer.weight.detach()


def cross_attention_layers(unet) -> list[tuple[str, int]]:
    """``(processor name, hidden_size)`` of every cross-attention layer, in ``unet.attn_processors`` order.

    Self-attention (``attn1``) is skipped; ``hidden_size`` comes from ``block_out_channels`` and the block
    prefix, as diffusers' ``loaders/unet.py`` derives it.
    """
    channels = list(unet.config.block_out_channels)
    layers = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        elif name.startswith("down_blocks"):
            hidden = channels[int(name[len("down_blocks.")])]
        else:
            raise ValueError(f"unexpected attention processor {name!r}: not in a down, mid or up block")
        attn = unet.get_submodule(name[: -len(".processor")])
        assert attn.to_k.out_features == hidden, (name, attn.to_k.out_features, hidden)
        layers.append((name, hidden))
    return layers


def identity_processor(
    attn, hidden_size: int, num_tokens: int, scales: tuple[float, float], kv_rank: int | None
) -> IPAdapterAttnProcessor2_0:
    """The face + body processor for one cross-attention layer ``attn``.

    Args:
        attn: the diffusers ``Attention`` module (its ``to_k`` / ``to_v`` start the identity K/V).
        hidden_size: the layer's width.
        num_tokens: tokens per adapter.
        scales: ``(lambda_face, lambda_body)``.
        kv_rank: rank of the trainable K/V update; ``None`` for full trainable copies (classic IP-Adapter).
    """
    cross = attn.to_k.in_features
    with torch.device("meta"):  # its own Linear layers are replaced below: don't allocate them
        proc = IPAdapterAttnProcessor2_0(hidden_size, cross, num_tokens=[num_tokens] * 2, scale=list(scales))
    if kv_rank is None:

        def copy(src: nn.Linear) -> nn.Linear:
            layer = nn.Linear(cross, hidden_size, bias=False, device=src.weight.device, dtype=src.weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(src.weight)
            return layer

        proc.to_k_ip = nn.ModuleList([copy(attn.to_k) for _ in range(2)])
        proc.to_v_ip = nn.ModuleList([copy(attn.to_v) for _ in range(2)])
    else:
        proc.to_k_ip = nn.ModuleList([LowRankLinear(attn.to_k, kv_rank) for _ in range(2)])
        proc.to_v_ip = nn.ModuleList([LowRankLinear(attn.to_v, kv_rank) for _ in range(2)])
    return proc


def face_masks(face_visible: torch.Tensor, latent_size: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
    """Per-sample ``ip_adapter_masks`` entry for the face adapter: ``(B, 1, h, w)`` of 1 (keep) or 0 (drop).

    The mask has the latent's aspect ratio, because diffusers resizes it to each layer's token grid by
    that ratio (``IPAdapterMaskProcessor.downsample``); a mask whose first dimension is the batch applies
    per sample.
    """
    h, w = (int(s) for s in latent_size)
    return face_visible.to(dtype)[:, None, None, None].expand(-1, 1, h, w).contiguous()
