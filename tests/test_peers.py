"""Peers as eval rows: per variant, the image follows the identity and scale 0 is the base SDXL; InstantID's
checkpoint loads into stock diffusers unchanged; the comparison run writes peer rows and Face Sim."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps

pytest.importorskip("onnxruntime", reason="the faceid extra (bolid[faceid]) is part of dev")

from bolid.cli.eval import EvalConfig  # noqa: E402
from bolid.peers import PEER_KINDS, PeerRunner, PeerSpec, draw_face_keypoints, sdxl_base_generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def references(fixtures) -> tuple[Image.Image, Image.Image]:
    """Two 'people': the COCO skier and its mirror image (the tiny face model finds a face in both)."""
    photo = Image.open(fixtures / "coco_000000000785.jpg").convert("RGB")
    return photo, ImageOps.mirror(photo)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, np.float64) for im in images])


@pytest.mark.parametrize("kind", PEER_KINDS)
def test_peer_follows_the_identity_and_is_the_base_model_at_scale_zero(kind, references):
    spec = PeerSpec(kind, kind, steps=STEPS)
    runner = PeerRunner(spec, "tiny")
    a = runner("a person on a beach", [references[0]], SEEDS)
    b = runner("a person on a beach", [references[1]], SEEDS)
    assert a.settings["face_found"] and b.settings["face_found"]
    assert np.abs(_pixels(a.images) - _pixels(b.images)).mean() > 1.0  # another face, another image

    zero = runner("a person on a beach", [references[0]], SEEDS, scale=0.0)
    base = sdxl_base_generate("tiny", STEPS, spec.guidance_scale)("a person on a beach", None, SEEDS)
    assert np.abs(_pixels(zero.images) - _pixels(base.images)).max() <= 1.0  # uint8 rounding at most
    assert np.abs(_pixels(a.images) - _pixels(base.images)).mean() > 1.0
    assert zero.settings["scale"] == 0.0 and a.settings["scale"] == spec.scale
    if kind == "instantid":
        assert zero.settings["controlnet_scale"] == 0.0 and a.settings["controlnet_scale"] == spec.controlnet_scale


def test_instantid_adapter_loads_into_stock_diffusers_unchanged():
    """InstantID's ip-adapter.bin (Resampler with fused to_kv) is read by stock load_ip_adapter, weights intact."""
    from bolid.kits.tiny_peers import tiny_instantid_repo

    runner = PeerRunner(PeerSpec("InstantID", "instantid", steps=STEPS), "tiny")
    state = torch.load(tiny_instantid_repo() / "ip-adapter.bin", weights_only=True)
    proj = runner.pipe.unet.encoder_hid_proj.image_projection_layers[0]
    assert type(proj).__name__ == "IPAdapterPlusImageProjection" and proj.latents.shape[1] == 16
    for i in range(4):
        to_k, to_v = state["image_proj"][f"layers.{i}.0.to_kv.weight"].chunk(2)
        torch.testing.assert_close(proj.layers[i].attn.to_k.weight, to_k, rtol=0, atol=0)
        torch.testing.assert_close(proj.layers[i].attn.to_v.weight, to_v, rtol=0, atol=0)
        torch.testing.assert_close(proj.layers[i].attn.to_q.weight, state["image_proj"][f"layers.{i}.0.to_q.weight"])
    torch.testing.assert_close(proj.proj_in.weight, state["image_proj"]["proj_in.weight"])
    cross = [p for n, p in runner.pipe.unet.attn_processors.items() if n.endswith("attn2.processor")]
    for j, processor in enumerate(cross):
        torch.testing.assert_close(processor.to_k_ip[0].weight, state["ip_adapter"][f"{2 * j + 1}.to_k_ip.weight"])
        torch.testing.assert_close(processor.to_v_ip[0].weight, state["ip_adapter"][f"{2 * j + 1}.to_v_ip.weight"])
    assert len(cross) == len(state["ip_adapter"]) // 2


def test_identitynet_attends_to_the_face_tokens_not_the_prompt():
    runner = PeerRunner(PeerSpec("InstantID", "instantid", steps=STEPS), "tiny")
    net = runner.pipe.controlnet
    g = torch.Generator().manual_seed(0)
    sample, cond = torch.randn(1, 4, 32, 32, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}

    def run(prompt, tokens):
        net.face_tokens = tokens
        kwargs = {"controlnet_cond": cond, "added_cond_kwargs": added, "return_dict": False}
        down, mid = net(sample, 10, encoder_hidden_states=prompt, **kwargs)
        net.face_tokens = None
        return mid

    tokens = torch.randn(1, 16, 64, generator=g)
    first = run(torch.randn(1, 7, 64, generator=g), tokens)
    torch.testing.assert_close(run(torch.randn(1, 9, 64, generator=g), tokens), first)  # prompt ignored
    assert (run(torch.randn(1, 9, 64, generator=g), tokens + 1.0) - first).abs().mean() > 1e-4
    with pytest.raises(RuntimeError, match="no face tokens"):
        net(sample, 10, encoder_hidden_states=tokens, controlnet_cond=cond, added_cond_kwargs=added)


def test_keypoint_image_marks_each_point_in_its_colour():
    kps = np.array([[30.0, 30], [70, 30], [50, 50], [35, 75], [65, 75]])
    image = np.asarray(draw_face_keypoints((100, 100), kps))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    for (x, y), colour in zip(kps.astype(int), colours, strict=True):
        assert tuple(image[y, x]) == colour
    assert image[5, 5].sum() == 0 and image[:, :, :].max() == 255
    limb = image[40, 40]  # between the left eye and the nose: the eye's colour at 60%
    assert tuple(limb) == (153, 0, 0)


def test_no_face_gives_the_base_model(references):
    runner = PeerRunner(PeerSpec("FaceID", "ip_adapter_faceid", steps=STEPS), "tiny")
    flat = Image.new("RGB", (200, 200), (128, 128, 128))
    out = runner("a person", [flat], SEEDS)
    base = sdxl_base_generate("tiny", STEPS, runner.spec.guidance_scale)("a person", None, SEEDS)
    assert not out.settings["face_found"] and out.settings["scale"] == 0.0
    assert np.abs(_pixels(out.images) - _pixels(base.images)).max() <= 1.0


# ------------------------------------------------------------------------------------------------ configs


def test_peer_configs_parse():
    real = EvalConfig.from_yaml(ROOT / "configs" / "eval" / "real.yaml")
    peers = [m for m in real.models if isinstance(m, PeerSpec)]
    assert {m.kind for m in peers} == set(PEER_KINDS)
    assert all(m.source for m in peers), "every peer records where its settings come from"
    assert real.face_pack in ("buffalo_l", "antelopev2")
    tiny = EvalConfig.from_yaml(ROOT / "configs" / "eval" / "peers_tiny.yaml")
    assert {m.kind for m in tiny.models if isinstance(m, PeerSpec)} == set(PEER_KINDS)
    assert tiny.face_pack == "buffalo_l"


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "p", "kind": "instantid", "scal": 1}, r"models\[0\]\.scal \(did you mean models\[0\]\.scale\?\)"),
        ({"name": "p", "kind": "ip_adapter", "controlnet_scale": 0.5}, "does not apply to kind 'ip_adapter'"),
        (
            {"name": "p", "kind": "ip_adapter_faceid", "scale": -1},
            r"models\[0\]\.scale must be a number >= 0 or null, got -1",
        ),
        ({"name": "p", "kind": "instantid", "steps": 0}, r"models\[0\]\.steps must be an int > 0 or null, got 0"),
    ],
)
def test_peer_config_errors_name_the_key(entry, message):
    cfg = {"out": "x", "prompts": ["a person"], "datasets": [{"name": "d", "folder": "f"}], "models": [entry]}
    with pytest.raises(ValueError, match=message):
        EvalConfig.from_dict(cfg)


def test_missing_peer_weights_say_how_to_get_them(tmp_path):
    from bolid.components import MissingWeightsError
    from bolid.peers import resolve_peer

    with pytest.raises(MissingWeightsError, match=r"(?s)ip-adapter\.bin.*ControlNetModel.*huggingface-cli download"):
        resolve_peer(PeerSpec("InstantID", "instantid", weights=str(tmp_path)))


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_eval_writes_peer_rows_and_face_sim(references, tmp_path):
    """`bolid eval` with configs/eval/peers_tiny.yaml (on a photo folder instead of the demo shards)."""
    from bolid.__main__ import main

    photos = tmp_path / "photos"
    (photos / "skier").mkdir(parents=True)
    references[0].save(photos / "skier" / "a.jpg")
    (photos / "noface").mkdir()
    Image.new("RGB", (200, 240), (128, 128, 128)).save(photos / "noface" / "a.jpg")
    config = yaml.safe_load((ROOT / "configs" / "eval" / "peers_tiny.yaml").read_text())
    config.update(out=str(tmp_path / "out"), max_prompts=1, images_per_prompt=1, batch_size=1)
    config["prompts"] = str(ROOT / "configs" / "eval" / "prompts.yaml")
    config["datasets"] = [{"name": "Photos", "folder": str(photos)}]
    config["models"] = [m for m in config["models"] if m["kind"] != "bolid"]  # BoLID rows: tests/test_evaluate.py
    for m in config["models"]:
        if m["kind"] != "base":
            m["steps"] = STEPS
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["eval", "--config", str(path)]) == 0

    out = tmp_path / "out"
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Model"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["Model"] + [
        f"Photos · {m} ↑" for m in ("Face Sim", "Body Sim", "CLIP-T", "CLIP-I")
    ]
    names = [m["name"] for m in config["models"]]
    for name in names:
        assert f"| {name} |" in md
    assert "## Face Sim failures" in md

    results = json.loads((out / "results.json").read_text())
    refs = results["settings"]["clip_i_reference"]
    assert refs["SDXL-Lightning"] == "SDXL-Lightning"
    assert (
        refs["InstantID"] == f"SDXL ({STEPS} steps, CFG 5)"
        and refs["IP-Adapter FaceID"] == f"SDXL ({STEPS} steps, CFG 7.5)"
    )
    assert results["settings"]["face_sim_model"]["pack"] == "buffalo_l"
    by_model = {r["model"]: r for r in results["results"]}
    for name in names:
        r = by_model[name]
        assert r["face_sim_failures"]["no_reference_face"] == 1  # the flat 'person' has no face: counted
        assert r["metrics"]["face_sim"]["n"] + sum(r["face_sim_failures"].values()) == r["face_sim_pairs"] == 2
    lines = [json.loads(x) for x in (out / "images.jsonl").read_text().splitlines()]
    instantid = [x for x in lines if x["model"] == "InstantID" and x["identity"] == "skier"]
    assert instantid and all(x["settings"]["kind"] == "instantid" for x in instantid)
    assert {x["seed"] for x in lines} == {0}  # the same seed for every row
    fig = Image.open(out / "comparison.png")
    assert fig.width == 160 + (1 + len(names)) * (128 + 6) + 6  # reference | one column per row, peers included
    shutil.rmtree(out / "images")
