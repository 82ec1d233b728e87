"""``leank compact``: prefill a context, compact its KV cache by attention matching, answer a question.

Loads a Llama/Qwen2 model, patches it with LeanK (with a channel mask, or keeping every
channel), prefills the context into a ``LeanKCache``, runs ``leank.compact`` and generates
the answer to ``--question`` from the compacted cache. The memory report and the timings
go to stdout (this is the user-facing command); errors are logged with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compact", help="compact a context's KV cache 10-50x by attention matching and answer a question",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model id or local path (Llama or Qwen2 family)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--context-file", type=Path, help="text file with the context")
    src.add_argument("--context", help="the context as a string")
    p.add_argument("--question", default="", help="appended after the context for generation")
    p.add_argument("--masks", default=None, help="LeanK channel mask (file, model id or alias); default: keep every channel")
    p.add_argument("--ratio", type=float, default=0.02, help="fraction of archived tokens to keep (default 0.02 = 50x)")
    p.add_argument("--budget", type=int, default=None, help="entries per KV head instead of --ratio")
    from leank.compaction.selection import selection_methods
    from leank.config import LeanKConfig

    p.add_argument("--method", choices=selection_methods(), default="hak", help="key selection method (registry)")
    p.add_argument("--queries", default="repeat", help="repeat | repeat_only | self, optionally +gaussian")
    p.add_argument("--max-queries", type=int, default=4096, help="reference queries per KV head")
    p.add_argument("--ridge", type=float, default=0.0)
    p.add_argument("--sink", type=int, default=LeanKConfig().sink, help="full-precision sink tokens (default: %(default)s)")
    p.add_argument("--recent", type=int, default=LeanKConfig().recent,
                   help="full-precision recent tokens (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    p.set_defaults(func=cmd_compact)
    return p


def _load(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    return model, tok, device


def _mask(args, model):
    if args.masks:
        return args.masks
    import torch

    from leank.patches import model_dims

    from .masks import ChannelMask

    keep = torch.ones(*model_dims(model.config), dtype=torch.bool)
    return ChannelMask(keep, source="leank compact: every channel kept")


def cmd_compact(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        logger.error("%s", e)
        return 1


def _run(args) -> int:
    import torch

    import leank
    from leank.compaction import record_queries
    from leank.config import LeanKConfig
    from leank.patching import cache_kwarg, new_cache

    text = args.context_file.read_text() if args.context_file else args.context
    model, tok, device = _load(args)
    leank.patch(model, masks=_mask(args, model), config=LeanKConfig(sink=args.sink, recent=args.recent))
    try:
        ids = tok(text, return_tensors="pt")["input_ids"].to(device)
        cache = new_cache(model)
        t0 = time.perf_counter()
        cfg = model.config
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        every = max(1, rep * ids.shape[1] // args.max_queries)  # the prefill's own queries, recorded for free
        with record_queries(model, every=every) as rec, torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
        before = cache.memory_report()
        print(f"prefill: {ids.shape[1]} tokens in {time.perf_counter() - t0:.2f} s, "
              f"KV {before['leank_bytes'] / 2**20:.1f} MiB")
        timings: dict = {}
        cache = leank.compact(model, cache, ratio=args.ratio, budget=args.budget, queries=args.queries,
                              method=args.method, ridge=args.ridge, max_queries_per_head=args.max_queries,
                              input_ids=ids, tokenizer=tok, timings=timings, context_queries=rec.queries())
        after = cache.memory_report()
        print(f"compact: {timings['total']:.2f} s (" + ", ".join(f"{k} {v:.2f}" for k, v in timings.items() if k != "total")
              + f"); KV {before['leank_bytes'] / 2**20:.1f} -> {after['leank_bytes'] / 2**20:.1f} MiB "
              f"({before['leank_bytes'] / max(1, after['leank_bytes']):.1f}x)")
        q = tok(args.question, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        if q.shape[1] == 0:
            return 0
        out = model.generate(torch.cat([ids, q], 1), max_new_tokens=args.max_new_tokens, **{cache_kwarg(model): cache},
                             do_sample=False)
        print(tok.decode(out[0, ids.shape[1] + q.shape[1]:], skip_special_tokens=True))
    finally:
        leank.unpatch(model)
    return 0
