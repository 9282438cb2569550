"""The three metrics of BoLID's results table as ``torchmetrics.Metric`` subclasses.

All three accumulate over batches, keep a per-sample ``values`` state for confidence intervals,
and merge across DDP ranks through torchmetrics' own sync (``sum`` and ``cat`` states only).

**Body Sim** (:class:`BodySimilarity`): how well a generated image keeps the reference person's
body. Following PuLID's practice for Face Sim, the keypoints come from a pose model that the
training loss does *not* use (BlazePose, :class:`bolid.pose.BlazePoseExtractor`, by default;
training uses ViTPose), so a model cannot score by fooling the very network it was trained on.

1. Keypoints of the largest person in each image -> the 6 pose-invariant proportions of
   :func:`bolid.body.body_features` (upper arm, forearm, thigh, shin, shoulder and hip width,
   each divided by the torso length), a keypoint counting as visible at score >= ``min_score``.
2. Standardisation: each proportion is z-scored, ``z = (p - mean) / std``, with the population
   statistics :data:`BODY_STATS_MEAN` / :data:`BODY_STATS_STD`. Raw proportions are all positive
   and of similar size, so their cosine is ~1 for any two people; after z-scoring, the vector
   says how a body *differs from the average body* (longer legs, narrower hips), which is what
   identifies it. The statistics are constants, not re-estimated per run, so numbers from
   different runs and papers stay comparable. They were measured with BlazePose (min_score 0.5)
   on the 36 labelled real full-body photos of ``../shared/testdata/fullbody`` (iPER + DeepFashion,
   30 people) by ``python bench/bench_bodysim.py --stats``.
3. Body Sim = cosine similarity of the two z-vectors over the proportions visible in *both*
   images (a masked proportion is never compared as zero). It lies in [-1, 1]; identical images
   give 1.

A pair is a **failure**, never silently dropped, when the generated image has no person
(``no_body``), the reference has none (``no_reference_body``), or fewer than ``min_features``
proportions are visible in both (``too_few_features``). :meth:`BodySimilarity.compute` returns
the mean over scored pairs and the failure rate; with ``failure_score`` set, failures enter the
mean at that value instead.

**Body Sim v2** (:class:`BodyShapeSimilarity`, an option, not the default): the likelihood ratio of
"same body" for the pose- and viewpoint-invariant shape estimates of :mod:`bolid.body_shape`, with
multi-photo references and an ``ambiguous_view`` failure. It stays an option until it beats Body Sim on
the real-photo measures of ``bench/bench_bodysim.py`` (it does not yet). :class:`BodySimilarity` is also
exported as :data:`BodyProportionSimilarity`.

**CLIP-T** (:class:`CLIPTextScore`): torchmetrics' ``CLIPScore`` between the generated image and
its prompt, ``max(100 * cos(E_img, E_text), 0)`` (PuLID reports it on this 0-100 scale).

**CLIP-I** (:class:`CLIPImageSimilarity`): cosine of the CLIP image embeddings of an image
generated *with* the identity and one generated *without* it (same prompt, same seed), in
[-1, 1]; higher means the identity disturbs the base model less. It runs through the same
torchmetrics ``CLIPScore`` code in its image-to-image mode, divided by 100 and not clipped.

CLIP models come from :func:`clip_loader`: the real ``openai/clip-vit-large-patch14`` (or a
local folder) through :mod:`bolid.components`, or the tiny kit's CLIP.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torchmetrics import Metric
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from torchmetrics.multimodal import CLIPScore
from torchmetrics.utilities import dim_zero_cat

from bolid.body import NUM_PROPORTIONS, PROPORTION_NAMES, body_features, proportion_cosine
from bolid.pose import PoseExtractor

__all__ = [
    "BODY_STATS_MEAN",
    "BODY_STATS_STD",
    "BodyProportionSimilarity",
    "BodyShapeSimilarity",
    "BodySimilarity",
    "CLIPImageSimilarity",
    "CLIPTextScore",
    "body_similarity",
    "clip_loader",
    "images_to_uint8",
    "keypoints_of",
    "proportion_stats",
]

# Population statistics of the 6 proportions (PROPORTION_NAMES order), BlazePose keypoints with
# min_score 0.5, the 36 labelled photos (30 people) of shared/testdata/fullbody.
# Measured by: python bench/bench_bodysim.py --stats
BODY_STATS_MEAN = (0.5268, 0.4673, 0.7371, 0.6529, 0.6608, 0.3643)
BODY_STATS_STD = (0.0414, 0.0269, 0.0579, 0.0850, 0.0268, 0.0100)

ImageLike = Image.Image | str | Path | bytes | torch.Tensor

FAILURE_REASONS = ("no_body", "no_reference_body", "too_few_features")
SHAPE_FAILURE_REASONS = ("no_body", "no_reference_body", "ambiguous_view")


# ------------------------------------------------------------------------------------------------ helpers


def images_to_uint8(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """PIL images -> a list of ``(3, H, W)`` uint8 tensors (what torchmetrics' CLIPScore takes); tensors pass."""
    if isinstance(images, torch.Tensor):
        return images
    from torchvision.transforms.functional import pil_to_tensor

    return [pil_to_tensor(im.convert("RGB")) for im in images]


def _to_pil(images: Sequence[ImageLike] | torch.Tensor) -> list:
    """Images for a pose extractor: uint8/float tensors ``(N, 3, H, W)`` become PIL; anything else passes."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        images = list(images)
    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            from torchvision.transforms.functional import to_pil_image

            if im.is_floating_point():  # [0, 1] floats, as torchvision's convention
                im = (im.clamp(0, 1) * 255).round().to(torch.uint8)
            im = to_pil_image(im.cpu())
        out.append(im)
    return out


def keypoints_of(extractor, images: Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
    """Keypoints ``(N, 17, 3)`` of the largest person in each image; rows of NaN where none is found."""
    persons = extractor(_to_pil(images))
    out = torch.full((len(persons), 17, 3), float("nan"))
    for i, found in enumerate(persons):
        if found:
            out[i] = torch.as_tensor(found[0].keypoints, dtype=torch.float32)
    return out


def _default_pose() -> PoseExtractor:
    from bolid.pose import BlazePoseExtractor

    return BlazePoseExtractor()


def _is_keypoints(x) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 3 and tuple(x.shape[-2:]) == (17, 3)


def proportion_stats(keypoints: torch.Tensor, min_score: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-proportion mean and standard deviation over a population, each ``(6,)``.

    Args:
        keypoints: ``(N, 17, 3)``; persons with a NaN row (not found) are skipped, and each proportion
            uses only the persons where it is visible.
        min_score: keypoint visibility threshold, as in :class:`BodySimilarity`.

    Raises:
        ValueError: a proportion is visible in fewer than 2 persons.
    """
    found = ~torch.isnan(keypoints).any(dim=(-2, -1))
    feats = body_features(keypoints[found].double(), min_score=min_score)
    m = feats.proportions_mask
    n = m.sum(0)
    if bool((n < 2).any()):
        raise ValueError(f"need each proportion visible in >= 2 persons, got counts {n.tolist()}")
    mean = (feats.proportions * m).sum(0) / n
    var = (((feats.proportions - mean) * m) ** 2).sum(0) / (n - 1)
    return mean.float(), var.sqrt().float()


def body_similarity(
    generated: torch.Tensor,
    reference: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    min_score: float = 0.5,
    min_features: int = 3,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Body Sim of keypoint pairs (the definition in the module docstring), batched.

    Args:
        generated: ``(N, 17, 3)`` keypoints; a row of NaN means no person was found.
        reference: ``(N, 17, 3)`` likewise.
        mean: ``(6,)`` population mean of the proportions.
        std: ``(6,)`` population standard deviation.
        min_score: keypoints below this score are missing.
        min_features: fewest proportions visible in both images for a pair to be scored.
        eps: guards the norm of a z-vector that is all zeros (a perfectly average body): its cosine is 0.

    Returns:
        ``(similarity, reason)``, each ``(N,)``: the cosine (NaN for failures) and the failure reason as an
        index into :data:`FAILURE_REASONS` (-1 where the pair was scored).
    """
    gen_found = ~torch.isnan(generated).any(dim=(-2, -1))
    ref_found = ~torch.isnan(reference).any(dim=(-2, -1))
    g = body_features(torch.nan_to_num(generated.double()), min_score=min_score)
    r = body_features(torch.nan_to_num(reference.double()), min_score=min_score)
    cos, common = proportion_cosine(g, r, mean, std, eps)  # (N,)
    reason = torch.full_like(cos, -1, dtype=torch.long)
    reason[common < min_features] = 2
    reason[~ref_found] = 1
    reason[~gen_found] = 0
    return torch.where(reason < 0, cos, torch.full_like(cos, float("nan"))).float(), reason


# ----------------------------------------------------------------------------------------------- Body Sim


class _PairSimilarity(Metric):
    """What Body Sim v1 and v2 share: a pose model built on first use, pairwise scores with failure reasons,
    their mean (failures counted at ``failure_score`` or left out) and every pair's value."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def _init_pairs(
        self, pose: PoseExtractor | Callable[[], PoseExtractor] | None, failure_score: float | None, reasons
    ) -> None:
        self.failure_score = failure_score
        self._reasons = tuple(reasons)
        # An extractor given ready-made is used as is; otherwise this factory builds one on first use.
        self._pose = pose if isinstance(pose, PoseExtractor) else None
        self._pose_factory = None if self._pose is not None else (pose or _default_pose)
        self.add_state("similarity_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_scored", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("num_pairs", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("num_failed", torch.zeros(len(self._reasons), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("values", [], dist_reduce_fx="cat")

    @property
    def pose(self) -> PoseExtractor:
        """The pose extractor, built on first use."""
        if self._pose is None:
            self._pose = self._pose_factory()
        return self._pose

    def __getstate__(self) -> dict:
        # An extractor this metric built (MediaPipe's graph cannot be pickled or deep-copied) is rebuilt on demand.
        state = super().__getstate__()
        if state.get("_pose_factory") is not None:
            state["_pose"] = None
        return state

    def keypoints(self, images: Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
        """``(N, 17, 3)`` keypoints of the largest person per image with this metric's pose model."""
        return keypoints_of(self.pose, images)

    def _accumulate(self, sim: torch.Tensor, reason: torch.Tensor) -> None:
        """Add a batch of scores ``sim`` (NaN for failures) and reasons (index into the reasons, -1 = scored)."""
        ok = reason < 0
        dev = self.similarity_sum.device
        self.similarity_sum += sim[ok].double().sum().to(dev)
        self.num_scored += int(ok.sum())
        self.num_pairs += len(sim)
        self.num_failed += torch.bincount(reason[~ok], minlength=len(self._reasons)).to(dev)
        self.values.append(sim.float().to(dev))

    def compute(self) -> dict[str, torch.Tensor]:
        failed = self.num_failed.sum()
        total = self.similarity_sum
        count = self.num_scored
        if self.failure_score is not None:
            total = total + failed * self.failure_score
            count = count + failed
        nan = torch.tensor(float("nan"), device=total.device)
        return {
            "body_sim": (total / count).float() if count > 0 else nan,
            "failure_rate": (failed / self.num_pairs).float() if self.num_pairs > 0 else nan,
        }

    def failures(self) -> dict[str, int]:
        """Failure counts by reason."""
        return {name: int(n) for name, n in zip(self._reasons, self.num_failed, strict=True)}

    def per_sample(self) -> torch.Tensor:
        """Similarity of every pair in update order, ``(N,)``; NaN for failures (or ``failure_score``).

        Under DDP this is the local rank's; inside ``with metric.sync_context():`` it is every rank's.
        """
        values = dim_zero_cat(self.values) if len(self.values) else torch.zeros(0)
        if self.failure_score is not None:
            values = torch.nan_to_num(values, nan=self.failure_score)
        return values


class BodySimilarity(_PairSimilarity):
    """Body Sim: cosine similarity of standardised pose-invariant body proportions, generated vs reference.

    ``update(generated, reference)`` takes two equally long batches, each either images (PIL images,
    paths, or an ``(N, 3, H, W)`` uint8 tensor) or keypoints already extracted by the same pose model
    (an ``(N, 17, 3)`` tensor from :func:`keypoints_of`, NaN rows for "no person"), so a reference used
    with many generated images is run through the pose model once.

    ``compute()`` returns ``{"body_sim": mean over scored pairs, "failure_rate": failed / all pairs}``.

    Args:
        pose: a :class:`bolid.pose.PoseExtractor`, or a zero-argument callable building one (built on first
            use, so the metric can be created, copied and pickled before). Default: BlazePose.
        mean: population mean of the 6 proportions (default :data:`BODY_STATS_MEAN`).
        std: population standard deviation (default :data:`BODY_STATS_STD`).
        min_score: keypoint visibility threshold.
        min_features: fewest proportions visible in both images for a pair to be scored (1..6).
        failure_score: ``None`` leaves failures out of the mean (they are counted in ``failure_rate``);
            a number counts each failure at that value (e.g. ``0.0``).
    """

    def __init__(
        self,
        pose: PoseExtractor | Callable[[], PoseExtractor] | None = None,
        mean: Sequence[float] = BODY_STATS_MEAN,
        std: Sequence[float] = BODY_STATS_STD,
        min_score: float = 0.5,
        min_features: int = 3,
        failure_score: float | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 1 <= min_features <= NUM_PROPORTIONS:
            raise ValueError(f"min_features must be in 1..{NUM_PROPORTIONS}, got {min_features}")
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}")
        mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean_t.shape != (NUM_PROPORTIONS,) or std_t.shape != (NUM_PROPORTIONS,):
            raise ValueError(f"mean and std need {NUM_PROPORTIONS} values ({', '.join(PROPORTION_NAMES)})")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.register_buffer("stats_mean", mean_t, persistent=False)
        self.register_buffer("stats_std", std_t, persistent=False)
        self.min_score = min_score
        self.min_features = min_features
        self._init_pairs(pose, failure_score, FAILURE_REASONS)

    def update(self, generated, reference) -> None:
        gen = generated if _is_keypoints(generated) else self.keypoints(generated)
        ref = reference if _is_keypoints(reference) else self.keypoints(reference)
        if gen.shape[0] != ref.shape[0]:
            raise ValueError(f"generated and reference batches differ in size: {gen.shape[0]} vs {ref.shape[0]}")
        sim, reason = body_similarity(
            gen.cpu(), ref.cpu(), self.stats_mean.cpu(), self.stats_std.cpu(), self.min_score, self.min_features
        )
        self._accumulate(sim, reason)


class BodyShapeSimilarity(_PairSimilarity):
    """Body Sim v2: agreement of pose- and viewpoint-invariant body-shape estimates, generated vs reference.

    Each image's keypoints (BlazePose by default, as for :class:`BodySimilarity`) go through the ``"metric"``
    instance of :class:`bolid.body_shape.BodyShapeNet`, a network trained only on synthetic 3D skeletons,
    which returns a Gaussian estimate of the body's 3D proportions with a per-entry variance. A reference
    given as several photos (``(N, K, 17, 3)`` keypoints, or a list of K-image lists) is fused by
    precision weighting. The score is :func:`bolid.body_shape.shape_similarity` (default ``tanh(LLR/2)``:
    1 = surely the same body, 0 = cannot tell, -1 = surely different). No statistics of real photos enter.

    ``estimator="fit"`` replaces the network by :func:`bolid.body_fit.fit_shape`, a kinematic skeleton
    fitted to the keypoints with joint-limit and pose priors and a Laplace confidence; K reference photos are
    then fitted jointly (one shape, a pose and camera each) instead of fused. It is slower (a few hundred
    optimiser steps a batch) and not differentiable.

    Failures, never silently dropped: ``no_body``, ``no_reference_body``, and ``ambiguous_view`` (the photo
    says almost nothing about the body: mean variance above ``max_var``, e.g. a strongly foreshortened view).

    Args:
        pose: as in :class:`BodySimilarity`.
        min_score: keypoint visibility threshold.
        max_var: largest mean variance (1 = prior only) a scored image may have.
        method: ``"llr"``, ``"difference"`` or ``"cosine"`` (see :func:`bolid.body_shape.shape_similarity`).
        failure_score: as in :class:`BodySimilarity`.
        weights: a folder with other trained weights than the shipped ones (``estimator="network"``).
        estimator: ``"network"`` (the ``"metric"`` instance of :class:`bolid.body_shape.BodyShapeNet`) or
            ``"fit"`` (:func:`bolid.body_fit.fit_shape`).
    """

    def __init__(
        self,
        pose: PoseExtractor | Callable[[], PoseExtractor] | None = None,
        min_score: float = 0.5,
        max_var: float = 0.9,
        method: str = "llr",
        failure_score: float | None = None,
        weights: str | None = None,
        estimator: str = "network",
        **kwargs,
    ):
        from bolid.body_shape import SIMILARITIES, load

        super().__init__(**kwargs)
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}")
        if not 0.0 < max_var <= 1.0:
            raise ValueError(f"max_var must be in (0, 1], got {max_var}")
        if method not in SIMILARITIES:
            raise ValueError(f"method must be one of {SIMILARITIES}, got {method!r}")
        if estimator not in ("network", "fit"):
            raise ValueError(f"estimator must be 'network' or 'fit', got {estimator!r}")
        self.estimator = estimator
        self.net = load("metric", weights) if estimator == "network" else None
        self.min_score, self.max_var, self.method = min_score, max_var, method
        self._init_pairs(pose, failure_score, SHAPE_FAILURE_REASONS)

    def _kps(self, x) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.ndim in (3, 4) and tuple(x.shape[-2:]) == (17, 3):
            return x
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], (list, tuple)):  # K reference photos per pair
            k = {len(refs) for refs in x}
            if len(k) != 1:
                raise ValueError(f"every reference list needs the same number of photos, got {sorted(k)}")
            flat = self.keypoints([im for refs in x for im in refs])
            return flat.view(len(x), k.pop(), 17, 3)
        return self.keypoints(x)

    def estimate(self, keypoints: torch.Tensor):
        """:class:`bolid.body_shape.ShapeEstimate` of ``(..., 17, 3)`` keypoints (NaN rows: no person)."""
        from bolid.body_shape import ShapeEstimate

        kp = keypoints.detach().float().cpu()
        if self.estimator == "fit":
            from bolid.body_fit import fit_shape

            return fit_shape(kp, self.min_score)  # (N, K, 17, 3): one joint fit per pair's K photos
        found = ~torch.isnan(kp).any(dim=(-2, -1))
        with torch.no_grad():
            est = self.net(torch.nan_to_num(kp), self.min_score)
        return ShapeEstimate(est.mean, est.var, est.found & found)

    def update(self, generated, reference) -> None:
        """``generated``: images or ``(N, 17, 3)``; ``reference``: the same, or K photos per pair as
        ``(N, K, 17, 3)`` keypoints or a list of N lists of K images (fused into one estimate)."""
        from bolid.body_shape import fuse, shape_similarity

        gen, ref = self._kps(generated), self._kps(reference)
        if gen.ndim != 3:
            raise ValueError(f"generated keypoints must be (N, 17, 3), got {tuple(gen.shape)}")
        if gen.shape[0] != ref.shape[0]:
            raise ValueError(f"generated and reference batches differ in size: {gen.shape[0]} vs {ref.shape[0]}")
        g = self.estimate(gen)
        r = self.estimate(ref)
        if ref.ndim == 4 and self.estimator == "network":
            r = fuse(r)
        sim, reason = shape_similarity(g, r, max_var=self.max_var, method=self.method)
        self._accumulate(sim, reason)


#: Today's metric under a name that says what it compares (Body Sim v1: standardised 2D proportions).
BodyProportionSimilarity = BodySimilarity


# ------------------------------------------------------------------------------------------------- CLIP


class _FeatureTensors(torch.nn.Module):
    """Makes ``get_image_features`` / ``get_text_features`` return tensors.

    transformers >= 5 returns a ``BaseModelOutputWithPooling`` (projected embeddings in
    ``pooler_output``) where torchmetrics <= 1.9's CLIPScore expects a tensor
    (Lightning-AI/torchmetrics PR #3428); this wrapper works with both versions.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_loader(components: str = "real", source: str | None = None) -> Callable[[], tuple]:
    """A zero-argument callable for ``CLIPScore(model_name_or_path=...)`` giving ``(model, processor)``.

    The model loads once, on the first call, and later calls return the same objects, so CLIP-T and
    CLIP-I share one CLIP.

    Args:
        components: the kit (``"real"``: ``openai/clip-vit-large-patch14``; ``"tiny"``, ...), see
            :func:`bolid.components.load`.
        source: a hub id or local folder for the real model (see ``components.overrides.clip``).
    """
    from bolid import components as comp

    comp.kit_module(components)  # an unknown kit fails here, not at the first metric

    @functools.cache
    def load() -> tuple:
        model, processor = comp.load("clip", components, source)
        return _FeatureTensors(model.eval().requires_grad_(False)), processor

    return load


class _CLIPPairs(CLIPScore):
    """torchmetrics' CLIPScore plus a per-sample ``values`` state; sums are updated exactly as CLIPScore does."""

    full_state_update = False  # CLIPScore's update reads no earlier state, so states merge across ranks.

    def __init__(self, model_name_or_path: str | Callable[[], tuple] = "openai/clip-vit-large-patch14", **kwargs):
        super().__init__(model_name_or_path=model_name_or_path, **kwargs)
        self.add_state("values", [], dist_reduce_fx="cat")

    def update(self, source, target) -> None:
        # torchmetrics moves the model to the images' device: keep the images on the metric's.
        source, target = (self._on_device(images_to_uint8(x) if _is_pil_list(x) else x) for x in (source, target))
        with torch.no_grad():
            score, n_samples = _clip_score_update(source, target, self.model, self.processor)
        self.score += score.sum(0).to(self.score.device)
        self.n_samples += n_samples
        self.values.append(score.detach().float().to(self.score.device))

    def _on_device(self, x):
        if isinstance(x, torch.Tensor):
            return x.to(self.device)
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
            return [t.to(self.device) for t in x]
        return x

    def per_sample(self) -> torch.Tensor:
        """Scores of every pair in update order, ``(N,)``, on the same scale as :meth:`compute`.

        Under DDP this is the local rank's; inside ``with metric.sync_context():`` it is every rank's.
        """
        return dim_zero_cat(self.values) if len(self.values) else torch.zeros(0)


def _is_pil_list(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], Image.Image)


class CLIPTextScore(_CLIPPairs):
    """CLIP-T: torchmetrics ``CLIPScore`` of generated images against their prompts, 0-100.

    ``update(images, prompts)``: images as PIL images, a list of ``(3, H, W)`` uint8 tensors or an
    ``(N, 3, H, W)`` uint8 tensor; one prompt per image. :meth:`compute` is ``CLIPScore``'s own (the mean,
    clipped at 0); :meth:`per_sample` clips each image's score at 0, as CLIPScore's definition
    (Hessel et al., 2021) does, so their mean equals ``compute()`` whenever no image scores below 0, which
    real CLIP models never do for a caption of the image.

    Args:
        model_name_or_path: as in ``CLIPScore``; pass :func:`clip_loader` for a local or tiny model.
    """

    def update(self, images, prompts: str | list[str]) -> None:
        super().update(images, prompts)

    def per_sample(self) -> torch.Tensor:
        return super().per_sample().clamp(min=0)


class CLIPImageSimilarity(_CLIPPairs):
    """CLIP-I: cosine of CLIP image embeddings of images with vs without the identity, in [-1, 1].

    ``update(images, base_images)``: two equally long batches in the same formats as :class:`CLIPTextScore`;
    ``base_images[i]`` was generated from the same prompt and seed as ``images[i]`` with no identity.
    """

    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    def update(self, images, base_images) -> None:
        super().update(images, base_images)

    def compute(self) -> torch.Tensor:
        return self.score / self.n_samples / 100.0

    def per_sample(self) -> torch.Tensor:
        return super().per_sample() / 100.0
