"""Body Sim, CLIP-T and CLIP-I on known inputs: identity gives 1, another person less, ranks merge exactly."""

from __future__ import annotations

import csv
import json
import os
import pickle
import socket

import pytest
import torch
from PIL import Image, ImageOps

from bolid.metrics import (
    BODY_STATS_MEAN,
    BODY_STATS_STD,
    BodySimilarity,
    CLIPImageSimilarity,
    CLIPTextScore,
    body_similarity,
    clip_loader,
    proportion_stats,
)

PROMPTS = ["a person in a red coat on a street", "a skier on a snowy slope", "a chef in a kitchen", "a beach", "a cat"]


@pytest.fixture(scope="module")
def body():
    return BodySimilarity()


@pytest.fixture(scope="module")
def skier(fixtures):
    return Image.open(fixtures / "coco_000000000785.jpg").convert("RGB")


@pytest.fixture(scope="module")
def annotated(fixtures) -> torch.Tensor:
    """The COCO annotation of the skier as ``(17, 3)`` keypoints, score 1 where labelled."""
    ann = json.loads((fixtures / "coco_000000000785.json").read_text())["annotations"][0]
    kp = torch.tensor(ann["keypoints"], dtype=torch.float32).reshape(17, 3)
    kp[:, 2] = (kp[:, 2] > 0).float()
    return kp


def longer_legs(kp: torch.Tensor, factor: float = 1.3) -> torch.Tensor:
    """The same pose with thighs and shins ``factor`` times as long: another body."""
    out = kp.clone()
    for hip, knee, ankle in ((11, 13, 15), (12, 14, 16)):
        thigh = kp[knee, :2] - kp[hip, :2]
        shin = kp[ankle, :2] - kp[knee, :2]
        out[knee, :2] = kp[hip, :2] + factor * thigh
        out[ankle, :2] = out[knee, :2] + factor * shin
    return out


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 48, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- Body Sim


def test_identical_photo_scores_one(body, skier):
    body.reset()
    body.update([skier], [skier])
    out = body.compute()
    assert out["body_sim"].item() == pytest.approx(1.0, abs=1e-5)
    assert out["failure_rate"].item() == 0.0


def test_scale_mirror_and_rotation_keep_the_body(body, skier):
    """Proportions are pose-invariant: the same photo resized, mirrored or rotated is still ~the same body."""
    body.reset()
    variants = [
        skier.resize((skier.width * 2 // 3, skier.height * 2 // 3)),
        ImageOps.mirror(skier),
        skier.rotate(10, expand=True, fillcolor=(128, 128, 128)),
    ]
    body.update(variants, [skier] * 3)
    assert (body.per_sample() > 0.97).all(), body.per_sample()


def test_other_body_scores_less(annotated):
    mean, std = torch.tensor(BODY_STATS_MEAN), torch.tensor(BODY_STATS_STD)
    gen = torch.stack([annotated, longer_legs(annotated)])
    sim, reason = body_similarity(gen, annotated.expand(2, 17, 3), mean, std)
    assert (reason == -1).all()
    assert sim[0].item() == pytest.approx(1.0, abs=1e-6)
    assert sim[1].item() < 0.9


def test_same_person_above_different_person(body, shared_testdata):
    """Real photos: two photos of one person score above a pair of different people."""
    root = shared_testdata / "fullbody"
    with open(root / "identities.csv", newline="") as f:
        ids = {r["file"]: r["identity"].strip() for r in csv.DictReader(f)}
    a, b = sorted(f for f, i in ids.items() if i == "iper_024")
    others = [f for f, i in ids.items() if i.startswith("deepfashion")][:4]
    body.reset()
    photos = {f: Image.open(root / f) for f in [a, b, *others]}
    body.update([photos[b]] + [photos[o] for o in others], [photos[a]] * (1 + len(others)))
    sims = body.per_sample()
    assert not torch.isnan(sims).any()
    assert (sims[0] > sims[1:]).all(), sims


def test_no_body_is_a_failure_not_dropped(skier):
    blank = Image.new("RGB", (320, 240), (200, 220, 240))
    metric = BodySimilarity()
    metric.update([skier, blank], [skier, skier])
    metric.update([skier], [blank])
    out = metric.compute()
    assert out["body_sim"].item() == pytest.approx(1.0, abs=1e-5)  # the mean is over scored pairs
    assert out["failure_rate"].item() == pytest.approx(2 / 3)
    assert metric.failures() == {"no_body": 1, "no_reference_body": 1, "too_few_features": 0}
    assert torch.isnan(metric.per_sample()[1:]).all()
    # With a failure score, failures enter the mean at that value.
    scored = BodySimilarity(failure_score=0.0)
    scored.update([skier, blank], [skier, skier])
    assert scored.compute()["body_sim"].item() == pytest.approx(0.5, abs=1e-5)


def test_too_few_visible_proportions_is_a_failure(annotated):
    hidden = annotated.clone()
    hidden[7:17, 2] = 0.0  # only the shoulders visible: one proportion (shoulder width) at most
    metric = BodySimilarity()
    metric.update(hidden[None], annotated[None])
    assert metric.failures()["too_few_features"] == 1
    assert metric.compute()["failure_rate"].item() == 1.0


def test_metric_pickles_without_its_extractor(body, skier):
    body.reset()
    body.keypoints([skier])  # the extractor is built
    copy = pickle.loads(pickle.dumps(body))
    copy.update([skier], [skier])
    assert copy.compute()["body_sim"].item() == pytest.approx(1.0, abs=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="min_features"):
        BodySimilarity(min_features=0)
    with pytest.raises(ValueError, match="std must be positive"):
        BodySimilarity(std=(1, 1, 1, 1, 1, 0))
    with pytest.raises(ValueError, match="differ in size"):
        BodySimilarity().update(torch.zeros(2, 17, 3), torch.zeros(1, 17, 3))


def test_proportion_stats_of_a_population(annotated):
    population = torch.stack([annotated, longer_legs(annotated, 1.2), longer_legs(annotated, 0.8)])
    population = torch.cat([population, torch.full((1, 17, 3), float("nan"))])  # not found: skipped
    mean, std = proportion_stats(population)
    assert mean.shape == std.shape == (6,)
    assert std[2] > 0 and std[3] > 0  # thigh and shin vary
    assert std[0] == pytest.approx(0.0, abs=1e-6)  # upper arm does not


# ------------------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip():
    return clip_loader("tiny")


def test_clip_i_identical_images_score_one(clip):
    metric = CLIPImageSimilarity(clip)
    a, b = images(3, 0), images(3, 1)
    metric.update(a, a)
    assert metric.compute().item() == pytest.approx(1.0, abs=1e-5)
    metric.reset()
    metric.update(a, b)
    assert metric.compute().item() < 1.0 - 1e-4


def test_clip_t_is_torchmetrics_clipscore(clip):
    from torchmetrics.multimodal import CLIPScore

    ours, theirs = CLIPTextScore(clip), CLIPScore(model_name_or_path=clip)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images(2, 3)]
    ours.update(pil, PROMPTS[:2])  # PIL images are accepted and converted
    theirs.update(images(2, 3), PROMPTS[:2])
    assert torch.allclose(ours.score, theirs.score, atol=1e-4)
    assert torch.equal(ours.compute(), theirs.compute())
    assert ours.per_sample().shape == (2,)
    assert (ours.per_sample() >= 0).all()


def test_states_merge_like_a_single_pass(clip, annotated):
    """Two 'ranks' on halves of the data, merged with torchmetrics' reductions, equal one pass over all."""
    kps = torch.stack([annotated, longer_legs(annotated, 1.2), longer_legs(annotated, 0.9), annotated, annotated])
    kps[3] = float("nan")  # a failure on rank 1
    refs = annotated.expand(5, 17, 3)
    imgs, base = images(5, 4), images(5, 5)
    for make, args in (
        (lambda: BodySimilarity(), (kps, refs)),
        (lambda: CLIPTextScore(clip), (imgs, PROMPTS)),
        (lambda: CLIPImageSimilarity(clip), (imgs, base)),
    ):
        single, rank0, rank1 = make(), make(), make()
        single.update(*args)
        rank0.update(*(a[:3] for a in args))
        rank1.update(*(a[3:] for a in args))
        rank1.merge_state(rank0)  # incoming (rank 0) first, as an all-gather orders ranks
        expect, got = single.compute(), rank1.compute()
        if isinstance(expect, dict):
            assert expect.keys() == got.keys()
            for key in expect:
                torch.testing.assert_close(got[key], expect[key], equal_nan=True)
        else:
            torch.testing.assert_close(got, expect)
        torch.testing.assert_close(rank1.per_sample(), single.per_sample(), equal_nan=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, kps: torch.Tensor, refs: torch.Tensor) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        clip = clip_loader("tiny")
        cut = slice(0, 3) if rank == 0 else slice(3, None)  # uneven shares: 3 and 2
        body, clip_t, clip_i = BodySimilarity(), CLIPTextScore(clip), CLIPImageSimilarity(clip)
        body.update(kps[cut], refs[cut])
        clip_t.update(images(5, 4)[cut], PROMPTS[cut])
        clip_i.update(images(5, 4)[cut], images(5, 5)[cut])
        result = {"body": body.compute(), "clip_t": clip_t.compute(), "clip_i": clip_i.compute()}  # all-gathers
        with body.sync_context():  # per-sample values and counts of every rank
            result.update(body_values=body.per_sample(), failures=body.failures())
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_real_ddp_sync_equals_single_pass(clip, annotated, tmp_path):
    """Two gloo processes, each with half of the data: the synced result is the single-process one."""
    import torch.multiprocessing as mp

    kps = torch.stack([annotated, longer_legs(annotated, 1.2), annotated, longer_legs(annotated, 0.9), annotated])
    kps[2] = float("nan")
    refs = annotated.expand(5, 17, 3).clone()
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out), kps, refs), nprocs=2, join=True)
    got = torch.load(out)
    body, clip_t, clip_i = BodySimilarity(), CLIPTextScore(clip), CLIPImageSimilarity(clip)
    body.update(kps, refs)
    clip_t.update(images(5, 4), PROMPTS)
    clip_i.update(images(5, 4), images(5, 5))
    for key, value in body.compute().items():
        torch.testing.assert_close(got["body"][key], value, equal_nan=True)
    torch.testing.assert_close(got["body_values"], body.per_sample(), equal_nan=True)
    assert got["failures"] == body.failures() == {"no_body": 1, "no_reference_body": 0, "too_few_features": 0}
    torch.testing.assert_close(got["clip_t"], clip_t.compute())
    torch.testing.assert_close(got["clip_i"], clip_i.compute())
