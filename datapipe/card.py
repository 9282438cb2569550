"""``DATASET_CARD.md``: what a built dataset holds, where it came from, and its caveats; written by the merge.

Follows the Hugging Face dataset card layout (YAML front matter, then sections). Counts come from ``stats.json``
and ``index.json``; source hosts and file dates from ``samples.parquet``'s rows. The text on biases and licences
states what this pipeline does to the data and what it cannot know; edit the card before publishing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from bolid.files import atomic_write
from bolid.shards import SPLITS


def render(index: dict, stats: dict, rows: list[dict], layout: str) -> str:
    """The card's Markdown text."""
    gone = Counter(r["identity"] for r in rows if r.get("reason") == "removed")
    removed = f"{sum(gone.values())} photos of {len(gone)} identities" if gone else "nothing"
    hosts = Counter(urlsplit(r["url"]).hostname for r in rows if r.get("url"))
    dates = sorted(r["file_date"] for r in rows if r.get("file_date"))
    samples = index["totals"]["samples"]
    size = "n<1K" if samples < 1000 else "1K<n<10K" if samples < 10_000 else "10K<n<100K"
    stage_lines = [
        f"| {name} | {s['in']} | {s['out']} | "
        + (", ".join(f"{r} {n}" for r, n in s["rejected"].items() if n) or "-")
        + " |"
        for name, s in stats["stages"].items()
    ]
    split_lines = [
        f"| {s} | {len(index['splits'][s]['identities'])} | {index['splits'][s]['samples']} |" for s in SPLITS
    ]
    source = (
        ", ".join(f"{h} ({n} photos)" for h, n in hosts.most_common())
        if hosts
        else "photos supplied as <identity>/<image> folders (no URLs recorded)"
    )
    return f"""---
license: other
license_name: research-only-photos-belong-to-their-owners
task_categories:
- text-to-image
size_categories:
- {size}
pretty_name: BoLID identity-grouped photo shards
---

# Dataset card

Identity-grouped WebDataset shards built by `python -m datapipe build` (BoLID) for identity-preserving image
generation. Shard format: `bolid/shards.py`; one row per input photo in `samples.parquet`; shard checksums in
`index.json` (`python -m datapipe verify .`).

## Sources

- Input layout: `{layout}`. Sources: {source}.
- Dates the source files were stored (file modification times, UTC): {dates[0] if dates else "unknown"} to
  {dates[-1] if dates else "unknown"}. The crawler's own run logs (`failures.jsonl`, its log file) give the
  crawl times.

## Counts per stage

| stage | in | out | rejected |
| --- | --- | --- | --- |
{chr(10).join(stage_lines)}

Identities: {stats["identities"]["found"]} found, {stats["identities"]["kept"]} kept;
{samples} samples in {index["totals"]["shards"]} shards.

## Identities and splits (split by person, never by photo)

| split | identities | samples |
| --- | --- | --- |
{chr(10).join(split_lines)}

A photo found under two or more people (the same bytes, or a perceptual hash within
`ingest.near_duplicate_distance`) is dropped from all of them (`multi_identity`), so no photo is in two
splits.

## Known biases and limitations

- Celebrity galleries over-represent public events, red carpets, professional and posed photos, young
  adults, and the people a single site chooses to cover; the mix of gender, age, skin tone and body type
  was not measured.
- Filters shape the data: photos under `ingest.min_size` px (phone snapshots, old photos), photos with
  several prominent people, and photos with few visible body keypoints are removed, so full-body,
  single-person, high-resolution photos dominate.
- Identity labels come from the gallery a photo was found in, not from verification; wrong labels that are
  not exact or near copies of another person's photo remain.
- Captions are machine-generated (BLIP-2) and inherit its biases and errors.

## Licence and personal data

The photos belong to their photographers and rights holders, and show real, identifiable people. Nothing
here grants a licence to them: this card and the shards are for research use only, and redistribution or
commercial use needs the rights holders' permission. The code that built them is Apache-2.0.

## Removal

To have a person or a photo removed, contact the dataset's maintainer with the identity name or the photo's
SHA-256 (both in `samples.parquet`). The maintainer runs

    python -m datapipe remove OUT --identity NAME --sha256 HASH

which records the request in `removed.json` (every later build leaves those samples out), rewrites only the
shards that held them, updates `index.json` (sizes, checksums), `stats.json`, `samples.parquet` and this
card, then checks `python -m datapipe verify OUT` and replaces the changed shards in every published copy
(their names are listed in the command's output). Removed so far: {removed}.
"""


def write_card(out: Path, index: dict, stats: dict, rows: list[dict], layout: str) -> None:
    """Write ``out/DATASET_CARD.md``."""
    atomic_write(Path(out) / "DATASET_CARD.md", render(index, stats, rows, layout))
