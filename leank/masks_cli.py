"""``leank masks fetch|inspect|convert|list``: get, look at and convert channel masks.

Tables go to stdout (this is the user-facing command); errors are logged and give a
non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import masks as M

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("masks", help="fetch, inspect, convert and list LeanK channel masks",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="masks_command", required=True)

    f = sub.add_parser("fetch", help="download a published mask into the cache dir and check its sha256")
    f.add_argument("name", help="model id or alias, e.g. meta-llama/Llama-3.1-8B-Instruct")
    f.add_argument("--set", dest="context_set", default=None, help="mask set (default: the model's default set)")
    f.add_argument("--cache-dir", default=None, help=f"target dir (default: ${M.CACHE_ENV} or ~/.cache/leank/masks)")
    f.add_argument("--url", default=None, help="download from this mirror URL instead (sha256 still checked)")
    f.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    f.set_defaults(func=cmd_fetch)

    i = sub.add_parser("inspect", help="per-layer sparsity and kept counts of a mask")
    i.add_argument("spec", metavar="FILE", help=".safetensors or .pth file (or a fetched model id/alias)")
    i.add_argument("--set", dest="context_set", default=None, help="mask set, for a model id")
    i.add_argument("--cache-dir", default=None)
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("convert", help="convert a published .pth mask to .safetensors with metadata")
    c.add_argument("input", metavar="IN.pth")
    c.add_argument("output", metavar="OUT.safetensors")
    c.add_argument("--model-id", required=True, help="model the mask belongs to (registry aliases are canonicalised)")
    c.add_argument("--set", dest="context_set", default=M.CONTEXT_SETS_DEFAULT, help="context set (default, yarn, ...)")
    c.add_argument("--align", type=int, default=None, help="kept-count alignment (default: inferred, 32 or 16)")
    c.add_argument("--source", default=None, help="provenance to record (default: the input path)")
    c.set_defaults(func=cmd_convert)

    ls = sub.add_parser("list", help="models and mask sets in the registry, and which are fetched")
    ls.add_argument("--cache-dir", default=None)
    ls.set_defaults(func=cmd_list)
    return p


def _guard(fn):
    """Run a handler; user errors are logged and turned into exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, FileNotFoundError, M.MaskFetchError) as e:
            logger.error("%s", e)
            return 1

    run.__name__ = fn.__name__
    return run


@_guard
def cmd_fetch(args: argparse.Namespace) -> int:
    path = M.fetch_mask(args.name, context_set=args.context_set, cache_dir=args.cache_dir,
                        url=args.url, timeout=args.timeout)
    print(path)
    return 0


@_guard
def cmd_inspect(args: argparse.Namespace) -> int:
    mask = M.resolve_mask(args.spec, context_set=args.context_set, cache_dir=args.cache_dir)
    print(mask.describe())
    return 0


@_guard
def cmd_convert(args: argparse.Namespace) -> int:
    if Path(args.input).suffix.lower() not in M.PTH_SUFFIXES:
        raise ValueError(f"IN: expected a .pth file, got {args.input}")
    if Path(args.output).suffix.lower() not in M.SAFETENSORS_SUFFIXES:
        raise ValueError(f"OUT: expected a .safetensors path, got {args.output}")
    model_id = M.canonical_model_id(args.model_id) or args.model_id
    mask = M.ChannelMask.from_pth(args.input, model_id=model_id, context_set=args.context_set,
                                  align=args.align, source=args.source)
    out = mask.save(args.output)
    print(f"wrote {out}: {mask!r}")
    return 0


@_guard
def cmd_list(args: argparse.Namespace) -> int:
    manifest = M.load_manifest()
    cache = M.mask_cache_dir(args.cache_dir)
    print(f"registry: {M.manifest_path()}\ncache dir: {cache}")
    for mid, entry in manifest["models"].items():
        print(f"{mid}  (aliases: {', '.join(entry.get('aliases', [])) or '-'})")
        for name, info in entry["sets"].items():
            if not info.get("file"):
                state = "not published"
            elif (cache / info["file"]).is_file():
                state = f"fetched: {cache / info['file']}"
            else:
                state = "not fetched"
            print(f"  set {name:8s} {state}")
    return 0
