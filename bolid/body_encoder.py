"""The Body-ID encoder: 12 body keypoints (+ keypoint-weighted appearance) -> one body vector.

BoLID's body identity follows InstantID's keypoint idea, for the body (12 COCO body keypoints, see
:mod:`bolid.body`), and the later BoLID paper's Gaussian keypoint weighting of the image:

    w_i(x, y) = exp(-((x - x_i)^2 + (y - y_i)^2) / 2 sigma^2),   W = max_i w_i  (min-max normalised to [0, 1]),
    I_w = I * (alpha + (1 - alpha) * W)

so that the appearance features look at the person and not at the background.

:class:`BodyIDEncoder` is a plain ``nn.Module`` (no Lightning). Its inputs are

* the body's shape, in one of two representations (``body_shape``), the same one ``L_id`` uses:

  * ``"net"`` (default): the body-shape estimate of :mod:`bolid.body_shape` (the frozen ``"loss"``
    instance): the mean and variance of the body's pose- and viewpoint-invariant 3D proportions, so the
    encoder knows both the shape and how sure the photo is of it;
  * ``"proportions"``: the six 2D proportions of Body Sim v1 (:mod:`bolid.body`), z-scored with a
    population's statistics, and their visibility mask. In a world without foreshortening (BoLID-mini)
    they carry far more identity than the 3D network, which must allow for limbs pointing at the camera;

  plus keypoint visibility from
  :func:`bolid.body.body_features`, and the normalised keypoint coordinates (the reference *pose*) only
  when ``include_pose=True``, which is off by default so that a prompt can put the person in a new pose;
* optionally the frozen CLIP embedding of the Gaussian-weighted person crop (``appearance_dim > 0``).

Its output is the *body vector*, diffusers' ``ip_adapter_image_embeds`` entry for the body adapter; the
body adapter's ``ImageProjection`` in :class:`bolid.adapter.BodyConditionModule` turns it into tokens.
The helpers here (:func:`person_boxes`, :func:`keypoints_to_box`, :func:`gaussian_keypoint_weights`,
:func:`weight_pixels`) are batched torch, shared by training and inference.
"""

from __future__ import annotations

import torch
from torch import nn

from bolid.body import BODY_INDICES, FEATURE_DIM, NUM_BODY, NUM_PROPORTIONS, body_features
from bolid.body_shape import SHAPE_DIM
from bolid.body_shape import load as load_shape_model

#: Width of the encoder's keypoint input: coords (24, zero unless include_pose) + visibility (12) +
#: shape mean (7) + shape variance (7).
ENCODER_INPUT_DIM = NUM_BODY * 2 + NUM_BODY + 2 * SHAPE_DIM


def person_boxes(
    keypoints: torch.Tensor,
    image_size: tuple[int, int],
    boxes: torch.Tensor | None = None,
    margin: float = 0.1,
    min_score: float = 0.3,
) -> torch.Tensor:
    """Square crop boxes around persons.

    Args:
        keypoints: ``(B, 17, 3)`` keypoints in pixels.
        image_size: ``(height, width)`` of the images, for persons with fewer than 2 visible keypoints
            (their box is the whole image, squared).
        boxes: ``(B, 4)`` detector boxes xyxy; when ``None`` the extent of the visible keypoints is used,
            grown by a further 15% because joints stop short of the head top and the feet.
        margin: grow the square by this fraction of its side on every edge.
        min_score: keypoints scoring below this do not count as visible.

    Returns:
        ``(B, 4)`` square boxes xyxy in pixels (they may extend beyond the image).
    """
    h, w = image_size
    if boxes is None:
        vis = keypoints[..., 2] >= min_score  # (B, 17)
        big = torch.finfo(keypoints.dtype).max
        xy = keypoints[..., :2]
        lo = torch.where(vis[..., None], xy, torch.full_like(xy, big)).amin(1)  # (B, 2)
        hi = torch.where(vis[..., None], xy, torch.full_like(xy, -big)).amax(1)
        centre, extent = (lo + hi) / 2, (hi - lo) * 1.15
        whole = torch.tensor([w / 2, h / 2], dtype=xy.dtype, device=xy.device)
        ok = vis.sum(1) >= 2
        centre = torch.where(ok[:, None], centre, whole)
        extent = torch.where(ok[:, None], extent, torch.tensor([float(w), float(h)], dtype=xy.dtype, device=xy.device))
    else:
        boxes = boxes.to(keypoints.dtype)
        centre, extent = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    half = extent.amax(1).clamp(min=1.0) * (0.5 + margin)  # (B,)
    return torch.stack([centre[:, 0] - half, centre[:, 1] - half, centre[:, 0] + half, centre[:, 1] + half], 1)


def keypoints_to_box(keypoints: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Map keypoints from image pixels into a ``size`` x ``size`` crop of ``boxes`` (scores kept)."""
    x0y0 = boxes[:, None, :2]
    scale = size / (boxes[:, None, 2:] - boxes[:, None, :2])  # (B, 1, 2)
    return torch.cat([(keypoints[..., :2] - x0y0) * scale, keypoints[..., 2:]], -1)


def gaussian_keypoint_weights(
    keypoints: torch.Tensor, size: tuple[int, int], sigma: float, min_score: float = 0.3
) -> torch.Tensor:
    """The keypoint weight map ``W``: max over visible keypoints of a Gaussian, min-max normalised to [0, 1].

    Args:
        keypoints: ``(B, K, 3)`` keypoints ``(x, y, score)`` in pixels of the target map.
        size: ``(height, width)`` of the map.
        sigma: Gaussian standard deviation in pixels.
        min_score: keypoints below this score are left out.

    Returns:
        ``(B, height, width)``. A map without visible keypoints (or a constant one) is all ones, i.e. no
        emphasis anywhere rather than a black image.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    h, w = size
    ys = torch.arange(h, device=keypoints.device, dtype=keypoints.dtype) + 0.5  # pixel centres
    xs = torch.arange(w, device=keypoints.device, dtype=keypoints.dtype) + 0.5
    dx2 = (xs[None, None, :] - keypoints[..., 0:1]) ** 2  # (B, K, W)
    dy2 = (ys[None, None, :] - keypoints[..., 1:2]) ** 2  # (B, K, H)
    logw = -(dy2[..., :, None] + dx2[..., None, :]) / (2 * sigma**2)  # (B, K, H, W)
    vis = keypoints[..., 2] >= min_score  # (B, K)
    logw = logw.masked_fill(~vis[..., None, None], float("-inf"))
    weight = logw.amax(1).exp()  # (B, H, W); exp(-inf) = 0 where nothing is visible
    lo = weight.flatten(1).amin(1)[:, None, None]
    hi = weight.flatten(1).amax(1)[:, None, None]
    span = hi - lo
    flat = span <= 1e-12
    return torch.where(flat, torch.ones_like(weight), (weight - lo) / torch.where(flat, torch.ones_like(span), span))


def weight_pixels(pixels: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """``I_w = I * (alpha + (1 - alpha) * W)`` for ``pixels (B, C, H, W)`` and ``weights (B, H, W)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return pixels * (alpha + (1 - alpha) * weights[:, None].to(pixels.dtype))


class BodyIDEncoder(nn.Module):
    """Body features (+ appearance embedding) -> body vector ``(B, out_dim)``.

    ``out = MLP(GELU(Linear(keypoint features) + Linear(LayerNorm(appearance))))``; the keypoint features
    are :meth:`features` (shape, visibility, optionally the pose).

    Args:
        out_dim: width of the body vector (the body ``ImageProjection``'s input).
        hidden_dim: hidden width.
        appearance_dim: width of the appearance embedding (the image encoder's ``embed_dim``); 0 for a
            keypoint-only encoder.
        include_pose: also feed the raw normalised reference keypoint coordinates (the reference pose).
            Off by default: identity comes from the pose-invariant shape estimate plus appearance.
        min_score: keypoints scoring below this are treated as missing.
        body_shape: ``"net"`` (the frozen 3D body-shape network) or ``"proportions"`` (z-scored 2D
            proportions); see the module docstring.
        proportion_stats: ``(mean, std)`` of the six proportions, required with ``body_shape="proportions"``.
    """

    def __init__(
        self,
        out_dim: int,
        hidden_dim: int,
        appearance_dim: int = 0,
        include_pose: bool = False,
        min_score: float = 0.3,
        body_shape: str = "net",
        proportion_stats: tuple | None = None,
    ):
        super().__init__()
        if out_dim < 1 or hidden_dim < 1 or appearance_dim < 0:
            raise ValueError(
                f"need out_dim, hidden_dim >= 1 and appearance_dim >= 0, got {out_dim}, {hidden_dim}, {appearance_dim}"
            )
        self.out_dim, self.appearance_dim = out_dim, appearance_dim
        self.include_pose, self.min_score, self.body_shape = include_pose, min_score, body_shape
        if body_shape == "net":
            self.body_in = nn.Linear(ENCODER_INPUT_DIM, hidden_dim)
            # Frozen and shared with L_id; kept out of the module tree so adapter files hold the encoder only.
            object.__setattr__(self, "_shape_net", load_shape_model("loss"))
        elif body_shape == "proportions":
            if proportion_stats is None or any(s is None or len(s) != NUM_PROPORTIONS for s in proportion_stats):
                raise ValueError(f"body_shape='proportions' needs proportion_stats (mean, std) of {NUM_PROPORTIONS}")
            self.body_in = nn.Linear(FEATURE_DIM, hidden_dim)
            # The statistics are settings (adapter.json), not weights.
            mean, std = (torch.tensor(v, dtype=torch.float32) for v in proportion_stats)
            self.register_buffer("proportion_mean", mean, persistent=False)
            self.register_buffer("proportion_std", std, persistent=False)
        else:
            raise ValueError(f"body_shape must be 'net' or 'proportions', got {body_shape!r}")
        self.appearance_in = (
            nn.Sequential(nn.LayerNorm(appearance_dim), nn.Linear(appearance_dim, hidden_dim))
            if appearance_dim
            else None
        )
        self.mlp = nn.Sequential(
            nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )

    def features(self, keypoints: torch.Tensor) -> torch.Tensor:
        """Coords (zeroed unless ``include_pose``), visibility, then the shape: ``(B, ENCODER_INPUT_DIM)`` with
        the network's mean and variance, ``(B, FEATURE_DIM)`` with z-scored proportions and mask."""
        kp = keypoints.float()
        if kp.shape[-2] == NUM_BODY:  # the 12 body points alone: the shape model wants COCO-17 (face missing)
            kp = torch.cat([torch.zeros_like(kp[..., :5, :]), kp], -2)
        f = body_features(kp, min_score=self.min_score)
        coords = f.coords if self.include_pose else torch.zeros_like(f.coords)
        if self.body_shape == "proportions":
            z = f.z_scores(self.proportion_mean.float(), self.proportion_std.float())
            return torch.cat([coords.flatten(-2), f.visibility, z, f.proportions_mask], -1)
        net = self._shape_net.to(kp.device)
        with torch.no_grad():
            shape = net(kp, self.min_score)
        return torch.cat([coords.flatten(-2), f.visibility, shape.mean, shape.var], -1)

    def forward(self, keypoints: torch.Tensor, appearance: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``keypoints (B, 17, 3)`` (any pixel frame; the features are scale and shift invariant).

        Args:
            keypoints: COCO-17 (or the 12 body) keypoints ``(x, y, score)``.
            appearance: ``(B, appearance_dim)`` embedding of the Gaussian-weighted person crop; required
                when ``appearance_dim > 0``.
        """
        if keypoints.ndim != 3 or keypoints.shape[1:] not in ((17, 3), (len(BODY_INDICES), 3)):
            raise ValueError(f"keypoints must be (B, 17, 3) or (B, 12, 3), got {tuple(keypoints.shape)}")
        dtype = self.body_in.weight.dtype
        x = self.body_in(self.features(keypoints).to(dtype))
        if self.appearance_in is not None:
            if appearance is None or appearance.shape != (keypoints.shape[0], self.appearance_dim):
                got = None if appearance is None else tuple(appearance.shape)
                raise ValueError(f"appearance must be ({keypoints.shape[0]}, {self.appearance_dim}), got {got}")
            x = x + self.appearance_in(appearance.to(dtype))
        return self.mlp(x)
