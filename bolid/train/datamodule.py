"""LightningDataModule over BoLID's identity-grouped shards: (reference, target) pairs per split.

The stream itself (stage list, pairing, SDXL crop conditioning) is :mod:`bolid.data`; the shard
format is documented once, in :mod:`bolid.shards`. Train, validation and test identities come
from the split in ``index.json`` (held-out *people*, not held-out photos).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from bolid.data import EVAL_SEED, PairDataset, collate_pairs

log = logging.getLogger(__name__)


class PairDataModule(L.LightningDataModule):
    """Pairs of photos of the same person for training, validation and testing.

    Args:
        shards: folder holding the shards and ``index.json`` (the datapipe's output).
        resolution: side of the square training crop (SDXL: 1024).
        crop_size: side of the reference's face and person crops, cut from the stored image at full resolution
            (:mod:`bolid.crops`); ``null`` = the model's image encoder input size (336 for EVA-CLIP), set by the
            model when training starts. A value that differs from the encoder's is an error.
        batch_size: pairs per batch per device.
        num_workers: DataLoader workers per device; shards are split across them.
        resampled: draw shards with replacement (endless stream, cut into epochs by ``epoch_pairs``);
            otherwise each epoch reads every sample of this rank's shards once.
        epoch_pairs: pairs per epoch per rank (default: the split's sample count / world size).
        random_crop: random crop position for training targets (centre crop otherwise).
        random_flip: probability-0.5 horizontal flip of training targets.
        shuffle_buffer: pairs held for shuffling across identities (validation and test: the same order at
            every validation).
        seed: training seed (`seed_everything`); epoch ``e`` of worker ``w`` on rank ``r`` uses a seed derived from
            all four. Validation and test use :data:`bolid.data.EVAL_SEED` whatever it is.
        val_pairs: pairs per validation/test pass (default: the split's sample count).
    """

    def __init__(
        self,
        shards: str,
        resolution: int = 1024,
        crop_size: int | None = None,
        batch_size: int = 1,
        num_workers: int = 4,
        resampled: bool = False,
        epoch_pairs: int | None = None,
        random_crop: bool = True,
        random_flip: bool = False,
        shuffle_buffer: int = 256,
        seed: int = 0,
        val_pairs: int | None = None,
    ):
        super().__init__()
        if resolution < 8 or resolution % 8:
            raise ValueError(f"data.resolution must be a positive multiple of 8, got {resolution}")
        if batch_size < 1 or num_workers < 0 or (crop_size is not None and crop_size < 8):
            raise ValueError("data.batch_size must be >= 1, data.num_workers >= 0 and data.crop_size >= 8 or null")
        if epoch_pairs is not None and epoch_pairs < 1:
            raise ValueError(f"data.epoch_pairs must be >= 1 or null, got {epoch_pairs}")
        self.shards = Path(shards)
        self.crop_size = crop_size
        self.kw = dict(resolution=resolution, crop_size=crop_size or 336, min_score=0.3, shuffle_buffer=shuffle_buffer)
        self.seed = seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.resampled, self.epoch_pairs, self.val_pairs = resampled, epoch_pairs, val_pairs
        self.random_crop, self.random_flip = random_crop, random_flip
        self._datasets: dict[str, PairDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        from bolid.shards import read_index

        if not (self.shards / "index.json").is_file():
            raise FileNotFoundError(f"data.shards: no index.json in {self.shards}; build shards with `make shards`")
        index = read_index(self.shards)
        world = self.trainer.world_size if self.trainer is not None else 1
        for split, train in (("train", True), ("validation", False), ("test", False)):
            if split in self._datasets:
                continue
            ds = PairDataset.from_index(
                index,
                split,
                train=train,
                resampled=self.resampled and train,
                random_crop=self.random_crop and train,
                random_flip=self.random_flip and train,
                world_size=world,
                batch_size=self.batch_size,
                epoch_pairs=self.epoch_pairs if train else self.val_pairs,
                seed=self.seed if train else EVAL_SEED,
                **self.kw,
            )
            self._datasets[split] = ds
            log.info(
                "%s split: %d identities, %d samples, %d batches/epoch/rank",
                split,
                ds.num_identities,
                ds.num_samples,
                ds.batches_per_epoch,
            )

    def configure_reference_crops(self, size: int, min_score: float) -> None:
        """Cut reference crops at the image encoder's input ``size`` with the adapter's keypoint ``min_score``
        (called by the training module's ``setup``), so that training sees what inference sees."""
        if self.crop_size is not None and self.crop_size != size:
            raise ValueError(
                f"data.crop_size={self.crop_size} differs from the image encoder's input size {size}: training would "
                f"see other crops than inference; set data.crop_size to null or to {size}"
            )
        self.kw.update(crop_size=size, min_score=min_score)
        for ds in self._datasets.values():
            ds.crop_size, ds.min_score = size, min_score

    def sync_to_trainer(self) -> None:
        """Point the training stream at the trainer's position: epoch and batches already done in it.

        The position comes from ``global_step`` (restored from a checkpoint on resume), not from Lightning's
        epoch counter, so a resumed run reads exactly the batches the uninterrupted run would have read.
        Called before every iterator is created: in :meth:`train_dataloader` (first epoch of a run) and by the
        module at each epoch start.
        """
        ds = self._datasets.get("train")
        if ds is None or self.trainer is None or not ds.batches_per_epoch:
            return
        done = self.trainer.global_step * self.trainer.accumulate_grad_batches
        ds.set_position(*divmod(done, ds.batches_per_epoch))

    def _loader(self, split: str) -> DataLoader:
        ds = self._datasets[split]
        if ds.num_samples == 0:
            raise ValueError(f"the {split} split of {self.shards} is empty; check index.json's split fractions")
        workers = min(self.num_workers, max(len(ds.shards), 1))
        return DataLoader(
            ds,
            batch_size=None,  # the dataset batches itself, so every worker yields whole batches
            num_workers=workers,
            collate_fn=None,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        self.sync_to_trainer()  # after a checkpoint restore, before any worker starts
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


__all__ = ["PairDataModule", "collate_pairs"]
