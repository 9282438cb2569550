"""Stage-2 memory estimate at real size, counted on the meta device (nothing is allocated, no GPU needed).

For SDXL's real UNet and VAE configs with BoLID's adapter installed, it counts in bfloat16:

* resident weights of every frozen model (SDXL base UNet, the SDXL-Lightning UNet *or* its LoRA, VAE, the two
  text encoders, EVA02-L-14-336, ViTPose-base) and the trainable state (fp32 weights, gradients, AdamW moments,
  EMA);
* attention as a fused SDPA kernel keeps it on a GPU (q, k, v, output, log-sum-exp; ``--math-attention`` counts
  the math path's attention matrices instead);
* activations kept for the backward pass, as the bytes of the tensors autograd saves (``saved_tensors_hooks``),
  for one sample: the ``L_diff`` UNet pass, one Lightning-branch UNet pass with gradients, and the VAE decode,
  each with and without gradient checkpointing. Under checkpointing, the recomputed block's activations come
  back during its backward pass: that transient is the largest single checkpointed block's saved bytes.

What it does not count: the CUDA allocator's fragmentation and workspace, temporaries that are freed before
the backward pass, the text-encoder and EVA-CLIP forward passes (no gradients), ViTPose's activations (a 256 x
192 crop, small). It is an estimate, to be checked with ``torch.cuda.max_memory_allocated`` on a GPU.

    python -m bench.bench_stage2_memory                 # defaults: 1024 px branch and target, batch 2, k = 2
    python -m bench.bench_stage2_memory --branch 768 --k 1
"""

from __future__ import annotations

import argparse

import torch

from bench.bench_adapter import EVA, SDXL_UNET
from bolid.adapter import BodyConditionModule
from bolid.image_encoder import ClipImageEncoder

GB = 1e9
#: SDXL base 1.0's VAE config (stabilityai/stable-diffusion-xl-base-1.0, vae/config.json).
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
)
#: Parameters of the frozen models not built here (public model cards): CLIP ViT-L text 123M + OpenCLIP
#: ViT-bigG text 695M (SDXL's two text encoders), ViTPose-base 90M; SDXL-Lightning 4-step LoRA file 394 MB in fp16.
TEXT_ENCODERS, VITPOSE, LIGHTNING_LORA_BYTES = 817_800_000, 90_000_000, 394_000_000


class _FusedAttention(torch.autograd.Function):
    """What a fused SDPA kernel (flash / memory-efficient, as on a GPU) keeps for backward: q, k, v, the output
    and the row log-sum-exp; the meta device's own SDPA is the math path, which also keeps the attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the count needs the forward only
        raise NotImplementedError


def fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    return _FusedAttention.apply(q, k, v)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward pass while ``fn`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def build():
    import open_clip
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET).to(torch.bfloat16).requires_grad_(False)
        vae = AutoencoderKL(**SDXL_VAE).to(torch.bfloat16).requires_grad_(False)
        eva = open_clip.create_model(EVA, pretrained=None, device="meta")
    adapter = BodyConditionModule(unet, ClipImageEncoder(eva, EVA))
    for p in adapter.trainable_parameters():
        p.data = p.data.float()
        p.requires_grad_(True)
    adapter.install(unet)
    return unet, vae, eva, adapter


def unet_pass(unet, adapter, latent: int, checkpointing: bool, input_grad: bool = False) -> tuple[int, int]:
    """(saved bytes of one sample's UNet pass with gradients to the adapter, largest checkpointed block's).

    ``input_grad``: the input latents need gradients too (every branch step with gradients after the first one).
    """
    from bolid.embeds import IdentityEmbeds

    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    dev, bf = "meta", torch.bfloat16
    dim = adapter.image_encoder.embed_dim
    x = torch.zeros(1, 4, latent, latent, device=dev, dtype=bf, requires_grad=input_grad)
    text = torch.zeros(1, 77, 2048, device=dev, dtype=bf)
    added = {
        "text_embeds": torch.zeros(1, 1280, device=dev, dtype=bf),
        "time_ids": torch.zeros(1, 6, device=dev, dtype=bf),
    }
    face = adapter.face_encoder(torch.zeros(1, dim, device=dev))
    body = torch.zeros(1, adapter.config.body_dim, device=dev, requires_grad=True)
    embeds = IdentityEmbeds(face.to(bf), body.to(bf), torch.ones(1, dtype=torch.bool))  # all faces visible
    kwargs = adapter.unet_kwargs(embeds, x, added)
    total = saved_bytes(lambda: unet(x, torch.tensor([500], device=dev), text, **kwargs))
    block = 0
    if checkpointing:  # the recompute transient: the largest block run alone without checkpointing
        unet.disable_gradient_checkpointing()
        block = max_block_bytes(unet, x, text, kwargs)
    return total, block


def max_block_bytes(unet, x, text, kwargs) -> int:
    """Saved bytes of the largest down/mid/up block of one un-checkpointed pass (each counted on its own)."""
    counts: dict[str, int] = {}
    blocks = {f"down{i}": b for i, b in enumerate(unet.down_blocks)} | {"mid": unet.mid_block}
    blocks |= {f"up{i}": b for i, b in enumerate(unet.up_blocks)}
    state = {"current": None}

    def pack(t):
        if state["current"] is not None:
            counts[state["current"]] = counts.get(state["current"], 0) + t.numel() * t.element_size()
        return t

    handles = []
    for name, block in blocks.items():
        handles.append(block.register_forward_pre_hook(lambda m, a, n=name: state.update(current=n)))
        handles.append(block.register_forward_hook(lambda m, a, o: state.update(current=None)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, torch.tensor([500], device="meta"), text, **kwargs)
    for h in handles:
        h.remove()
    return max(counts.values())


def vae_decode(vae, latent: int, checkpointing: bool) -> tuple[int, int]:
    """(saved bytes of one image's decode with gradients to the latents, largest checkpointed block's)."""
    if checkpointing:
        vae.enable_gradient_checkpointing()
    else:
        vae.disable_gradient_checkpointing()
    z = torch.zeros(1, 4, latent, latent, device="meta", dtype=torch.bfloat16, requires_grad=True)
    total = saved_bytes(lambda: vae.decode(z).sample)
    block = 0
    if checkpointing:
        vae.disable_gradient_checkpointing()
        counts = []
        h = vae.decoder.conv_in(z)
        h = vae.decoder.mid_block(h)
        for up in vae.decoder.up_blocks:
            h = h.detach().requires_grad_(True)
            counts.append(saved_bytes(lambda up=up, h=h: up(h)))
            with torch.no_grad():
                h = up(h)
        block = max(counts)
    return total, block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=int, default=1024, help="L_diff training resolution (px)")
    parser.add_argument("--branch", type=int, default=1024, help="Lightning-branch resolution (px)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--k", type=int, default=2, help="branch steps with gradients")
    parser.add_argument("--math-attention", action="store_true", help="count the math SDPA (attention matrices)")
    args = parser.parse_args(argv)
    if not args.math_attention:
        torch.nn.functional.scaled_dot_product_attention = fused_sdpa
    unet, vae, eva, adapter = build()
    bf = 2
    unet_b = sum(p.numel() for n, p in unet.named_parameters() if "processor" not in n and "encoder_hid" not in n) * bf
    trainable = sum(p.numel() for p in adapter.trainable_parameters())
    weights = {
        "SDXL base UNet (bf16)": unet_b,
        "second UNet: SDXL-Lightning (lightning_weights: unet)": unet_b,
        "or its LoRA (lightning_weights: lora)": LIGHTNING_LORA_BYTES,
        "VAE": sum(p.numel() for p in vae.parameters()) * bf,
        "text encoders": TEXT_ENCODERS * bf,
        "EVA02-L-14-336": sum(p.numel() for p in eva.parameters()) * bf,
        "ViTPose-base": VITPOSE * bf,
        f"adapter: {trainable / 1e6:.0f}M fp32 weights + grads + AdamW + EMA": trainable * 4 * 5,
    }
    acts = {}
    for ckpt in (False, True):
        acts[("L_diff UNet", ckpt)] = unet_pass(unet, adapter, args.target // 8, ckpt)
        acts[("branch UNet, first step with gradients", ckpt)] = unet_pass(unet, adapter, args.branch // 8, ckpt)
        acts[("branch UNet, each later step", ckpt)] = unet_pass(unet, adapter, args.branch // 8, ckpt, True)
        acts[("VAE decode", ckpt)] = vae_decode(vae, args.branch // 8, ckpt)
    print(f"## Stage-2 memory estimate (meta-device count; target {args.target} px, branch {args.branch} px, "
          f"batch {args.batch}, k = {args.k})\n")  # fmt: skip
    print("| resident weights | GB |\n| --- | ---: |")
    for k, v in weights.items():
        print(f"| {k} | {v / GB:.2f} |")
    print(
        "\n| activations saved for backward, per sample | no checkpointing GB | checkpointing GB (+ recompute peak) |"
    )
    print("| --- | ---: | ---: |")
    parts = ("L_diff UNet", "branch UNet, first step with gradients", "branch UNet, each later step", "VAE decode")
    for part in parts:
        (plain, _), (ck, peak) = acts[(part, False)], acts[(part, True)]
        print(f"| {part} | {plain / GB:.2f} | {ck / GB:.2f} (+ {peak / GB:.2f}) |")
    fixed = sum(v for k, v in weights.items() if not k.startswith(("second", "or its")))
    head = "| lightning_weights | UNet ckpt | VAE ckpt | weights | activations | recompute peak | total |"
    print("\n" + head)
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for lightning, extra in (("unet", unet_b), ("lora", LIGHTNING_LORA_BYTES)):
        for unet_ck, vae_ck in ((False, False), (True, False), (True, True)):
            per = {p: acts[(p, unet_ck)] for p in parts[:3]} | {"VAE decode": acts[("VAE decode", vae_ck)]}
            later = (args.k - 1) * per["branch UNet, each later step"][0]
            act = args.batch * (per["L_diff UNet"][0] + per[parts[1]][0] + later + per["VAE decode"][0])
            peak = args.batch * max(v[1] for v in per.values())
            total = fixed + extra + act + peak
            flags = f"| {lightning} | {'on' if unet_ck else 'off'} | {'on' if vae_ck else 'off'} |"
            print(f"{flags} {(fixed + extra) / GB:.1f} | {act / GB:.1f} | {peak / GB:.1f} | **{total / GB:.1f} GB** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
