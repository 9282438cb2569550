"""What runs the parts of a build: ``local``, ``ray`` or ``slurm`` (``executor:`` in the YAML, ``--executor``).

The unit of work is always the part (a set of identities, :mod:`datapipe.balance`) built by
:func:`datapipe.build.build`, so the model cache, resume after a kill and the byte-identical output work the
same whatever runs it; :func:`datapipe.index.merge` then writes the dataset's index once every part is done.

- ``local``: the parts one after another on this machine (with ``build``'s worker pool), then the merge.
- ``ray``: joins ``ray.address`` (or starts a local Ray), runs the parts as Ray tasks (retried when they fail)
  and the two model stages on pools of Ray actors shared by all parts (``ray.pose_actors``,
  ``ray.caption_actors``, each reserving ``ray.actor_gpus``), so detector + ViTPose and BLIP-2 stay loaded
  across batches and parts; merges at the end, reporting each finished part. Ray is an optional extra
  (``pip install 'bolid[ray]'``) imported only here.
- ``slurm``: writes ``OUT/slurm/parts.sbatch`` (an ``--array`` job, one task per part, log per part in
  ``OUT/logs/``) and ``OUT/slurm/merge.sbatch`` and submits them with ``sbatch``, the merge with
  ``--dependency=afterok:<array job>``; ``--dry-run`` prints the scripts instead of submitting.

Every executor starts a failed part again up to ``retries`` times; a restarted part repeats no finished work.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from datapipe.build import build, local_model
from datapipe.config import BuildConfig
from datapipe.index import merge

log = logging.getLogger(__name__)

RAY_MISSING = "executor 'ray' needs Ray, an optional extra: pip install 'bolid[ray]' (or pip install 'ray>=2.9')"


def run(
    config: BuildConfig,
    in_dir: str | Path,
    out_dir: str | Path,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
) -> dict:
    """Build every part of ``config.num_parts`` with ``config.executor`` and merge.

    Args:
        config_path, overrides: the YAML file and command-line options the Slurm jobs repeat.
        dry_run: Slurm only: write and return the scripts, submit nothing.

    Returns:
        ``local``, ``ray``: the merged index; ``slurm``: ``{"scripts": {name: text}, "jobs": [ids]}``.
    """
    if config.executor == "slurm":
        if config_path is None:
            raise ValueError("executor 'slurm' needs the --config file the jobs will read")
        return submit_slurm(config, config_path, in_dir, out_dir, overrides, dry_run)
    if dry_run:
        raise ValueError(f"--dry-run is for --executor slurm, not {config.executor}")
    if config.executor == "ray":
        return run_ray(config, in_dir, out_dir)
    return run_local(config, in_dir, out_dir)


def _merged(out_dir: Path, num_parts: int) -> dict:
    if num_parts == 1:  # a one-part build merged by itself
        import json

        return json.loads((Path(out_dir) / "index.json").read_text(encoding="utf-8"))
    return merge(Path(out_dir), num_parts)


# ----------------------------------------------------------------------------------------------------- local


def run_local(config: BuildConfig, in_dir: str | Path, out_dir: str | Path, models=None) -> dict:
    """Every part in turn in this process, each retried up to ``config.retries`` times, then the merge."""
    n = config.num_parts
    for part in range(n):
        for attempt in range(config.retries + 1):
            try:
                build(config, in_dir, out_dir, part=part, num_parts=n, models=models)
                break
            except Exception as e:
                if attempt == config.retries:
                    raise
                log.warning(
                    "part %d of %d failed (%s); starting it again (%d of %d)", part, n, e, attempt + 1, config.retries
                )
        log.info("local: part %d of %d done", part, n)
    return _merged(Path(out_dir), n)


# ------------------------------------------------------------------------------------------------------- ray


class ModelServer:
    """A Ray actor's state: one stage's model, loaded once and kept for every batch it is sent."""

    def __init__(self, stage: str, config: BuildConfig):
        self.model = local_model(stage, config)

    def fingerprint(self) -> str:
        return self.model.fingerprint

    def input_size(self) -> tuple[int, int] | None:
        self.model.load()
        return self.model.input_size

    def run(self, images: list) -> list[dict]:
        return self.model(images)


class ActorModel:
    """Stands for a stage's model inside a part task: each batch goes to the next actor of the pool."""

    def __init__(self, actors: list, offset: int = 0):
        import ray

        self.actors = actors
        self._next = offset
        self.fingerprint = ray.get(actors[0].fingerprint.remote())  # the actors' device and dtype
        self.input_size = None

    def load(self) -> None:
        import ray

        self.input_size = ray.get(self.actors[0].input_size.remote())

    def close(self) -> None:
        """The actors keep their models for the other parts."""

    def __call__(self, images: list) -> list[dict]:
        import ray

        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        return ray.get(actor.run.remote(images))


class ActorModels:
    """``models(stage, config)`` for :func:`datapipe.build.build`: the shared actor pools."""

    def __init__(self, pools: dict[str, list], offset: int = 0):
        self.pools = pools
        self.offset = offset

    def __call__(self, stage: str, config: BuildConfig) -> ActorModel:
        return ActorModel(self.pools[stage], self.offset)


def _build_part(config: BuildConfig, in_dir: str, out_dir: str, part: int, models: ActorModels) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    build(config, in_dir, out_dir, part=part, num_parts=config.num_parts, models=models)
    return part


def _start_ray(config: BuildConfig):
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_MISSING) from None
    if ray.is_initialized():
        return ray, False
    rc = config.ray
    if rc.address:
        log.info("ray: joining %s", rc.address)
        ray.init(address=rc.address, log_to_driver=True)
    else:
        # Workers must import this checkout's datapipe (not another install), wherever they start.
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(
            num_cpus=rc.num_cpus,
            object_store_memory=rc.object_store_mb * 2**20 if rc.object_store_mb else None,
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
            log_to_driver=True,
        )
        log.info("ray: started a local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
    return ray, True


def _check_resources(have: dict, rc) -> None:
    """Fail at once, naming the setting, where Ray would wait forever for resources the cluster lacks."""
    actors = rc.pose_actors + rc.caption_actors
    gpus, cpus = have.get("GPU", 0), have.get("CPU", 0)
    if rc.actor_gpus and actors * rc.actor_gpus > gpus:
        raise ValueError(
            f"ray.actor_gpus: {actors} actors x {rc.actor_gpus} GPUs > the cluster's {gpus:g} GPUs "
            "(set ray.actor_gpus: 0 on a CPU-only cluster, or fewer ray.pose_actors/caption_actors)"
        )
    if actors * rc.actor_cpus + rc.part_cpus > cpus:
        raise ValueError(
            f"ray.actor_cpus/part_cpus: {actors} actors x {rc.actor_cpus} CPUs + one part's {rc.part_cpus} CPUs > "
            f"the cluster's {cpus:g} CPUs, so no part could start"
        )


def run_ray(config: BuildConfig, in_dir: str | Path, out_dir: str | Path) -> dict:
    """The parts as Ray tasks, the model stages on shared actor pools, then the merge (module docstring)."""
    ray, started = _start_ray(config)
    rc, n = config.ray, config.num_parts
    in_dir, out_dir = str(Path(in_dir).resolve()), str(Path(out_dir).resolve())
    try:
        _check_resources(ray.cluster_resources(), rc)
        server = ray.remote(ModelServer).options(num_cpus=rc.actor_cpus, num_gpus=rc.actor_gpus)
        pools = {
            "pose": [server.remote("pose", config) for _ in range(rc.pose_actors)],
            "caption": [server.remote("caption", config) for _ in range(rc.caption_actors)],
        }
        task = ray.remote(_build_part).options(num_cpus=rc.part_cpus, max_retries=config.retries, retry_exceptions=True)
        pending = {task.remote(config, in_dir, out_dir, p, ActorModels(pools, p)): p for p in range(n)}
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            part = pending.pop(ready[0])
            ray.get(ready[0])  # raises when the part failed after its retries
            done += 1
            log.info("ray: part %d of %d done (%d of %d finished)", part, n, done, n)
        for actors in pools.values():
            for actor in actors:
                ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
    return _merged(Path(out_dir), n)


# ----------------------------------------------------------------------------------------------------- slurm


def _q(path) -> str:
    return shlex.quote(str(path))


def slurm_scripts(
    config: BuildConfig, config_path: str | Path, in_dir: str | Path, out_dir: str | Path, overrides: Sequence[str] = ()
) -> dict[str, str]:
    """The array job over the parts and the merge job, as ``{"parts.sbatch": text, "merge.sbatch": text}``.

    Paths are made absolute (the jobs start elsewhere); ``overrides`` are the command-line options to repeat.
    """
    sc, n = config.slurm, config.num_parts
    out, logs = Path(out_dir).resolve(), Path(out_dir).resolve() / "logs"
    array = f"0-{n - 1}" + (f"%{sc.max_parallel}" if sc.max_parallel else "")
    head = ["#!/bin/bash"]
    common = [f"--partition={sc.partition}"] * bool(sc.partition) + list(sc.extra)
    parts_opts = [
        "--job-name=datapipe-parts",
        f"--array={array}",
        f"--output={logs}/part-%a.log",
        f"--cpus-per-task={sc.cpus_per_task}",
        *[f"--gpus-per-task={sc.gpus_per_task}"] * bool(sc.gpus_per_task),
        *[f"--time={sc.time}"] * bool(sc.time),
        *[f"--mem={sc.mem}"] * bool(sc.mem),
        *common,
    ]
    merge_opts = ["--job-name=datapipe-merge", f"--output={logs}/merge.log", "--cpus-per-task=1", *common]
    cmd = [
        sc.python,
        "-m",
        "datapipe",
        "build",
        "--config",
        str(Path(config_path).resolve()),
        "--in",
        str(Path(in_dir).resolve()),
        "--out",
        str(out),
        *overrides,
        "--num-parts",
        str(n),
        "--part",
        "$SLURM_ARRAY_TASK_ID",
    ]
    build_line = " ".join(c if c.startswith("$") else _q(c) for c in cmd)
    parts = [
        *head,
        *(f"#SBATCH {o}" for o in parts_opts),
        "# One part of the dataset per array task; a failed part starts again from its cache.",
        "set -u",
        *sc.setup,
        f"for attempt in $(seq 0 {config.retries}); do",
        f"    {build_line} && exit 0",
        '    echo "part $SLURM_ARRAY_TASK_ID: attempt $attempt failed" >&2',
        "done",
        "exit 1",
    ]
    merge_script = [
        *head,
        *(f"#SBATCH {o}" for o in merge_opts),
        "# After every part succeeded (--dependency=afterok on the array job).",
        "set -eu",
        *sc.setup,
        f"{_q(sc.python)} -m datapipe merge {_q(out)} --num-parts {n}",
    ]
    return {"parts.sbatch": "\n".join(parts) + "\n", "merge.sbatch": "\n".join(merge_script) + "\n"}


def submit_slurm(
    config: BuildConfig,
    config_path: str | Path,
    in_dir: str | Path,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
) -> dict:
    """Write the scripts to ``OUT/slurm/`` and (unless ``dry_run``) submit them: parts, then merge after them."""
    from bolid.files import atomic_write

    scripts = slurm_scripts(config, config_path, in_dir, out_dir, overrides)
    folder = Path(out_dir).resolve() / "slurm"
    (Path(out_dir).resolve() / "logs").mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        atomic_write(folder / name, text)
    if dry_run:
        return {"scripts": scripts, "jobs": []}
    array = _sbatch(["--parsable", str(folder / "parts.sbatch")])
    merge_job = _sbatch(["--parsable", f"--dependency=afterok:{array}", str(folder / "merge.sbatch")])
    log.info(
        "slurm: parts job %s (%d tasks), merge job %s after it; logs in %s",
        array,
        config.num_parts,
        merge_job,
        folder.parent / "logs",
    )
    return {"scripts": scripts, "jobs": [array, merge_job]}


def _sbatch(args: list[str]) -> str:
    try:
        done = subprocess.run(["sbatch", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RuntimeError(
            "executor 'slurm': no sbatch on PATH (run on a Slurm login node, or use --dry-run)"
        ) from None
    if done.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    job = done.stdout.strip().split(";")[0]  # --parsable: "<id>" or "<id>;<cluster>"
    if not job.isdigit():
        raise RuntimeError(f"sbatch {' '.join(args)}: expected a job id, got {done.stdout.strip()!r}")
    return job
