"""Training-signal fidelity (issue 12): exact weights on init, shared reference crops, the person-cropped
differentiable pose, the ID chain by value (soft-argmax, keypoint mapping, body-ID and CLIP losses, the Lightning
branch against the stock pipeline), stage-2 memory options, and a mid-epoch resume."""

from __future__ import annotations

import torch

from bolid.train.module import BoLIDTrainingModule


def _module(**kw) -> BoLIDTrainingModule:
    args = dict(components="tiny", stage=2, w_id=0.3, w_clip=0.1, lightning_steps=2, grad_steps=1,
                branch_resolution=64, warmup_steps=0, lr=1e-3)  # fmt: skip
    args.update(kw)
    return BoLIDTrainingModule(**args)


# ------------------------------------------------------------------------------------ exact weights on init


def test_stage1_adapter_loads_bit_identical_into_a_bf16_stage2_module(tmp_path):
    stage1 = _module(stage=1, w_id=0.0, w_clip=0.0)
    with torch.no_grad():  # weights that bf16 cannot represent exactly
        for p in stage1.adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    saved = {k: v.clone() for k, v in stage1.adapter.adapter_state_dict().items()}
    stage1.adapter.save(tmp_path / "adapter")
    stage2 = _module(init_adapter=str(tmp_path / "adapter"), frozen_dtype="bf16")
    loaded = stage2.adapter.adapter_state_dict()
    assert loaded.keys() == saved.keys()
    for k, v in saved.items():
        assert loaded[k].dtype == torch.float32, k
        assert torch.equal(loaded[k], v), k
    # ...while the frozen parts are in bf16
    assert stage2.unet.conv_in.weight.dtype == torch.bfloat16
    assert stage2.lightning_unet.conv_in.weight.dtype == torch.bfloat16
    assert next(stage2.adapter.image_encoder.parameters()).dtype == torch.bfloat16
