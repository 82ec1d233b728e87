"""The projections of a small-batch decode step: cuBLAS (``F.linear``) against LeanK's split-K-free Triton kernels.

    python eval/gemv_bench.py                         # GPU: Llama-3.1-8B and Qwen2.5-7B shapes, tile sweep
    python eval/gemv_bench.py --models qwen2.5-7b --products qkv,o --configs default
    python eval/gemv_bench.py --rows 2,4,8            # the 2..16-row tensor-core kernel (batched decode)
    python eval/gemv_bench.py --dry-run               # CPU: list products and configs, time nothing

For each model shape and product (``qkv``: the fused q/k/v weight, with Qwen's bias; ``o``;
``gate_up``: the fused gate/up weight; ``down``; ``lm_head``) and each ``--rows`` batch ``b``,
``x [b, hidden]`` is multiplied by ``copies`` distinct weights in one CUDA graph, as a decode step runs
its layers:
the weights together are larger than the L2 cache, so every product reads its weight from
memory. The time per product is the median graph replay (``triton.testing.do_bench``) over
``copies``. Methods: ``cublas`` (``F.linear``'s product, ``torch.addmm`` / ``torch.mm`` written into
the output, as in ``eval/results/gemv_bench_h200_fair.json``; the earlier ``gemv_bench_h200.json`` and
``gemv_bench_h200_rows.json`` timed ``F.linear`` plus a copy of its result, one small extra kernel per product), ``gemv default`` (``leank.gemv.config_for``; for more than one row ``rows_config_for``, the tensor-core kernel) and each tile config of ``--configs``
(``BLOCK_N x BLOCK_K / warps``, ``sS`` for S pipeline stages). Each kernel's result is
checked against a float64 product of the same inputs, beside cuBLAS's error (``max_err``).
Bandwidth is the weight's bytes over the time, against the device-to-device copy bandwidth of
the same run (bytes read + written).

Writes a JSON (one row per product, batch and method: ``model, product, rows, n, k, method, us, gbps,
pct_of_copy, max_err``; ``tiles`` on the kernel's rows) to ``--out`` (default ``runs/gemv_bench_<device>.json``,
git-ignored) and prints a table per model: the best config per product and its time against cuBLAS's.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python eval/gemv_bench.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from eval import common  # noqa: E402
from leank import gemv  # noqa: E402

PRODUCTS = ("qkv", "o", "gate_up", "down", "lm_head")
SWEEP = [(bn, bk, w) for bn in (2, 4, 8) for bk in (512, 1024, 2048) for w in (4, 8)] + [(1, 2048, 4), (16, 256, 4)]
# the 2..16-row (tensor-core) kernel: (BLOCK_N, BLOCK_K, warps, stages)
ROW_SWEEP = [(bn, bk, w, st) for bn in (16, 32) for bk in (128, 256, 512) for w in (4,) for st in (3, 4)] + \
    [(16, 256, 8, 4), (64, 128, 4, 4)]


def product_shapes(config) -> dict:
    """``{product: (n, k, has_bias)}`` of one decoder layer (and the head) of a transformers config."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
    return {"qkv": (qkv, hidden, bias), "o": (hidden, config.num_attention_heads * head_dim, False),
            "gate_up": (2 * config.intermediate_size, hidden, False), "down": (hidden, config.intermediate_size, False),
            "lm_head": (config.vocab_size, hidden, False)}


def parse_configs(text: str, rows: int = 1) -> list:
    """``default``, ``sweep`` or ``BNxBK/W[sS]`` entries (comma list) -> ``[None | (BLOCK_N, BLOCK_K, warps,
    stages or None)]``; ``sweep`` is ``SWEEP`` for one row, ``ROW_SWEEP`` for more."""
    out = []
    for part in common.str_list(text):
        if part == "default":
            out.append(None)
        elif part == "sweep":
            out.extend((*c, None) for c in SWEEP) if rows == 1 else out.extend(ROW_SWEEP)
        else:
            try:
                tiles, launch = part.split("/")
                bn, bk = tiles.split("x")
                warps, _, stages = launch.partition("s")
                out.append((int(bn), int(bk), int(warps), int(stages) if stages else None))
            except ValueError:
                raise SystemExit(f"--configs: expected default, sweep or BLOCK_NxBLOCK_K/WARPS[sSTAGES] (e.g. 4x1024/4 "
                                 f"or 16x256/4s4), got {part!r}")
    return out


def label(cfg) -> str:
    if cfg is None:
        return "gemv default"
    return f"gemv {cfg[0]}x{cfg[1]}/{cfg[2]}" + (f"s{cfg[3]}" if cfg[3] else "")


def time_graph(fn, copies: int, rep_ms: int) -> float:
    """Median µs per product of a CUDA graph that calls ``fn(i)`` for every copy ``i``."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):  # warm-up: compiles, cuBLAS workspaces
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    return do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median") * 1e3 / copies


def bench_product(model: str, name: str, n: int, k: int, has_bias: bool, rows: int, configs: list, args, dtype,
                  copy_gbps) -> list:
    nbytes = n * k * torch.finfo(dtype).bits // 8
    copies = max(4, min(64, math.ceil(args.graph_bytes / nbytes)))
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    weights = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * k ** -0.5 for _ in range(copies)]
    biases = [torch.randn(n, device="cuda", dtype=dtype, generator=gen) if has_bias else None for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=dtype, generator=gen)
    want = F.linear(x.double(), weights[0].double(), None if biases[0] is None else biases[0].double())
    outs = [torch.empty(rows, n, device="cuda", dtype=dtype) for _ in range(copies)]
    out_rows = []

    def row(method, us, got):
        err = (got.double() - want).abs().max().item()
        out_rows.append({"model": model, "product": name, "rows": rows, "n": n, "k": k, "bias": has_bias,
                         "method": method, "us": us, "gbps": nbytes / us / 1e3,
                         "pct_of_copy": 100 * nbytes / us / 1e3 / copy_gbps, "max_err": err, "copies": copies})

    # cuBLAS writes into the output as the kernel does (the product F.linear runs: addmm with a bias, mm
    # without), so neither side pays a copy of its result
    us = time_graph(lambda i: _cublas(x, weights[i], biases[i], outs[i]), copies, args.rep_ms)
    row("cublas", us, _cublas(x, weights[0], biases[0], torch.empty_like(outs[0])))
    for cfg in configs:
        conf = None if cfg is None else {"BLOCK_N": cfg[0], "BLOCK_K": cfg[1], "num_warps": cfg[2],
                                         **({"num_stages": cfg[3]} if cfg[3] else {})}
        us = time_graph(lambda i: gemv.gemv_(x, weights[i], biases[i], outs[i], conf), copies, args.rep_ms)
        got = gemv.gemv_(x, weights[0], biases[0], torch.empty_like(outs[0]), conf)
        row(label(cfg), us, got)
        # the tiles a "gemv default" row ran (the defaults change as sweeps are measured)
        out_rows[-1]["tiles"] = conf or (gemv.config_for(n, k) if rows == 1 else gemv.rows_config_for(n, k))
    weights.clear()  # free the copies before the next product
    biases.clear()
    torch.cuda.empty_cache()
    return out_rows


def _cublas(x, weight, bias, out):
    """``out = F.linear(x, weight, bias)`` through cuBLAS without a temporary: ``x [rows, k]``, ``out [rows, n]``."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama3.1-8b,qwen2.5-7b", help="comma list of model shapes (eval.common)")
    p.add_argument("--products", default=",".join(PRODUCTS), help=f"comma list of {PRODUCTS}")
    p.add_argument("--configs", default="default,sweep",
                   help="comma list: default (leank.gemv.config_for, or rows_config_for above one row), sweep (%d "
                        "tile configs for one row, %d for more) or BLOCK_NxBLOCK_K/WARPS[sSTAGES]"
                        % (len(SWEEP), len(ROW_SWEEP)))
    p.add_argument("--rows", default="1",
                   help="comma list of batch sizes (rows of x; 2..16 run the tensor-core kernel, as "
                        "leank.gemv.MAX_BATCH would in a decode step) (default: %(default)s)")
    p.add_argument("--graph-bytes", type=float, default=2e9,
                   help="bytes of distinct weights per graph (4 to 64 copies; larger than L2)")
    p.add_argument("--rep-ms", type=int, default=60)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-name", default=None, help="device label of the output name (default: from CUDA)")
    p.add_argument("--out", default=None, help="output JSON (default: runs/gemv_bench_<device>.json)")
    p.add_argument("--dry-run", action="store_true", help="list products and configs, time nothing (CPU ok)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    products = common.str_list(args.products)
    bad = [p for p in products if p not in PRODUCTS]
    if bad:
        raise SystemExit(f"--products: expected names from {PRODUCTS}, got {bad}")
    batches = common.int_list(args.rows)
    if not batches or not all(1 <= b <= gemv.MAX_ROWS for b in batches):
        raise SystemExit(f"--rows: expected batch sizes in 1..{gemv.MAX_ROWS}, got {args.rows!r}")
    configs = {b: parse_configs(args.configs, b) for b in batches}
    models = common.str_list(args.models)
    shapes = {m: product_shapes(common.model_config(m)) for m in models}
    if args.dry_run:
        for m in models:
            for p in products:
                print(m, p, "n=%d k=%d bias=%s" % shapes[m][p])
        for b in batches:
            print(f"rows {b} configs:", ", ".join(label(c) for c in configs[b]))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("gemv_bench needs CUDA (use --dry-run on the CPU)")
    from eval.kernel_bench import device_label

    dtype = getattr(torch, args.dtype)
    dev = args.device_name or device_label(torch.cuda.get_device_name())
    out = args.out or common.scratch_out(f"gemv_bench_{dev}.json")
    copy_gbps = common.copy_bandwidth_gbps()
    print(f"device {torch.cuda.get_device_name()} ({dev}); copy bandwidth {copy_gbps:.0f} GB/s; {args.dtype}")
    rows = []
    for m in models:
        for b in batches:
            for p in common.progress(products, desc=f"{m} rows {b}"):
                rows += bench_product(m, p, *shapes[m][p], b, configs[b], args, dtype, copy_gbps)
    summary = []
    for m in models:
        for b in batches:
            for p in products:
                mine = [r for r in rows if r["model"] == m and r["product"] == p and r["rows"] == b]
                cub = next(r for r in mine if r["method"] == "cublas")
                best = min((r for r in mine if r["method"] != "cublas"), key=lambda r: r["us"], default=None)
                dflt = next((r for r in mine if r["method"] == "gemv default"), None)
                summary.append({"model": m, "rows": b, "product": p, "n": cub["n"], "k": cub["k"],
                                "cublas_us": cub["us"], "cublas_pct": cub["pct_of_copy"],
                                "default_us": dflt and dflt["us"], "default_pct": dflt and dflt["pct_of_copy"],
                                "best": best and best["method"], "best_us": best and best["us"],
                                "best_pct": best and best["pct_of_copy"], "gain_us": best and cub["us"] - best["us"],
                                "cublas_err": cub["max_err"], "best_err": best and best["max_err"]})
    print(common.format_table(summary))
    config = {**vars(args), "configs": {b: [label(c) for c in configs[b]] for b in batches}}
    common.write_results(out, {"device": torch.cuda.get_device_name(), "copy_gbps": copy_gbps, "dtype": args.dtype,
                               "summary": summary, "rows": rows}, config)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
