"""BoLID's training losses as plain torch: diffusion target, differentiable pose, body-ID and CLIP losses.

The objective follows the paper draft (``L = L_diff + α_id·L_id + β_clip·L_clip``):

* ``L_diff``: MSE between the UNet's prediction and the scheduler's target (ε for SDXL and
  SDXL-Lightning, or ``v`` / the sample for other prediction types), see :func:`diffusion_target`.
* ``L_id``: body-identity consistency on an image *generated* by the few-step Lightning branch.
  :class:`DifferentiablePose` runs ViTPose on the generated pixels and reads keypoints from its
  heatmaps with a soft-argmax, so gradients flow from keypoint positions back into the image and the
  adapter. :func:`body_identity_loss` compares the pose- and viewpoint-invariant body-shape
  estimates (:mod:`bolid.body_shape`) of the generated and reference persons, weighted by confidence;
  :func:`proportion_identity_loss` compares z-scored 2D proportions instead, for worlds without
  foreshortening (BoLID-mini; the adapter's ``body_shape`` picks one). An optional keypoint-position
  term ``Σ‖p_gen − p_ref‖²`` on the normalised coordinates serves same-pose training.
* ``L_clip``: ``1 − cos(EVA-CLIP(x_gen), EVA-CLIP(text))`` (:class:`ClipTextLoss`), and optionally its image
  half ``1 − cos(EVA-CLIP(x_gen), EVA-CLIP(reference))`` (:meth:`ClipTextLoss.image_loss`, weighted apart).

ViTPose-in-the-loss is PuLID's recipe with a body model; evaluation deliberately uses a *different*
pose model (BlazePose, :mod:`bolid.metrics`) so that the metric cannot be gamed by the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bolid.body import BODY_INDICES, body_features, proportion_cosine


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict for ``scheduler.config.prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


def soft_argmax(heatmaps: torch.Tensor, beta: float = 50.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable keypoint locations from heatmaps.

    Args:
        heatmaps: ``(B, K, h, w)``.
        beta: softmax temperature on the heatmap values (ViTPose peaks are ~1, background ~0).

    Returns:
        coordinates ``(B, K, 2)`` as ``(x, y)`` in heatmap pixels (pixel centres at integers), and the
        peak value ``(B, K)`` as a confidence.
    """
    b, k, h, w = heatmaps.shape
    flat = heatmaps.float().flatten(2)  # (B, K, h*w)
    prob = torch.softmax(beta * flat, dim=-1)
    ys = torch.arange(h, device=heatmaps.device, dtype=prob.dtype).repeat_interleave(w)
    xs = torch.arange(w, device=heatmaps.device, dtype=prob.dtype).repeat(h)
    x = (prob * xs).sum(-1)
    y = (prob * ys).sum(-1)
    return torch.stack([x, y], -1), flat.amax(-1)


def pose_input_boxes(boxes: torch.Tensor, input_hw: tuple[int, int], padding: float = 1.25) -> torch.Tensor:
    """The image region ViTPose reads for a person box, as its image processor frames it.

    Like transformers' ``VitPoseImageProcessor`` (``box_to_center_and_scale``): the box keeps its centre, grows to
    the model's input aspect ratio (``w / h = in_w / in_h``) along its short side, then by ``padding`` on both.

    Args:
        boxes: ``(B, 4)`` person boxes xyxy in pixels.
        input_hw: the model's ``(height, width)`` input size (ViTPose: 256 x 192).
        padding: ViTPose's box padding factor.

    Returns:
        ``(B, 4)`` regions xyxy in pixels (they may extend beyond the image).
    """
    in_h, in_w = input_hw
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    aspect = in_w / in_h
    w, h = torch.maximum(w, h * aspect), torch.maximum(h, w / aspect)
    half = torch.stack([w, h], 1) * padding / 2  # (B, 2)
    return torch.cat([centre - half, centre + half], 1)


class DifferentiablePose(nn.Module):
    """ViTPose on generated images, end to end differentiable: pixels -> person crop -> heatmaps -> keypoints.

    ViTPose is top-down: it reads one person box, padded 1.25x to its 3:4 input (:func:`pose_input_boxes`). The
    box is found without gradient, by :meth:`locate`: a first ViTPose pass over the whole frame, then the extent
    of its confident keypoints grown by 15% (joints stop short of the head top and the feet). A detector would
    do the same job at the cost of one more model in memory; the whole-frame pass is coarse but only has to
    frame the person. The crop itself is differentiable (torchvision's ``roi_align``, antialiased), so a
    full-body person at 1024 px reaches ViTPose at its native 256 x 192 instead of as 10-20 px limbs, and the
    soft-argmax keypoints are mapped back to image pixels.

    Args:
        model: a frozen ``VitPoseForPoseEstimation``.
        processor: its ``VitPoseImageProcessor`` (input size, mean, std).
        beta: soft-argmax temperature.
        min_score: keypoints of the whole-frame pass below this do not frame the person.
        padding: ViTPose's box padding factor.
    """

    def __init__(self, model: nn.Module, processor, beta: float = 50.0, min_score: float = 0.3, padding: float = 1.25):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        size = processor.size
        self.input_hw = (int(size["height"]), int(size["width"]))
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)
        self.beta, self.min_score, self.padding = beta, min_score, padding

    def train(self, mode: bool = True) -> DifferentiablePose:
        return super().train(False)  # frozen model: always eval mode

    @torch.no_grad()
    def locate(self, images: torch.Tensor) -> torch.Tensor:
        """Person boxes ``(B, 4)`` xyxy, without gradient; the whole frame where fewer than 2 keypoints are sure."""
        _, _, h, w = images.shape
        whole = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=images.device).expand(images.shape[0], 4)
        kp = self.forward(images, whole)
        vis = kp[..., 2] >= self.min_score  # (B, 17)
        big = torch.finfo(kp.dtype).max
        lo = torch.where(vis[..., None], kp[..., :2], torch.full_like(kp[..., :2], big)).amin(1)  # (B, 2)
        hi = torch.where(vis[..., None], kp[..., :2], torch.full_like(kp[..., :2], -big)).amax(1)
        centre, half = (lo + hi) / 2, (hi - lo).clamp(min=1.0) * 1.15 / 2
        boxes = torch.cat([centre - half, centre + half], 1)
        return torch.where((vis.sum(1) >= 2)[:, None], boxes, whole)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` images in ``[-1, 1]`` -> keypoints ``(B, 17, 3)`` (x, y, confidence) in image pixels.

        Args:
            images: the generated images.
            boxes: ``(B, 4)`` person boxes xyxy in pixels; found by :meth:`locate` when ``None``.
        """
        from torchvision.ops import roi_align

        if boxes is None:
            boxes = self.locate(images)
        in_h, in_w = self.input_hw
        regions = pose_input_boxes(boxes.float().detach(), self.input_hw, self.padding)  # (B, 4)
        x = (images.float() + 1) / 2
        index = torch.arange(x.shape[0], device=x.device, dtype=x.dtype)[:, None]
        x = roi_align(
            x, torch.cat([index, regions], 1), (in_h, in_w), spatial_scale=1.0, sampling_ratio=-1, aligned=True
        )
        x = (x - self.mean) / self.std  # outside the image: black before normalisation, as the processor pads
        dtype = next(self.model.parameters()).dtype
        heatmaps = self.model(pixel_values=x.to(dtype)).heatmaps  # (B, 17, in_h/4, in_w/4)
        coords, conf = soft_argmax(heatmaps, self.beta)
        hm_h, hm_w = heatmaps.shape[-2:]
        # Heatmap pixel centres -> crop pixels -> image pixels (continuous: pixel i spans [i, i + 1)).
        size = (regions[:, 2:] - regions[:, :2])[:, None]  # (B, 1, 2)
        xy = (coords + 0.5) * size / torch.tensor([hm_w, hm_h], device=x.device, dtype=coords.dtype) + regions[
            :, None, :2
        ]
        return torch.cat([xy, conf.to(xy.dtype)[..., None]], -1)


def body_identity_loss(
    generated: torch.Tensor,
    reference: torch.Tensor,
    min_score: float = 0.3,
    gen_min_score: float | None = None,
    pose_weight: float = 0.0,
    shape_net: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance between the body-shape estimates of the generated and reference persons.

    Both keypoint sets go through the ``"loss"`` instance of :class:`bolid.body_shape.BodyShapeNet` (an
    independent network from the one Body Sim v2 uses), which gives a pose- and viewpoint-invariant
    Gaussian estimate ``(mean, var)`` of the body's 3D proportions in prior z-units. Per pair,

        r = sum_d w_d (mean_gen,d - mean_ref,d)^2 / sum_d w_d (2 - var_gen,d - var_ref,d)
        w_d = 1 / (var_gen,d + var_ref,d)
        L = log(1 + r)

    The denominator of ``r`` is the expected numerator for two unrelated bodies from the population, so
    ``r`` is 0 for the same shape and about 1 for a random other person, whatever the photos' confidence.
    ``log(1 + r)`` keeps that scale near 0 (``L ~ r``; about 0.7 for a random other person) but bounds what
    one pair can do: on a half-drawn generated body the estimates leave the population (both variances near
    the prior's, so the denominator nearly vanishes) and ``r`` reached 10-700 in BoLID-mini's stage 2, where
    such pairs swamped ``L_diff`` and drove the adapter to one degenerate body; their gradient is now
    ``1 / (1 + r)`` times smaller. Entries the photos cannot see (a foreshortened
    limb) carry little weight. Gradients flow through the generated estimate's mean *and* variance: a
    generated person that cannot be measured has the prior's estimate and costs about 1, like an unrelated
    body, so ambiguity earns nothing. (Detaching the weights instead made the loss climb again under
    optimisation of the keypoints: the optimiser could not see the weights it moved.)

    Args:
        generated: ``(B, 17, 3)`` keypoints of the generated images (differentiable in x, y).
        reference: ``(B, 17, 3)`` keypoints of the references (any pixel scale).
        min_score: reference keypoints below this are missing.
        gen_min_score: generated keypoints below this are missing (scores are detached); defaults to
            ``min_score``.
        pose_weight: weight of the optional keypoint-position term on the normalised coordinates.
        shape_net: the shape model; defaults to ``bolid.body_shape.load("loss")``.

    Returns:
        ``(loss, valid_fraction)``: the mean over pairs where both persons were found (0 with no
        gradient-carrying terms when none is), and the fraction of such pairs.
    """
    from bolid.body_shape import load

    gen_min_score = min_score if gen_min_score is None else gen_min_score
    net = load("loss") if shape_net is None else shape_net
    net = net.to(generated.device)
    gen = generated.float().clone()
    gen[..., 2] = gen[..., 2].detach()
    eg = net(gen, gen_min_score)
    with torch.no_grad():
        er = net(reference.float().to(generated.device), min_score)
    var_g, var_r = eg.var, er.var
    w = 1 / (var_g + var_r).clamp(min=1e-6)
    num = (w * (eg.mean - er.mean) ** 2).sum(-1)
    den = (w * (2 - var_g - var_r)).sum(-1).clamp(min=1e-3)
    valid = (eg.found & er.found).to(num.dtype)
    n = valid.sum()
    loss = (torch.log1p(num / den) * valid).sum() / n.clamp(min=1)
    if pose_weight > 0:
        fg = body_features(gen, min_score=gen_min_score)
        fr = body_features(reference.float(), min_score=min_score)
        vis = fg.visibility * fr.visibility  # (B, 12)
        pos = ((fg.coords - fr.coords.to(fg.coords)) ** 2).sum(-1)
        loss = loss + pose_weight * (pos * vis).sum() / vis.sum().clamp(min=1)
    return loss, n / valid.numel()


def body_weighted_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    keypoints: torch.Tensor,
    image_side: int,
    weight: float,
    sigma: float,
    min_score: float = 0.3,
) -> torch.Tensor:
    """``L_diff`` with the target's body counted more: each latent pixel's squared error (mean over channels)
    is weighted by ``1 + weight·W``, ``W`` the Gaussian map of the target's 12 body keypoints
    (:func:`bolid.body_encoder.gaussian_keypoint_weights`, in ``[0, 1]``), normalised per image so the loss
    keeps MSE's scale. A target without visible keypoints gets uniform weights: the plain MSE.

    Args:
        pred, target: ``(B, C, h, w)`` prediction and diffusion target in latent space.
        keypoints: ``(B, 17, 3)`` the targets' keypoints in pixels of the ``image_side`` training crop.
        image_side: side of the training crop, for the pixel-to-latent scale.
        weight: ``λ``; 0 gives the plain MSE.
        sigma: the Gaussians' sigma as a fraction of the latent side.
        min_score: keypoints scoring below this are left out.
    """
    from bolid.body_encoder import gaussian_keypoint_weights

    side = pred.shape[-1]
    kp = keypoints.float()[:, BODY_INDICES[0] :]
    kp = torch.cat([kp[..., :2] * (side / image_side), kp[..., 2:]], -1)
    w = 1 + weight * gaussian_keypoint_weights(kp, tuple(pred.shape[-2:]), sigma * side, min_score)  # (B, h, w)
    err = ((pred.float() - target.float()) ** 2).mean(1)
    return ((err * w).flatten(1).sum(1) / w.flatten(1).sum(1)).mean()


def proportion_identity_loss(
    generated: torch.Tensor,
    reference: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    min_score: float = 0.3,
    gen_min_score: float | None = None,
    min_features: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 − cos`` of the z-scored 2D proportions of the generated and reference persons: ``1 − Body Sim v1``.

    The six proportions (:mod:`bolid.body`) are z-scored with the population's ``mean`` and ``std``, and the
    cosine runs over the proportions visible in both persons. The loss lies in ``[0, 2]``: 0 for the same
    proportions, about 1 for an unrelated body, so no pair can swamp ``L_diff``. For photos without
    foreshortening (BoLID-mini's world: limbs move in the image plane, turns only narrow the widths) this
    separates people far better than the 3D body-shape network, which must allow for limbs pointing at the
    camera; for real photos :func:`body_identity_loss` is the one to use.

    Args:
        generated: ``(B, 17, 3)`` keypoints of the generated images (differentiable in x, y; scores detached).
        reference: ``(B, 17, 3)`` keypoints of the references.
        mean, std: ``(6,)`` population statistics of the proportions.
        min_score: reference keypoints below this are missing.
        gen_min_score: generated keypoints below this are missing; defaults to ``min_score``.
        min_features: fewest proportions visible in both for a pair to count.

    Returns:
        ``(loss, valid_fraction)``: the mean over the pairs that count (0, still differentiable, when none
        does), and the fraction of such pairs.
    """
    gen_min_score = min_score if gen_min_score is None else gen_min_score
    gen = generated.float().clone()
    gen[..., 2] = gen[..., 2].detach()
    g = body_features(gen, min_score=gen_min_score)
    r = body_features(reference.float().to(gen.device), min_score=min_score)
    cos, common = proportion_cosine(g, r, mean, std, eps=1e-6)
    valid = (common >= min_features).to(cos.dtype)
    n = valid.sum()
    return ((1 - cos) * valid).sum() / n.clamp(min=1), n / valid.numel()


class ClipTextLoss(nn.Module):
    """``1 − cos(image, text)`` with a frozen open_clip model (EVA-CLIP), differentiable in the image.

    Args:
        image_encoder: the frozen image tower with its preprocessing (the adapter's own
            :class:`bolid.image_encoder.ClipImageEncoder`, so EVA-CLIP is held once).
        model: the open_clip model the tower came from (its ``encode_text``).
        tokenizer: its tokenizer.
    """

    def __init__(self, image_encoder: nn.Module, model: nn.Module, tokenizer):
        super().__init__()
        self.image_encoder = image_encoder
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    def train(self, mode: bool = True) -> ClipTextLoss:
        return super().train(False)

    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Mean ``1 − cos`` over the batch; ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``."""
        img = self.image_encoder((images.float() + 1) / 2).float()
        with torch.no_grad():
            txt = self.model.encode_text(self.tokenizer(captions).to(images.device)).float()
        return (1 - F.cosine_similarity(img, txt, dim=-1)).mean()

    def image_loss(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """The image half of ``L_clip``: mean ``1 − cos(EVA-CLIP(generated), EVA-CLIP(reference))``.

        Args:
            images: ``(B, 3, H, W)`` generated images in ``[-1, 1]`` (differentiable).
            references: ``(B, 3, h, w)`` reference photos in ``[0, 1]`` (no gradient).
        """
        img = self.image_encoder((images.float() + 1) / 2).float()
        with torch.no_grad():
            ref = self.image_encoder(references.float()).float()
        return (1 - F.cosine_similarity(img, ref, dim=-1)).mean()
