"""The executors of ``datapipe build`` (datapipe/executors.py): local, slurm and ray over the same parts.

The Slurm scripts are checked by value, submitted to a fake ``sbatch`` on PATH that records its arguments (the
real boundary is a subprocess), and run by hand with bash; every executor's dataset must equal the local one
byte for byte. Ray runs when installed (``pip install 'bolid[ray]'``): a local Ray with 2 CPUs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_datapipe_e2e import make_input, write_config

from datapipe.__main__ import main
from datapipe.build import local_model
from datapipe.config import BuildConfig
from datapipe.executors import RAY_MISSING, run_local, run_ray, slurm_scripts

ROOT = Path(__file__).resolve().parents[1]
DATASET_FILES = ("index.json", "stats.json", "rejects.jsonl", "samples.parquet", "DATASET_CARD.md")


def dataset_bytes(out: Path) -> dict[str, bytes]:
    """Every file of the finished dataset (shards, index, stats, rejects, table, card), by name."""
    names = [p.name for p in sorted(out.glob("shard-*.tar"))] + list(DATASET_FILES)
    return {name: (out / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def local2(tmp_path_factory):
    """The reference: a 2-part build with the local executor (fresh cache)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("executors")
    make_input(tmp / "in")
    data = yaml.safe_load(write_config(tmp).read_text())
    data |= {"num_parts": 2, "workers": 0, "slurm": {"python": sys.executable, "gpus_per_task": 0}}
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(data))
    config = BuildConfig.from_yaml(config_path)
    run_local(config, tmp / "in", tmp / "local")
    yield {"tmp": tmp, "in": tmp / "in", "out": tmp / "local", "config": config, "config_path": config_path}
    torch.set_num_threads(threads)


def test_slurm_scripts_by_value(tmp_path):
    config = BuildConfig.from_dict(
        {
            "num_parts": 3,
            "retries": 2,
            "slurm": {
                "python": "/opt/venv/bin/python",
                "partition": "gpu",
                "time": "4:00:00",
                "cpus_per_task": 6,
                "gpus_per_task": 1,
                "max_parallel": 2,
                "extra": ["--account=vision"],
                "setup": ["source /opt/venv/bin/activate"],
            },
        }
    )
    scripts = slurm_scripts(config, tmp_path / "c.yaml", tmp_path / "in dir", tmp_path / "out", ["--device", "cuda"])
    out = tmp_path / "out"
    assert scripts["parts.sbatch"].splitlines() == [
        "#!/bin/bash",
        "#SBATCH --job-name=datapipe-parts",
        "#SBATCH --array=0-2%2",
        f"#SBATCH --output={out}/logs/part-%a.log",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --time=4:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=vision",
        "# One part of the dataset per array task; a failed part starts again from its cache.",
        "set -u",
        "source /opt/venv/bin/activate",
        "for attempt in $(seq 0 2); do",
        f"    /opt/venv/bin/python -m datapipe build --config {tmp_path}/c.yaml --in '{tmp_path}/in dir' --out {out}"
        " --device cuda --num-parts 3 --part $SLURM_ARRAY_TASK_ID && exit 0",
        '    echo "part $SLURM_ARRAY_TASK_ID: attempt $attempt failed" >&2',
        "done",
        "exit 1",
    ]
    assert scripts["merge.sbatch"].splitlines() == [
        "#!/bin/bash",
        "#SBATCH --job-name=datapipe-merge",
        f"#SBATCH --output={out}/logs/merge.log",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=vision",
        "# After every part succeeded (--dependency=afterok on the array job).",
        "set -eu",
        "source /opt/venv/bin/activate",
        f"/opt/venv/bin/python -m datapipe merge {out} --num-parts 3",
    ]


def fake_sbatch(folder: Path, fail: bool = False) -> Path:
    """An ``sbatch`` that appends its arguments (one JSON list a line) to calls.jsonl and prints a job id."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "sbatch"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, sys\n"
        f"log = pathlib.Path({str(folder / 'calls.jsonl')!r})\n"
        "n = len(log.read_text().splitlines()) if log.exists() else 0\n"
        "log.open('a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        + ("sys.exit('sbatch: error: invalid partition specified: gpu')\n" if fail else "")
        + "print(f'{4100 + n};cluster1' if n else '4100')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder / "calls.jsonl"


def test_slurm_submits_the_array_then_the_merge_after_it(tmp_path, monkeypatch):
    calls = fake_sbatch(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"components": "tiny", "executor": "slurm", "num_parts": 4}))
    (tmp_path / "in").mkdir()
    assert main(["build", "--config", str(config), "--in", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    folder = (tmp_path / "out" / "slurm").resolve()
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [
        ["--parsable", str(folder / "parts.sbatch")],
        ["--parsable", "--dependency=afterok:4100", str(folder / "merge.sbatch")],
    ]
    assert "#SBATCH --array=0-3\n" in (folder / "parts.sbatch").read_text()
    assert (tmp_path / "out" / "logs").is_dir()


def test_slurm_dry_run_submits_nothing_and_sbatch_errors_are_named(tmp_path, monkeypatch, capsys):
    calls = fake_sbatch(tmp_path / "bin", fail=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"components": "tiny", "num_parts": 2}))
    args = ["build", "--config", str(config), "--in", str(tmp_path), "--out", str(tmp_path / "out")]
    assert main([*args, "--executor", "slurm", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "# ---- parts.sbatch\n#!/bin/bash\n" in printed and "# ---- merge.sbatch\n#!/bin/bash\n" in printed
    assert "-m datapipe merge" in printed and not calls.exists()
    assert main([*args, "--executor", "slurm"]) == 2  # the fake sbatch refuses
    assert len(calls.read_text().splitlines()) == 1, "no merge job after a failed array submission"


def test_slurm_scripts_run_by_hand_equal_the_local_build(local2):
    """``--dry-run``, then each array task and the merge run with bash, as Slurm would (shared model cache)."""
    out = local2["tmp"] / "slurm"
    shutil.copytree(local2["out"] / "cache", out / "cache")
    cli = ["build", "--config", str(local2["config_path"]), "--in", str(local2["in"]), "--out", str(out)]
    assert main([*cli, "--executor", "slurm", "--dry-run"]) == 0
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for part in range(2):
        subprocess.run(
            ["bash", str(out / "slurm" / "parts.sbatch")],
            env=env | {"SLURM_ARRAY_TASK_ID": str(part)},
            cwd=ROOT,
            check=True,
            timeout=300,
        )
    assert not (out / "index.json").exists()
    subprocess.run(["bash", str(out / "slurm" / "merge.sbatch")], env=env, cwd=ROOT, check=True, timeout=300)
    assert dataset_bytes(out) == dataset_bytes(local2["out"])


def test_local_executor_retries_a_failed_part(local2, tmp_path):
    """A part whose model fails once is started again and resumes; with no retries the error surfaces."""
    failures = []

    def flaky(stage, config):
        if stage == "caption" and not failures:
            failures.append(stage)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return local_model(stage, config)

    out = tmp_path / "out"
    shutil.copytree(local2["out"] / "cache", out / "cache")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_local(local2["config"].replace(retries=0), local2["in"], out, models=flaky)
    failures.clear()
    run_local(local2["config"].replace(retries=1), local2["in"], out, models=flaky)
    assert failures == ["caption"]
    assert dataset_bytes(out) == dataset_bytes(local2["out"])


def test_missing_ray_names_the_extra(local2, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError, as when it is not installed
    with pytest.raises(RuntimeError, match=r"bolid\[ray\]") as info:
        run_ray(local2["config"].replace(executor="ray"), local2["in"], tmp_path / "out")
    assert str(info.value) == RAY_MISSING
    assert not (tmp_path / "out").exists()


def test_ray_resources_the_cluster_lacks_are_named():
    from datapipe.config import RayConfig
    from datapipe.executors import _check_resources

    with pytest.raises(ValueError, match="ray.actor_gpus: 2 actors x 0.5 GPUs > the cluster's 0 GPUs"):
        _check_resources({"CPU": 16}, RayConfig(actor_gpus=0.5))
    with pytest.raises(ValueError, match="ray.actor_cpus/part_cpus"):
        _check_resources({"CPU": 2}, RayConfig(part_cpus=1, actor_cpus=1))
    _check_resources({"CPU": 2, "GPU": 1}, RayConfig(part_cpus=1, actor_cpus=0.5, actor_gpus=0.5))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray not installed: pip install 'bolid[ray]'")
def test_ray_equals_local_byte_for_byte(local2):
    """A local Ray (2 CPUs, small object store), fresh cache: the models run in the actor pools, the parts as
    Ray tasks; the dataset equals the local executor's byte for byte."""
    config = local2["config"].replace(
        executor="ray",
        ray__num_cpus=2,
        ray__object_store_mb=128,
        ray__part_cpus=0.5,
        ray__actor_cpus=0.25,
        ray__pose_actors=2,
    )
    os.environ["OMP_NUM_THREADS"] = "1"
    out = local2["tmp"] / "ray"
    index = run_ray(config, local2["in"], out)
    assert index["totals"]["samples"] > 0
    assert dataset_bytes(out) == dataset_bytes(local2["out"])
    pose_journals = list((out / "cache").glob("pose-*.jsonl"))
    assert pose_journals and sum(p.stat().st_size for p in pose_journals) > 0, "the actors ran the models"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray not installed: pip install 'bolid[ray]'")
def test_killed_ray_run_resumes_from_the_cache(local2):
    """``--executor ray`` killed (SIGKILL to the driver and every Ray process it started) once the pose actors
    have cached a batch, then run again: the dataset equals the local executor's byte for byte."""
    import signal
    import time

    data = yaml.safe_load(local2["config_path"].read_text())
    data["ray"] = {"num_cpus": 2, "object_store_mb": 128, "part_cpus": 0.5, "actor_cpus": 0.25}
    config_path = local2["tmp"] / "ray-kill.yaml"
    config_path.write_text(yaml.safe_dump(data))
    out = local2["tmp"] / "ray-killed"
    cmd = [sys.executable, "-m", "datapipe", "build", "--config", str(config_path), "--in", str(local2["in"])]
    cmd += ["--out", str(out), "--executor", "ray"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    end = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < end:
        if any(p.stat().st_size > 0 for p in (out / "cache").glob("pose-*.jsonl")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the Ray build ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started (same session)
    proc.communicate(timeout=60)
    assert not (out / "index.json").exists()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=400, check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert dataset_bytes(out) == dataset_bytes(local2["out"])
