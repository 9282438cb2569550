"""SDXL-Lightning as a LoRA on the SDXL base UNet, switched on and off (stage-2 training holds one UNet, not two).

ByteDance publishes SDXL-Lightning both as full UNets and as LoRAs (``sdxl_lightning_{2,4,8}step_lora.safetensors``,
Kohya layout). :func:`apply_lightning_lora` loads one with diffusers' own LoRA loading
(``StableDiffusionXLPipeline.lora_state_dict`` converts the layout, ``load_lora_into_unet`` injects it with PEFT)
under the adapter name :data:`LIGHTNING_LORA`, switched off; :func:`set_lora_enabled` switches it for the whole
UNet or for one block (gradient checkpointing recomputes blocks one at a time). The kits' ``sdxl_lightning_lora``
builders (:mod:`bolid.kits`) find the file or build a random one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bolid.components import _call

#: The adapter name under which the SDXL-Lightning LoRA sits in the UNet.
LIGHTNING_LORA = "lightning"


def set_lora_enabled(module: torch.nn.Module, enabled: bool) -> None:
    """Switch the LoRA layers inside ``module`` on or off, keeping their weights frozen.

    Like ``unet.enable_lora()`` / ``disable_lora()`` (PEFT's ``enable_adapters``, which would also make the LoRA
    weights trainable), for any submodule.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)
            for name in m.adapter_layer_names:
                getattr(m, name).requires_grad_(False)


def apply_lightning_lora(unet, lora: str | Path | dict, what: str = "sdxl_lightning_lora") -> None:
    """Put an SDXL-Lightning LoRA into ``unet`` as adapter :data:`LIGHTNING_LORA`, switched *off*, frozen.

    Args:
        unet: the SDXL base ``UNet2DConditionModel``.
        lora: a ``.safetensors`` file or a state dict in any layout ``lora_state_dict`` reads.
        what: the component name for error messages.
    """
    from diffusers import StableDiffusionXLPipeline

    tried = "state dict" if isinstance(lora, dict) else str(lora)
    state, alphas = _call(what, tried, StableDiffusionXLPipeline.lora_state_dict, lora)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet, adapter_name=LIGHTNING_LORA)
    set_lora_enabled(unet, False)


def random_lightning_lora(unet, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA for ``unet`` in the Kohya layout of ByteDance's ``sdxl_lightning_4step_lora.safetensors``
    (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``): every linear layer of the
    transformer blocks and the resnets' convolutions, as the real one covers."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, m in unet.named_modules():
        linear = isinstance(m, torch.nn.Linear) and ".attentions." in name
        conv = isinstance(m, torch.nn.Conv2d) and ".resnets." in name and name.endswith(("conv1", "conv2"))
        if not (linear or conv):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if linear:
            down, up = torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g)
        else:
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g)
        state[f"{key}.lora_down.weight"] = down * 0.1
        state[f"{key}.lora_up.weight"] = up * 0.1
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state
