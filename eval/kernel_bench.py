"""Decode-attention kernel benchmark: LeanK TileLang kernel vs FlashAttention on the same data.

    python eval/kernel_bench.py                               # GPU: Llama + Qwen, 8K..128K, batch 1/8/32
    python eval/kernel_bench.py --head-dim 64                 # head_dim-64 shapes (Llama-3.2-1B, Qwen2.5-0.5B)
    python eval/kernel_bench.py --small-lengths --batches 1   # fixed per-call cost, kv_len 1..256
    python eval/kernel_bench.py --mask ../shared/reference-masks/llama-3.1-8b-instruct.pth
    python eval/kernel_bench.py --shapes llama --kv-lens 8192 --batches 1 --layers 1   # quick
    python eval/kernel_bench.py --dry-run --head-dim 64       # CPU: list the points, time nothing

For each model shape (head_dim 128: Llama-3.1-8B 32/8 heads, Qwen2.5-7B 28/4; head_dim 64:
Llama-3.2-1B 32/8, Qwen2.5-0.5B 14/2), kv_len and batch, one decode step of one layer is
timed:

- ``leank``: the TileLang split + combine kernels over a full window of 128 sink + 1024
  recent tokens (capacity +32 pending) and the compacted archive of the other tokens,
  with the layer's kept counts from the mask (``--layers`` layers sampled evenly; the
  time reported is their mean);
- ``leank_dense``: the same code path with every channel of every head kept;
- baselines on dense K/V of kv_len tokens: torch SDPA with the FlashAttention-2 and the
  cuDNN backends (``enable_gqa=True``) and ``flash_attn.flash_attn_with_kvcache`` when
  flash-attn is importable.

Times are medians of ``triton.testing.do_bench`` (L2 flushed before every run, warm-up
excluded), of CUDA-graph replays when every method can be captured (``--no-graph`` for
eager calls). Bandwidth is the bytes the step must read (K/V of the tokens attended to,
at their stored width, plus q and the output) over the time, against the device-to-device
copy bandwidth measured in the same run (bytes read + written). Masks: ``--mask FILE``
(float 0/1 ``[layers, kv_heads, head_dim]``, matched to a shape by its head count) or the
built-in default with the published kept-count mix (``leank.baselines``; for head_dim 64 the
same proportions of kept channels: counts scaled by head_dim / 128) at a fixed seed.

``--small-lengths`` times kv_len 1..256 (the whole context in the window): what remains is
the fixed cost of a call (launches, block setup, the combine), reported per shape and batch.

Writes a JSON (one row per point: ``shape, batch, kv_len, head_dim, mask, leank_us,
baselines_us, speedup, pct_of_copy`` and more; per timed layer its time, bytes and split plan,
``plan_per_layer``: blocks, parts, heaviest and mean block bytes, which ``--dry-run`` prints on a CPU) and a PNG to ``--out``, by default
``runs/kernel_bench_<device name>`` (git-ignored; committed runs live in eval/results/ and
are written only with an explicit ``--out``); prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # `python eval/kernel_bench.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from eval import common  # noqa: E402
from leank.baselines import LLAMA_MIX, QWEN_MIX, mix_counts, rope_keep  # noqa: E402
from leank.window import WindowPolicy  # noqa: E402

def _attention_shape(cfg: dict) -> dict:
    """layers / heads / kv_heads / head_dim of a model shape of eval/common.py."""
    return dict(layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"],
                head_dim=cfg["head_dim"])


# mix: the published kept-count mix ({kept count of 128: number of KV heads}) the built-in
# mask follows; leank.baselines is the one source
SHAPES = {
    "llama": dict(name="Llama-3.1-8B", **_attention_shape(common.LLAMA31_8B), mix=LLAMA_MIX),
    "qwen": dict(name="Qwen2.5-7B", **_attention_shape(common.QWEN25_7B), mix=QWEN_MIX),
    "llama-1b": dict(name="Llama-3.2-1B", layers=16, heads=32, kv_heads=8, head_dim=64, mix=LLAMA_MIX),
    "qwen-0.5b": dict(name="Qwen2.5-0.5B", layers=24, heads=14, kv_heads=2, head_dim=64, mix=QWEN_MIX),
}
DEFAULT_SHAPES = {128: "llama,qwen", 64: "llama-1b,qwen-0.5b"}
DEFAULT_KV_LENS = "8192,32768,65536,131072"
SMALL_KV_LENS = "1,2,4,8,16,32,64,128,256"
DEFAULT_OUT = str(Path(__file__).resolve().parents[1] / "runs" / "kernel_bench_{device}")
WINDOW = WindowPolicy()  # the library's default window (sink, recent, flush_every)
SINK, RECENT, PENDING = WINDOW.sink, WINDOW.recent, WINDOW.flush_every


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/kernel_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None,
                   help=f"comma list of: {', '.join(SHAPES)} (default: the shapes of --head-dim, "
                        f"{DEFAULT_SHAPES[128]} for 128, {DEFAULT_SHAPES[64]} for 64)")
    p.add_argument("--head-dim", type=int, choices=sorted(DEFAULT_SHAPES), default=None,
                   help="head_dim to time; picks the default shapes, and gives a --shapes entry of another "
                        "head_dim this head_dim (its head counts, kept counts scaled)")
    p.add_argument("--kv-lens", default=None, help=f"comma list (default {DEFAULT_KV_LENS})")
    p.add_argument("--small-lengths", action="store_true",
                   help=f"time kv_len {SMALL_KV_LENS} instead (fixed per-call cost; overrides --kv-lens)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--mask", action="append", default=[], help="mask file (.pth); repeatable")
    p.add_argument("--layers", type=int, default=4, help="layers of the mask timed per point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--mem-limit-gb", type=float, default=0.0, help="skip points above this (0: 85%% of the GPU)")
    p.add_argument("--no-graph", action="store_true", help="time eager calls, not CUDA-graph replays")
    p.add_argument("--cold-compile", action="store_true", help="also time a cold compile of each model's kernels")
    p.add_argument("--kernel-times", action="store_true",
                   help="also record each kernel's device time per call (torch.profiler over eager calls back to "
                        "back, L2 not flushed): split vs combine, printed beside the graph-replay time, for the "
                        "all-channels run and every timed layer (JSON: kernel_us_dense, kernel_us_per_layer)")
    p.add_argument("--device-name", default=None,
                   help="device label for the output name and the JSON (default: from "
                        "torch.cuda.get_device_name(), e.g. 'h200'; 'cpu' without CUDA)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="output stem (.json, .png); '{device}' is replaced by --device-name; default: "
                        "%(default)s (git-ignored; committed runs such as eval/results/kernel_bench_h100 are "
                        "written only when named here)")
    p.add_argument("--blocks-per-sm", type=int, default=None,
                   help="split planning: thread blocks per SM the plan aims for (default: the kernel's rule, "
                        "2 at batch <= 2, 3 up to batch 8, else 4); a tuning experiment, recorded in the JSON")
    p.add_argument("--min-split-tiles", type=int, default=None,
                   help="split planning: no split shorter than this many 64-token tiles of its segment's "
                        "capacity (fewer, longer splits at short contexts; default: the kernel's 4, 0 turns it "
                        "off); a tuning experiment, recorded in the JSON")
    p.add_argument("--split-rule", choices=["window", "bytes"], default=None,
                   help="split planning: 'window' (the kernel's default) gives the window up to one split per 4 "
                        "tiles and the archive the rest; 'bytes' gives every segment splits in proportion to its "
                        "bytes at capacity (blocks of equal load); a tuning experiment, recorded in the JSON")
    p.add_argument("--block-h", type=int, choices=[16, 32, 64], default=None,
                   help="query rows per split-kernel block (default: the kernel's rule, the smallest of 16/32/64 "
                        "that holds the GQA group; 16 and 32 use mma.sync tiles, 64 one wgmma tile); a tuning "
                        "experiment, recorded in the JSON")
    p.add_argument("--block-n", type=int, choices=[32, 64, 128], default=None,
                   help="K/V tokens per tile of the split kernel (default: the kernel's 64; 128 halves the block "
                        "barriers and softmax rounds per byte, with twice the shared memory per stage); a tuning "
                        "experiment, recorded in the JSON")
    p.add_argument("--threads", type=int, choices=[32, 64, 128], default=None,
                   help="threads per split-kernel block (default: the kernel's 128, one warpgroup). 32 makes a "
                        "block one warp: its softmax max and sum are warp shuffles instead of block-wide "
                        "reductions through shared memory with barriers (two per tile at 128), and with "
                        "--block-n 32 (37 KiB of shared memory) up to 5 blocks fit an SM (pair with "
                        "--blocks-per-sm); a tuning experiment, recorded in the JSON")
    p.add_argument("--num-stages", type=int, choices=[2, 3], default=None,
                   help="K/V tiles in flight per split-kernel block (default: the kernel's 2; each more stage "
                        "takes 32 KiB of shared memory at head_dim 128); a tuning experiment, recorded in the JSON")
    p.add_argument("--combine-vector", type=int, choices=[1, 4], default=None,
                   help="combine kernel: channels per thread (default: the kernel's 1; 4 reads float4 and sums "
                        "the parts in 4 or 8 lanes side by side); a tuning experiment, recorded in the JSON")
    p.add_argument("--combine-chunked", action=argparse.BooleanOptionalAction, default=None,
                   help="combine kernel: one block per 32 channels of a query head, each warp summing a quarter "
                        "of the parts (the default unless --combine-vector 4); --no-combine-chunked: one block "
                        "per query head (the default before 2026-12-01); recorded in the JSON")
    p.add_argument("--pdl", action="store_true", default=None,
                   help="programmatic dependent launch: the split kernel starts while the kernel before it "
                        "finishes and the combine while the split's last blocks write their parts (each waits "
                        "with griddepcontrol.wait before reading); a tuning experiment, recorded in the JSON")
    p.add_argument("--dry-run", action="store_true", help="list shapes, masks and points, time nothing (CPU ok)")
    return p


def tile_config(args) -> dict | None:
    """The kernels' tile-config override the tuning flags ask for (None: the kernels' defaults)."""
    cfg = {k: v for k, v in (("block_H", args.block_h), ("block_N", args.block_n), ("num_stages", args.num_stages),
                             ("threads", args.threads), ("combine_vector", args.combine_vector),
                             ("combine_chunked", args.combine_chunked), ("pdl", args.pdl))
           if v is not None}
    return cfg or None


def device_label(name: str) -> str:
    """Short file-name-safe label of a device name: 'NVIDIA H200' -> 'h200'."""
    label = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return label or "device"


def resolve_shapes(shapes: str | None, head_dim: int | None) -> list:
    """``[(key, shape dict)]`` to time; ``head_dim`` overrides a shape's own (name says so)."""
    keys = (shapes or DEFAULT_SHAPES[head_dim or 128]).split(",")
    out = []
    for key in keys:
        if key not in SHAPES:
            raise ValueError(f"--shapes: expected names from {sorted(SHAPES)}, got {key!r}")
        s = dict(SHAPES[key])
        if head_dim is not None and head_dim != s["head_dim"]:
            s["name"] = f"{s['name']} (head_dim {head_dim})"
            s["head_dim"] = head_dim
        out.append((key, s))
    return out


def scaled_mix(mix: dict, head_dim: int) -> dict:
    """A published mix (kept counts of 128 channels) at ``head_dim``: same kept fractions."""
    if head_dim not in (64, 128):
        raise ValueError(f"head_dim: expected 64 or 128, got {head_dim}")
    return {d * head_dim // 128: c for d, c in mix.items()}


# ----------------------------------------------------------------------------- masks


def kept_counts_default(s: dict, seed: int) -> list[list[int]]:
    """``[layers][kv_heads]`` kept counts: the shape's published mix, scaled to its head_dim
    and head count, placed at random (fixed seed)."""
    mix = scaled_mix(s["mix"], s["head_dim"])
    flat = mix_counts(mix, s["layers"] * s["kv_heads"], torch.Generator().manual_seed(seed)).tolist()
    return [flat[l * s["kv_heads"]:(l + 1) * s["kv_heads"]] for l in range(s["layers"])]


def default_keeps(s: dict, seed: int) -> torch.Tensor:
    """Bool keep ``[layers, kv_heads, head_dim]`` of the built-in mask (lowest RoPE frequencies kept)."""
    return rope_keep(torch.tensor(kept_counts_default(s, seed)), s["head_dim"])


def load_mask(path: str) -> torch.Tensor:
    """Bool keep ``[layers, kv_heads, head_dim]`` from a float 0/1 (or bool) tensor file."""
    m = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(m, dict):
        m = next(v for v in m.values() if isinstance(v, torch.Tensor))
    if m.dim() != 3:
        raise ValueError(f"--mask {path}: expected [layers, kv_heads, head_dim], got {tuple(m.shape)}")
    return m > 0.5


def layer_byte_ratios(keeps: torch.Tensor) -> list[float]:
    """Per layer: archive bytes per token over dense (K at kept width + V where kept > 0)."""
    counts = keeps.sum(-1)  # [layers, kv_heads]
    d, kvh = keeps.shape[-1], keeps.shape[1]
    return [WINDOW.archive_bytes_per_token(row, d, 1) / (2 * d * kvh) for row in counts]


def sample_layers(keeps: torch.Tensor, k: int) -> list[int]:
    """``k`` layers at evenly spaced quantiles of the per-layer byte ratio (stratified:
    their mean ratio is close to the model's, so their mean time stands for the model)."""
    ratios = layer_byte_ratios(keeps)
    order = sorted(range(len(ratios)), key=lambda l: (ratios[l], l))
    k = max(1, min(k, len(order)))
    return sorted({order[int((i + 0.5) * len(order) / k)] for i in range(k)})


# ----------------------------------------------------------------------------- data


def kept_groups(counts) -> list:
    """Archive groups of one layer, as ``leank_inputs`` builds them: ``[(kept count, [kv heads])]`` per
    distinct non-zero count, ascending."""
    return [(dg, [h for h, c in enumerate(counts) if c == dg]) for dg in sorted({c for c in counts if c > 0})]


def leank_inputs(batch, s, kv_len, keep, dtype, gen_dev):
    """Window + compacted archive for one layer. ``keep``: bool [kv_heads, head_dim]."""
    kvh, d = s["kv_heads"], s["head_dim"]
    _, arch, win = WINDOW.split(kv_len)
    wcap = WINDOW.capacity
    dev = "cuda"
    rnd = lambda *sh: torch.randn(*sh, device=dev, dtype=dtype, generator=gen_dev)  # noqa: E731
    q = rnd(batch, s["heads"], d)
    win_k, win_v = rnd(batch, kvh, wcap, d), rnd(batch, kvh, wcap, d)
    counts = keep.sum(-1).tolist()
    ak, av, ah, ac = [], [], [], []
    for dg, heads in kept_groups(counts):
        ah.append(torch.tensor(heads, dtype=torch.int64))
        ac.append(torch.stack([keep[h].nonzero().flatten() for h in heads]).to(dev))
        ak.append(rnd(batch, len(heads), max(arch, 1), dg))
        av.append(rnd(batch, len(heads), max(arch, 1), d))
    wl = torch.full((batch,), win, dtype=torch.int32, device=dev)
    al = torch.full((batch,), arch, dtype=torch.int32, device=dev)
    nbytes = _leank_bytes(batch, s, kv_len, counts, dtype)
    return (q, win_k, win_v, wl, ak, av, ah, ac, al), nbytes


ASSUMED_SMS = 132  # H100 / H200: the SM count a --dry-run plans for


def layer_plan(batch, s, kv_len, keep, sms, elem_bytes=2) -> dict:
    """The split plan ``decode_attention`` builds for one layer at this point (the same ``build_plan``, on
    the CPU) and what its blocks read: ``blocks`` (per sequence), ``max_parts`` (per KV head) and the
    heaviest and mean block's K/V bytes at this point's lengths (a split covers block-aligned chunks of
    its segment's length, as the kernel computes them). At batch <= 2 all blocks run in one wave, so the
    heaviest block bounds the call. ``keep``: bool ``[kv_heads, head_dim]``."""
    from leank.tilelang_kernels import decode as dec

    kvh, d = s["kv_heads"], s["head_dim"]
    _, arch, win = WINDOW.split(kv_len)
    # leank_inputs' groups; decode_attention pads each kept count to a multiple of 16
    groups = [((dg + 15) // 16 * 16, heads, max(arch, 1)) for dg, heads in kept_groups(keep.sum(-1).tolist())]
    slots = dec.call_slot_dims(d, [g[0] for g in groups])
    plan = dec.build_plan(batch, kvh, d, WINDOW.capacity, groups, slots, torch.device("cpu"), sms)
    loads = []
    for slot, _row, _h, split, nsplit, _part in plan.table.tolist():
        length, width = (win, 2 * d) if slot == len(slots) else (arch, slots[slot] + d)
        chunk = -(-length // (nsplit * 64)) * 64
        loads.append(max(0, min(chunk, length - split * chunk)) * width * elem_bytes)
    return dict(blocks=plan.num_items, max_parts=plan.num_parts, heaviest_block_bytes=max(loads),
                mean_block_bytes=sum(loads) / len(loads))


def _leank_bytes(batch, s, kv_len, counts, dtype):
    e = torch.finfo(dtype).bits // 8
    k, v = WINDOW.cache_bytes(kv_len, counts, s["head_dim"], e)
    return batch * (k + v + 2 * s["heads"] * s["head_dim"] * e)


def dense_bytes(batch, s, kv_len, dtype):
    e = torch.finfo(dtype).bits // 8
    return batch * (s["kv_heads"] * kv_len * 2 * s["head_dim"] + 2 * s["heads"] * s["head_dim"]) * e


# ----------------------------------------------------------------------------- timing


def bench(fn, rep_ms, graph):
    """Median µs of ``fn`` (do_bench; L2 flushed each run), of graph replays if ``graph``."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            g.replay()
            torch.cuda.synchronize()
            run = g.replay
        except Exception as e:  # capture unsupported: time eager calls
            print(f"  graph capture failed ({type(e).__name__}: {str(e)[:100]}); eager timing")
            torch.cuda.synchronize()
    return do_bench(run, warmup=25, rep=rep_ms, return_mode="median") * 1e3


def kernel_times(fn, calls: int = 50) -> dict:
    """Mean device µs per call of each kernel ``fn`` launches, ``{kernel name: µs}``: ``calls`` eager calls
    back to back under ``torch.profiler`` (CUDA activity), after one warm-up call; L2 is not flushed, so a
    kernel that reads what the one before it wrote (the combine) finds it in L2 as in a decode step."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None)
        if total is None:  # torch before 2.4 names it cuda_time_total
            total = e.cuda_time_total
        if total > 0:
            out[e.key] = total / calls
    return out


def _kernel_summary(times: dict) -> str:
    return ", ".join(f"{name[:24]} {us:.1f}" for name, us in sorted(times.items(), key=lambda kv: -kv[1]))


def baselines(q4, k, v, rep_ms, graph):
    """Dense baselines on ``q4 [B, H, 1, D]``, ``k, v [B, KVH, T, D]``: {name: µs}."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def f(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
        try:
            out[name] = bench(f, rep_ms, graph)
        except Exception as e:  # backend unavailable for this shape/dtype
            print(f"  {name}: unavailable ({type(e).__name__}: {str(e)[:80]})")
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:
        flash_attn_with_kvcache = None
    if flash_attn_with_kvcache is not None:
        qf = q4.transpose(1, 2).contiguous()  # [B, 1, H, D]
        kf, vf = k.transpose(1, 2), v.transpose(1, 2)  # [B, T, KVH, D] views (strided)
        kf, vf = kf.contiguous(), vf.contiguous()
        out["flash_attn"] = bench(lambda: flash_attn_with_kvcache(qf, kf, vf), rep_ms, graph)
        del kf, vf
    return out


# ----------------------------------------------------------------------------- main


def run_point(shape, s, batch, kv_len, keeps, layers, args, dtype, gen_dev, copy_gbps):
    from leank.tilelang_kernels.decode import decode_attention

    graph = not args.no_graph
    from leank.tilelang_kernels import decode as _decode

    rec = dict(shape=shape, model=s["name"], batch=batch, kv_len=kv_len, head_dim=s["head_dim"], layers=layers,
               blocks_per_sm=_decode.BLOCKS_PER_SM or _decode.default_blocks_per_sm(batch),
               min_split_tiles=_decode.MIN_SPLIT_TILES, split_rule=_decode.SPLIT_RULE)  # the split plan this point ran
    # dense baselines: K/V of kv_len tokens
    k = torch.randn(batch, s["kv_heads"], kv_len, s["head_dim"], device="cuda", dtype=dtype, generator=gen_dev)
    v = torch.randn_like(k)
    q4 = torch.randn(batch, s["heads"], 1, s["head_dim"], device="cuda", dtype=dtype, generator=gen_dev)
    rec["baselines_us"] = baselines(q4, k, v, args.rep_ms, graph)
    rec["dense_bytes"] = dense_bytes(batch, s, kv_len, dtype)
    # LeanK code path with every channel kept: the dense K/V serve as the archive
    _, arch, win = WINDOW.split(kv_len)
    wk = torch.randn(batch, s["kv_heads"], WINDOW.capacity, s["head_dim"], device="cuda", dtype=dtype,
                     generator=gen_dev)
    wv = torch.randn_like(wk)
    heads = torch.arange(s["kv_heads"])
    chan = torch.arange(s["head_dim"], device="cuda").expand(s["kv_heads"], -1).contiguous()
    wl = torch.full((batch,), win, dtype=torch.int32, device="cuda")
    al = torch.full((batch,), arch, dtype=torch.int32, device="cuda")
    qd = q4[:, :, 0].contiguous()
    dense_args = (qd, wk, wv, wl, [k], [v], [heads], [chan], al)
    rec["leank_dense_us"] = bench(partial(decode_attention, *dense_args), args.rep_ms, graph)
    if args.kernel_times:
        rec["kernel_us_dense"] = kernel_times(partial(decode_attention, *dense_args))
        print(f"  all channels: {rec['leank_dense_us']:.1f} µs per replay; kernels per call (µs, eager, L2 warm): "
              f"{_kernel_summary(rec['kernel_us_dense'])}", flush=True)
    del k, v, wk, wv, dense_args
    torch.cuda.empty_cache()
    # LeanK with the mask's kept counts, per sampled layer
    times, nbytes = [], []
    for layer in layers:
        inputs, nb = leank_inputs(batch, s, kv_len, keeps[layer], dtype, gen_dev)
        times.append(bench(partial(decode_attention, *inputs), args.rep_ms, graph))
        nbytes.append(nb)
        if args.kernel_times:
            rec.setdefault("kernel_us_per_layer", []).append(kernel_times(partial(decode_attention, *inputs)))
            print(f"  layer {layer}: {times[-1]:.1f} µs per replay; kernels per call (µs, eager, L2 warm): "
                  f"{_kernel_summary(rec['kernel_us_per_layer'][-1])}", flush=True)
        del inputs
        torch.cuda.empty_cache()
    rec["leank_us_per_layer"] = times
    rec["leank_bytes_per_layer"] = nbytes
    sms = _decode.num_sms(torch.device("cuda"))
    rec["plan_per_layer"] = [layer_plan(batch, s, kv_len, keeps[layer], sms, dtype.itemsize) for layer in layers]
    rec["leank_us"] = sum(times) / len(times)
    rec["leank_bytes"] = sum(nbytes) / len(nbytes)
    fastest = min(rec["baselines_us"].items(), key=lambda kv: kv[1]) if rec["baselines_us"] else (None, math.nan)
    rec["fastest_baseline"] = fastest[0]
    rec["speedup"] = fastest[1] / rec["leank_us"]
    rec["speedup_vs_leank_dense"] = rec["leank_dense_us"] / rec["leank_us"]
    rec["leank_gbps"] = rec["leank_bytes"] / (rec["leank_us"] * 1e-6) / 1e9
    rec["pct_of_copy"] = 100 * rec["leank_gbps"] / copy_gbps
    rec["fastest_baseline_gbps"] = rec["dense_bytes"] / (fastest[1] * 1e-6) / 1e9
    rec["leank_dense_gbps"] = (dense_bytes(batch, s, kv_len, dtype)) / (rec["leank_dense_us"] * 1e-6) / 1e9
    return rec


def estimate_gb(batch, s, kv_len, dtype):
    """Peak GPU memory of one point: dense K/V + window + the largest LeanK layer (≤ dense)."""
    return 2.2 * dense_bytes(batch, s, kv_len, dtype) / 1e9


def cold_compile_seconds(s: dict, dtype: torch.dtype, keeps: torch.Tensor) -> dict:
    """Compile every kernel the model's layers need, in a fresh process and TileLang cache.

    Returns seconds and the distinct kernel variants (slot sets) the mask's layers need.
    """
    import os
    import subprocess
    import tempfile

    from leank.tilelang_kernels.decode import default_slot_dims

    sets = sorted({default_slot_dims(s["head_dim"], sorted({int(c) for c in k.sum(-1).tolist() if c > 0}))
                   for k in keeps})
    code = ("import sys, time, torch; sys.path.insert(0, '.');"
            "from leank.tilelang_kernels.decode import get_kernels; t = time.time();"
            f"[get_kernels({s['heads']}, {s['kv_heads']}, {s['head_dim']}, torch.{str(dtype)[6:]}, sl, False) "
            f"for sl in {sets!r}]; print('COLD', time.time() - t)")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TILELANG_CACHE_DIR=tmp)
        t = time.time()
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           cwd=str(Path(__file__).resolve().parents[1]))
        wall = time.time() - t
    line = [x for x in r.stdout.splitlines() if x.startswith("COLD")]
    return dict(variants=[list(x) for x in sets], compile_s=float(line[0].split()[1]) if line else None,
                process_s=wall, ok=r.returncode == 0)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    shapes = resolve_shapes(args.shapes, args.head_dim)
    kv_lens = [int(x) for x in (SMALL_KV_LENS if args.small_lengths else (args.kv_lens or DEFAULT_KV_LENS)).split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    cuda = torch.cuda.is_available()
    from leank.tilelang_kernels import decode as _decode  # the planning / tile knobs (TileLang imported on first use)

    if args.blocks_per_sm is not None and args.blocks_per_sm < 1:
        raise SystemExit(f"--blocks-per-sm: expected >= 1, got {args.blocks_per_sm}")
    if args.min_split_tiles is not None and args.min_split_tiles < 0:
        raise SystemExit(f"--min-split-tiles: expected >= 0 (0: off), got {args.min_split_tiles}")
    _decode.MIN_SPLIT_TILES = _decode.DEFAULT_MIN_SPLIT_TILES if args.min_split_tiles is None else args.min_split_tiles
    _decode.BLOCKS_PER_SM = args.blocks_per_sm
    _decode.SPLIT_RULE = args.split_rule or "window"
    _decode.TILE_CONFIG = tile_config(args)
    if not cuda and not args.dry_run:
        print("kernel_bench needs a CUDA GPU (--dry-run lists the points without one)")
        return 2
    dtype = getattr(torch, args.dtype)
    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    label = args.device_name or (device_label(dev_name) if cuda else "cpu")
    limit = args.mem_limit_gb or (0.85 * torch.cuda.get_device_properties(0).total_memory / 1e9 if cuda else math.inf)
    masks = {}
    for path in args.mask:
        keep = load_mask(path)
        for key, s in shapes:
            if keep.shape == (s["layers"], s["kv_heads"], s["head_dim"]):
                masks[key] = (keep, path)
    if args.dry_run:
        copy_gbps, gen_dev = math.nan, None
    else:
        gen_dev = torch.Generator(device="cuda").manual_seed(args.seed)
        copy_gbps = common.copy_bandwidth_gbps(args.rep_ms)
    print(f"device: {dev_name} ({label}); copy bandwidth {copy_gbps:.0f} GB/s (read + write); dtype {args.dtype}")
    results, models, points = [], [], []
    stem = Path(args.out.replace("{device}", label))

    def document(complete: bool) -> dict:
        out = dict(device=dev_name, device_name=label, dtype=args.dtype, copy_gbps=copy_gbps,
                   torch=torch.__version__, python=platform.python_version(), graph=not args.no_graph,
                   window=dict(sink=SINK, recent=RECENT, pending_cap=PENDING),
                   timing="triton do_bench median, L2 flushed, warm-up excluded", launches_per_layer_step=2,
                   blocks_per_sm=args.blocks_per_sm, min_split_tiles=_decode.MIN_SPLIT_TILES,
                   split_rule=_decode.SPLIT_RULE, block_h=args.block_h,
                   tile_config=tile_config(args), models=models, results=results, fixed_cost_us=fixed_costs(results),
                   complete=complete)
        try:
            import tilelang

            out["tilelang"] = tilelang.__version__
        except Exception:
            pass
        stem.parent.mkdir(parents=True, exist_ok=True)
        common.write_atomic(stem.with_suffix(".json"), json.dumps(out, indent=1))  # after every point: a cut run keeps its rows
        return out

    for key, s in shapes:
        if key in masks:
            keeps, src = masks[key]
        else:
            keeps = default_keeps(s, args.seed)
            src = f"default: published mix {scaled_mix(s['mix'], s['head_dim'])}, seed {args.seed}"
        layers = sample_layers(keeps, args.layers)
        ratios = layer_byte_ratios(keeps)
        model_ratio = sum(ratios) / len(ratios)
        timed_ratio = sum(ratios[l] for l in layers) / len(layers)
        print(f"{s['name']} ({s['heads']} q / {s['kv_heads']} kv heads, head_dim {s['head_dim']}): mask {src}; "
              f"layers timed {layers}; archive bytes/token vs dense: all layers {model_ratio:.3f}, "
              f"timed layers {timed_ratio:.3f}")
        info = dict(shape=key, model=s["name"], head_dim=s["head_dim"], heads=s["heads"], kv_heads=s["kv_heads"],
                    mask=src, layers_timed=layers, archive_byte_ratio=model_ratio,
                    archive_byte_ratio_timed=timed_ratio)
        if args.cold_compile and not args.dry_run:
            info["cold_compile"] = cold_compile_seconds(s, dtype, keeps)
            print(f"  cold compile of all {s['layers']} layers' kernels: {info['cold_compile']}")
        models.append(info)
        for kv_len in kv_lens:
            for batch in batches:
                if estimate_gb(batch, s, kv_len, dtype) > limit:
                    print(f"  skip batch {batch} kv_len {kv_len}: ~{estimate_gb(batch, s, kv_len, dtype):.0f} GB")
                    continue
                if args.dry_run:
                    points.append(dict(shape=key, batch=batch, kv_len=kv_len, head_dim=s["head_dim"], mask=src))
                    print(f"  point: batch {batch} kv_len {kv_len} (~{estimate_gb(batch, s, kv_len, dtype):.2f} GB)")
                    for layer in layers:
                        p = layer_plan(batch, s, kv_len, keeps[layer], ASSUMED_SMS, dtype.itemsize)
                        print(f"    layer {layer}: {p['blocks']} blocks per sequence ({ASSUMED_SMS} SMs), heaviest "
                              f"{p['heaviest_block_bytes'] / 1e3:.0f} KB, mean {p['mean_block_bytes'] / 1e3:.0f} KB")
                    continue
                rec = run_point(key, s, batch, kv_len, keeps, layers, args, dtype, gen_dev, copy_gbps)
                rec["mask"] = src
                results.append(rec)
                print(_row(rec), flush=True)
                document(complete=False)
                torch.cuda.empty_cache()
    if args.dry_run:
        print(f"dry run: {len(points)} points, nothing timed or written")
        return 0
    out = document(complete=True)
    _plot(out, stem.with_suffix(".png"))
    print()
    print(table(out))
    if out["fixed_cost_us"]:
        print()
        print(fixed_cost_table(out["fixed_cost_us"]))
    print(f"wrote {stem.with_suffix('.json')}")
    return 0


FIXED_COST_MAX_LEN = 256


def fixed_costs(results: list) -> list:
    """Per (shape, batch): LeanK µs over the points with kv_len <= 256 (the fixed cost of a
    call: the read is a few KB), against the fastest baseline at the same points."""
    out = []
    for key in sorted({(r["shape"], r["batch"]) for r in results}):
        rr = sorted((r for r in results if (r["shape"], r["batch"]) == key and r["kv_len"] <= FIXED_COST_MAX_LEN),
                    key=lambda r: r["kv_len"])
        if not rr:
            continue
        base = [min(r["baselines_us"].values()) for r in rr if r["baselines_us"]]
        out.append(dict(shape=key[0], model=rr[0]["model"], batch=key[1], head_dim=rr[0]["head_dim"],
                        kv_lens=[r["kv_len"] for r in rr], leank_us=[r["leank_us"] for r in rr],
                        leank_us_median=sorted(r["leank_us"] for r in rr)[len(rr) // 2],
                        leank_us_max=max(r["leank_us"] for r in rr),
                        fastest_baseline_us_median=sorted(base)[len(base) // 2] if base else None))
    return out


def fixed_cost_table(rows: list) -> str:
    lines = [f"fixed per-call cost (kv_len <= {FIXED_COST_MAX_LEN}), median µs",
             "| model | batch | head_dim | LeanK median µs | LeanK max µs | fastest baseline median µs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        b = r["fastest_baseline_us_median"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['head_dim']} | {r['leank_us_median']:.1f} | "
                     f"{r['leank_us_max']:.1f} | {'-' if b is None else f'{b:.1f}'} |")
    return "\n".join(lines)


def _row(r):
    b = r["baselines_us"]
    base = " ".join(f"{k}={v:.1f}" for k, v in b.items())
    return (f"  {r['model']} B={r['batch']} T={r['kv_len']}: leank={r['leank_us']:.1f}us "
            f"dense-path={r['leank_dense_us']:.1f}us {base} speedup={r['speedup']:.2f}x "
            f"{r['leank_gbps']:.0f}GB/s ({r['pct_of_copy']:.0f}% of copy)")


def table(out) -> str:
    lines = [f"device {out['device']}, {out['dtype']}, copy {out['copy_gbps']:.0f} GB/s, "
             f"{'CUDA graph' if out['graph'] else 'eager'}, median µs",
             "| model | head_dim | batch | kv_len | LeanK µs | LeanK all-channels µs | SDPA flash µs | SDPA cuDNN µs | "
             "flash_attn µs | speedup vs fastest | bytes vs dense | LeanK GB/s | % of copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        b = r["baselines_us"]
        f = lambda k: f"{b[k]:.1f}" if k in b else "-"  # noqa: E731
        pct = r.get("pct_of_copy", 100 * r["leank_gbps"] / out["copy_gbps"])
        lines.append(f"| {r['model']} | {r.get('head_dim', 128)} | {r['batch']} | {r['kv_len']} | {r['leank_us']:.1f} | "
                     f"{r['leank_dense_us']:.1f} | "
                     f"{f('sdpa_flash')} | {f('sdpa_cudnn')} | {f('flash_attn')} | {r['speedup']:.2f}x | "
                     f"{r['leank_bytes'] / r['dense_bytes']:.3f} | "
                     f"{r['leank_gbps']:.0f} | {pct:.0f}% |")
    return "\n".join(lines)


def replot(json_path: str) -> None:
    """Redraw the PNG of a result JSON (``python -c 'from eval.kernel_bench import replot; replot(...)'``)."""
    p = Path(json_path)
    _plot(json.loads(p.read_text()), p.with_suffix(".png"))


def _plot(out, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"no plot: {e}")
        return
    res = out["results"]
    shapes = sorted({r["model"] for r in res})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    for ax, m in zip(axes[0], shapes):
        for batch in sorted({r["batch"] for r in res if r["model"] == m}):
            rr = sorted((r for r in res if r["model"] == m and r["batch"] == batch), key=lambda r: r["kv_len"])
            xs = [r["kv_len"] for r in rr]
            ax.plot(xs, [r["speedup"] for r in rr], "o-", label=f"batch {batch}: vs fastest baseline")
            ax.plot(xs, [r["speedup_vs_leank_dense"] for r in rr], "x--", label=f"batch {batch}: vs all-channels path")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(1.5, color="darkred", lw=0.8, ls=":", label="goal 1.5x (>=32K)")
        info = next((mi for mi in out.get("models", []) if mi["model"] == m), None)
        if info and info.get("archive_byte_ratio_timed"):
            ax.axhline(1 / info["archive_byte_ratio_timed"], color="black", lw=0.8, ls="--",
                       label="dense/LeanK archive bytes")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("kv_len (tokens)")
        ax.set_ylabel("speedup (time ratio)")
        ax.set_title(f"{m} decode attention, {out['dtype']}\n{out['device']}")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.45 * (hi - lo))  # room for the legend above the curves
        ax.legend(fontsize=6.5, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
