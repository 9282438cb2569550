"""Identity-pair training data over BoLID's WebDataset shards (format: :mod:`bolid.shards`).

Training needs pairs of the *same person in different photos*: the reference gives the face and
body conditions, the target gives the latents and the caption. The shards keep each identity's
samples contiguous, so pairs are formed in the stream, with no index lookups and no second read:

    shard list -> (resample) -> split_by_node -> split_by_worker -> tarfile_to_samples
    -> decode -> keep this split's identities -> identity_pairs -> to_training_pair -> batch -> with_epoch

:func:`identity_pairs` buffers the samples of one identity as they stream past and, when the identity
ends, emits every sample once as a *target* with a reference drawn from the *other* samples of that
identity (never itself, never another person). Each sample is read from disk once per epoch; an
identity with a single photo in a worker's slice is counted and skipped.

The target is resized (short side to ``resolution``) and cropped (random or centre) to a square, and
SDXL's size/crop conditioning is computed for it as SDXL was trained: ``time_ids = (orig_h, orig_w,
crop_top, crop_left, target_h, target_w)``, with the *original* size of the photo before any resizing,
and the crop's top-left corner in the resized image (mirrored for a horizontal flip, as the diffusers
SDXL training scripts do); ``keypoints`` holds the target's keypoints moved into that crop
(:func:`crop_keypoints`, for the body-weighted diffusion loss). The reference's face and person crops are cut
from the *stored* image at the resolution inference uses, by the same function inference calls
(:func:`bolid.crops.reference_crops`), at the
image encoder's input size ``crop_size``; the batch holds ``ref_face``, ``ref_person``, ``ref_keypoints`` (in
person-crop pixels), ``ref_face_visible`` (see :func:`batch_crops`) and ``ref_image``, the whole reference
letterboxed into a ``crop_size`` square (for the EVA-CLIP image loss and the sample grid).

DDP: shards are split by node and by worker, and every rank's epoch is cut to the same number of
batches with ``with_epoch`` so ranks stay in step. With ``resampled=True`` shards are drawn with
replacement (an endless stream, the usual choice for large multi-node runs); without it each rank reads
its own shards once per epoch and no sample is read twice.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bolid.crops import ReferenceCrops, reference_crops

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ transforms


@dataclass(frozen=True)
class CropParams:
    """Where a target crop came from, for SDXL's micro-conditioning."""

    original_size: tuple[int, int]  # (h, w) of the photo before any resizing
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]  # (h, w) of the crop

    def time_ids(self) -> torch.Tensor:
        """SDXL ``add_time_ids``: original size, crop top-left, target size; ``(6,)`` float."""
        return torch.tensor([*self.original_size, *self.crop_top_left, *self.target_size], dtype=torch.float32)


#: Validation and test draw their pairs, batches and noise with this seed whatever the run's seed
#: (``seed_everything``): runs of different seeds are scored on the same evaluation.
EVAL_SEED = 0


def _resized_size(w: int, h: int, resolution: int) -> tuple[int, int]:
    """``(width, height)`` after :func:`resize_and_crop`'s resize: the short side to ``resolution``."""
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def resize_and_crop(
    image: Image.Image,
    resolution: int,
    original_size: tuple[int, int] | None = None,
    random_crop: bool = True,
    flip: bool = False,
    rng: random.Random | None = None,
) -> tuple[torch.Tensor, CropParams]:
    """Resize so the short side is ``resolution``, crop a ``resolution`` square, optionally flip.

    Args:
        image: the stored image (RGB).
        resolution: output side in pixels.
        original_size: ``(h, w)`` of the photo before the datapipe's resize; defaults to ``image``'s size.
        random_crop: random crop position (training) or centre crop (validation).
        flip: mirror horizontally; the recorded crop ``left`` is mirrored too.
        rng: random source for the crop.

    Returns:
        ``(3, resolution, resolution)`` tensor in ``[-1, 1]`` and the :class:`CropParams`.
    """
    rng = rng or random.Random()
    w, h = image.size
    nw, nh = _resized_size(w, h, resolution)
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=2.0)
    if random_crop:
        top, left = rng.randint(0, nh - resolution), rng.randint(0, nw - resolution)
    else:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = nw - left - resolution
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    params = CropParams(original_size or (h, w), (top, left), (resolution, resolution))
    return arr, params


def crop_keypoints(keypoints: np.ndarray, image_size: tuple[int, int], crop: CropParams, flip: bool) -> torch.Tensor:
    """Keypoints ``(17, 3)`` of a stored image ``(w, h)`` = ``image_size``, moved into the training crop that
    :func:`resize_and_crop` cut from it (scores kept). A flip mirrors x; left/right labels are not swapped."""
    w, h = image_size
    nw, nh = _resized_size(w, h, crop.target_size[1])
    top, left = crop.crop_top_left
    kp = torch.from_numpy(np.asarray(keypoints, dtype=np.float32).copy())
    x, y = kp[:, 0] * (nw / w), kp[:, 1] * (nh / h)
    kp[:, 0] = (nw - left - x) if flip else (x - left)
    kp[:, 1] = y - top
    return kp


def letterbox(
    image: Image.Image, keypoints: np.ndarray, box: np.ndarray | None, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit ``image`` into a ``size`` square (aspect kept, black bars), mapping keypoints and box with it.

    Returns:
        pixels ``(3, size, size)`` in ``[0, 1]``, keypoints ``(17, 3)`` and box ``(4,)`` in the square's pixels.
    """
    w, h = image.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    ox, oy = (size - nw) // 2, (size - nh) // 2
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=2.0), (ox, oy))
    pixels = torch.from_numpy(np.asarray(canvas, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    kp = torch.as_tensor(np.asarray(keypoints, np.float32)).clone()
    kp[:, 0] = kp[:, 0] * (nw / w) + ox
    kp[:, 1] = kp[:, 1] * (nh / h) + oy
    if box is None:
        b = torch.tensor([0.0, 0.0, float(size), float(size)])
    else:
        b = torch.as_tensor(np.asarray(box, np.float32)).clone()
        b[[0, 2]] = b[[0, 2]] * (nw / w) + ox
        b[[1, 3]] = b[[1, 3]] * (nh / h) + oy
    return pixels, kp, b


# -------------------------------------------------------------------------------------------- pairing


class RateLimitedWarning:
    """Count events and log at most one warning per ``interval`` seconds (corrupt samples, singletons)."""

    def __init__(self, what: str, interval: float = 30.0):
        self.what, self.interval, self.count, self._last = what, interval, 0, -math.inf

    def __call__(self, detail: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log.warning("%s (%d so far): %s", self.what, self.count, detail)


def identity_pairs(
    samples: Iterable[dict], rng: random.Random, max_group: int = 2048, on_singleton=None
) -> Iterator[tuple[dict, dict]]:
    """Turn a stream of identity-grouped samples into ``(reference, target)`` pairs.

    Every sample is the target exactly once; its reference is drawn uniformly from the *other* samples
    of the same identity in the group. Groups longer than ``max_group`` are paired in chunks (bounded
    memory); a group of one cannot be paired and is reported to ``on_singleton``.

    Args:
        samples: dicts with at least ``"identity"`` and ``"__key__"``.
        rng: random source (seeded per worker by the caller).
        max_group: the most samples held in memory at once.
        on_singleton: called with the identity of a group that had a single sample.
    """
    group: list[dict] = []

    def flush() -> Iterator[tuple[dict, dict]]:
        if len(group) == 1:
            if on_singleton is not None:
                on_singleton(group[0]["identity"])
            return
        order = list(range(len(group)))
        rng.shuffle(order)
        for i in order:
            j = rng.randrange(len(group) - 1)
            j = j + 1 if j >= i else j  # uniform over the others, never i itself
            yield group[j], group[i]

    keys: set[str] = set()
    reads: dict[str | None, int | None] = {}  # shard url -> which read of it the group holds
    for sample in samples:
        # A group is one identity's consecutive samples. With resampling the same shard can be read again while
        # its identity's group is open (``__read__`` numbers the reads): that starts a new group, so a photo is
        # never its own reference.
        url, read = sample.get("__url__"), sample.get("__read__")
        if group and (
            sample["identity"] != group[0]["identity"]
            or (url in reads and reads[url] != read)
            or len(group) >= max_group
        ):
            yield from flush()
            group, keys, reads = [], set(), {}
        reads[url] = read
        if sample["__key__"] in keys:  # the same photo twice in a group (a duplicated sample): keep it once
            continue
        keys.add(sample["__key__"])
        group.append(sample)
    if group:
        yield from flush()


# -------------------------------------------------------------------------------------------- dataset


def _decode(sample: dict) -> dict:
    """Raw tar sample -> ``{"__key__", "identity", "image", "meta"}``; raises on a corrupt sample."""
    from bolid.images import load_image
    from bolid.shards import ShardSample

    meta = ShardSample.from_json(sample["json"])
    image = load_image(sample["jpg"])
    if image.size != (meta.width, meta.height):
        raise ValueError(f"sample {sample['__key__']}: jpg is {image.size}, json says {(meta.width, meta.height)}")
    return {
        "__key__": sample["__key__"],
        "__url__": sample.get("__url__"),
        "identity": meta.identity,
        "image": image,
        "meta": meta,
    }


def to_training_pair(
    ref: dict,
    target: dict,
    resolution: int,
    crop_size: int,
    random_crop: bool,
    flip: bool,
    rng: random.Random,
    min_score: float = 0.3,
) -> dict:
    """One training example from a decoded (reference, target) pair; see the module docstring for the fields."""
    tmeta, rmeta = target["meta"], ref["meta"]
    original = (tmeta.original_height, tmeta.original_width)
    pixels, crop = resize_and_crop(target["image"], resolution, original, random_crop, flip, rng)
    target_keypoints = crop_keypoints(tmeta.keypoints_array(), target["image"].size, crop, flip)
    keypoints = rmeta.keypoints_array()
    # The face and person crops come from the stored image at full resolution, through the function inference uses.
    crops = reference_crops(ref["image"], keypoints, np.asarray(rmeta.box), crop_size, min_score)
    ref_image, _, _ = letterbox(ref["image"], keypoints, None, crop_size)
    return {
        "pixels": pixels,
        "time_ids": crop.time_ids(),
        "flip": torch.tensor(flip),
        "keypoints": target_keypoints,
        "caption": tmeta.caption,
        "ref_face": crops.face[0],
        "ref_person": crops.person[0],
        "ref_keypoints": crops.keypoints[0],
        "ref_face_visible": crops.face_visible[0],
        "ref_image": ref_image,
        "identity": target["identity"],
        "key": target["__key__"],
        "ref_key": ref["__key__"],
    }


def batch_crops(batch: dict) -> ReferenceCrops:
    """The references' :class:`bolid.crops.ReferenceCrops` of a collated batch."""
    return ReferenceCrops(batch["ref_face"], batch["ref_person"], batch["ref_keypoints"], batch["ref_face_visible"])


def collate_pairs(items: list[dict]) -> dict:
    """Stack tensors, keep strings as lists."""
    out: dict = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


class PairDataset(torch.utils.data.IterableDataset):
    """The (reference, target) stream of one split, already batched; see the module docstring.

    Build it with :meth:`from_index`. Each DataLoader worker of each rank reads a disjoint slice of the
    shard list; the number of batches per epoch per rank is fixed up front (``with_epoch``-style) so
    that DDP ranks stay in step.
    """

    def __init__(
        self,
        shards: list[str],
        identities: set[str],
        num_samples: int,
        num_identities: int,
        train: bool,
        resolution: int,
        crop_size: int,
        batch_size: int,
        seed: int = 0,
        resampled: bool = False,
        random_crop: bool = True,
        random_flip: bool = False,
        shuffle_buffer: int = 256,
        world_size: int = 1,
        epoch_pairs: int | None = None,
        min_score: float = 0.3,
    ):
        super().__init__()
        self.shards, self.identities = list(shards), set(identities)
        self.num_samples, self.num_identities = num_samples, num_identities
        self.train, self.resolution, self.batch_size = train, resolution, batch_size
        self.crop_size, self.min_score = crop_size, min_score
        self.seed, self.resampled, self.random_crop, self.random_flip = seed, resampled, random_crop, random_flip
        # Evaluation splits are mixed too, with the same seed at every validation (their epoch stays 0): the same
        # pairs in the same batches each time, and batches of several people for val/ref_gain.
        self.shuffle_buffer = shuffle_buffer
        self.world_size = world_size
        pairs = epoch_pairs if epoch_pairs is not None else num_samples // max(world_size, 1)
        self.batches_per_epoch = max(1, pairs // batch_size) if num_samples else 0
        self.epoch, self.skip = 0, 0
        self.corrupt = RateLimitedWarning("skipped corrupt shard samples")
        self.singletons = RateLimitedWarning("skipped identities with a single photo in a worker's shards")
        if world_size > 1 and not resampled and train:
            log.warning(
                "DDP without resampling: ranks read different shards and may hold different sample counts; every "
                "rank is cut to %d batches per epoch. Set data.resampled: true for large multi-GPU runs.",
                self.batches_per_epoch,
            )

    @classmethod
    def from_index(cls, index, split: str, **kwargs) -> PairDataset:
        """The dataset of ``split`` (train / validation / test) from a :class:`bolid.shards.ShardIndex`."""
        identities = index.identities_in(split)
        paths = index.shard_paths(split)
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"index.json lists shards that do not exist, e.g. {missing[0]}")
        num_samples = sum(int(index.identities[i]["count"]) for i in identities)
        return cls(paths, set(identities), num_samples, len(identities), **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Next iteration yields epoch ``epoch``'s batches, without its first ``skip`` (mid-epoch resume)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _shard_stream(self, rank: int, worker: int, workers: int, rng: random.Random) -> Iterator[dict]:
        nodes = max(self.world_size, 1)
        if self.resampled:  # endless, with replacement: every (rank, worker) draws its own sequence
            while True:
                yield {"url": rng.choice(self.shards)}
        order = list(self.shards)
        if self.train:  # the same permutation on every rank (seeded by epoch only), then split
            random.Random(self.seed * 7_919 + self.epoch).shuffle(order)
        mine = order[rank % nodes :: nodes] if len(order) >= nodes else order
        for url in mine[worker::workers]:
            yield {"url": url}

    def _corrupt(self, exn: Exception) -> bool:
        self.corrupt(f"{type(exn).__name__}: {exn}")
        return True  # continue

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank = (
            torch.distributed.get_rank()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 0
        )
        rng = random.Random(hash((self.seed, self.epoch, rank, worker)) & 0xFFFFFFFF)
        quota = self.batches_per_epoch // workers + (1 if worker < self.batches_per_epoch % workers else 0)
        # Batches are dealt to workers round-robin; a mid-epoch resume skips this worker's share of `skip`.
        skip = self.skip // workers + (1 if worker < self.skip % workers else 0)
        if quota - skip <= 0:
            return

        def samples() -> Iterator[dict]:
            # One shard at a time, each read numbered: with resampling the same shard can be read twice in a row,
            # and pairing must see two separate groups then (a photo is never its own reference).
            for read, shard in enumerate(self._shard_stream(rank, worker, workers, rng)):
                for raw in wds.tarfile_samples([shard], handler=self._corrupt):
                    try:
                        if "jpg" not in raw or "json" not in raw:
                            raise ValueError(f"sample {raw.get('__key__')} lacks jpg or json")
                        sample = _decode(raw)
                    except Exception as e:  # noqa: BLE001 - any broken sample is skipped and counted
                        self._corrupt(e)
                        continue
                    if sample["identity"] in self.identities:
                        sample["__read__"] = read
                        yield sample

        pairs = identity_pairs(samples(), rng, on_singleton=lambda ident: self.singletons(ident))
        if self.shuffle_buffer > 1:
            pairs = _shuffled(pairs, self.shuffle_buffer, rng)
        batch: list[dict] = []
        produced = 0
        for ref, target in pairs:
            flip = self.random_flip and rng.random() < 0.5
            batch.append(
                to_training_pair(
                    ref, target, self.resolution, self.crop_size, self.random_crop, flip, rng, self.min_score
                )
            )
            if len(batch) == self.batch_size:
                if produced >= skip:  # a skipped batch is still drawn, so the RNG stream stays the same
                    yield collate_pairs(batch)
                batch, produced = [], produced + 1
                if produced >= quota:
                    return


def _shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle buffer (mixes pairs across identities)."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf
