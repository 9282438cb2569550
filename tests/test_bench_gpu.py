"""``bench/bench_gpu.py``: the paper-scale GPU benchmark, checked end to end on the CPU with ``--smoke``."""

from __future__ import annotations

import json

import pytest
import torch

from bench import bench_gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_refuses_on_a_cpu_without_smoke(tmp_path, capsys):
    assert bench_gpu.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--smoke" in err and "make bench-gpu" in err
    assert not (tmp_path / "bench_gpu.json").exists()


@pytest.mark.slow
def test_smoke_runs_every_part_and_writes_json_and_markdown(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    assert bench_gpu.main(["--smoke", "--budget", "900", "--out", str(tmp_path / "out"), "--write", str(md)]) == 0
    res = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    assert not [r for s in ("train", "mfu", "inference", "datapipe") for r in res[s] if "seconds" not in r
                and "seconds_adapter" not in r], "a part was skipped or failed"  # fmt: skip
    train = res["train"]
    stage2 = {(r["k"], r["checkpointing"]) for r in train if r["stage"] == 2}
    assert stage2 == {(1, True), (2, True), (1, False), (2, False)}
    assert {(r["batch"], r["checkpointing"]) for r in train if r["stage"] == 1} == {
        (1, True), (2, True), (1, False), (2, False)
    }  # fmt: skip
    assert all(r["seconds"] > 0 for r in train)
    for r in res["mfu"]:
        # Frozen UNet: the backward pass computes input (and adapter) gradients only, about one forward's worth.
        assert 1.6 < r["fwd_bwd_tflop"] / r["forward_tflop"] < 2.6, r
    two, one = (next(r["fwd_bwd_tflop"] for r in res["mfu"] if r["batch"] == b) for b in (2, 1))
    assert two == pytest.approx(2 * one, rel=0.05)  # FLOPs scale with the batch
    for r in res["inference"]:
        assert r["overhead"] > 0 and r["images_per_s_adapter"] > 0 and r["images_per_s_plain"] > 0
    assert {r["model"] for r in res["datapipe"]} == {"RT-DETR + ViTPose", "BLIP-2 OPT-2.7b"}
    assert res["environment"]["torch"] == torch.__version__
    text = md.read_text()
    assert "<!-- bench:gpu:start -->" in text and "Smoke run" in text and "PuLID A100" in text
    assert "Command: `python -m bench.bench_gpu --smoke" in text


def test_budget_is_hard_and_what_is_not_run_is_listed(tmp_path):
    assert bench_gpu.main(["--smoke", "--budget", "0.5", "--out", str(tmp_path), "--only", "train"]) == 0
    res = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert res.get("stopped") == "budget ran out" or all("skipped" in r for r in res.get("train", []))
    assert "seconds" not in json.dumps(res.get("train", []))
