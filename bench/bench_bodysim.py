"""Does Body Sim tell people apart? Same-person vs different-person pairs of real photos, as ROC AUC.

On ``../shared/testdata/fullbody`` (full-body photos, identities in identities.csv; 6 people
have 2 photos) every pair of photos is scored with :class:`bolid.metrics.BodySimilarity`
(BlazePose keypoints, standardised proportions) exactly as the eval harness scores a generated
image against its reference. A valid metric scores same-person pairs above different-person
pairs: the ROC AUC of the similarity as a same-person detector is the separation.

Also reported:

* the AUC of the same cosine with the population statistics re-estimated for every pair
  *without* the two identities in it (the shipped statistics were measured on these photos,
  so this shows the separation is not an artefact of that);
* the AUC of the cosine of the raw, unstandardised proportions (why the metric standardises);
* the photo labelled ``unknown_...`` is left out: with no identity it is neither a same- nor a
  different-person pair;
* ``posevaried/``: one person in 12 poses; the mean and median Body Sim over all pairs of poses.

``--stats`` prints the population statistics that bolid/metrics.py ships as BODY_STATS_MEAN/STD.

    python -m bench.bench_bodysim                       # print
    python -m bench.bench_bodysim --write BENCHMARKS.md # and replace this benchmark's section there
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import time
from pathlib import Path

import torch

from bench.report import command, machine, write_section
from bolid.body import body_features
from bolid.metrics import (
    BODY_STATS_MEAN,
    BODY_STATS_STD,
    BodySimilarity,
    body_similarity,
    proportion_stats,
)

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA = Path(os.environ.get("BOLID_SHARED_TESTDATA", ROOT.parent / "shared" / "testdata"))


def auroc(scores: torch.Tensor, same: torch.Tensor) -> float:
    """ROC AUC (torchmetrics' binary AUROC) of ``scores`` as a detector of ``same``."""
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(scores.float(), same.long()))


def measure(data: Path, min_score: float) -> dict:
    metric = BodySimilarity(min_score=min_score)
    root = data / "fullbody"
    with open(root / "identities.csv", newline="", encoding="utf-8") as f:
        rows = [(r["file"].strip(), r["identity"].strip()) for r in csv.DictReader(f)]
    rows = [(f, i) for f, i in rows if not i.startswith("unknown_")]  # no label: cannot be paired either way
    t0 = time.perf_counter()
    kps = metric.keypoints([root / name for name, _ in rows])  # (N, 17, 3), NaN where no person
    seconds = time.perf_counter() - t0
    ids = [identity for _, identity in rows]
    pairs = list(itertools.combinations(range(len(rows)), 2))
    a, b = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    same = torch.tensor([ids[i] == ids[j] for i, j in pairs])

    metric.update(kps[a], kps[b])  # the metric as shipped
    sims = metric.per_sample()
    ok = ~torch.isnan(sims)
    out = {
        "images": len(rows),
        "identities": len(set(ids)),
        "no_person": int(torch.isnan(kps).any(dim=(1, 2)).sum()),
        "pairs_same": int(same.sum()),
        "pairs_diff": int((~same).sum()),
        "failure_rate": 1 - float(ok.double().mean()),
        "auc": auroc(sims[ok], same[ok]),
        "sim_same": float(sims[ok & same].mean()),
        "sim_diff": float(sims[ok & ~same].mean()),
        "pose_seconds_per_image": seconds / len(rows),
        "curve": {"shipped": (sims[ok], same[ok])},
    }
    # Statistics re-estimated per pair without the pair's two identities.
    held = []
    for (i, j), ok_ij in zip(pairs, ok.tolist(), strict=True):
        if not ok_ij:
            continue
        keep = [k for k in range(len(rows)) if ids[k] not in (ids[i], ids[j])]
        mean, std = proportion_stats(kps[keep], min_score)
        held.append(body_similarity(kps[i : i + 1], kps[j : j + 1], mean, std, min_score)[0][0])
    out["auc_held_out_stats"] = auroc(torch.stack(held), same[ok])
    # Raw proportions, no standardisation: all positive and alike, so their cosine says little.
    feats = body_features(torch.nan_to_num(kps.double()), min_score=min_score)
    p, m = feats.proportions, feats.proportions_mask
    both = m[a] * m[b]
    raw = (p[a] * p[b] * both).sum(-1) / ((p[a] * both).norm(dim=-1) * (p[b] * both).norm(dim=-1)).clamp(min=1e-8)
    out["auc_raw"] = auroc(raw[ok], same[ok])
    out["curve"]["raw proportions"] = (raw[ok], same[ok])

    out["stats"] = proportion_stats(kps, min_score)
    pose_dir = data / "posevaried"
    if pose_dir.is_dir():
        pk = metric.keypoints(sorted(pose_dir.glob("*.jpg")))
        pp = list(itertools.combinations(range(len(pk)), 2))
        pa, pb = torch.tensor([p[0] for p in pp]), torch.tensor([p[1] for p in pp])
        pose_metric = BodySimilarity(pose=metric.pose, min_score=min_score)
        pose_metric.update(pk[pa], pk[pb])
        ps = pose_metric.per_sample()
        out["pose"] = {
            "images": len(pk),
            "pairs": len(pp),
            "failure_rate": float(pose_metric.compute()["failure_rate"]),
            "mean": float(torch.nanmean(ps)),
            "median": float(torch.nanmedian(ps)),
        }
    return out


def plot(r: dict, path: Path) -> None:
    """ROC curves (shipped vs raw proportions) and the score distributions of same / different people."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.functional.classification import binary_roc

    fig, (roc, hist) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for name, (scores, same) in r["curve"].items():
        fpr, tpr, _ = binary_roc(scores.float(), same.long())
        roc.plot(fpr, tpr, label=f"{name} (AUC {auroc(scores, same):.3f})")
    roc.plot([0, 1], [0, 1], ls=":", c="grey")
    roc.set(xlabel="false positive rate (different people)", ylabel="true positive rate (same person)",
            title="Body Sim as a same-person detector")  # fmt: skip
    roc.legend(loc="lower right")
    scores, same = r["curve"]["shipped"]
    bins = torch.linspace(-1, 1, 41).tolist()
    hist.hist(
        scores[~same].tolist(), bins=bins, density=True, alpha=0.6, label=f"different people ({int((~same).sum())})"
    )
    hist.hist(scores[same].tolist(), bins=bins, density=True, alpha=0.6, label=f"same person ({int(same.sum())})")
    hist.set(xlabel="Body Sim", ylabel="density", title="Body Sim of photo pairs")
    hist.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(r: dict) -> str:
    import mediapipe

    lines = [
        "## Body Sim validity: same person vs different person (real photos)",
        "",
        "Goal: Body Sim must score two photos of one person above photos of two different people.",
        "",
        f"Data: `shared/testdata/fullbody`, {r['images']} photos of {r['identities']} people (iPER, DeepFashion); "
        f"every pair: {r['pairs_same']} same-person, {r['pairs_diff']} different-person. Pose model: BlazePose "
        f"(not the training loss's ViTPose); {r['no_person']} photos without a detected person; pair failure rate "
        f"{100 * r['failure_rate']:.1f}%.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| **ROC AUC, Body Sim as shipped** | **{r['auc']:.3f}** |",
        f"| ROC AUC, statistics re-estimated without each pair's two people | {r['auc_held_out_stats']:.3f} |",
        f"| ROC AUC, raw proportions (no standardisation) | {r['auc_raw']:.3f} |",
        f"| mean Body Sim, same person / different people | {r['sim_same']:.3f} / {r['sim_diff']:.3f} |",
    ]
    if "pose" in r:
        p = r["pose"]
        lines.append(
            f"| posevaried: one person, {p['images']} poses, {p['pairs']} pairs: mean / median Body Sim | "
            f"{p['mean']:.3f} / {p['median']:.3f} (failure rate {100 * p['failure_rate']:.1f}%) |"
        )
    lines += [
        f"| BlazePose time per photo | {1000 * r['pose_seconds_per_image']:.0f} ms |",
        "",
        f"Only {r['pairs_same']} same-person pairs exist in this set: read the AUC as a check that the metric "
        "separates people, not as a precise figure. Bent poses (posevaried) lower Body Sim: 2D proportions cannot "
        "undo foreshortening out of the image plane.",
        "",
        f"Machine: {machine()}, mediapipe {mediapipe.__version__} (BlazePose full, CPU).",
        "",
        f"Command: `{command('bench.bench_bodysim')}`",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared testdata folder")
    parser.add_argument("--min-score", type=float, default=0.5, help="keypoint visibility threshold")
    parser.add_argument("--stats", action="store_true", help="print the population statistics of the proportions")
    parser.add_argument("--write", type=Path, help="replace this benchmark's section in this markdown file")
    args = parser.parse_args(argv)
    if not (args.data / "fullbody" / "identities.csv").is_file():
        parser.error(f"{args.data}/fullbody/identities.csv not found (set --data or BOLID_SHARED_TESTDATA)")
    r = measure(args.data, args.min_score)
    mean, std = r["stats"]
    if args.stats:
        print("BODY_STATS_MEAN =", tuple(round(v, 4) for v in mean.tolist()))
        print("BODY_STATS_STD =", tuple(round(v, 4) for v in std.tolist()))
    shipped = torch.tensor(BODY_STATS_MEAN), torch.tensor(BODY_STATS_STD)
    if not (torch.allclose(mean, shipped[0], atol=2e-3) and torch.allclose(std, shipped[1], atol=2e-3)):
        print("note: these photos' statistics differ from the shipped BODY_STATS_* (see --stats)", file=sys.stderr)
    section = report(r)
    if args.write:
        figure = Path(args.write).parent / "docs" / "bodysim_roc.png"
        plot(r, figure)
        section += f"\n\n![Body Sim ROC and score distributions]({figure.relative_to(Path(args.write).parent)})"
    print(section)
    if args.write:
        write_section(args.write, "bodysim", section)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
