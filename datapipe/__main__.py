"""``python -m datapipe``: build identity-grouped WebDataset shards from crawled or own photos.

python -m datapipe build --config configs/shards/real.yaml --in IN --out OUT
python -m datapipe build ... --num-parts 8 --executor ray --ray-address auto   # 8 parts on a Ray cluster
python -m datapipe build ... --num-parts 8 --executor slurm [--dry-run]        # an sbatch array + merge job
python -m datapipe build ... --num-parts 8 --part 3     # just part 3 (what each Slurm array task runs)
python -m datapipe merge OUT                            # after all parts finished (the executors do it)
python -m datapipe verify OUT                           # re-check every shard's size, sha256 and samples
python -m datapipe remove OUT --identity NAME --sha256 HASH   # take people or photos out (rewrites their shards)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from datapipe import __doc__ as PACKAGE_DOC


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m datapipe",
        description=(PACKAGE_DOC or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Shard format: see bolid/shards.py. Run `python -m datapipe build -h` for the build options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    b = sub.add_parser(
        "build",
        help="run the pipeline (all of it, or one part of a scale-out run)",
        description=(
            "Ingest and validate -> person and keypoints -> identity filter -> captions -> shards. "
            "Restartable: re-running after a crash or after adding images repeats no finished work."
        ),
    )
    b.add_argument("--config", required=True, help="YAML settings: configs/shards/real.yaml, configs/shards/tiny.yaml")
    b.add_argument(
        "--in",
        dest="in_dir",
        required=True,
        metavar="IN",
        help="crawler output (with manifest.jsonl) or a folder of <identity>/<image> files",
    )
    b.add_argument("--out", dest="out_dir", required=True, metavar="OUT", help="output folder for shards and index")
    b.add_argument("--components", choices=["real", "tiny", "mini"], help="override the config: real, tiny or mini kit")
    b.add_argument("--device", help="torch device for the models (cpu, cuda, cuda:1; default: config, auto)")
    b.add_argument("--batch-size", type=int, help="images per model batch for pose and captions (default: config)")
    b.add_argument("--workers", type=int, help="CPU worker processes for decode/resize/encode (0: in-process)")
    b.add_argument(
        "--num-parts",
        type=int,
        metavar="N",
        help="split the identities into N parts, balanced by photos (default: config num_parts, 1)",
    )
    b.add_argument(
        "--part",
        type=int,
        metavar="I",
        help="build only part I (0 <= I < N) here and do not merge; without it the executor runs every part",
    )
    b.add_argument(
        "--executor",
        choices=["local", "ray", "slurm"],
        help="what runs the parts: local (this machine), ray, slurm (default: config executor, local)",
    )
    b.add_argument("--ray-address", help="Ray cluster to join (host:6379, ray://host:10001, auto); default: config")
    b.add_argument("--retries", type=int, help="start a failed part again this many times (default: config, 1)")
    b.add_argument("--dry-run", action="store_true", help="slurm: write and print the sbatch scripts, submit nothing")

    m = sub.add_parser(
        "merge",
        help="combine the parts of a scale-out run into index.json and stats.json",
        description="Write OUT/index.json, stats.json and rejects.jsonl from OUT/parts/ when all parts are done.",
    )
    m.add_argument("out_dir", metavar="OUT", help="the --out folder all parts wrote to")
    m.add_argument("--num-parts", type=int, help="which run's parts, when parts of several --num-parts are present")

    v = sub.add_parser(
        "verify",
        help="re-check every shard against index.json (size, sha256, samples); exit status 1 on any problem",
        description="Read OUT/index.json and check each shard's size, SHA-256 and sample count. Changes nothing.",
    )
    v.add_argument("out_dir", metavar="OUT", help="the dataset folder (with index.json)")

    r = sub.add_parser(
        "remove",
        help="take identities or photos out of a built dataset (e.g. on a removal request)",
        description=(
            "Record the removal in OUT/removed.json (later builds honour it), rewrite only the shards that held "
            "the samples, and update index.json, stats.json, rejects.jsonl, samples.parquet and DATASET_CARD.md."
        ),
    )
    r.add_argument("out_dir", metavar="OUT", help="the dataset folder (with index.json)")
    r.add_argument("--identity", action="append", default=[], help="an identity to remove (repeatable)")
    r.add_argument("--sha256", action="append", default=[], help="SHA-256 of a source photo to remove (repeatable)")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    """The command-line settings a Slurm job must repeat (the YAML holds the rest)."""
    flags = {"components": "--components", "device": "--device", "batch_size": "--batch-size", "workers": "--workers"}
    out = []
    for key, flag in flags.items():
        value = getattr(args, key)
        if value is not None:
            out += [flag, str(value)]
    if args.retries is not None:
        out += ["--retries", str(args.retries)]
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "build":
            from datapipe.build import build
            from datapipe.config import BuildConfig

            if args.batch_size is not None and args.batch_size < 1:
                raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
            if args.workers is not None and args.workers < 0:
                raise ValueError(f"--workers must be >= 0, got {args.workers}")
            if args.num_parts is not None and args.num_parts < 1:
                raise ValueError(f"--num-parts must be >= 1, got {args.num_parts}")
            config = BuildConfig.from_yaml(args.config).replace(
                components=args.components,
                device=args.device,
                workers=args.workers,
                pose__batch_size=args.batch_size,
                caption__batch_size=args.batch_size,
            )
            config = config.replace(
                executor=args.executor, num_parts=args.num_parts, retries=args.retries, ray__address=args.ray_address
            )
            if args.part is not None:
                if args.dry_run:
                    raise ValueError("--dry-run writes the scripts for every part; leave out --part")
                build(config, args.in_dir, args.out_dir, part=args.part, num_parts=config.num_parts)
            else:
                from datapipe.executors import run

                result = run(config, args.in_dir, args.out_dir, args.config, _overrides(args), args.dry_run)
                for name, text in result.get("scripts", {}).items():
                    print(f"# ---- {name}\n{text}", end="")
                if args.dry_run:
                    folder = Path(args.out_dir).resolve() / "slurm"
                    print(
                        f"# ---- not submitted; to submit:\n# job=$(sbatch --parsable {folder}/parts.sbatch)\n"
                        f"# sbatch --dependency=afterok:$job {folder}/merge.sbatch"
                    )
        elif args.command == "remove":
            from datapipe.remove import remove

            touched = remove(args.out_dir, args.identity, args.sha256)
            logging.getLogger("datapipe").info("rewrote or deleted %d shards: %s", len(touched), ", ".join(touched))
        elif args.command == "verify":
            from datapipe.verify import verify

            problems = verify(args.out_dir)
            for problem in problems:
                logging.getLogger("datapipe").error("%s", problem)
            if problems:
                return 1
            logging.getLogger("datapipe").info("%s: every shard matches index.json", args.out_dir)
        else:
            from datapipe.index import merge

            merge(args.out_dir, args.num_parts)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        logging.getLogger("datapipe").error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
