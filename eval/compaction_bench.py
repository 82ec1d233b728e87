"""Attention-matching compaction benchmark on a Llama-3.1-8B-shaped model (random weights).

For each context length and ratio: prefill a random-token context with the random-weight
model (sdpa, DynamicCache; not timed), then time ``leank.compact`` end to end (copy into
a LeanK cache, reference-query passes, targets, selection, solves, write-back) and split
by phase; peak GPU memory; and held-out reconstruction error of full attention (window +
compacted archive with beta) against the uncompacted cache, next to the baseline that
keeps the same number of highest-attention keys without beta or refit.

    python eval/compaction_bench.py --contexts 32768 65536 --ratios 0.1 0.05 0.02 \
        --out eval/results/compaction_bench_h100.json

Random weights give near-uniform attention: the timings are representative, the errors
are those of diffuse heads (the AM vs top-k comparison is what they show).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path
import statistics
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from eval import common  # noqa: E402

# --tiny: every code path (both methods, recorded queries, held-out errors) in seconds on a CPU
TINY_SIZES = dict(contexts=[512], ratios=[0.1], layers=2, max_queries=128, heldout=32, reps=1, sink=8, recent=32,
                  extra="512:0.1:hak:repeat_rec,512:0.1:omp:repeat")


def llama8b_config(layers: int, max_pos: int, tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:  # CPU smoke test of this script
        return LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=max_pos,
                           attn_implementation="sdpa")
    shape = {k: common.LLAMA31_8B[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                               "num_key_value_heads", "head_dim", "rms_norm_eps")}
    # plain RoPE at the 8B's theta (no llama3 scaling): the benchmark's committed configuration
    return LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=max_pos,
                       rope_theta=common.LLAMA31_8B["rope_parameters"]["rope_theta"], attn_implementation="sdpa")


def build_model(layers: int, max_pos: int, device: str, tiny: bool = False):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama8b_config(layers, max_pos, tiny))
    finally:
        torch.set_default_dtype(old)
    return (model.float() if tiny else model).eval()


@torch.no_grad()
def prefill(model, ids, max_queries: int):
    """DynamicCache of the context, and the prefill's own queries recorded on the way (record_queries)."""
    from transformers import DynamicCache

    from leank.compaction import record_queries
    from leank.patching import cache_kwarg

    cache = DynamicCache(config=model.config)
    rep = model.config.num_attention_heads // model.config.num_key_value_heads
    with record_queries(model, every=max(1, rep * ids.shape[1] // max_queries)) as rec:
        model.model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    return cache, rec.queries()


def layer_window_archive(cache, i, sink, recent):
    """Layer ``i`` of the uncompacted DynamicCache split like the LeanK cache: (window K, V), (archive K, V)."""
    from leank.window import WindowPolicy

    k, v = cache.layers[i].keys[0], cache.layers[i].values[0]  # [KVH, T, D]
    policy = WindowPolicy(sink, recent)
    lo, hi = policy.archive_range(k.shape[1])
    win = torch.tensor(policy.window_indices(k.shape[1]), dtype=torch.long, device=k.device)
    return (k[:, win], v[:, win]), (k[:, lo:hi], v[:, lo:hi])


def layer_errors(held, cache, i, kc, vc, bc):
    """Held-out error of full attention over (kc, vc, bias bc) vs the uncompacted layer ``i``."""
    from leank.compaction import attention_targets

    full = attention_targets(held, cache.layers[i].keys[0], cache.layers[i].values[0])
    comp = attention_targets(held, kc, vc, bc)
    y, yc = full.out.double(), comp.out.double()
    d = (comp.lse - full.lse).double().abs()
    return float(((yc - y) ** 2).sum()), float((y ** 2).sum()), float(d.sum()), float(d.max()), d.numel()


def evaluate(held, cache, compacted, train, budget, sink, recent):
    """AM (compacted LeanK cache) and top-attention-keys errors on held-out queries, all layers."""
    from leank.compaction import top_attention_baseline

    acc = {"am": [0.0, 0.0, 0.0, 0.0, 0], "top_keys": [0.0, 0.0, 0.0, 0.0, 0]}
    for i, layer in enumerate(compacted.layers):
        q = held[i][0]
        (wk, wv), (ak, av) = layer_window_archive(cache, i, sink, recent)
        zeros = torch.zeros(wk.shape[:2], device=wk.device)
        ck, cv, cb, cl = layer.get_archive()
        a = int(cl[0])
        am = (torch.cat([wk, ck[0, :, :a]], 1), torch.cat([wv, cv[0, :, :a]], 1), torch.cat([zeros, cb[0, :, :a]], 1))
        base = top_attention_baseline(train[i][0], ak, av, budget)
        tk = (torch.cat([wk, base.keys], 1), torch.cat([wv, base.values], 1), torch.cat([zeros, base.bias], 1))
        for name, (k, v, b) in (("am", am), ("top_keys", tk)):
            e = layer_errors(q, cache, i, k, v, b)
            r = acc[name]
            r[0] += e[0]; r[1] += e[1]; r[2] += e[2]; r[3] = max(r[3], e[3]); r[4] += e[4]
    return {k: dict(out_rel=math.sqrt(r[0] / r[1]), lse_mae=r[2] / r[4], lse_max=r[3]) for k, r in acc.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--queries", default="repeat")
    ap.add_argument("--max-queries", type=int, default=4096)
    ap.add_argument("--heldout", type=int, default=512, help="held-out queries per KV head")
    ap.add_argument("--reps", type=int, default=2, help="timed runs per point (median reported)")
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--recent", type=int, default=128)
    ap.add_argument("--extra", default="32768:0.02:hak:repeat_rec,32768:0.02:hak:repeat_only,32768:0.02:omp:repeat",
                    help="extra single runs context:ratio:method:queries, comma-separated (queries 'repeat_rec': "
                         "repeat pass + the prefill's own queries recorded with record_queries)")
    ap.add_argument("--out", default=None, help="result JSON (default: none written; results are printed)")
    ap.add_argument("--tiny", action="store_true",
                    help=f"CPU smoke test with a tiny fp32 model; options left at their defaults become {TINY_SIZES}")
    ap.add_argument("--deadline", type=float, default=None, help="skip points that start after this many seconds")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.tiny:
        common.apply_smoke_sizes(args, ap, TINY_SIZES)

    import leank
    from leank.compaction import collect_queries
    from leank.config import LeanKConfig

    t_begin = time.perf_counter()
    dev = "cpu" if args.tiny else "cuda"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    conf = LeanKConfig(sink=args.sink, recent=args.recent, flush_every=32, backend="reference")
    t0 = time.perf_counter()
    model = build_model(args.layers, max(args.contexts) * 2 + 256, dev, args.tiny)
    sync()
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu", torch=torch.__version__, python=platform.python_version(),
                model=(f"tiny LlamaForCausalLM (CPU smoke test), random weights, fp32, {args.layers} layers, "
                       "4 q / 2 KV heads, head_dim 32") if args.tiny else
                      ("Llama-3.1-8B-shaped LlamaForCausalLM, random weights (normal 0.02), bf16, rope_theta 5e5, "
                       f"{args.layers} layers, 32 q / 8 KV heads, head_dim 128"),
                context="random token ids; prefill with sdpa into a DynamicCache (not timed), recording its own queries",
                window=f"LeanK window sink={args.sink} recent={args.recent}; ratio applies to the archive",
                heldout="repeat-pass queries at positions drawn with another seed (train positions are "
                        f"{args.max_queries // 8} of T per pass, so overlap is ~that fraction)",
                timing="leank.compact wall seconds, CUDA-synchronised per phase; median over reps")
    rows = []
    first = True
    extra = [e.split(":") for e in args.extra.split(",") if e]
    for T in args.contexts:
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(0, model.config.vocab_size - 256, (1, T), generator=g).to(dev)
        t0 = time.perf_counter()
        cache, recorded = prefill(model, ids, args.max_queries)
        sync()
        t_prefill = time.perf_counter() - t0
        # the training queries (same seed as compact) for the baseline, and held-out queries
        lk_ref = leank.compaction.leank_cache_from_dense(cache, conf)
        arch = int(lk_ref.layers[0].arch_len[0])
        train = collect_queries(model, lk_ref, ids, sources=tuple(args.queries.split("+")), max_queries_per_head=args.max_queries, seed=0)
        held = collect_queries(model, lk_ref, ids, sources=("repeat_only",), max_queries_per_head=args.heldout, seed=12345)
        del lk_ref
        print(f"T={T}: prefill {t_prefill:.2f} s, archive {arch} tokens", flush=True)
        runs = [(r, "hak", args.queries, args.reps) for r in args.ratios]
        runs += [(float(r), m, q, 1) for (c, r, m, q) in extra if int(c) == T]
        for ratio, method, queries, reps in runs:
            if args.deadline is not None and time.perf_counter() - t_begin > args.deadline:
                print(f"skipped T={T} ratio={ratio} {method} {queries}: past the {args.deadline:.0f} s deadline", flush=True)
                continue
            times, peaks = [], []
            n_runs = reps + (1 if first else 0)  # one untimed warm-up run on the very first point
            for rep in range(n_runs):
                lk = None
                if dev == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated() if dev == "cuda" else 0
                tm: dict = {}
                # "repeat_rec": repeat pass + the prefill's own queries recorded during the prefill
                lk = leank.compact(model, cache, ratio=ratio, queries=queries.replace("repeat_rec", "repeat"), method=method,
                                   input_ids=ids, max_queries_per_head=args.max_queries, config=conf, progress=False,
                                   timings=tm, context_queries=recorded if "repeat_rec" in queries else None)
                sync()
                if first and rep == 0:
                    continue
                peaks.append((torch.cuda.max_memory_allocated() - base_mem) / 2**30 if dev == "cuda" else 0.0)
                times.append(tm)
            first = False
            med = {k: statistics.median(t[k] for t in times) for k in times[0]}
            budget = math.ceil(ratio * arch)
            t0 = time.perf_counter()
            err = evaluate(held, cache, lk, train, budget, args.sink, args.recent)
            kept = sum(int(layer.arch_len[0]) for layer in lk.layers) / len(lk.layers)
            row = dict(context=T, ratio=ratio, method=method, queries=queries, archive_tokens=arch, budget=budget,
                       mean_archive_rows_after=kept, window_tokens=args.sink + args.recent,
                       overall_compression=T / (args.sink + args.recent + budget), reps=len(times),
                       seconds_median=med, seconds_all=[t["total"] for t in times],
                       peak_extra_gib=max(peaks), queries_per_head=args.max_queries,
                       heldout=dict(**err, n_per_head=held[0].shape[2]))
            rows.append(row)
            print(json.dumps(row), f"(eval {time.perf_counter() - t0:.1f} s)", flush=True)
            if args.out:  # keep what is done if a later point runs out of time
                with open(args.out, "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=1)
            del lk
        del cache, train, held, recorded

    result = dict(meta=meta, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print()
    print(f"{'T':>6} {'ratio':>5} {'meth':>4} {'queries':>11} {'t':>5} {'total s':>7} {'qry s':>6} {'tgt s':>6} {'sel s':>6} {'solve s':>7} {'peak GiB':>8} {'AM out/lse':>15} {'topk out/lse':>15}")
    for r in rows:
        s = r["seconds_median"]
        am, tb = r["heldout"]["am"], r["heldout"]["top_keys"]
        print(f"{r['context']:>6} {r['ratio']:>5} {r['method']:>4} {r['queries']:>11} {r['budget']:>5} {s['total']:>7.2f} "
              f"{s['queries']:>6.2f} {s.get('targets', 0):>6.2f} {s.get('selection', 0):>6.2f} {s.get('solves', 0):>7.2f} "
              f"{r['peak_extra_gib']:>8.1f} {am['out_rel']:>7.3f}/{am['lse_mae']:<7.3f} {tb['out_rel']:>7.3f}/{tb['lse_mae']:<7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
