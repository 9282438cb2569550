"""Face Sim: the ArcFace cosine between the face in a generated image and the face in the reference photo.

The peers report it beside CLIP-T and CLIP-I (PuLID's table: IP-Adapter FaceID 0.619, InstantID 0.725,
PuLID 0.733 on DivID-120), and it shows whether adding body identity costs face identity.

Definition: the largest face of each image (by box area) is detected and embedded by an InsightFace pack
(:class:`bolid.face_id.FaceAnalyzer`, ``buffalo_l`` by default); Face Sim is the cosine of the two 512-d
embeddings, in [-1, 1]. As with Body Sim, a pair is a **failure**, counted and never silently dropped, when
the generated image has no face (``no_face``) or the reference has none (``no_reference_face``);
``compute()`` gives the mean over scored pairs and the failure rate, and ``failure_score`` (e.g. ``0.0``)
counts failures in the mean at that value instead.

Which face model scores matters: PuLID evaluates with a face model that neither its encoder nor its loss
uses, so a method cannot score by fooling its own encoder. InstantID and PuLID encode with ``antelopev2``
and IP-Adapter FaceID with ``buffalo_l``; whichever pack Face Sim uses is the encoder of some row, and the
results record which (``face_sim_model``). ``buffalo_l`` (ArcFace R50 on WebFace600K) is the default since
it differs from the encoder of InstantID and PuLID; read FaceID's Face Sim with that in mind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from bolid.face_id import FaceAnalyzer

FACE_FAILURE_REASONS = ("no_face", "no_reference_face")
EMBED_DIM = 512


def _is_embeddings(x) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[-1] == EMBED_DIM


class FaceSimilarity(Metric):
    """Face Sim: cosine of ArcFace embeddings of the largest face, generated vs reference image.

    ``update(generated, reference)`` takes two equally long batches, each PIL images or embeddings already
    computed by :meth:`embeddings` (an ``(N, 512)`` tensor, NaN rows for "no face"), so a reference used with
    many generated images is embedded once.

    ``compute()`` returns ``{"face_sim": mean over scored pairs, "failure_rate": failed / all pairs}``.

    Args:
        faces: a :class:`bolid.face_id.FaceAnalyzer`, or a zero-argument callable building one on first use.
        failure_score: ``None`` leaves failures out of the mean (counted in ``failure_rate``); a number counts
            each failure at that value.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    def __init__(self, faces: FaceAnalyzer | Callable[[], FaceAnalyzer], failure_score: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self._faces = faces if isinstance(faces, FaceAnalyzer) else None
        self._factory = None if self._faces is not None else faces
        self.failure_score = failure_score
        self.add_state("similarity_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_scored", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("num_pairs", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("num_failed", torch.zeros(len(FACE_FAILURE_REASONS), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("values", [], dist_reduce_fx="cat")

    @property
    def faces(self) -> FaceAnalyzer:
        if self._faces is None:
            self._faces = self._factory()
        return self._faces

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if state.get("_factory") is not None:  # onnxruntime sessions do not pickle; rebuilt on demand
            state["_faces"] = None
        return state

    def embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(N, 512)`` unit ArcFace embeddings of the largest face per image; NaN rows where there is none."""
        out = torch.full((len(images), EMBED_DIM), float("nan"))
        for i, im in enumerate(images):
            face = self.faces.largest(im)
            if face is not None:
                out[i] = torch.from_numpy(np.asarray(face.normed_embedding, np.float32))
        return out

    def update(self, generated, reference) -> None:
        gen = generated if _is_embeddings(generated) else self.embeddings(generated)
        ref = reference if _is_embeddings(reference) else self.embeddings(reference)
        if gen.shape[0] != ref.shape[0]:
            raise ValueError(f"generated and reference batches differ in size: {gen.shape[0]} vs {ref.shape[0]}")
        gen, ref = gen.double().cpu(), ref.double().cpu()
        reason = torch.full((len(gen),), -1, dtype=torch.long)
        reason[torch.isnan(ref).any(-1)] = 1
        reason[torch.isnan(gen).any(-1)] = 0
        ok = reason < 0
        cos = torch.nn.functional.cosine_similarity(torch.nan_to_num(gen), torch.nan_to_num(ref), dim=-1)
        sim = torch.where(ok, cos, torch.full_like(cos, float("nan"))).float()
        dev = self.similarity_sum.device
        self.similarity_sum += sim[ok].double().sum().to(dev)
        self.num_scored += int(ok.sum())
        self.num_pairs += len(sim)
        self.num_failed += torch.bincount(reason[~ok], minlength=len(FACE_FAILURE_REASONS)).to(dev)
        self.values.append(sim.to(dev))

    def compute(self) -> dict[str, torch.Tensor]:
        failed = self.num_failed.sum()
        total, count = self.similarity_sum, self.num_scored
        if self.failure_score is not None:
            total, count = total + failed * self.failure_score, count + failed
        nan = torch.tensor(float("nan"), device=total.device)
        return {
            "face_sim": (total / count).float() if count > 0 else nan,
            "failure_rate": (failed / self.num_pairs).float() if self.num_pairs > 0 else nan,
        }

    def failures(self) -> dict[str, int]:
        """Failure counts by reason (see :data:`FACE_FAILURE_REASONS`)."""
        return {name: int(n) for name, n in zip(FACE_FAILURE_REASONS, self.num_failed, strict=True)}

    def per_sample(self) -> torch.Tensor:
        """Similarity of every pair in update order, ``(N,)``; NaN for failures (or ``failure_score``)."""
        values = dim_zero_cat(self.values) if len(self.values) else torch.zeros(0)
        if self.failure_score is not None:
            values = torch.nan_to_num(values, nan=self.failure_score)
        return values
