"""Evaluation results: the table cells with confidence intervals, saved images and the comparison figure.

Everything :func:`bolid.evaluate.evaluate` writes to ``out/`` is produced here (formats are described
in :mod:`bolid.evaluate`): ``results.md`` / ``results.csv`` / ``results.json`` from :class:`Row`\ s,
PNGs with their settings in a ``bolid`` text chunk, and ``comparison.png``.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

METRICS = ("face_sim", "body_sim", "clip_t", "clip_i")  # table order; Face Sim only when a face model is given
METRIC_TITLES = {"face_sim": "Face Sim", "body_sim": "Body Sim", "clip_t": "CLIP-T", "clip_i": "CLIP-I"}


@dataclass
class MetricResult:
    """One metric of one model on one dataset."""

    mean: float
    ci_low: float
    ci_high: float
    n: int  # scored images
    n_identities: int

    def cell(self, digits: int) -> str:
        if math.isnan(self.mean):
            return "n/a"
        if math.isnan(self.ci_low):
            return f"{self.mean:.{digits}f} ± n/a"
        half = max(self.mean - self.ci_low, self.ci_high - self.mean)
        return f"{self.mean:.{digits}f} ± {half:.{digits}f}"


@dataclass
class Row:
    """Results of one model on one dataset."""

    dataset: str
    model: str
    metrics: dict[str, MetricResult]
    pairs: int
    failure_rate: float
    failures: dict[str, int]
    face_pairs: int = 0
    face_failure_rate: float = math.nan
    face_failures: dict[str, int] | None = None
    #: each image's Body Sim (NaN: not scored) by ``(identity, prompt index, seed index)``, for paired comparisons
    body_sim_samples: dict[tuple[str, int, int], float] = field(default_factory=dict, repr=False)
    #: Body Sim minus the no-identity model's on the same images' prompts, seeds and photos (:func:`paired_gain`)
    body_sim_gain: MetricResult | None = None


# ------------------------------------------------------------------------------------------- statistics


def cluster_bootstrap_ci(
    values: torch.Tensor, groups: Sequence[str], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float, int]:
    """Mean of ``values`` (NaN = not scored) and its percentile bootstrap CI, resampling whole groups.

    Returns:
        ``(mean, low, high, n_scored)``; the interval is NaN when fewer than 2 groups have scored values.
    """
    values = values.double()
    ok = ~torch.isnan(values)
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    gid = torch.tensor([index[g] for g in groups], dtype=torch.long)
    sums = torch.zeros(len(names), dtype=torch.float64).index_add_(0, gid[ok], values[ok])
    counts = torch.zeros(len(names), dtype=torch.float64).index_add_(0, gid[ok], ok[ok].double())
    n = int(counts.sum())
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(sums.sum() / counts.sum())
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    if len(sums) < 2:
        return mean, math.nan, math.nan, n
    g = torch.Generator().manual_seed(seed)
    draw = torch.randint(len(sums), (resamples, len(sums)), generator=g)  # (B, groups)
    stats = sums[draw].sum(1) / counts[draw].sum(1)
    alpha = (1 - level) / 2
    low, high = torch.quantile(stats, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return mean, low, high, n


def paired_gain(row: Row, base: Row, resamples: int = 2000, seed: int = 0) -> MetricResult:
    """``row``'s Body Sim minus ``base``'s, image by image (same identity, prompt and seed), with a bootstrap CI.

    Both models are scored against the same held-out photos, so the person's own difficulty cancels and the
    interval is far tighter than the two rows' own intervals side by side. Images that either model failed to
    score are left out; whole identities are resampled (:func:`cluster_bootstrap_ci`).
    """
    keys = [k for k in row.body_sim_samples if k in base.body_sim_samples]
    diff = torch.tensor([row.body_sim_samples[k] - base.body_sim_samples[k] for k in keys], dtype=torch.float64)
    groups = [k[0] for k in keys]
    mean, low, high, n = cluster_bootstrap_ci(diff, groups, resamples, seed)
    scored = {g for g, d in zip(groups, diff.tolist(), strict=True) if not math.isnan(d)}
    return MetricResult(mean, low, high, n, len(scored))


# ------------------------------------------------------------------------------------------- image files


def save_image(image: Image.Image, path: Path, settings: dict) -> None:
    """Write a PNG with ``settings`` as JSON in its ``bolid`` text chunk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("bolid", json.dumps(settings, sort_keys=True))
    image.save(path, pnginfo=info)


def read_settings(path: str | Path) -> dict:
    """The settings stored in a generated PNG by :func:`save_image`."""
    with Image.open(path) as im:
        return json.loads(im.text["bolid"])


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(image: Image.Image, tile: int) -> Image.Image:
    """``image`` scaled to fit a ``tile`` square, centred on white."""
    im = image.convert("RGB")
    scale = tile / max(im.size)  # up or down: tiny-kit images are 64 px
    im = im.resize((max(round(im.width * scale), 1), max(round(im.height * scale), 1)), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (tile, tile), "white")
    canvas.paste(im, ((tile - im.width) // 2, (tile - im.height) // 2))
    return canvas


def comparison_grid(
    rows: Sequence[tuple[str, Image.Image, Sequence[Image.Image | None]]], columns: Sequence[str], tile: int = 256
) -> Image.Image:
    """A figure: one row per (identity, prompt): label | reference | one image per model.

    Args:
        rows: ``(label, reference, images)``, ``images`` in ``columns`` order (``None`` leaves a blank).
        columns: model names.
        tile: side of each image cell in pixels.
    """
    pad, label_w, head_h = 6, max(tile, 160), 46
    font, small = _font(16), _font(12)
    width = label_w + (1 + len(columns)) * (tile + pad) + pad
    height = head_h + len(rows) * (tile + pad) + pad
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)
    for j, title in enumerate(["reference", *columns]):
        x = label_w + pad + j * (tile + pad)
        lines = textwrap.wrap(title, width=max(tile // 9, 8))
        if len(lines) > 2:
            lines = [lines[0], textwrap.shorten(" ".join(lines[1:]), width=max(tile // 9, 8), placeholder="…")]
        draw.multiline_text((x + 2, 4), "\n".join(lines), fill="black", font=font, spacing=2)
    chars = max(label_w // 7, 12)
    for i, (label, reference, images) in enumerate(rows):
        y = head_h + pad + i * (tile + pad)
        lines = textwrap.wrap(label, width=chars)[: max(tile // 15, 1)]
        draw.multiline_text((pad, y), "\n".join(lines), fill="black", font=small, spacing=2)
        for j, im in enumerate([reference, *images]):
            x = label_w + pad + j * (tile + pad)
            if im is None:
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline="grey")
            else:
                fig.paste(_fit(im, tile), (x, y))
    return fig


# -------------------------------------------------------------------------------------------- writers


def write_results(rows: Sequence[Row], out: Path, models: Sequence[str], datasets: Sequence[str], record: dict) -> None:
    """results.md (the paper's table), results.csv and results.json."""
    by = {(r.dataset, r.model): r for r in rows}
    digits = {"face_sim": 3, "body_sim": 3, "clip_t": 2, "clip_i": 3}
    metrics = [m for m in METRICS if any(m in r.metrics for r in rows)]
    head = ["Model"] + [f"{d} · {METRIC_TITLES[m]} ↑" for d in datasets for m in metrics]
    lines = ["# BoLID evaluation", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        cells = [model]
        for d in datasets:
            r = by.get((d, model))
            cells += [r.metrics[m].cell(digits[m]) if r else "" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    run = record.get("run", {})
    pose = (record.get("body_sim") or {}).get("pose", "BlazePose")
    lines += [
        "",
        f"Mean ± 95% CI half-width (percentile bootstrap over identities, {run.get('ci_resamples')} resamples). "
        f"Body Sim: cosine of standardised body proportions ({pose}), mean over images where a body was found; "
        "CLIP-T: CLIPScore (0-100) with the prompt; CLIP-I: CLIP image cosine with the no-identity image of the "
        f"same prompt and seed (by {record.get('no_identity_model')}, or by a peer's own base model: see "
        "clip_i_reference in the settings; 1 for a base model by definition)."
        + (
            " Face Sim: ArcFace cosine of the largest face in the image and in the reference (InsightFace "
            f"{record.get('face_sim_model', {}).get('pack')}), mean over images where both have a face."
            if "face_sim" in metrics
            else ""
        ),
        "",
    ]
    chance = {d: v for d, v in (record.get("body_sim_chance_level") or {}).items() if v is not None}
    if chance:
        lines += [
            f"Body Sim chance level: {record.get('no_identity_model')} (no identity input) scored against the same "
            "photos: " + ", ".join(f"{d} {v:.3f}" for d, v in chance.items()) + ". A model keeps the body only as far "
            "as it scores above this.",
            "",
        ]
    gains = [r for r in rows if r.body_sim_gain is not None]
    if gains:
        gain_datasets = [d for d in datasets if any(r.dataset == d for r in gains)]
        lines += [
            f"## Body Sim over {record.get('no_identity_model')}, paired",
            "",
            "| Model | " + " | ".join(f"{d} · Body Sim − chance" for d in gain_datasets) + " |",
            "|" + "---|" * (len(gain_datasets) + 1),
        ]
        by_gain = {(r.dataset, r.model): r.body_sim_gain for r in gains}
        for model in models:
            if any((d, model) in by_gain for d in gain_datasets):
                cells = [_interval(by_gain[d, model]) if (d, model) in by_gain else "" for d in gain_datasets]
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Mean difference from the no-identity model's Body Sim on the same identity, prompt, seed and held-out "
            "photo, [95% CI] (percentile bootstrap over identities). Paired, it cancels how hard each person's "
            "photo is to match, so it can be clear of 0 where the table's intervals overlap.",
            "",
        ]
    lines += [
        "## Body Sim failures",
        "",
        "| Dataset | Model | pairs | failure rate | no body | no reference body | too few features |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r.failures
        lines.append(
            f"| {r.dataset} | {r.model} | {r.pairs} | {100 * r.failure_rate:.1f}% | {f['no_body']} "
            f"| {f['no_reference_body']} | {f['too_few_features']} |"
        )
    if "face_sim" in metrics:
        lines += [
            "",
            "## Face Sim failures",
            "",
            "| Dataset | Model | pairs | failure rate | no face | no reference face |",
        ]
        lines += ["|---|---|---|---|---|---|"]
        for r in rows:
            f = r.face_failures or {}
            lines.append(
                f"| {r.dataset} | {r.model} | {r.face_pairs} | {100 * r.face_failure_rate:.1f}% "
                f"| {f.get('no_face', 0)} | {f.get('no_reference_face', 0)} |"
            )
    lines += ["", "## Settings", "", "```json", json.dumps(record, indent=1, default=str), "```", ""]
    (out / "results.md").write_text("\n".join(lines), encoding="utf-8")

    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "model", "metric", "mean", "ci_low", "ci_high", "n", "n_identities", "failure_rate"])
        for r in rows:
            extra = {"body_sim_gain": r.body_sim_gain} if r.body_sim_gain is not None else {}
            for m, x in [(m, r.metrics[m]) for m in metrics] + list(extra.items()):
                rate = {"body_sim": f"{r.failure_rate:.6f}", "face_sim": _fmt(r.face_failure_rate)}.get(m, "")
                w.writerow(
                    [
                        r.dataset,
                        r.model,
                        m,
                        *(_fmt(v) for v in (x.mean, x.ci_low, x.ci_high)),
                        x.n,
                        x.n_identities,
                        rate,
                    ]
                )

    payload = {
        "settings": record,
        "results": [
            {
                "dataset": r.dataset,
                "model": r.model,
                "pairs": r.pairs,
                "body_sim_failure_rate": r.failure_rate,
                "body_sim_failures": r.failures,
                **(
                    {
                        "face_sim_pairs": r.face_pairs,
                        "face_sim_failure_rate": _json_num(r.face_failure_rate),
                        "face_sim_failures": r.face_failures,
                    }
                    if r.face_failures is not None
                    else {}
                ),
                "metrics": {m: {k: _json_num(v) for k, v in asdict(x).items()} for m, x in r.metrics.items()},
                **(
                    {"body_sim_gain": {k: _json_num(v) for k, v in asdict(r.body_sim_gain).items()}}
                    if r.body_sim_gain is not None
                    else {}
                ),
            }
            for r in rows
        ],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")


def _interval(x: MetricResult) -> str:
    if math.isnan(x.mean):
        return "n/a"
    if math.isnan(x.ci_low):
        return f"{x.mean:+.3f} [n/a]"
    return f"{x.mean:+.3f} [{x.ci_low:+.3f}, {x.ci_high:+.3f}]"


def _fmt(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.6f}"


def _json_num(v):
    return None if isinstance(v, float) and math.isnan(v) else v
