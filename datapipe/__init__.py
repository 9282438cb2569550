"""datapipe: crawled or own photos -> filtered, captioned, keypointed, identity-grouped WebDataset shards.

BoLID trains on pairs of photos of one person (a reference and a target from another angle),
so the shards keep each identity's photos together, and every sample carries its caption and
keypoints so that training never runs a detector. ``python -m datapipe build`` runs:

1. ingest and validate (:mod:`datapipe.ingest`): header-only size check, decode check, EXIF
   orientation, RGB, exact and near-duplicate removal; images stored resized (:mod:`datapipe.resize`);
2. person and keypoints (:mod:`datapipe.annotate`): RT-DETR + ViTPose or BlazePose, batched;
3. identity filter: at least ``identities.min_photos`` accepted photos per person;
4. captions (:mod:`datapipe.annotate`): BLIP-2, batched;
5. shards (:mod:`datapipe.writer`; the format is documented in :mod:`bolid.shards`): WebDataset tars, ``index.json``
   with a train/validation/test split by identity, ``stats.json`` (:mod:`datapipe.stats`).

Runs are restartable and idempotent (:mod:`datapipe.build`, :mod:`datapipe.cache`) and scale
out over machines by identity (``--num-parts N --part i``, then :mod:`datapipe.index`'s merge).
Settings: :mod:`datapipe.config` and ``configs/shards/*.yaml``.
"""
