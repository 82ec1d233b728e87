"""The ``leank`` command line: ``masks``, ``demo``, ``bench``, ``train``, ``compact``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; the
module is imported only when the CLI is built, never at ``import leank``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module that defines add_parser(subparsers) and sets func on its parser
SUBCOMMANDS = {
    "masks": "leank.masks_cli",
    "demo": "leank.demo",
    "train": "leank.train.cli",
    "compact": "leank.compaction_cli",
    "bench": "leank.bench_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leank", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not module.startswith(e.name):
                raise  # a real missing dependency, not an absent subcommand module
            continue  # subcommand not shipped in this build
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
