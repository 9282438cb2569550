"""Training callbacks: a sample grid in TensorBoard and the adapter export at the end of training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from PIL import Image

from bolid.data import batch_crops

log = logging.getLogger(__name__)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` steps, log rows of ``reference | generated with ID | generated without ID``
    to TensorBoard and to ``<default_root_dir>/samples/step_NNNNNNN.png``.

    The first training batch that reaches a logging step gives the references and captions, and is
    kept; generation uses the Lightning branch's sampler with a fixed seed, so successive grids differ
    only by what the adapter learned.

    Args:
        every_n_steps: interval in optimiser steps (0 = use the module's ``sample_every_n_steps``).
        num_rows: references per grid.
        resolution: image side of the samples (default: the training resolution).
    """

    def __init__(self, every_n_steps: int = 0, num_rows: int = 4, resolution: int | None = None):
        self.every_n_steps, self.num_rows, self.resolution = every_n_steps, num_rows, resolution
        self._batch: dict | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_steps or pl_module.hparams.sample_every_n_steps
        if not every or trainer.global_step % every or not trainer.is_global_zero:
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches:  # only once per optimiser step
            return
        if self._batch is None:
            self._batch = {k: (v[: self.num_rows] if hasattr(v, "__getitem__") else v) for k, v in batch.items()}
        grid = self.render(pl_module, self._batch)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image("samples/reference|with_id|without_id", grid, trainer.global_step)
        # Also as a PNG, for a look without TensorBoard.
        folder = Path(trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(folder / f"step_{trainer.global_step:07d}.png")

    @torch.no_grad()
    def render(self, module, batch: dict) -> torch.Tensor:
        """A ``(3, rows*R, 3*R)`` uint8 grid."""
        was_training = module.training
        module.eval()
        try:
            res = self.resolution or batch["pixels"].shape[-1]
            ref = batch["ref_image"].to(module.device)
            embeds = module.adapter.encode_crops(batch_crops(batch).to(module.device))
            zero = embeds.negative()
            steps = module.hparams.sample_steps
            gen = lambda e: module.lightning_branch(  # noqa: E731 - same seed for both rows
                e, list(batch["caption"]), torch.Generator(module.device).manual_seed(0), res, steps
            )
            with_id, without = gen(embeds), gen(zero)
            ref_img = torch.nn.functional.interpolate(ref.float() * 2 - 1, size=(res, res), mode="bilinear")
            rows = torch.cat([ref_img, with_id, without], dim=-1)  # (B, 3, R, 3R)
            return _to_uint8(torch.cat(list(rows), dim=-2))  # (3, B*R, 3R)
        finally:
            module.train(was_training)


class AdapterExport(L.Callback):
    """At the end of ``fit``, write the adapter folder (and its EMA twin) beside the checkpoints.

    Args:
        dirpath: output folder (default: ``<log_dir>/adapter``).
        export_diffusers: also write the stock-diffusers IP-Adapter files (``bolid_face`` / ``bolid_body``).
    """

    def __init__(self, dirpath: str | None = None, export_diffusers: bool = True):
        self.dirpath, self.export_diffusers = dirpath, export_diffusers

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        out = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "adapter")
        pl_module.save_adapter(out)
        if self.export_diffusers:
            pl_module.adapter.export_diffusers(out / "diffusers")
        if pl_module.ema_state_dict() is not None:
            pl_module.save_adapter(out.with_name(out.name + "_ema"), ema=True)
        log.info("adapter written to %s", out)
