"""Body shape from 2D keypoints: a pose- and viewpoint-invariant shape estimate with its confidence.

The model maps the COCO-17 keypoints of one photo to a Gaussian estimate of the body's *shape vector*
(:data:`bolid.synthetic_bodies.SHAPE_NAMES`: log 3D lengths of upper arm, forearm, thigh, shin, shoulder
and hip width and torso, minus their mean, i.e. stature-free proportions), standardised by the
population prior of :func:`bolid.synthetic_bodies.prior_stats` (z-units: 0 = the average body, 1 = one
population standard deviation). Its output per photo is ``mean`` and ``var`` per entry; ``var`` near 1
means the photo says nothing about that entry beyond the prior (a foreshortened limb, a side view's
widths), near 0 that it pins it down.

How (chosen by measurement, see BENCHMARKS.md "Body shape"): an MLP (:class:`BodyShapeNet`) on
canonicalised keypoints (centred on the mid-hip, rotated so the torso points up, scaled by the RMS
spread), their visibility and the log 2D lengths of 12 segments, trained with a Gaussian negative
log-likelihood on :mod:`bolid.synthetic_bodies` views (random bodies, poses, cameras, detector noise).
Its output is averaged with that of the mirrored keypoints, so it is exactly invariant to image scale,
translation, in-plane rotation and horizontal flips. It is plain torch and differentiable in the
keypoint coordinates.

Several photos of one person are fused by precision weighting (:func:`fuse`), the Gaussian product of
the per-photo estimates. Two estimates are compared by :func:`shape_similarity`. A photo (or a fused set)
whose mean variance stays above ``max_var`` is *ambiguous*: the pair fails with ``ambiguous_view``
instead of getting a confident wrong score.

Two instances ship, trained by the same command with different seeds and widths, so the metric cannot be
fooled by fitting the loss's network: ``"metric"`` for Body Sim and ``"loss"`` for ``L_id`` and the
Body-ID encoder. Their weights live in ``bolid/weights/`` with the command that trained them, their
validation figures and sha256 (``bolid/weights/body_shape.json``)::

    python -m bolid.body_shape train --instance metric
    python -m bolid.body_shape train --instance loss
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bolid.files import atomic_write
from bolid.synthetic_bodies import COCO_FLIP, SHAPE_DIM, SHAPE_NAMES, prior_stats, synthetic_views

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
RECORD = WEIGHTS_DIR / "body_shape.json"
#: Training settings of the shipped instances (different seeds and widths: independent networks).
INSTANCES = {
    "metric": {"seed": 0, "hidden": 256, "depth": 3, "steps": 3000, "batch": 1024, "lr": 2e-3},
    "loss": {"seed": 1, "hidden": 192, "depth": 3, "steps": 3000, "batch": 1024, "lr": 2e-3},
}
#: A reduced run of the same training code, small enough for the test suite, whose figures are recorded too.
REDUCED_CHECK = {"seed": 0, "hidden": 64, "depth": 2, "steps": 40, "batch": 256, "lr": 2e-3}
# Segments whose 2D log lengths the network sees (COCO indices): torso sides, limbs, widths.
_SEGMENTS = (
    (5, 11), (6, 12), (5, 7), (6, 8), (7, 9), (8, 10), (11, 13), (12, 14), (13, 15), (14, 16), (5, 6), (11, 12),
)  # fmt: skip
INPUT_DIM = 17 * 2 + 17 + 2 * len(_SEGMENTS)  # COCO-17 layout; the face entries are always 0
_BODY_ONLY = torch.tensor([0.0] * 5 + [1.0] * 12)
FAILURE_REASONS = ("no_body", "no_reference_body", "ambiguous_view")


@dataclass
class ShapeEstimate:
    """A Gaussian shape estimate in prior z-units, batched over leading dimensions."""

    mean: torch.Tensor  # (..., 7)
    var: torch.Tensor  # (..., 7), 1 = no information beyond the population prior
    found: torch.Tensor  # (...,) bool: a body was there to measure

    def __getitem__(self, idx) -> ShapeEstimate:
        return ShapeEstimate(self.mean[idx], self.var[idx], self.found[idx])

    @property
    def confidence(self) -> torch.Tensor:
        """``(...,)`` in [0, 1]: 1 - mean variance (0 = the prior only, 1 = exact)."""
        return (1 - self.var.mean(-1)).clamp(0, 1) * self.found


def flip_keypoints(keypoints: torch.Tensor) -> torch.Tensor:
    """Mirror ``(..., 17, 3)`` keypoints horizontally (x -> -x) and swap the left/right labels."""
    out = keypoints[..., list(COCO_FLIP), :].clone()
    out[..., 0] = -out[..., 0]
    return out


def _masked_mean(xy: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = w.sum(-1, keepdim=True)
    return (xy * w[..., None]).sum(-2) / n.clamp(min=1), n[..., 0] > 0


def canonical_keypoints(keypoints: torch.Tensor, min_score: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical coordinates ``(..., 17, 2)``, body visibility ``(..., 17)`` and a found-mask ``(...,)``.

    Only the 12 body points count (the face points are treated as missing), so the estimate does not change
    when the face is hidden or turned away.

    Centred on the mid-hip (else the visible points' mean), rotated so mid-hip -> mid-shoulder points up
    (image -y), divided by the RMS distance of the visible points from that centre: invariant to image
    scale, translation and in-plane rotation by construction. Differentiable in x, y. Invisible points are 0.
    """
    xy = torch.nan_to_num(keypoints[..., :2])
    v = (torch.nan_to_num(keypoints[..., 2], nan=0.0) >= min_score).to(xy.dtype)
    v = v * _BODY_ONLY.to(v)  # the 5 face points are left out: the body estimate must not depend on the face
    hip, hip_ok = _masked_mean(xy[..., 11:13, :], v[..., 11:13])
    hips_both = v[..., 11] * v[..., 12] > 0
    allc, found = _masked_mean(xy[..., 5:, :], v[..., 5:])
    centre = torch.where(hips_both[..., None], hip, allc)
    sh, sh_ok = _masked_mean(xy[..., 5:7, :], v[..., 5:7])
    # Up: mid-hip -> mid-shoulder; without both, the visible upper body's mean minus the lower body's; without
    # those either, image up (the one case that is not rotation invariant).
    upper, upper_ok = _masked_mean(xy[..., :11, :], v[..., :11])
    lower, lower_ok = _masked_mean(xy[..., 11:, :], v[..., 11:])
    fallback = torch.where((upper_ok & lower_ok)[..., None], upper - lower, torch.tensor([0.0, -1.0], dtype=xy.dtype))
    up = torch.where((hip_ok & sh_ok)[..., None], sh - hip, fallback)
    up_len = torch.linalg.vector_norm(up, dim=-1, keepdim=True)
    up = torch.where(up_len > 1e-6, up / up_len.clamp(min=1e-6), torch.tensor([0.0, -1.0], dtype=xy.dtype))
    # Rotate so that `up` becomes (0, -1): new x = (-uy, ux) . p, new y = (ux, uy) . p * -1.
    ux, uy = up[..., 0:1], up[..., 1:2]
    p = xy - centre[..., None, :]
    px, py = p[..., 0], p[..., 1]
    rx, ry = -uy * px + ux * py, -(ux * px + uy * py)
    rel = torch.stack([rx, ry], -1) * v[..., None]
    scale = ((rel**2).sum(-1) * v).sum(-1) / v.sum(-1).clamp(min=1)
    scale = scale.clamp(min=1e-8).sqrt()
    return rel / scale[..., None, None], v, found


def shape_inputs(keypoints: torch.Tensor, min_score: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input ``(..., INPUT_DIM)`` and a found-mask ``(...,)`` from ``(..., 17, 3)`` keypoints.

    The canonical keypoints of :func:`canonical_keypoints`, their visibility and the log 2D lengths of the
    12 segments of ``_SEGMENTS``. Differentiable in x, y.
    """
    rel, v, found = canonical_keypoints(keypoints, min_score)
    a = torch.tensor([s[0] for s in _SEGMENTS])
    b = torch.tensor([s[1] for s in _SEGMENTS])
    seg_mask = v[..., a] * v[..., b]
    seg_len = torch.linalg.vector_norm(rel[..., a, :] - rel[..., b, :], dim=-1)
    seg_log = torch.log(seg_len + 1e-3) * seg_mask
    found = found & (v[..., 5:].sum(-1) >= 4)
    x = torch.cat([rel.flatten(-2), v, seg_log, seg_mask], -1)
    return x, found


class BodyShapeNet(nn.Module):
    """Keypoints ``(..., 17, 3)`` -> :class:`ShapeEstimate` (see the module docstring).

    Args:
        hidden: hidden width of the MLP.
        depth: number of hidden layers.
        min_score: keypoints scoring below this are missing.
    """

    def __init__(self, hidden: int = 256, depth: int = 3, min_score: float = 0.5):
        super().__init__()
        if hidden < 1 or depth < 1:
            raise ValueError(f"hidden and depth must be >= 1, got {hidden}, {depth}")
        layers: list[nn.Module] = []
        width = INPUT_DIM
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 2 * SHAPE_DIM))
        self.mlp = nn.Sequential(*layers)
        self.min_score = min_score
        self.hidden, self.depth = hidden, depth
        mean, std = prior_stats()
        self.register_buffer("prior_mean", mean)
        self.register_buffer("prior_std", std)

    def _head(self, keypoints: torch.Tensor, min_score: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, found = shape_inputs(keypoints, min_score)
        out = self.mlp(x.to(self.prior_mean.dtype))
        mean, log_var = out.split(SHAPE_DIM, -1)
        return mean, log_var.clamp(-7.0, 1.0), found

    def forward(self, keypoints: torch.Tensor, min_score: float | None = None) -> ShapeEstimate:
        """Estimate from ``(..., 17, 3)`` keypoints; ``min_score`` overrides the visibility threshold."""
        if keypoints.shape[-2:] != (17, 3):
            raise ValueError(f"keypoints must have shape (..., 17, 3), got {tuple(keypoints.shape)}")
        ms = self.min_score if min_score is None else min_score
        m1, lv1, found = self._head(keypoints, ms)
        m2, lv2, _ = self._head(flip_keypoints(keypoints), ms)
        mean = (m1 + m2) / 2
        var = ((lv1.exp() + lv2.exp()) / 2).clamp(max=1.0)  # a photo cannot know less than the prior
        f = found[..., None]
        # No body: the prior itself (mean 0, variance 1).
        return ShapeEstimate(torch.where(f, mean, 0.0), torch.where(f, var, 1.0), found)

    def raw_loss(self, keypoints: torch.Tensor, target_z: torch.Tensor) -> torch.Tensor:
        """Gaussian negative log-likelihood of ``target_z`` under one (unflipped) pass; for training."""
        mean, log_var, found = self._head(keypoints, self.min_score)
        nll = 0.5 * (log_var + (target_z - mean) ** 2 / log_var.exp())
        return (nll.mean(-1) * found).sum() / found.sum().clamp(min=1)

    def to_z(self, shape: torch.Tensor) -> torch.Tensor:
        """A true shape vector ``(..., 7)`` -> prior z-units."""
        return (shape - self.prior_mean) / self.prior_std


# ------------------------------------------------------------------------------------------------ fusion / similarity


def fuse(est: ShapeEstimate, dim: int = -2) -> ShapeEstimate:
    """Precision-weighted fusion of several photos of one person along ``dim`` of ``mean``/``var``.

    Each photo's estimate counts with its own information beyond the prior (``1/var - 1``), so several
    photos that each pin down a different part of the body combine, and adding photos never *lowers* the
    fused precision. Photos without a body contribute nothing.
    """
    f = est.found.unsqueeze(-1).to(est.var.dtype)
    var = est.var.clamp(1e-6, 1.0)
    prec = 1 + ((1 / var - 1) * f).sum(dim)  # product of the photos' likelihoods times one prior
    mean = (est.mean / var * f).sum(dim) / prec
    found = est.found.any(dim if dim >= 0 else dim + 1)
    return ShapeEstimate(torch.where(found[..., None], mean, 0.0), torch.where(found[..., None], 1 / prec, 1.0), found)


def log_likelihood_ratio(a: ShapeEstimate, b: ShapeEstimate) -> torch.Tensor:
    """``(...,)`` log p(a, b | same body) / p(a, b | two bodies from the population) of two shape estimates.

    With Gaussian posteriors ``N(m_a, v_a)``, ``N(m_b, v_b)`` under the prior ``N(0, 1)`` the ratio is
    ``integral N(x; m_a, v_a) N(x; m_b, v_b) / N(x; 0, 1) dx`` per entry, in closed form with
    ``P = 1/v_a + 1/v_b - 1``:

        log LR = -1/2 log(v_a v_b P) - 1/2 (m_a^2/v_a + m_b^2/v_b - (m_a/v_a + m_b/v_b)^2 / P)

    Entries a photo cannot see (variance near 1) contribute little; it needs no division by ``1 - v``, so
    it stays finite for every variance in (0, 1].
    """
    va, vb = a.var.clamp(1e-6, 1.0), b.var.clamp(1e-6, 1.0)
    ma, mb = a.mean, b.mean
    p = 1 / va + 1 / vb - 1
    llr = -0.5 * torch.log(va * vb * p) - 0.5 * (ma**2 / va + mb**2 / vb - (ma / va + mb / vb) ** 2 / p)
    return llr.sum(-1)


def difference_log_likelihood_ratio(a: ShapeEstimate, b: ShapeEstimate, max_var: float = 0.999) -> torch.Tensor:
    """``(...,)`` log-likelihood ratio, same body vs two bodies, of the *difference* of two shape estimates only.

    Each posterior ``N(m, v)`` (prior ``N(0, 1)``) is turned back into the measurement that produced it,
    ``y = m / (1 - v)`` with noise variance ``s = v / (1 - v)``. Same body: ``y_a - y_b ~ N(0, s_a + s_b)``;
    two bodies of the population: ``N(0, 2 + s_a + s_b)``. Per entry, with ``s = s_a + s_b``:

        log LR = -1/2 log(s / (2 + s)) - 1/2 (y_a - y_b)^2 (1/s - 1/(2 + s))

    Unlike :func:`log_likelihood_ratio` it ignores where the two estimates sit in the population, only how
    far apart they are, so a shift shared by every photo (a detector that places joints differently from
    the synthetic skeleton) cancels. An entry that neither photo constrains (``s`` large) adds ~0. Variances
    are clamped to ``max_var`` so that ``y`` stays finite.
    """
    va, vb = a.var.clamp(1e-6, max_var), b.var.clamp(1e-6, max_var)
    sa, sb = va / (1 - va), vb / (1 - vb)
    d2 = (a.mean / (1 - va) - b.mean / (1 - vb)) ** 2
    s = sa + sb
    return (-0.5 * torch.log(s / (2 + s)) - 0.5 * d2 * (1 / s - 1 / (2 + s))).sum(-1)


SIMILARITIES = ("llr", "difference", "cosine")


def shape_similarity(
    a: ShapeEstimate, b: ShapeEstimate, max_var: float = 0.9, method: str = "llr", eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity of two shape estimates, in [-1, 1], and a failure reason index per pair.

    ``method="llr"`` (default): ``tanh(LLR / 2)`` with LLR from :func:`log_likelihood_ratio`, i.e.
    ``2 P(same) - 1`` at even prior odds: 1 = surely the same body, -1 = surely different, 0 = the photos
    cannot tell. ``method="difference"``: the same mapping of :func:`difference_log_likelihood_ratio`
    (blind to a shift shared by both estimates). ``method="cosine"``: the cosine of the two z-vectors, each
    entry weighted by ``1 / (var_a + var_b)``.

    Returns:
        ``(similarity, reason)``, each ``(...,)``: NaN similarity where the pair failed, and the reason as
        an index into :data:`FAILURE_REASONS` (-1 where scored). ``ambiguous_view``: either side's mean
        variance is above ``max_var`` (the photo says almost nothing beyond the population prior).
    """
    if method == "llr":
        sim = torch.tanh(log_likelihood_ratio(a, b) / 2)
    elif method == "difference":
        sim = torch.tanh(difference_log_likelihood_ratio(a, b) / 2)
    elif method == "cosine":
        w = 1 / (a.var + b.var).clamp(min=eps)
        num = (w * a.mean * b.mean).sum(-1)
        sim = num / ((w * a.mean**2).sum(-1) * (w * b.mean**2).sum(-1)).clamp(min=eps).sqrt()
    else:
        raise ValueError(f"method must be one of {SIMILARITIES}, got {method!r}")
    reason = torch.full(sim.shape, -1, dtype=torch.long, device=sim.device)
    reason[(a.var.mean(-1) > max_var) | (b.var.mean(-1) > max_var)] = 2
    reason[~b.found] = 1
    reason[~a.found] = 0
    return torch.where(reason < 0, sim, torch.full_like(sim, float("nan"))), reason


# ------------------------------------------------------------------------------------------------ training


def validation_set(n: int = 20_000, seed: int = 12345) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic validation set: keypoints ``(n, 17, 3)`` and true shape vectors ``(n, 7)``."""
    v = synthetic_views(n, torch.Generator().manual_seed(seed))
    return v.keypoints, v.shape


@torch.no_grad()
def validate(net: BodyShapeNet, n: int = 20_000, seed: int = 12345) -> dict[str, float]:
    """Validation figures on :func:`validation_set`: R² of the shape vector, NLL, calibration, confidence."""
    kp, shape = validation_set(n, seed)
    est = net(kp)
    z = net.to_z(shape)
    ok = est.found
    err = (est.mean - z)[ok]
    r2 = 1 - (err**2).mean(0) / z[ok].var(0)
    nll = 0.5 * (est.var[ok].log() + err**2 / est.var[ok]).mean()
    return {
        "r2_mean": round(float(r2.mean()), 4),
        **{f"r2_{name}": round(float(v), 4) for name, v in zip(SHAPE_NAMES, r2, strict=True)},
        "nll": round(float(nll), 4),
        # Calibrated variances give a mean squared standardised error of 1.
        "calibration": round(float((err**2 / est.var[ok]).mean()), 4),
        "mean_var": round(float(est.var[ok].mean()), 4),
        "found": round(float(ok.float().mean()), 4),
    }


def train(
    seed: int, hidden: int, depth: int, steps: int, batch: int, lr: float, log_every: int = 250, log=print
) -> tuple[BodyShapeNet, dict[str, float]]:
    """Train a :class:`BodyShapeNet` on fresh synthetic views each step (deterministic for a given seed)."""
    torch.manual_seed(seed)
    net = BodyShapeNet(hidden=hidden, depth=depth)
    gen = torch.Generator().manual_seed(1000 + seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    for step in range(steps):
        v = synthetic_views(batch, gen)
        kp = v.keypoints
        flip = torch.rand(batch, generator=gen) < 0.5  # the flip average at inference sees both
        kp = torch.where(flip[:, None, None], flip_keypoints(kp), kp)
        loss = net.raw_loss(kp, net.to_z(v.shape))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps} nll {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    net.eval()
    return net, validate(net)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(net: BodyShapeNet, instance: str, figures: dict, command: str, seconds: float, out: Path) -> Path:
    """Write ``out/body_shape_<instance>.safetensors`` and its entry in ``out/body_shape.json``."""
    from safetensors.torch import save as st_save

    path = out / f"body_shape_{instance}.safetensors"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(path, st_save(state, metadata={"hidden": str(net.hidden), "depth": str(net.depth)}))
    record_path = out / RECORD.name
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record[instance] = {
        "file": path.name,
        "sha256": _file_sha256(path),
        "command": command,
        "settings": INSTANCES.get(instance),
        "train_seconds": round(seconds, 1),
        "validation": figures,
    }
    atomic_write(record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


@functools.cache
def load(instance: str = "metric", folder: str | None = None) -> BodyShapeNet:
    """The shipped (or a trained) instance, frozen. ``instance``: ``"metric"`` (Body Sim) or ``"loss"`` (L_id).

    Leaves torch's global random state as it was: the instance is cached, so a first (loading) call that drew
    from it for the overwritten random init would shift every later random init by whether the instance was
    already loaded (e.g. a ``BodyIDEncoder`` built in the same process would get different weights).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if instance not in INSTANCES:
        raise ValueError(f"instance must be one of {sorted(INSTANCES)}, got {instance!r}")
    path = Path(folder or WEIGHTS_DIR) / f"body_shape_{instance}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: python -m bolid.body_shape train --instance {instance}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    with torch.random.fork_rng(devices=[]):  # the init is overwritten below: it must not consume the global RNG
        net = BodyShapeNet(hidden=int(meta["hidden"]), depth=int(meta["depth"]))
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bolid.body_shape", description="Train the body-shape model.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one instance on synthetic skeletons and write its weights")
    t.add_argument("--instance", choices=sorted(INSTANCES), required=True)
    t.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for the weights and body_shape.json")
    t.add_argument("--steps", type=int, help="override the instance's step count (a reduced check)")
    t.add_argument("--threads", type=int, default=2, help="torch threads (the budget is 2 CPU cores)")
    c = sub.add_parser("check", help="run the reduced training check and record its figures in body_shape.json")
    c.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder holding body_shape.json")
    args = parser.parse_args(argv)
    if args.cmd == "check":
        torch.set_num_threads(1)
        _, figures = train(**REDUCED_CHECK, log=None)
        record_path = args.out / RECORD.name
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        record["reduced_check"] = {"settings": REDUCED_CHECK, "validation": figures}
        atomic_write(record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
        print(json.dumps(figures, indent=2))
        return 0
    torch.set_num_threads(args.threads)
    cfg = dict(INSTANCES[args.instance])
    if args.steps is not None:
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        cfg["steps"] = args.steps
    t0 = time.perf_counter()
    net, figures = train(**cfg)
    seconds = time.perf_counter() - t0
    # --out and --threads do not change the weights: the record names what does.
    command = f"python -m bolid.body_shape train --instance {args.instance}"
    command += f" --steps {args.steps}" if args.steps is not None else ""
    path = save(net, args.instance, figures, command, seconds, args.out)
    print(json.dumps({"weights": str(path), "seconds": round(seconds, 1), **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
