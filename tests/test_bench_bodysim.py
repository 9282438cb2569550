"""The Body Sim benchmark's statistics (bench/bench_bodysim.py): the people-level AUC interval and the
ideal-observer ceiling, by value on constructed data."""

from __future__ import annotations

import torch

from bench.bench_bodysim import auroc, auroc_ci, gaussian_ceiling, real_pairs


def _real(ids: list[str], frames: int) -> dict:
    """The parts of ``load_real``'s result that pairing and resampling read (keypoints unused here)."""
    return {"ids": ids, "pv": (torch.zeros(frames, 17, 3), torch.zeros(frames, 17, 4))}


def test_gaussian_ceiling_runs_from_chance_to_perfect_and_grows_with_features():
    six = torch.ones(6)
    assert gaussian_ceiling(six, 0.02 * six) > 0.99  # people far apart, photos of one person identical
    assert abs(gaussian_ceiling(0.02 * six, six) - 0.5) < 0.02  # people alike, photos vary: chance
    one = gaussian_ceiling(torch.ones(1), torch.ones(1))
    assert 0.6 < one < gaussian_ceiling(six, six) < 0.95  # each independent feature adds evidence


def test_auroc_ci_covers_the_estimate_and_is_exact_when_every_resample_separates():
    ids = [f"p{i}" for i in range(20)] + ["p0", "p1", "p2", "p3"]
    real = _real(ids, 8)
    for set_name, (_, _, same) in real_pairs(real).items():
        perfect = same.float() + 0.01 * torch.rand(len(same))
        assert auroc_ci(real, set_name, perfect, same) == (1.0, 1.0)
        noisy = same.float() + 2.0 * torch.randn(len(same), generator=torch.Generator().manual_seed(0))
        lo, hi = auroc_ci(real, set_name, noisy, same)
        assert lo < auroc(noisy, same) < hi


def test_auroc_ci_resamples_frames_not_pairs():
    """Scores that depend only on which frames a pair holds: 66 same pairs share 12 frames, so the evidence is
    12 frames, not 66 pairs. Resampling frames gives a wide interval; resampling pairs would give a narrow one."""
    nf, frames = 30, 12
    real = _real([f"p{i}" for i in range(nf)], frames)
    a, b, same = real_pairs(real)["posevaried"]
    gen = torch.Generator().manual_seed(1)
    frame_effect = torch.randn(frames, generator=gen)
    photo_effect = torch.randn(nf, generator=gen)
    fa = frame_effect[a - nf]
    scores = torch.where(same, fa + frame_effect[(b - nf).clamp(min=0)], fa + photo_effect[b.clamp(max=nf - 1)])
    lo, hi = auroc_ci(real, "posevaried", scores, same)
    pair_draws = []
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        i = torch.randint(len(scores), (len(scores),), generator=g)
        if same[i].any() and (~same[i]).any():
            pair_draws.append(auroc(scores[i], same[i]))
    p_lo, p_hi = torch.quantile(torch.tensor(pair_draws), torch.tensor([0.025, 0.975])).tolist()
    assert hi - lo > 1.5 * (p_hi - p_lo)
