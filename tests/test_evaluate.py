"""The eval harness: datasets from real shards and folders, configs, CIs, and a full tiny-kit run with every output."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from bolid.cli.eval import EvalConfig
from bolid.evaluate import folder_dataset, load_prompts, shard_dataset
from bolid.results import cluster_bootstrap_ci, read_settings

ROOT = Path(__file__).resolve().parents[1]
IDENTITIES = ("anna", "boris", "carla", "dmitri", "elena", "fedor")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A shard set written by the real datapipe build (tiny kit) from synthetic photos: 6 identities x 2."""
    from datapipe.build import build
    from datapipe.config import BuildConfig
    from demo.synthetic import jpeg_bytes, synthetic_photo

    tmp = tmp_path_factory.mktemp("eval-shards")
    for i, name in enumerate(IDENTITIES):
        (tmp / "in" / name).mkdir(parents=True)
        for j in range(2):
            photo = synthetic_photo(200, 240, 100 * i + j, figures=1)
            (tmp / "in" / name / f"{j}.jpg").write_bytes(jpeg_bytes(photo))
    config = BuildConfig.from_yaml(ROOT / "configs" / "shards" / "tiny.yaml").replace(
        workers=0, identities__min_photos=1, pose__max_persons=10, pose__min_body_keypoints=0
    )
    build(config, tmp / "in", tmp / "out")
    return tmp / "out"


@pytest.fixture(scope="module")
def photos(tmp_path_factory, fixtures) -> Path:
    """A ``<identity>/<image>`` folder: the COCO skier, plus a file that is not an image."""
    root = tmp_path_factory.mktemp("eval-photos")
    (root / "skier").mkdir()
    shutil.copy(fixtures / "coco_000000000785.jpg", root / "skier" / "a.jpg")
    (root / "skier" / "b.jpg").write_text("<html>not a photo</html>")
    (root / "empty").mkdir()
    return root


# ----------------------------------------------------------------------------------------------- datasets


def test_shard_dataset_reads_the_held_out_identities(shards):
    from bolid.shards import read_index

    index = read_index(shards)
    for split in ("test", "validation"):
        ds = shard_dataset(split, [shards], split, references=2)
        assert [i.name for i in ds.identities] == index.identities_in(split)
        for ident in ds.identities:
            assert len(ident.references) == 2 and all(im.mode == "RGB" for im in ident.references)
            assert all(s.startswith("shard-") and ident.name in s for s in ident.sources)
    with pytest.raises(ValueError, match="no identity of split 'test' has 3"):
        shard_dataset("x", [shards], "test", references=3)


def test_a_further_photo_is_held_out_for_body_sim(shards, tmp_path, fixtures):
    """With more photos than references, the model gets the references and Body Sim the held-out photo."""
    ds = shard_dataset("test", [shards], "test", references=1)
    for ident in ds.identities:  # 2 photos each: 1 reference + 1 held out
        assert len(ident.references) == 1 and ident.held_out is not None
        assert ident.held_out_source != ident.sources[0] and ident.body_target is ident.held_out
    assert all(i.held_out is None for i in shard_dataset("test", [shards], "test", references=2).identities)
    (tmp_path / "p").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(fixtures / "coco_000000000785.jpg", tmp_path / "p" / name)
    (ident,) = folder_dataset("f", tmp_path, references=2).identities
    assert [Path(s).name for s in ident.sources] == ["a.jpg", "b.jpg"] and Path(ident.held_out_source).name == "c.jpg"
    (ident,) = folder_dataset("f", tmp_path, references=3).identities
    assert ident.held_out is None and ident.body_target is ident.references[0]


def test_folder_dataset_skips_what_it_cannot_use(photos):
    ds = folder_dataset("photos", photos)
    assert [i.name for i in ds.identities] == ["skier"]
    assert ds.identities[0].sources == [str(photos / "skier" / "a.jpg")]
    with pytest.raises(ValueError, match="no identity folder"):
        folder_dataset("photos", photos, references=2)  # the second "photo" is not an image
    with pytest.raises(ValueError, match="does not exist"):
        folder_dataset("nowhere", photos / "nowhere")


# ------------------------------------------------------------------------------------------------ prompts


def test_prompt_list_has_distinct_scenes_and_outfits():
    prompts = load_prompts(ROOT / "configs" / "eval" / "prompts.yaml")
    assert len(prompts) >= 12 and len(set(prompts)) == len(prompts)
    assert load_prompts(ROOT / "configs" / "eval" / "prompts.yaml", max_prompts=3) == prompts[:3]
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        load_prompts(["a person", ""])


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", ["eval/real.yaml", "eval/tiny.yaml"])
def test_eval_configs_parse(name):
    cfg = EvalConfig.from_yaml(ROOT / "configs" / name)
    assert len(cfg.datasets) == 2 and cfg.prompts
    kinds = [m.kind for m in cfg.models]
    assert kinds[0] == "base" and kinds.count("bolid") >= 3
    scales = {(m.scale_face, m.scale_body) for m in cfg.models if m.kind == "bolid"}
    assert {(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)} <= scales  # BoLID, face only, body only


def _minimal(**changes) -> dict:
    cfg = {
        "out": "x",
        "prompts": ["a person"],
        "datasets": [{"name": "d", "folder": "f"}],
        "models": [{"name": "m", "kind": "base"}],
    }
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"modles": []}, r"unknown config key\(s\): modles \(did you mean models\?\)"),
        ({"models": [{"name": "m", "kind": "bolid", "scale_bdy": 0}]}, r"models\[0\]\.scale_bdy"),
        ({"models": [{"name": "m", "kind": "lora"}]}, "kind must be one of"),
        ({"models": [{"name": "m", "kind": "base", "adapter": "a"}]}, "takes no adapter"),
        ({"models": [{"name": "m", "kind": "bolid", "scale_face": -1}]}, "scale_face must be a number >= 0"),
        ({"datasets": [{"name": "d", "folder": "f", "shards": ["s"]}]}, "exactly one of 'shards' or 'folder'"),
        ({"datasets": [{"folder": "f"}]}, r"datasets\[0\]: missing key 'name'"),
        ({"generation": {"stpes": 4}}, r"generation\.stpes"),
        ({"images_per_prompt": 0}, "images_per_prompt must be an int > 0, got 0"),
        ({"dtype": "fp8"}, "dtype must be one of"),
        ({"metrics": {"ci_resamples": 50}}, r"metrics\.ci_resamples must be an int >= 100, got 50"),
        ({"comparison": {"tile": 16}}, r"comparison\.tile must be an int >= 32, got 16"),
        ({"metrics": {"face_pack": "buffalo"}}, r"metrics\.face_pack must be one of 'antelopev2', 'buffalo_l' or null"),
        ({"generation": {"steps": "four"}}, r"generation\.steps must be an int > 0 or null, got 'four'"),
    ],
)
def test_config_errors_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig.from_dict(_minimal(**changes))


def test_missing_key_is_named():
    cfg = _minimal()
    del cfg["models"]
    with pytest.raises(ValueError, match="missing key 'models'"):
        EvalConfig.from_dict(cfg)


# -------------------------------------------------------------------------------------------- statistics


def test_cluster_bootstrap_ci():
    values = torch.tensor([1.0, 1.0, 2.0, 2.0, float("nan"), 3.0])
    groups = ["a", "a", "b", "b", "c", "c"]
    mean, low, high, n = cluster_bootstrap_ci(values, groups, resamples=500)
    assert n == 5 and mean == pytest.approx(9 / 5)  # the NaN (a failure) is not scored
    assert 1.0 <= low < mean < high <= 3.0
    assert cluster_bootstrap_ci(values, groups, resamples=500) == (mean, low, high, n)  # seeded
    one = cluster_bootstrap_ci(torch.tensor([0.5, 0.7]), ["a", "a"])
    assert one[0] == pytest.approx(0.6) and math.isnan(one[1]) and math.isnan(one[2])
    assert math.isnan(cluster_bootstrap_ci(torch.tensor([float("nan")]), ["a"])[0])


def test_cluster_bootstrap_width_matches_the_standard_error():
    g = torch.Generator().manual_seed(0)
    per_group = torch.randn(200, generator=g)  # 200 identities, 3 identical images each
    values = per_group.repeat_interleave(3)
    groups = [f"id{i}" for i in range(200) for _ in range(3)]
    mean, low, high, _ = cluster_bootstrap_ci(values, groups, resamples=2000)
    se = per_group.std().item() / math.sqrt(200)  # identities, not images, are the independent units
    assert (high - low) / 2 == pytest.approx(1.96 * se, rel=0.15)


def test_paired_gain_cancels_each_persons_difficulty(tmp_path):
    """Body Sim over the base, image by image: people differ far more than the model's gain, so the two rows'
    own intervals overlap, while the paired interval is tight around the true gain (+0.1) and clear of 0.
    Images either model failed to score are left out."""
    from bolid.results import MetricResult, Row, paired_gain, write_results

    g = torch.Generator().manual_seed(0)
    people = [f"p{i}" for i in range(20)]
    level = torch.rand(20, generator=g) * 0.8 - 0.4  # how well anything matches each person's held-out photo
    base, model = {}, {}
    for i, person in enumerate(people):
        for prompt in range(3):
            for k in range(2):
                noise = float(torch.randn((), generator=g)) * 0.02
                base[person, prompt, k] = float(level[i]) + noise
                model[person, prompt, k] = float(level[i]) + 0.1 + noise + float(torch.randn((), generator=g)) * 0.02
    model["p0", 0, 0] = float("nan")  # a failure: that image counts for neither
    rows = []
    for name, samples in (("Base", base), ("BoLID", model)):
        values = torch.tensor(list(samples.values()))
        mean, low, high, n = cluster_bootstrap_ci(values, [k[0] for k in samples], 1000)
        metrics = {"body_sim": MetricResult(mean, low, high, n, 20)}
        failures = {"no_body": 0, "no_reference_body": 0, "too_few_features": 0}
        rows.append(Row("Mini test", name, metrics, n, 0.0, failures, body_sim_samples=samples))
    (b, m) = [r.metrics["body_sim"] for r in rows]
    assert m.ci_low < b.ci_high  # side by side the intervals overlap ...
    gain = paired_gain(rows[1], rows[0], resamples=1000)
    assert gain.n == 20 * 6 - 1 and gain.n_identities == 20
    assert gain.mean == pytest.approx(0.1, abs=0.01)
    assert 0.08 < gain.ci_low < gain.mean < gain.ci_high < 0.12  # ... paired, the gain is clear of 0
    rows[1].body_sim_gain = gain
    write_results(rows, tmp_path, ["Base", "BoLID"], ["Mini test"], {"no_identity_model": "Base", "run": {}})
    md = (tmp_path / "results.md").read_text()
    assert "## Body Sim over Base, paired" in md
    assert f"| BoLID | {gain.mean:+.3f} [{gain.ci_low:+.3f}, {gain.ci_high:+.3f}] |" in md
    saved = json.loads((tmp_path / "results.json").read_text())["results"][1]["body_sim_gain"]
    assert saved["mean"] == pytest.approx(gain.mean)


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def run(shards, photos, tmp_path_factory):
    """`python -m bolid eval` on the tiny kit: two datasets, base + three BoLID models, K=2, two prompts."""
    from bolid.__main__ import main

    tmp = tmp_path_factory.mktemp("eval-run")
    config = {
        "components": "tiny",
        "out": str(tmp / "out"),
        "prompts": str(ROOT / "configs" / "eval" / "prompts.yaml"),
        "max_prompts": 2,
        "images_per_prompt": 2,
        "batch_size": 2,
        "datasets": [
            {"name": "Demo test", "shards": [str(shards)], "split": "test", "max_identities": 1},
            {"name": "Photos", "folder": str(photos)},
        ],
        "models": [
            {"name": "SDXL-Lightning", "kind": "base"},
            {"name": "BoLID", "kind": "bolid"},
            {"name": "BoLID face only", "kind": "bolid", "scale_body": 0.0},
            {"name": "BoLID body only", "kind": "bolid", "scale_face": 0.0},
        ],
        "generation": {"steps": 2, "pose_threshold": 0.3},
        "metrics": {"ci_resamples": 200},
        "comparison": {"identities": 1, "prompts": 2, "tile": 64},
    }
    path = tmp / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["eval", "--config", str(path)]) == 0
    return tmp / "out", config


def test_run_writes_every_output(run):
    out, _ = run
    for name in ("results.md", "results.csv", "results.json", "comparison.png", "images.jsonl"):
        assert (out / name).is_file(), name


def test_results_table_is_laid_out_as_in_the_paper(run):
    out, config = run
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Model"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == ["Model"] + [
        f"{d} · {m} ↑" for d in ("Demo test", "Photos") for m in ("Body Sim", "CLIP-T", "CLIP-I")
    ]
    for model in config["models"]:
        assert f"| {model['name']} |" in md
    assert "## Body Sim failures" in md and '"command": "python -m bolid eval --config' in md

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 4 * 3 + 2 * 3  # datasets x models x metrics, + each BoLID model's paired Body Sim gain
    assert {r["model"] for r in rows if r["metric"] == "body_sim_gain"} == {m["name"] for m in config["models"][1:]}
    assert "## Body Sim over SDXL-Lightning, paired" in md
    base_clip_i = [r for r in rows if r["model"] == "SDXL-Lightning" and r["metric"] == "clip_i"]
    assert all(float(r["mean"]) == pytest.approx(1.0, abs=1e-5) for r in base_clip_i)  # compared with itself

    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["seeds"] == [0, 1]
    assert {(r["dataset"], r["model"]) for r in results["results"]} == {
        (d, m["name"]) for d in ("Demo test", "Photos") for m in config["models"]
    }


def test_body_sim_failures_are_reported_not_dropped(run):
    """The tiny kit's random images hold no body: every pair is a counted failure."""
    out, _ = run
    for r in json.loads((out / "results.json").read_text())["results"]:
        assert r["pairs"] == 2 * 2  # one identity per dataset x 2 prompts x K=2
        assert r["body_sim_failure_rate"] == 1.0
        assert r["body_sim_failures"]["no_body"] == 4
        assert r["metrics"]["body_sim"]["mean"] is None and r["metrics"]["body_sim"]["n"] == 0
        assert r["metrics"]["clip_t"]["n"] == 4


def test_every_image_is_saved_with_its_settings(run):
    out, config = run
    lines = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert len(lines) == 4 * 2 * 4  # models x datasets x (prompts x K)
    files = {line["path"] for line in lines}
    assert len(files) == 2 * 2 + 3 * 2 * 2 * 2  # base: once per (prompt, k); BoLID models: per identity too
    for line in lines:
        settings = read_settings(out / line["path"])
        assert settings["seed"] == line["seed"] == line["k"]
        assert settings["prompt"] == line["prompt"] and settings["model"] == line["model"]
    demo = [line for line in lines if line["dataset"] == "Demo test"]
    assert len({line["body_sim_against"] for line in demo}) == 1  # the identity's held-out photo ...
    for line in demo:  # ... which no model was given
        if line["model"] != "SDXL-Lightning":
            assert line["body_sim_against"] not in read_settings(out / line["path"])["reference_files"]
    bolid = next(line for line in lines if line["model"] == "BoLID body only")
    settings = read_settings(out / bolid["path"])
    assert (settings["scale_face"], settings["scale_body"]) == (0.0, 1.0)
    assert settings["steps"] == 2 and settings["identity"] == bolid["identity"] and settings["reference_files"]
    assert settings["pipeline"]["identity"] is True and settings["pipeline"]["scale_body"] == 1.0  # what it ran


def test_comparison_figure_has_a_cell_per_model(run):
    out, config = run
    fig = Image.open(out / "comparison.png")
    tile, pad = 64, 6
    columns = 1 + len(config["models"])  # reference + models
    rows = 2 * 2  # datasets x prompts (one identity each)
    assert fig.width == 160 + columns * (tile + pad) + pad  # label column is at least 160 px
    assert fig.height == 46 + rows * (tile + pad) + pad


def test_identity_folders_never_collide():
    from bolid.evaluate import _slug

    names = ["Анна", "Иван", "Anna Ivanova", "Anna_Ivanova", "anna", "a/b", "a_b"]
    slugs = [_slug(n) for n in names]
    assert len(set(slugs)) == len(names)
    assert _slug("anna") == "anna" and all("/" not in s for s in slugs)
