"""Reference photos: photo -> the person to keep -> face and body vectors; several photos -> one identity.

A :class:`Reference` is one photo and the person in it that BoLID conditions on, found by a
:class:`bolid.pose.PoseExtractor` (RT-DETR + ViTPose by default). The rules, which every caller shares:

* no person found: :class:`NoPersonError`, naming the photo and the detector threshold;
* several persons: the largest box is used, and the log says so (how many were found, which box won);
* face not visible (fewer than 2 face keypoints above the score threshold): the reference still counts;
  its face term is dropped and its body term is used.

:func:`encode_references` combines several references of one person by the **mean of their embedding
vectors**, per modality (:meth:`bolid.adapter.IdentityEmbeds.mean`): the face vector averages the
references whose face is visible, the body vector averages all of them. The result is one face vector
and one body vector, i.e. the same number of tokens as a single reference. The face and person crops come
from :func:`bolid.crops.reference_crops`, the function the training data loader uses too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from bolid.adapter import BodyConditionModule, IdentityEmbeds
from bolid.crops import MAX_REFERENCE_SIDE, ReferenceCrops, reference_crops
from bolid.images import load_image
from bolid.pose import Person, PoseExtractor

log = logging.getLogger(__name__)


class NoPersonError(ValueError):
    """A reference photo in which the pose model finds no person."""


@dataclass
class Reference:
    """One reference photo and the person in it that BoLID conditions on."""

    image: Image.Image
    person: Person
    name: str
    num_persons: int = 1

    @property
    def face_visible(self) -> bool:
        return self.person.face_box() is not None

    def crops(self, size: int, min_score: float = 0.3, max_side: int = MAX_REFERENCE_SIDE) -> ReferenceCrops:
        """Face and person crops at the encoder's ``size``, cut by :func:`bolid.crops.reference_crops`, the
        function the training data loader uses too."""
        return reference_crops(self.image, self.person.keypoints, self.person.box, size, min_score, max_side)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "size": list(self.image.size),
            "persons_found": self.num_persons,
            "person": self.person.to_dict(),
            "face_visible": self.face_visible,
        }


def _name(src) -> str:
    return str(src) if isinstance(src, (str, Path)) else f"<{type(src).__name__} #{id(src) % 10000}>"


def load_references(
    images: Sequence[str | Path | bytes | Image.Image], extractor: PoseExtractor, threshold: float | None = None
) -> list[Reference]:
    """Find the person to keep in each reference photo.

    Args:
        images: photo paths, encoded bytes or PIL images (EXIF orientation is applied).
        extractor: the pose model.
        threshold: the extractor's detection threshold, only to name it in the error message.

    Raises:
        ValueError: no images.
        NoPersonError: a photo shows no person.
        bolid.images.ImageError: a file is not a readable image.
    """
    if not images:
        raise ValueError("at least one reference photo is needed")
    names = [_name(im) for im in images]
    pil = [load_image(im) for im in images]
    found = extractor(pil)
    refs = []
    for name, image, persons in zip(names, pil, found, strict=True):
        if not persons:
            at = f" at detection threshold {threshold}" if threshold is not None else ""
            raise NoPersonError(
                f"reference {name}: no person found{at}; use a photo in which the person is clearly visible"
            )
        if len(persons) > 1:
            box = ", ".join(f"{v:.0f}" for v in persons[0].box)
            log.warning(
                "reference %s: %d persons found; using the largest (box %s, area %.0f px)",
                name,
                len(persons),
                box,
                persons[0].area,
            )
        ref = Reference(image, persons[0], name, len(persons))
        if not ref.face_visible:
            log.warning("reference %s: face not visible; its face term is dropped, its body term is used", name)
        refs.append(ref)
    return refs


def encode_references(adapter: BodyConditionModule, references: Sequence[Reference]) -> IdentityEmbeds:
    """Face and body vectors of one person from several references: per-modality mean (see module docstring)."""
    if not references:
        raise ValueError("at least one reference is needed")
    device = adapter.device
    size, min_score = adapter.image_encoder.image_size, adapter.config.min_score
    rows = []
    with torch.no_grad():
        for ref in references:  # one at a time: references differ in size
            rows.append(adapter.encode_crops(ref.crops(size, min_score).to(device)))
    stacked = IdentityEmbeds(
        torch.cat([r.face for r in rows]), torch.cat([r.body for r in rows]), torch.cat([r.face_visible for r in rows])
    )
    return stacked.mean()
