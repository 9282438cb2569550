"""``bolid components``: list every pretrained component, where it resolves, and optionally load it."""

from __future__ import annotations

import argparse

from bolid import components as comp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check",
        nargs="*",
        metavar="NAME",
        help="resolve these components (all if none named) and report missing weights; nothing is downloaded "
        "when the hub is unreachable",
    )


def run(args: argparse.Namespace) -> int:
    rows = comp.describe()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['status']:<22}  {r['source']}\n{'':<{width}}  env {r['env']}: {r['what']}")
    if args.check is None:
        return 0
    failed = 0
    for name in args.check or list(comp.COMPONENTS):
        try:
            where = comp.resolve(name)
            print(f"ok       {name}: {where}")
        except comp.MissingWeightsError as e:
            failed += 1
            print(f"MISSING  {e}")
    return 1 if failed else 0
