"""BoLID-mini: the world, the trained mini kit, the identity pairs on its shards, and learned body identity."""

from __future__ import annotations

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


# --------------------------------------------------------------------------------------------- mini kit


def test_mini_keypoint_models_read_the_renders(tmp_path):
    """Both trained keypoint models find the people of a world none of them trained on, within a few pixels."""
    from bolid.kits import mini

    world = list(iter_world(7, 8, 2))
    images = [im for *_, im, _ in world]
    exact = torch.tensor(np.stack([kp for *_, kp in world]))
    for kind in ("train", "eval"):
        persons = mini.pose_extractor(kind)(images)
        assert all(len(p) == 1 for p in persons), kind
        found = torch.tensor(np.stack([p[0].keypoints for p in persons]))
        err = (found[:, 5:, :2] - exact[:, 5:, :2]).norm(dim=-1).median()
        assert err < 3.0, (kind, float(err))  # pixels of a 64 px image


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
    """The real datapipe with configs/mini/shards.yaml on a 20-person world."""
    from datapipe.__main__ import main as datapipe_main
    from demo.mini import write_config

    root = tmp_path_factory.mktemp("mini")
    world = write_world(root / "world", seed=5, identities=20, photos=5)
    config = write_config("shards", root)
    assert datapipe_main(["build", "--config", str(config), "--in", str(world), "--out", str(root / "shards")]) == 0
    return root / "shards"


def test_datamodule_pairs_never_cross_identities_or_splits(mini_shards):
    from bolid.train.datamodule import PairDataModule
    from datapipe.shards import read_index

    index = read_index(mini_shards)
    train_ids = set(index.identities_in("train"))
    held_out = set(index.identities_in("validation")) | set(index.identities_in("test"))
    assert len(train_ids) >= 10 and held_out and not train_ids & held_out
    dm = PairDataModule(str(mini_shards), resolution=64, ref_size=64, batch_size=4, num_workers=0, shuffle_buffer=8)
    dm.setup("fit")
    seen = set()
    for batch in dm.train_dataloader():
        for ident, key, ref in zip(batch["identity"], batch["key"], batch["ref_key"], strict=True):
            assert key != ref
            assert key.rsplit("_", 1)[0] == ref.rsplit("_", 1)[0] == ident  # one person per pair
            assert ident in train_ids  # never a validation or test person
            seen.add(ident)
    assert len(seen) >= 10
