"""The ``leank`` command line: ``masks``, ``demo``, ``train``, ``compact``.

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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leank", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def _version_line() -> str:
    from leank import __version__

    try:
        import torch
        import transformers

        deps = f" (torch {torch.__version__}, transformers {transformers.__version__})"
    except ImportError:  # pragma: no cover - the package depends on both
        deps = ""
    return f"leank {__version__}{deps}"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A bad input found after parsing (a ``ValueError`` or a missing file,
    e.g. a recipe field or a mask that does not fit the model) is printed as one
    ``leank <command>: error: ...`` line with exit status 2, as argparse does for its own checks;
    ``-v`` shows the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"leank {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
