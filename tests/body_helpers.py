"""Keypoint transforms shared by the body-shape tests (``test_body_shape``, ``test_body_fit``)."""

from __future__ import annotations

import math

import torch


def rotate(kp: torch.Tensor, degrees: float, centre=(300.0, 200.0)) -> torch.Tensor:
    """``kp`` ``(..., 17, 3)`` turned in the image plane by ``degrees`` about ``centre`` (scores kept)."""
    a = math.radians(degrees)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c = torch.tensor(centre)
    out = kp.clone()
    out[..., :2] = (kp[..., :2] - c) @ rot.T + c
    return out
