"""BoLID-mini: the world, the trained mini kit, the identity pairs on its shards, and learned body identity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bolid.body import body_features
from bolid.mini.world import iter_world, make_identity, make_photo, render, write_world

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ world


def test_world_is_deterministic_and_identities_do_not_depend_on_the_count():
    a = [(i.name, np.asarray(im)) for i, _, _, im, _ in iter_world(3, 2, 2)]
    b = [(i.name, np.asarray(im)) for i, _, _, im, _ in iter_world(3, 4, 2)][:4]
    assert [n for n, _ in a] == [n for n, _ in b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))


def test_proportions_belong_to_the_person_not_the_photo():
    """Exact keypoints give the same proportions in every photo of a person (up to the body turn) and
    different ones for different people: body identity is a real, pose-invariant signal in this world."""
    people = []
    for i in range(6):
        ident = make_identity(0, i)
        kps = [render(ident, make_photo(0, i, j))[1] for j in range(6)]
        props = body_features(torch.tensor(np.stack(kps))).proportions[:, :4]  # limbs: unaffected by the turn
        people.append(props)
    within = torch.stack([p.std(0) for p in people]).mean()
    between = torch.stack([p.mean(0) for p in people]).std(0).mean()
    assert within < 0.02 and between > 3 * within, (within, between)


def test_write_world_writes_identity_folders_labels_and_refuses_other_settings(tmp_path):
    root = write_world(tmp_path / "w", seed=1, identities=3, photos=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["p01_0000", "p01_0001", "p01_0002"]
    assert len(list(root.glob("*/*.png"))) == 6
    assert len((root / "labels.jsonl").read_text().splitlines()) == 6
    write_world(root, seed=1, identities=3, photos=2)  # same settings: kept
    with pytest.raises(ValueError, match="delete it to re-render"):
        write_world(root, seed=2, identities=3, photos=2)


def test_look_captions_name_each_persons_own_look(tmp_path):
    """The UNet's look captions: the photo's caption with the person's look for "a person", read back from the
    world's seed; the same words for every photo of a person, and a clear error for a world of another seed."""
    from bolid.mini.train import World
    from bolid.mini.world import SKIN, SKIN_WORDS

    root = write_world(tmp_path / "w", seed=3, identities=12, photos=2)
    world = World(root)
    looks = {}
    for row, plain, look in zip(world.labels, world.captions, world.look_captions, strict=True):
        ident = make_identity(3, int(row["identity"].rsplit("_", 1)[1]))
        assert look == plain.replace("a person", ident.look, 1) and look != plain
        assert f"{SKIN_WORDS[SKIN.index(ident.skin)]} skin" in look
        assert looks.setdefault(row["identity"], ident.look) == ident.look
    assert len(set(looks.values())) >= 10  # people differ in words, as they differ in looks
    (root / "world.json").write_text((root / "world.json").read_text().replace('"seed": 3', '"seed": 4'))
    with pytest.raises(ValueError, match="does not match world seed 4"):
        World(root)


# --------------------------------------------------------------------------------------------- mini kit


def test_mini_keypoint_models_read_the_renders(tmp_path):
    """Both trained keypoint models find the people of a world none of them trained on to about a pixel
    (median over the 12 body keypoints; bolid/mini/weights/README.md: 0.78 and 0.96 px; here 0.74 and 1.04).
    The previous 6 px-patch models (1.7 and 1.4 px) fail this bound."""
    from bolid.kits import mini

    world = list(iter_world(7, 8, 2))
    images = [im for *_, im, _ in world]
    exact = torch.tensor(np.stack([kp for *_, kp in world]))
    for kind in ("train", "eval"):
        persons = mini.pose_extractor(kind)(images)
        assert all(len(p) == 1 for p in persons), kind
        found = torch.tensor(np.stack([p[0].keypoints for p in persons]))
        err = (found[:, 5:, :2] - exact[:, 5:, :2]).norm(dim=-1).median()
        assert err < 1.3, (kind, float(err))  # pixels of a 64 px image; random weights: > 15


def test_mini_eva_clip_tells_people_apart(tmp_path):
    """BoLID's identity image encoder, on a world it never saw: two photos of one person embed closer than
    photos of two people, on the face and person crops the adapter cuts (bolid/mini/weights/README.md, 40
    people: face 0.987, person 0.748; here 0.99 and 0.75). The encoder trained on captions alone scores 0.55 and
    0.49 here and fails both bounds."""
    from bolid.mini.train import measure_identity

    q = measure_identity(tmp_path, people=16, photos=3)
    assert q["face"]["raw"] > 0.9 and q["person"]["raw"] > 0.65, q
    assert json.loads((tmp_path / "identity_quality.json").read_text()) == q


def test_mini_clip_matches_renders_to_their_captions():
    from bolid.kits import mini
    from bolid.mini.caption import ZeroShotCaptioner

    world = list(iter_world(7, 12, 2))
    captioner = ZeroShotCaptioner(*mini.clip())
    said = captioner([im for *_, im, _ in world])
    scenes = [p.scene for _, _, p, _, _ in world]
    assert sum(s in c for s, c in zip(scenes, said, strict=True)) >= 0.8 * len(world)


# ------------------------------------------------------------------------------------------------ shards


@pytest.fixture(scope="module")
def mini_shards(tmp_path_factory) -> Path:
    """The real datapipe with configs/shards/mini.yaml on a 20-person world."""
    from datapipe.__main__ import main as datapipe_main
    from demo.mini import write_config

    root = tmp_path_factory.mktemp("mini")
    world = write_world(root / "world", seed=5, identities=20, photos=5)
    config = write_config("shards", root)
    assert datapipe_main(["build", "--config", str(config), "--in", str(world), "--out", str(root / "shards")]) == 0
    return root / "shards"


def test_datamodule_pairs_never_cross_identities_or_splits(mini_shards):
    from bolid.shards import read_index
    from bolid.train.datamodule import PairDataModule

    index = read_index(mini_shards)
    train_ids = set(index.identities_in("train"))
    held_out = set(index.identities_in("validation")) | set(index.identities_in("test"))
    assert len(train_ids) >= 10 and held_out and not train_ids & held_out
    dm = PairDataModule(str(mini_shards), resolution=64, batch_size=4, num_workers=0, shuffle_buffer=8)
    dm.setup("fit")
    seen = set()
    for batch in dm.train_dataloader():
        for ident, key, ref in zip(batch["identity"], batch["key"], batch["ref_key"], strict=True):
            assert key != ref
            assert key.rsplit("_", 1)[0] == ref.rsplit("_", 1)[0] == ident  # one person per pair
            assert ident in train_ids  # never a validation or test person
            seen.add(ident)
    assert len(seen) >= 10


def test_validation_batches_mix_people_the_same_way_every_validation(mini_shards):
    """val/ref_gain needs batches of several people; comparable validations need the same batches each time."""
    from bolid.train.datamodule import PairDataModule

    dm = PairDataModule(str(mini_shards), resolution=64, batch_size=2, num_workers=0, shuffle_buffer=8)
    dm.setup("fit")
    runs = [[(tuple(b["identity"]), tuple(b["key"]), tuple(b["ref_key"])) for b in dm.val_dataloader()] for _ in "ab"]
    assert runs[0] == runs[1] and len(runs[0]) >= 4
    mixed = sum(len(set(people)) > 1 for people, _, _ in runs[0])
    assert mixed >= len(runs[0]) // 2, runs[0]  # in identity order (no mixing) only 1 of 5 batches holds two people
    for people, keys, refs in runs[0]:
        assert all(k.rsplit("_", 1)[0] == r.rsplit("_", 1)[0] == p for p, k, r in zip(people, keys, refs, strict=True))


# ------------------------------------------------------------------------------- learned body identity

PROMPT = "a photo of a person in a studio, wearing a white shirt and black trousers"
HELD_OUT_SEED = 9  # a world none of the mini components nor the committed adapter has seen
SWAP_MARGIN = 0.1  # mean Body Sim margin the learned identity must clear
IDENTITY_GAIN = 0.1
PAIRS = 12  # per-pair margins scatter by ~0.2: with 4 pairs a margin of 0 passed 0.1 by chance (see below)
#: The committed weights do not pass these yet (docs/mini/README.md). With the shipped stage-2 adapter (on the
#: UNet trained with look captions) the swap margin is -0.080 and the with-vs-without gain -0.015 (12 pairs), though
#: `make mini`'s eval finds +0.10 over the base, paired, on 50 held-out people (the previous: -0.068 and -0.020).
#: An older adapter scored +0.120 on the old test's 4 pairs and passed by chance (+0.063 +- 0.107 over 16);
#: hence 12 pairs and a 95% lower bound.
#: strict: once training makes these pass, the marker must go. raises=AssertionError: only the learning
#: assertion may fail; a load error (e.g. an adapter that no longer fits the encoder) is a real breakage and
#: must error, not hide behind the marker. With fixed seeds and weights each result is deterministic.
UNDERTRAINED = pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="the shipped mini adapter does not pass this yet (docs/mini/README.md)"
)


def _clearly_above(values: list[float], threshold: float) -> bool:
    """Mean above ``threshold`` and its 95% lower bound (normal, over people) above 0."""
    v = np.asarray(values)
    return bool(v.mean() > threshold and v.mean() - 1.96 * v.std(ddof=1) / np.sqrt(len(v)) > 0)


@pytest.fixture(scope="module")
def mini_pipe():
    from bolid.kits import mini
    from bolid.pipeline import BoLIDPipeline

    return BoLIDPipeline.from_components("mini", adapter=mini.adapter_dir(), pose_threshold=0.05)


@pytest.fixture(scope="module")
def body_sim():
    """Body Sim with the mini kit's *evaluation* keypoint model (not the one the adapter was trained with)."""
    from bolid.kits import mini

    mean, std = mini.body_stats()
    extractor = mini.pose_extractor("eval")

    def score(images, reference) -> float:
        from bolid.metrics import BodySimilarity

        # min_score as configs/eval/mini.yaml: at the default 0.5 the mini models' low heatmap peaks (~0.1-0.25)
        # leave no keypoint visible, every image scores the failure score and these tests could never pass.
        metric = BodySimilarity(pose=extractor, mean=mean, std=std, min_score=0.05, failure_score=0.0)
        metric.update(images, [reference] * len(images))
        return float(metric.compute()["body_sim"])

    return score


def _references(n: int):
    """The first photo of ``n`` held-out people."""
    return [im for _, j, _, im, _ in iter_world(HELD_OUT_SEED, n, 1) if j == 0]


def _generate(pipe, reference=None, seed: int = 0, **kw):
    return pipe(PROMPT, references=None if reference is None else [reference], seed=seed, num_images=4, steps=8,
                guidance_scale=3.0, **kw).images  # fmt: skip


@UNDERTRAINED
@pytest.mark.slow
def test_swapping_the_reference_moves_the_body_toward_the_new_person(mini_pipe, body_sim):
    """Conditioning on A's photo must make bodies closer to A than to B, and B's photo closer to B:
    the margin sim(gen_A, A) - sim(gen_A, B), averaged over pairs of held-out people, is clearly positive."""
    refs = _references(2 * PAIRS)
    margins = []
    for i in range(0, 2 * PAIRS, 2):
        a, b = refs[i], refs[i + 1]
        gen_a, gen_b = (
            _generate(mini_pipe, a, seed=i),
            _generate(mini_pipe, b, seed=i),
        )  # same seeds: only the ref differs
        margins.append(body_sim(gen_a, a) - body_sim(gen_a, b) + body_sim(gen_b, b) - body_sim(gen_b, a))
    assert _clearly_above(margins, SWAP_MARGIN), (np.mean(margins), margins)


@UNDERTRAINED
@pytest.mark.slow
def test_bodies_follow_the_reference_only_with_the_identity_on(mini_pipe, body_sim):
    """Replaces the fixed-noise overfit test: with the trained adapter on, generated bodies are closer to
    the reference person than the base model's (same seeds, no identity) are."""
    refs = _references(PAIRS)
    gains = [
        body_sim(_generate(mini_pipe, r, seed=k), r) - body_sim(_generate(mini_pipe, None, seed=k), r)
        for k, r in enumerate(refs)
    ]
    assert _clearly_above(gains, IDENTITY_GAIN), (np.mean(gains), gains)


# ------------------------------------------------------------------------------------------- make mini


@pytest.mark.slow
def test_make_mini_quick_runs_every_stage_and_resumes(tmp_path):
    """``make mini MINI_ARGS=--quick``: world -> shards -> stage 1, ablation, stage 2 -> eval -> docs; a second
    run reuses every finished stage (same table, adapters untouched)."""

    from demo.mini import main

    out, docs = tmp_path / "run", tmp_path / "docs"
    assert main(["--quick", "--out", str(out), "--docs", str(docs)]) == 0
    table = (docs / "results.md").read_text()
    for model in ("Base (no identity)", "BoLID face only", "BoLID body only", "BoLID stage 1", "BoLID stage 2",
                  "Ablation: no appearance"):  # fmt: skip
        assert f"| {model} |" in table
    assert (docs / "comparison.png").stat().st_size > 0
    settings = json.loads((docs / "settings.json").read_text())
    assert settings["world"]["identities"] == 12 and "stage1" in settings["configs"]
    adapters = {n: (out / n / "adapter" / "adapter.safetensors").stat().st_mtime for n in ("stage1", "stage2")}
    assert main(["--quick", "--out", str(out), "--docs", str(docs)]) == 0
    assert {n: (out / n / "adapter" / "adapter.safetensors").stat().st_mtime for n in adapters} == adapters
    assert (docs / "results.md").read_text() == table


def test_mini_probe_refuses_an_adapter_it_cannot_read(tmp_path, capsys):
    """The probe compares proportion losses; an adapter that reads bodies with the 3D network is refused by name."""
    from bolid.adapter import AdapterConfig, BodyConditionModule
    from bolid.image_encoder import ClipImageEncoder
    from bolid.kits import mini
    from demo.mini_probe import main as probe

    eva, _, _ = mini.build_eva_clip()
    net = BodyConditionModule(mini.build_unet(), ClipImageEncoder(eva, "BoLID-EVA02-Tiny"), AdapterConfig())
    net.save(tmp_path / "net")
    with pytest.raises(SystemExit):
        probe(["--adapter", str(tmp_path / "net"), "--shards", str(tmp_path / "none")])
    assert "body_shape='net'" in capsys.readouterr().err
