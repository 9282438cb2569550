"""Does lowering ``L_id`` move the body, or only what the loss's keypoint model reads?

Optimises a BoLID-mini adapter on ``L_id`` alone, for one fixed batch of references and fixed branch noise,
and reads the generated images before and after with both mini keypoint models: the training one (which
``L_id`` uses) and the independent evaluation one (Body Sim's). If only the training reader sees the loss
fall, the adapter learned to steer that model, not to draw the reference's body
(``docs/mini/README.md``). Needs ``make mini``'s shards and stage-1 adapter::

    python -m demo.mini_probe --steps 80 --batch 32
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.mini_probe", description=__doc__.split("\n")[0])
    p.add_argument("--adapter", default="runs/mini/stage1/adapter", help="adapter to start from")
    p.add_argument("--shards", default="runs/mini/shards", help="BoLID-mini shards (make mini)")
    p.add_argument("--steps", type=int, default=80, help="optimisation steps on the fixed batch")
    p.add_argument("--batch", type=int, default=32, help="references in the fixed batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from tqdm import tqdm

    from bolid.kits import mini
    from bolid.losses import DifferentiablePose, proportion_identity_loss
    from bolid.train.datamodule import PairDataModule
    from bolid.train.module import BoLIDTrainingModule

    torch.manual_seed(args.seed)
    module = BoLIDTrainingModule(components="mini", stage=2, init_adapter=args.adapter, w_id=1.0, w_clip=0.0,
                                 lightning_steps=4, grad_steps=4, branch_resolution=64, min_score=0.05)  # fmt: skip
    cfg = module.adapter.config
    if cfg.body_shape != "proportions":
        p.error(f"{args.adapter} reads bodies with body_shape={cfg.body_shape!r}; this probe is for 'proportions'")
    data = PairDataModule(shards=args.shards, resolution=64, batch_size=args.batch, num_workers=0, crop_size=None)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    stats = torch.tensor(cfg.proportion_mean), torch.tensor(cfg.proportion_std)
    eval_reader = DifferentiablePose(*mini.build_vitpose(True, "eval"), min_score=0.05)
    readers = {"training reader": module.pose, "evaluation reader": eval_reader}

    @torch.no_grad()
    def read(noise_seed: int) -> dict[str, float]:
        images = module.lightning_branch(
            module._identity(batch), batch["caption"], torch.Generator().manual_seed(noise_seed), 64, 4, 4
        )
        return {
            name: proportion_identity_loss(reader(images), batch["ref_keypoints"], *stats, 0.05)[0].item()
            for name, reader in readers.items()
        }

    fixed, fresh = 123, 999
    before = {"fixed noise": read(fixed), "fresh noise": read(fresh)}
    opt = torch.optim.Adam([q for q in module.parameters() if q.requires_grad], lr=args.lr)
    for _ in tqdm(range(args.steps), desc="L_id on the fixed batch"):
        loss = module.id_losses(batch, torch.Generator().manual_seed(fixed))["loss_id"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {"fixed noise": read(fixed), "fresh noise": read(fresh)}
    print(f"L_id (1 - cos of z-scored proportions), {args.batch} references, {args.steps} steps at lr {args.lr}:")
    print("| noise | training reader, before | after | evaluation reader, before | after |")
    print("|---|---|---|---|---|")
    for noise in before:
        b, a = before[noise], after[noise]
        print(f"| {noise} | {b['training reader']:.3f} | {a['training reader']:.3f} | "
              f"{b['evaluation reader']:.3f} | {a['evaluation reader']:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
