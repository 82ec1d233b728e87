"""End-to-end ``generate()`` decode speed and memory: transformers' best attention vs LeanK.

    python eval/e2e_decode.py                          # full run on a GPU (Llama-3.1-8B and Qwen2.5-7B shapes)
    python eval/e2e_decode.py --quick                  # 8 layers, 8K/32K, batch 1/8, no max-batch search
    python eval/e2e_decode.py --device cpu --tiny      # CPU smoke run of every code path

Models are built from the published configs with random weights (speed and memory do
not depend on the values). For each model, prompt length and batch size it runs
``model.generate`` greedily for warm-up + measured steps with

- ``dense-static`` / ``dense-dynamic``: the unpatched model with its best attention
  (flash_attention_2 when flash_attn is importable, else sdpa) and a static or dynamic cache;
- ``leank``: the same model after ``leank.patch(model, masks=<mix>, config=LeanKConfig(backend=...))``
  with the published kept-count mix (Llama: of 256 KV heads 47/120/67/22 keep 0/32/64/96
  channels; Qwen: 35/34/33/10 of 112) placed at random with ``--seed``; decode steps are
  compiled and replayed from a CUDA graph (``leank.capture``), q/k/v and gate/up products fused
  (``leank.fused_decode``);
- ``leank-unfused``: ``leank`` with ``fuse_projections=False`` (transformers' forward, separate products);
- ``leank-graph``: ``leank`` without ``torch.compile`` (the fused forward recorded uncompiled);
- ``leank-dense``: the same captured LeanK path with every channel kept (nothing pruned);
- ``leank-eager``: ``leank`` with ``capture=False``;
- ``leank-autotune`` (only when named in ``--methods``): ``leank`` compiled with
  ``compile_mode="max-autotune-no-cudagraphs"``;
- ``leank-unbalanced`` (only when named in ``--methods``; differs from ``leank`` under ``torchrun``
  only): ``leank`` with ``tp_balance=False``, each rank keeping transformers' contiguous KV heads;
- ``leank-one-shot`` (only when named in ``--methods``; differs from ``leank`` under ``torchrun`` on CUDA
  only): ``leank`` with ``tp_allreduce="one_shot"``.

Every row also reports the byte floor of a decode step: (the weight bytes the step reads + the
K/V bytes it reads) / the device-to-device copy bandwidth measured in the same run (an
input-embedding table not tied to the output head counts one row per sequence, not whole;
result rows without ``weight_bytes_read`` counted it whole: their floors are high by
vocab x hidden x 2 bytes / ``copy_gbps``, 0.25 ms for the 8B shapes on the H200), and
``pct_of_floor`` = floor / measured time. ``speedup_vs_strongest_dense`` compares tokens/s
with the fastest dense method of the same model, length and batch (``dense-*``, transformers' own paths, and
``leank-dense``, LeanK's machinery with nothing pruned: whichever is faster; ``baseline`` names it);
``speedup_vs_leank_dense``, when ``leank-dense`` ran, isolates what the channel pruning gains on the same machinery. ``--second-turn N`` times
a follow-up message of N tokens on each conversation cache; ``--speculative N`` times
prompt-lookup speculative decoding (``prompt_lookup_num_tokens=N``) on a repetitive prompt
against plain greedy decoding (dense-dynamic and leank, batch 1).

Per-token latency comes from CUDA events recorded by a logits processor inside the real
generate loop (median and mean over the measured steps; the mean includes LeanK's flush
every ``--flush-every`` steps); tokens/s = batch x steps / measured time. One warm-up call per
method at batch 1 compiles first; each LeanK row is preceded by one short call at its own batch
(``--row-warmup``, on by default: a new batch size recompiles the decode step once per process), so
a row's ``call_extra_ms`` (its call's decode minus steps x median) is what every call pays for a
new cache: its first decode step run compiled but unrecorded, the step that records the graph, and
its first two flushes (eager, then recorded). Peak memory is
``torch.cuda.max_memory_allocated`` during prefill and during decode; the KV bytes are the
allocation still held by the returned cache. ``--max-batch`` finds, for each method, the
largest batch whose decode phase (weights + caches + step; ``--budget-phase all``: the whole
generate(), prefill included) fits ``--budget-gib`` at ``--budget-length`` and measures its
throughput. Writes JSON, ``*.config.json``, a markdown table and a PNG.

Tensor parallel: ``torchrun --nproc-per-node N eval/e2e_decode.py ...`` runs every row on N
ranks (NCCL on CUDA, gloo on CPU). Each rank builds the random model from the same seed and
transformers' own TP plan for the family shards it (q/k/v colwise, o rowwise, as
``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))`` does); LeanK slices
the mask to each rank's KV heads. Every row records ``tp`` and ``kv_bytes_per_rank`` (rank 0's), and its
floor counts one rank's weight bytes and, layer by layer, the K/V bytes of the rank with the most
(``kv_bytes_slowest_rank``: each layer's all-reduce waits for that rank); rank 0 prints and writes. Run without torchrun
for ``tp`` 1 on one device. ``llama3.1-70b`` is the Llama-3.1-70B width (80 layers unless
``--layers``), with the Llama kept-count mix in the same proportions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `python eval/e2e_decode.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import common  # noqa: E402

METHODS = ("dense-static", "dense-dynamic", "leank", "leank-unfused", "leank-graph", "leank-dense", "leank-eager")
# run only when named in --methods (Inductor autotuning costs minutes of compile per batch size; leank-unbalanced
# and leank-one-shot equal leank outside torchrun)
EXTRA_METHODS = ("leank-autotune", "leank-unbalanced", "leank-one-shot")
# dense methods --synthetic-prefill can fill (every LeanK method can)
SYNTHETIC_METHODS = ("dense-dynamic", "dense-static")
# what each method is, for the JSON and the README
METHOD_DOC = {
    "dense-static": "unpatched model, transformers' static cache; transformers compiles the decode step "
                    "(torch.compile, CUDA graphs) automatically on CUDA. With --dense-prefill-chunk the prompt "
                    "(all but its last token) is prefilled eagerly in chunks into the StaticCache before generate "
                    "(static_prefill): generate(prefill_chunk_size=...) sends every chunk through the compiled "
                    "call, which did not finish a 128K x 4 prefill in minutes under TP2 on 2 x H200",
    "dense-dynamic": "unpatched model, transformers' dynamic cache, eager",
    "leank": "leank.patch with the kept-count mix; decode steps compiled (torch.compile around LeanK's attention op) "
             "and replayed as one CUDA graph (LeanKConfig.capture, compile_decode), q/k/v and gate/up products fused "
             "(LeanKConfig.fuse_projections)",
    "leank-unfused": "leank with fuse_projections=False: transformers' forward (separate q/k/v, gate/up products) "
                     "compiled and replayed",
    "leank-graph": "leank with compile_decode=False: the fused forward replayed uncompiled as one CUDA graph",
    "leank-dense": "the same LeanK machinery (captured) with every channel kept: what LeanK costs without pruning",
    "leank-eager": "leank with capture=False (every decode step eager)",
    "leank-autotune": "leank with compile_mode='max-autotune-no-cudagraphs': Inductor benchmarks Triton "
                      "matrix-product templates against cuBLAS for the step's products",
    "leank-unbalanced": "leank with tp_balance=False: under tensor parallelism each rank keeps transformers' "
                        "contiguous KV heads instead of heads reordered so that the ranks' K/V bytes are even",
    "leank-one-shot": "leank with tp_allreduce='one_shot': under tensor parallelism the decode step sums o_proj and "
                      "down_proj with PyTorch's symmetric-memory one-shot all-reduce instead of transformers' NCCL one",
}
# --tiny: every code path in about a minute on a 2-core CPU (the window is small so the archive fills)
TINY_SIZES = dict(lengths=[96], batches=[1, 2], warmup=1, steps=6, dense_prefill_chunk=32, sink=8, recent=16,
                  flush_every=4)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    """How each method's ``generate()`` runs: ``--dense-prefill-chunk``, ``--leank-prefill-chunk``,
    ``--defer-stop``, ``--rope-append``, ``--gemv`` (shared with ``eval/decode_profile.py``)."""
    p.add_argument("--dense-prefill-chunk", type=common.int_k, default=8192,
                   help="prefill chunk of the dense methods, so a static cache's prefill mask and the activations "
                        "stay small at long contexts; 0 = one shot. dense-dynamic passes it to "
                        "generate(prefill_chunk_size=...); dense-static prefills all prompt tokens but the last "
                        "eagerly in chunks of it into its StaticCache (static_prefill). Decode numbers do not depend "
                        "on it; prefill times then differ in kind (default: %(default)s)")
    p.add_argument("--leank-prefill-chunk", type=common.int_k, default=0,
                   help="generate(prefill_chunk_size=...) for the LeanK methods; 0 = one shot. Later chunks attend "
                        "to the LeanK cache through leank.attention.chunk_attention (FlashAttention per sequence and "
                        "archive group for fp16/bf16, the exact reference in bounded blocks otherwise): less "
                        "activation memory than one shot (8K keeps 128K x 8 within one H200; default: %(default)s)")
    p.add_argument("--defer-stop", action=argparse.BooleanOptionalAction, default=True,
                   help="leank.defer.ENABLED (default: on): transformers decides one step late whether generation "
                        "has finished, for LeanK caches on CUDA, so the host queues the next decode step while the "
                        "current one runs instead of waiting for it; --no-defer-stop waits every step as transformers "
                        "does on CUDA. The dense methods are unaffected. Recorded in the config")
    p.add_argument("--rope-append", action=argparse.BooleanOptionalAction, default=True,
                   help="the fused decode step applies RoPE to q and k inside its window-append kernel "
                        "(leank.append_kernel.FUSE_ROPE, the default: one launch per layer instead of Inductor's two "
                        "RoPE kernels and the append); --no-rope-append applies the model's own RoPE first. Recorded "
                        "in the config")
    p.add_argument("--gemv", action=argparse.BooleanOptionalAction, default=True,
                   help="up to batch --gemv-max-batch (8 by default) the fused decode step runs every matrix "
                        "product (q/k/v, o_proj, gate/up, down_proj, lm_head) through LeanK's split-K-free Triton "
                        "kernels (leank.gemv.ENABLED, the default); "
                        "--no-gemv through F.linear (cuBLAS). "
                        "Recorded in the config")
    p.add_argument("--gemv-max-batch", type=int, default=None,
                   help="largest batch whose products go through leank.gemv (leank.gemv.MAX_BATCH; default: the "
                        "library's, 8; 1: cuBLAS above batch 1). Batches of 2..16 use its tensor-core rows kernel "
                        "(timed at 2, 4 and 8 rows: eval/gemv_bench.py --rows; 8 is 3-6%% faster end to end than "
                        "cuBLAS: eval/RESULTS.md). Recorded in the config")


def apply_generate_args(args: argparse.Namespace) -> None:
    """``--defer-stop``, ``--rope-append``, ``--gemv`` / ``--gemv-max-batch`` (``add_generate_args``) onto LeanK's
    module switches (read when a step is traced or a call starts)."""
    from leank import append_kernel, defer, gemv

    defer.ENABLED = args.defer_stop
    append_kernel.FUSE_ROPE = args.rope_append
    gemv.ENABLED = args.gemv
    if args.gemv_max_batch is not None:
        if not 1 <= args.gemv_max_batch <= gemv.MAX_ROWS:
            raise SystemExit(f"--gemv-max-batch: expected 1..{gemv.MAX_ROWS}, got {args.gemv_max_batch}")
        gemv.MAX_BATCH = args.gemv_max_batch
    args.gemv_max_batch = gemv.MAX_BATCH  # the config records the value the run used, not None for "the default"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/e2e_decode.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", type=common.str_list, default=list(common.DEFAULT_SHAPES),
                   help=f"model shapes from {list(common.MODEL_SHAPES)} (default: {','.join(common.DEFAULT_SHAPES)})")
    p.add_argument("--lengths", type=common.int_list, default=[8192, 32768, 65536, 131072],
                   help="prompt lengths in tokens, K suffix allowed (default: 8K,32K,64K,128K; "
                        "those that cannot fit are skipped)")
    p.add_argument("--batches", type=common.int_list, default=[1, 8], help="batch sizes (default: 1,8)")
    p.add_argument("--methods", type=common.str_list, default=list(METHODS),
                   help=f"subset of {list(METHODS + EXTRA_METHODS)} (default: all but {list(EXTRA_METHODS)})")
    p.add_argument("--layers", type=int, default=None, help="use only this many decoder layers (default: all)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke test: tiny widths (2 layers, head_dim 128) and, for options left at their "
                        f"defaults, {TINY_SIZES}")
    p.add_argument("--quick", action="store_true",
                   help="8 layers, lengths 8K,32K, batches 1,8, no max-batch search (overrides those options)")
    p.add_argument("--warmup", type=int, default=8, help="decode steps excluded from the statistics (default: %(default)s)")
    p.add_argument("--steps", type=int, default=64, help="measured decode steps (default: %(default)s)")
    add_generate_args(p)
    p.add_argument("--attn", default="auto", help="dense attention: auto, sdpa, flash_attention_2, eager (default: auto)")
    p.add_argument("--max-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="search the largest batch within --budget-gib for each method (default: on)")
    p.add_argument("--budget-gib", type=float, default=40.0,
                   help="memory budget of the max-batch search (default: %(default)s)")
    p.add_argument("--budget-phase", choices=["decode", "all"], default="decode",
                   help="what must fit the budget: the decode phase (weights + caches + decode step: the serving "
                        "regime where prompts are prefilled in micro-batches; the one-shot prefill may exceed the "
                        "budget as long as the GPU holds it) or the whole generate() (default: %(default)s)")
    p.add_argument("--budget-length", type=common.int_k, default=16384, help="prompt length of the max-batch search (default: %(default)s)")
    p.add_argument("--synthetic-prefill", action="store_true",
                   help="fill each call's cache with random K/V as a prefill in "
                        "chunks of --leank-prefill-chunk / --dense-prefill-chunk stores them (e2e_decode."
                        "synthetic_leank_cache, synthetic_dynamic_cache, synthetic_static_cache), without running the "
                        "model over the prompt; "
                        "generate runs the model on the last prompt token, then decodes. Cache "
                        "layout, sizes, decode steps and decode-phase memory are a real run's; prefill times and "
                        "prefill peaks are not. For max-batch searches whose prefills would not fit a run's time "
                        "(a 70B model at 128K). Recorded in the config and in every row (synthetic_prefill)")
    p.add_argument("--second-turn", type=common.int_k, default=0,
                   help="also time a follow-up message of this many tokens appended to each --lengths conversation "
                        "cache (time to the first new token), dense-dynamic vs leank with the same attention backend; "
                        "0 = off (default: %(default)s)")
    p.add_argument("--speculative", type=int, default=0,
                   help="also time prompt-lookup speculative decoding (generate(prompt_lookup_num_tokens=N)) on a "
                        "repetitive prompt of each --lengths, batch 1, dense-dynamic vs leank: decode tokens/s with "
                        "and without speculation; 0 = off (default: %(default)s)")
    p.add_argument("--speculative-tokens", type=int, default=128,
                   help="new tokens of each speculative run (default: %(default)s)")
    p.add_argument("--records-from", nargs="+", default=None, metavar="RESULT_JSON",
                   help="write the chunked-prefill and second-turn records (LeanK vs dense) of these earlier runs "
                        "to --out and exit; runs nothing")
    p.add_argument("--split-rule", choices=["window", "bytes"], default="window",
                   help="the TileLang decode kernel's split planning (tilelang_kernels.decode.SPLIT_RULE): 'window' "
                        "is the kernel's default, 'bytes' splits every segment in proportion to its bytes; an "
                        "experiment, recorded in the config (default: %(default)s)")
    p.add_argument("--pdl", action="store_true",
                   help="launch the TileLang decode kernels as programmatic dependents (tilelang_kernels.decode."
                        "TILE_CONFIG = {'pdl': True}): each starts while the kernel before it finishes and waits "
                        "before reading; an experiment, recorded in the config")
    p.add_argument("--inductor-pdl", action="store_true",
                   help="torch._inductor.config.triton.enable_pdl = True for every compiled method of the run "
                        "(LeanK's decode step and dense-static alike): Inductor's Triton kernels launch as "
                        "programmatic dependents; an experiment, recorded in the config")
    p.add_argument("--inductor-combo", action="store_true",
                   help="torch._inductor.config.combo_kernels = True for every compiled method of the run: "
                        "Inductor launches independent small kernels together (each layer of LeanK's decode step "
                        "runs RoPE of q and of k as two kernels in the H200 profile); an experiment, recorded in "
                        "the config")
    p.add_argument("--flush-kernel", action=argparse.BooleanOptionalAction, default=True,
                   help="LeanK's decode flush through its Triton kernels on CUDA (leank.flush_kernel.ENABLED, the "
                        "default: one launch per archive group + two, instead of 31-41 PyTorch operations per layer); "
                        "--no-flush-kernel flushes through PyTorch indexing. Recorded in the config")
    p.add_argument("--row-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="before each LeanK row, one short call at the row's batch size (a prompt of up to 2K "
                        "tokens, 2 x --flush-every + 2 new tokens), timed as the row's row_warmup_s, so the row's "
                        "call_extra_ms is what every call pays and not what a process pays once per batch size "
                        "(default: on)")
    p.add_argument("--no-skip", action="store_true", help="try configurations whose estimated memory exceeds the GPU")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    common.add_common_args(p, default_out=common.scratch_out("e2e_decode.json"))
    common.add_leank_args(p)
    p.set_defaults(backend=None)
    for a in p._actions:  # default backend: tilelang on CUDA (a benchmark must not fall back silently)
        if a.dest == "backend":
            a.help = "LeanK attention backend (default: tilelang on CUDA, reference on CPU)"
    return p


def resolve_args(args) -> None:
    if args.tiny:
        common.apply_smoke_sizes(args, build_parser(), TINY_SIZES)
    if args.quick:
        args.layers, args.lengths, args.batches, args.max_batch = args.layers or 8, [8192, 32768], [1, 8], False
    for name in ("models", "methods", "lengths", "batches"):
        if not getattr(args, name):
            raise SystemExit(f"--{name}: expected at least one value, got none")
    bad = [x for x in args.lengths + args.batches if x < 1]
    if bad:
        raise SystemExit(f"--lengths and --batches: expected values >= 1, got {bad}")
    bad = [m for m in args.methods if m not in METHODS + EXTRA_METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; expected a subset of {list(METHODS + EXTRA_METHODS)}")
    bad = [m for m in args.models if m not in common.MODEL_SHAPES]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; expected a subset of {list(common.MODEL_SHAPES)}")
    if args.speculative < 0 or args.speculative_tokens < 2:
        raise SystemExit(f"--speculative: expected >= 0 and --speculative-tokens >= 2, got {args.speculative} and "
                         f"{args.speculative_tokens}")
    if args.steps < 2 or args.warmup < 1:
        raise SystemExit("--steps: expected >= 2 and --warmup >= 1")
    if args.synthetic_prefill:
        bad = [m for m in args.methods if not m.startswith("leank") and m not in SYNTHETIC_METHODS]
        if bad or args.second_turn or args.speculative:
            raise SystemExit(f"--synthetic-prefill: fills the caches of LeanK methods and {SYNTHETIC_METHODS} only, and "
                             f"runs no --second-turn or --speculative; got methods {bad}, --second-turn "
                             f"{args.second_turn}, --speculative {args.speculative}")
    if args.plot is None:
        args.plot = str(Path(args.out).with_suffix(".png"))


# ----------------------------------------------------------------------------- timing
class StepClock:
    """A logits processor that timestamps every step of ``generate``.

    Call 0 happens right after the prefill forward, call i after decode step i. On CUDA it
    records events (no host sync inside the loop beyond generate's own); on CPU it reads
    ``time.perf_counter``. At call 0 it also reads and resets the peak-memory counter so
    prefill and decode peaks are separate.
    """

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list = []
        self.prefill_peak = None

    def start(self) -> None:
        self.marks = [self._mark()]

    def _mark(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def __call__(self, input_ids, scores):
        self.marks.append(self._mark())
        if len(self.marks) == 2 and self.cuda:
            self.prefill_peak = self.torch.cuda.max_memory_allocated(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
        return scores

    def intervals_ms(self) -> list[float]:
        """[prefill, step 1, step 2, ...] in milliseconds."""
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1000 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def step_stats(intervals_ms: Sequence[float], warmup: int, batch: int) -> dict:
    """Statistics of the decode steps after ``warmup`` (intervals[0] is the prefill)."""
    steps = list(intervals_ms[1 + warmup:])
    total_s = sum(steps) / 1000
    median = statistics.median(steps)
    decode = list(intervals_ms[1:])  # every decode step of the call, warm-up included
    return {
        "prefill_s": intervals_ms[0] / 1000,
        "latency_ms_median": median,
        "latency_ms_mean": statistics.fmean(steps),
        "latency_ms_p90": sorted(steps)[min(len(steps) - 1, int(0.9 * len(steps)))],
        "latency_ms_max": max(steps),
        "tokens_per_s": batch * len(steps) / total_s if total_s > 0 else float("inf"),
        "measured_steps": len(steps),
        "step_ms": [round(x, 4) for x in steps],  # each measured step: a flush step shows as itself
        "warmup_step_ms": [round(x, 4) for x in intervals_ms[1:1 + warmup]],
        # what this generate() call's decode took beyond its steady rate: one-time work every call pays
        # (LeanK: the first step of a new cache's layout, the decode-step and flush recordings, the first
        # flushes run eagerly) plus the flushes' own cost
        "call_extra_ms": sum(decode) - len(decode) * median,
    }


# ----------------------------------------------------------------------------- one run
def kv_bytes_per_token(cfg, element_size: int = 2) -> int:
    """Dense K+V bytes of one token over all layers (``element_size`` 2: bf16/fp16)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * element_size


def leank_fraction(mask) -> float:
    """Archived-token K+V bytes with the mask / dense (K pruned channels, V of 0-channel heads)."""
    k = mask.keep.float().mean().item()
    v = 1.0 - mask.v_sparsity
    return (k + v) / 2


def estimate_gib(cfg, method: str, length: int, batch: int, new_tokens: int, mask, weight_bytes: int,
                 tp: int = 1) -> float:
    """Rough lower bound of generate()'s memory on one rank, used only to skip what cannot fit."""
    kv = batch * (length + new_tokens) * kv_bytes_per_token(cfg) * kv_fraction(method, mask) / tp
    return (weight_bytes + kv) / 2**30


def greedy_kwargs(method: str, new_tokens: int, prefill_chunk: int = 0, logits_processor=None) -> dict:
    """``generate`` keywords of a greedy run of ``method`` (the dense methods name their cache)."""
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  return_dict_in_generate=True, pad_token_id=0)
    if logits_processor is not None:
        kwargs["logits_processor"] = logits_processor
    if method in ("dense-static", "dense-dynamic"):
        kwargs["cache_implementation"] = method.split("-")[1]
    if prefill_chunk:
        kwargs["prefill_chunk_size"] = prefill_chunk
    return kwargs


def method_setups(model, family: str, args, need_mask: bool = True) -> tuple:
    """``(mask, {method: (mask, LeanKConfig)})`` of the LeanK methods: ``--mask`` (default ``mix``: the
    kept-count mix of ``family`` at random heads, ``args.seed``), every channel kept for ``leank-dense``,
    the window of ``args``."""
    import torch

    import leank
    from leank.masks import resolve_mask

    mask = None
    if need_mask:
        mask = common.build_mask(args.mask if args.mask != "mix" else f"mix:{family}", model, args.seed)
        if isinstance(mask, str):  # a mask file or a model id: the registry resolves it
            mask = resolve_mask(mask, model.config)
    dense_mask = None if mask is None else type(mask)(keep=torch.ones_like(mask.keep), align=mask.align,
                                                         context_set=mask.context_set, source="every channel kept")
    lcfg = leank.LeanKConfig(sink=args.sink, recent=args.recent, flush_every=args.flush_every, backend=args.backend)
    return mask, {"leank": (mask, lcfg), "leank-dense": (dense_mask, lcfg),
                  "leank-unfused": (mask, dataclasses.replace(lcfg, fuse_projections=False)),
                  "leank-graph": (mask, dataclasses.replace(lcfg, compile_decode=False)),
                  "leank-eager": (mask, dataclasses.replace(lcfg, capture=False)),
                  "leank-autotune": (mask, dataclasses.replace(lcfg, compile_mode="max-autotune-no-cudagraphs")),
                  "leank-unbalanced": (mask, dataclasses.replace(lcfg, tp_balance=False)),
                  "leank-one-shot": (mask, dataclasses.replace(lcfg, tp_allreduce="one_shot"))}


def method_context(model, setups: dict, method: str):
    """``with method_context(...)``: the model patched as ``method`` needs (nothing for dense methods)."""
    return common.patched(model, *setups[method]) if method in setups else contextlib.nullcontext()


def is_dense(method: str) -> bool:
    """A method that keeps every K channel: transformers' ``dense-*`` paths and ``leank-dense``."""
    return method.startswith("dense") or method == "leank-dense"


def kv_fraction(method: str, mask) -> float:
    """Archived K+V bytes of ``method`` relative to a dense cache (1 for dense and ``leank-dense``)."""
    return 1.0 if is_dense(method) else leank_fraction(mask)


def slowest_rank_fraction(method: str, mask, tp: int, order=None) -> float:
    """``kv_fraction`` of the rank that reads the most, layer by layer, under ``tp``-way tensor parallelism,
    relative to one rank's dense share: the heads' archived K+V channels (``leank.tp.head_costs``) summed per
    rank in ``order`` (the patched model's ``_leank.head_order``; None: transformers' contiguous split), the
    largest rank taken in every layer. Equals ``kv_fraction`` for one rank and for dense methods."""
    if tp == 1 or is_dense(method):
        return kv_fraction(method, mask)
    from leank.tp import rank_loads

    loads = rank_loads(mask, tp, order)  # [layers, tp] channels per token
    return float(loads.max(1).values.sum()) / (2 * mask.num_layers * (mask.num_kv_heads // tp) * mask.head_dim)


def static_prefill(model, input_ids, new_tokens: int, chunk: int):
    """A ``StaticCache`` for ``input_ids [batch, length]`` plus ``new_tokens``, holding every prompt token but
    the last, prefilled eagerly ``chunk`` tokens per forward (unpadded prompts, as this benchmark's are).

    ``generate(input_ids, cache=<it>)`` then runs the last prompt token as its (uncompiled) prefill and
    compiles the decode steps as it does for ``cache_implementation="static"``. Its own chunked prefill
    (``prefill_chunk_size``) sends every chunk through the compiled call (transformers 5.17 and 5.24), whose
    compile and CUDA-graph recording per chunk kept a 128K x 4 prefill under TP2 from finishing in minutes
    (``eval/results/tp_decode_h200x2_cut.log``); the decode steps are the same either way.
    """
    import torch
    from transformers import StaticCache

    from leank.patching import cache_kwarg

    if chunk <= 0:
        raise ValueError(f"chunk: expected a positive number of tokens, got {chunk}")
    cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + new_tokens)
    name = cache_kwarg(model)
    with torch.inference_mode():
        for start in range(0, input_ids.shape[1] - 1, chunk):
            part = input_ids[:, start:min(start + chunk, input_ids.shape[1] - 1)]
            model(input_ids=part, use_cache=True, logits_to_keep=1, **{name: cache})
    return cache


def _random_kv_chunks(model, batch: int, kv_heads: int, head_dim: int, length: int, chunk: int, seed: int):
    """``(k, v)`` pairs ``[batch, kv_heads, n, head_dim]`` of random values in the model's dtype and device,
    ``chunk`` tokens each (the last one shorter) up to ``length`` tokens: one layer's synthetic prefill."""
    import torch

    if length < 1 or chunk < 1:
        raise ValueError(f"length, chunk: expected >= 1, got length={length}, chunk={chunk}")
    param = next(model.parameters())
    gen = torch.Generator(device=param.device).manual_seed(seed)
    for start in range(0, length, chunk):
        shape = (batch, kv_heads, min(chunk, length - start), head_dim)
        yield (torch.randn(shape, generator=gen, device=param.device, dtype=param.dtype),
               torch.randn(shape, generator=gen, device=param.device, dtype=param.dtype))


def synthetic_leank_cache(model, batch: int, length: int, new_tokens: int, chunk: int, seed: int = 0):
    """A ``LeanKCache`` of a patched ``model`` holding ``length`` tokens of random K/V per sequence, stored as
    a prefill in chunks of ``chunk`` tokens stores them (``LeanKLayer.store_chunk``, after the same
    ``reserve(new_tokens + 1)`` the patched ``generate`` makes), without running the model: the cache's
    layout, sizes and allocations are a real prefill's, its values are not. For memory and decode-speed
    runs whose prefill would take longer than the run may (``--synthetic-prefill``); under tensor
    parallelism each rank fills its own heads."""
    import leank

    cache = leank.new_cache(model)
    cache.reserve(new_tokens + 1)
    for i, layer in enumerate(cache.layers):
        for k, v in _random_kv_chunks(model, batch, *layer.keep.shape, length, chunk, seed + i):
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
            layer.store_chunk(k, v, None)
            layer.seen_tokens += k.shape[2]
    return cache


def _local_kv_shape(model) -> tuple:
    """``(KV heads this rank holds, head_dim)`` of ``model`` (all its KV heads outside tensor parallelism)."""
    from leank.tp import detect

    cfg = model.config
    shard = detect(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (cfg.num_key_value_heads if shard is None else shard.local_kv_heads), head_dim


def synthetic_dynamic_cache(model, batch: int, length: int, new_tokens: int, chunk: int, seed: int = 0):
    """transformers' ``DynamicCache`` holding ``length`` tokens of random K/V per sequence, appended ``chunk``
    tokens at a time through its ``update`` (what a chunked prefill's layers call), without running the model;
    ``new_tokens`` is unused (a dynamic cache reserves nothing). Under tensor parallelism each rank fills its
    own KV heads. See ``synthetic_leank_cache``."""
    from transformers import DynamicCache

    cfg = model.config
    kvh, head_dim = _local_kv_shape(model)
    cache = DynamicCache(config=cfg)
    for i in range(cfg.num_hidden_layers):
        for k, v in _random_kv_chunks(model, batch, kvh, head_dim, length, chunk, seed + i):
            cache.update(k, v, i)
    return cache


def synthetic_static_cache(model, batch: int, length: int, new_tokens: int, chunk: int, seed: int = 0):
    """transformers' ``StaticCache`` for ``length`` + ``new_tokens`` + 1 tokens per sequence (``static_prefill``'s
    size: the prompt, of which the last token is fed by ``generate``, plus the new tokens) holding ``length`` tokens
    of random K/V, written ``chunk`` tokens at a time through its ``update`` at their positions, without running the
    model. Under tensor parallelism each rank fills its own KV heads. See ``synthetic_leank_cache``."""
    import torch
    from transformers import StaticCache

    cfg = model.config
    kvh, head_dim = _local_kv_shape(model)
    cache = StaticCache(config=cfg, max_cache_len=length + 1 + new_tokens)
    device = next(model.parameters()).device
    for i in range(cfg.num_hidden_layers):
        start = 0
        for k, v in _random_kv_chunks(model, batch, kvh, head_dim, length, chunk, seed + i):
            # the positions: transformers <= 5.2x's StaticLayer reads them, later ones count the tokens themselves
            pos = torch.arange(start, start + k.shape[2], device=device)
            cache.update(k, v, i, {"cache_position": pos})
            start += k.shape[2]
    return cache


def generate_kwargs(model, method: str, input_ids, new_tokens: int, prefill_chunk: int = 0,
                    logits_processor=None, synthetic: bool = False) -> dict:
    """``greedy_kwargs`` of ``method`` for ``input_ids [batch, length]``. ``dense-static`` with ``prefill_chunk``
    gets its ``StaticCache`` here, prefilled by ``static_prefill`` with every prompt token but the last (call it
    where the prefill is timed); every other method passes ``prefill_chunk`` to ``generate``. ``synthetic`` (LeanK
    methods, ``dense-dynamic``, ``dense-static``): the cache comes from ``synthetic_leank_cache`` /
    ``synthetic_dynamic_cache`` / ``synthetic_static_cache``
    with every prompt token but the last, so ``generate`` runs the model on the last one only."""
    if synthetic:
        from leank.patching import cache_kwarg

        if method not in SYNTHETIC_METHODS and not method.startswith("leank"):
            raise ValueError(f"synthetic: a synthetic prefill fills LeanK caches and {SYNTHETIC_METHODS}' caches, got "
                             f"method {method!r}")
        kwargs = greedy_kwargs(method, new_tokens, 0, logits_processor)
        kwargs.pop("cache_implementation", None)
        b, length = input_ids.shape
        fill = {"dense-dynamic": synthetic_dynamic_cache, "dense-static": synthetic_static_cache}.get(
            method, synthetic_leank_cache)
        kwargs[cache_kwarg(model)] = fill(model, b, length - 1, new_tokens, prefill_chunk or length, seed=length + b)
        return kwargs
    if method == "dense-static" and prefill_chunk > 0 and input_ids.shape[1] > 1:
        from leank.patching import cache_kwarg

        kwargs = greedy_kwargs(method, new_tokens, 0, logits_processor)
        del kwargs["cache_implementation"]
        kwargs[cache_kwarg(model)] = static_prefill(model, input_ids, new_tokens, prefill_chunk)
        return kwargs
    return greedy_kwargs(method, new_tokens, prefill_chunk, logits_processor)


def run_generate(model, method: str, input_ids, new_tokens: int, device, prefill_chunk: int = 0,
                 synthetic: bool = False) -> dict:
    """One greedy ``generate`` with step timestamps and memory readings (model patched already for leank).

    ``dense-static`` with ``prefill_chunk`` prefills through ``static_prefill`` (``generate_kwargs``, timed as part
    of the prefill); ``synthetic`` fills the cache without running the model (``synthetic_leank_cache`` /
    ``synthetic_dynamic_cache`` / ``synthetic_static_cache``, timed and measured as the prefill)."""
    import torch
    from transformers import LogitsProcessorList

    from leank.patching import output_cache

    clock = StepClock(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    clock.start()
    kwargs = generate_kwargs(model, method, input_ids, new_tokens, prefill_chunk, LogitsProcessorList([clock]),
                             synthetic=synthetic)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    intervals = clock.intervals_ms()
    wall = time.perf_counter() - t0
    res = {"wall_s": wall, "intervals_ms": intervals}
    if cuda:
        torch.cuda.synchronize(device)
        res["prefill_peak_gib"] = clock.prefill_peak / 2**30
        res["decode_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        res["peak_gib"] = max(res["prefill_peak_gib"], res["decode_peak_gib"])
    cache = output_cache(out)
    runner = getattr(getattr(model, "_leank", None), "runner", None)
    if runner is not None:  # LeanK's captured path: graph recording, apart from prefill and decode
        res["capture_s_total"], res["captured_replays_total"] = runner.capture_s, runner.replays
        res["decode_compiled"] = runner.compiled_steps > 0 and not runner._compile_failed  # False: ran uncompiled
    del out
    if cuda:
        gc.collect()
        res["kv_held_bytes"] = torch.cuda.memory_allocated(device) - base  # the returned cache, measured
    if hasattr(cache, "memory_report"):
        rep = cache.memory_report()
        res["report"] = {k: v for k, v in rep.items() if k != "layers"}
        res["report"]["slowest_rank_bytes"] = slowest_rank_bytes(rep, device)
    del cache
    return res


def slowest_rank_bytes(report: dict, device) -> int:
    """K+V bytes held, summed over layers, of the rank with the most in each layer (under tensor
    parallelism each layer's all-reduce waits for that rank, so its bytes bound the step); this
    rank's ``leank_bytes`` in one process. A collective: every rank calls it."""
    import torch
    import torch.distributed as dist

    mine = [layer["k_bytes"] + layer["v_bytes"] for layer in report["layers"]]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sum(mine)
    most = torch.tensor(mine, dtype=torch.int64, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.sum().item())


def oom_safe(fn, *args):
    """``fn(*args)``, or ``"OOM (...)"`` when CUDA runs out of memory (memory released after the traceback)."""
    import torch

    msg = None
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError as e:
        msg = f"OOM ({str(e).splitlines()[0][:120]})"
    gc.collect()  # outside the except block: the traceback no longer pins the failed call's tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return msg


def release_compiled_state(device) -> float | None:
    """Drop torch.compile's state after a ``dense-static`` row; returns the GiB this freed on CUDA.

    transformers compiles that row's step in ``reduce-overhead`` mode (its ``CompileConfig`` default),
    whose CUDA-graph trees keep memory pools after ``generate`` returns. On the H200 a LeanK row at
    128K x 4 fit after one-shot ``dense-static`` rows in one run and ran out of memory after chunked
    ones in another (not profiled: this release is the first thing to try). LeanK's compiled decode
    step is traced again at its next use, inside that row's warm-up steps (outside the statistics);
    its own CUDA graphs are not torch.compile's and stay.
    """
    import torch

    before = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
    torch._dynamo.reset()
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return (before - torch.cuda.memory_reserved(device)) / 2**30


def prefill_chunk_for(method: str, args) -> int:
    return args.leank_prefill_chunk if method.startswith("leank") else args.dense_prefill_chunk


# prompt tokens of the short warm-up call before each LeanK row (--row-warmup)
ROW_WARMUP_TOKENS = 2048


def sweep_one(model, cfg, method: str, length: int, batch: int, args, device, mask, weight_bytes, total_gib) -> dict:
    import torch

    row = {"method": method, "tp": args.tp, "length": length, "batch": batch}
    if args.synthetic_prefill:
        row["synthetic_prefill"] = True  # the cache was filled with random K/V, not by the model: prefill_s is the fill's
    new_tokens = args.warmup + args.steps + 1  # the first token comes from the prefill
    est = estimate_gib(cfg, method, length, batch, new_tokens, mask, weight_bytes, args.tp)
    row["estimated_min_gib"] = est
    if total_gib is not None and est > total_gib and not args.no_skip:
        row["status"] = f"skipped: needs at least {est:.1f} GiB of {total_gib:.1f}"
        return row
    gen = torch.Generator().manual_seed(args.seed + length + batch)
    if args.row_warmup and method.startswith("leank"):
        # a short call at this batch first: what a process pays once per batch size (the decode step's
        # recompile for a new batch, the flush kernels' JIT) stays out of this call's call_extra_ms
        warm = torch.randint(100, cfg.vocab_size, (batch, min(ROW_WARMUP_TOKENS, length)), generator=gen).to(device)
        t0 = time.perf_counter()
        res = oom_safe(run_generate, model, method, warm, 2 * args.flush_every + 2, device)
        if isinstance(res, str):
            row["status"] = f"{res} (in the row's warm-up call)"
            return row
        row["row_warmup_s"] = time.perf_counter() - t0
        del res, warm
    ids = torch.randint(100, cfg.vocab_size, (batch, length), generator=gen).to(device)
    res = oom_safe(run_generate, model, method, ids, new_tokens, device, prefill_chunk_for(method, args),
                   args.synthetic_prefill)
    if isinstance(res, str):
        row["status"] = res
        return row
    row.update(status="ok", **step_stats(res["intervals_ms"], args.warmup, batch),
               **{k: v for k, v in res.items() if k != "intervals_ms"})
    # K/V bytes one decode step reads, at the middle of the measured steps
    mid = length + args.warmup + args.steps // 2
    if "report" in res:  # LeanK: the rows the cache holds (window at full width, archive compacted), this rank's
        held = batch * (length + new_tokens - 1)  # the last token is never fed back
        row["kv_bytes"] = int(res["report"]["leank_bytes"] * batch * mid / held)
        # per layer, the rank with the most K/V (every layer's all-reduce waits for it); this rank's in one process
        row["kv_bytes_slowest_rank"] = int(res["report"]["slowest_rank_bytes"] * batch * mid / held)
    else:  # dense: this rank's share of the KV heads, the same on every rank
        row["kv_bytes"] = batch * mid * kv_bytes_per_token(cfg, next(model.parameters()).element_size()) // args.tp
        row["kv_bytes_slowest_rank"] = row["kv_bytes"]
    row["kv_bytes_per_rank"] = row["kv_bytes"]
    row["weight_bytes"] = weight_bytes
    row["weight_bytes_read"] = step_weight_bytes(model, batch)
    if args.copy_gbps:
        row["floor_ms"] = (row["weight_bytes_read"] + row["kv_bytes_slowest_rank"]) / (args.copy_gbps * 1e9) * 1e3
        row["pct_of_floor"] = 100 * row["floor_ms"] / row["latency_ms_median"]
    row["ms_per_token"] = row["latency_ms_median"]
    return row


# ----------------------------------------------------------------------------- second turn
def second_turn(model, cfg, method: str, length: int, batch: int, followup: int, device, seed: int) -> dict:
    """Time to the first new token of a ``followup``-token message on a ``length``-token cache.

    Turn 1 prefills the conversation and generates one token (untimed); turn 2 passes the
    returned cache with the conversation + the follow-up and is timed around ``generate``
    (host clock, device synchronised). The dense method uses a dynamic cache.
    """
    import torch

    from leank.patching import cache_kwarg, output_cache

    gen = torch.Generator().manual_seed(seed + length + batch)
    ids = torch.randint(100, cfg.vocab_size, (batch, length), generator=gen).to(device)
    more = torch.randint(100, cfg.vocab_size, (batch, followup), generator=gen).to(device)
    kw = dict(max_new_tokens=1, do_sample=False, temperature=None, top_p=None, top_k=None,
              return_dict_in_generate=True, pad_token_id=0)
    dense = method.startswith("dense")
    with torch.inference_mode():
        first = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               **({"cache_implementation": "dynamic"} if dense else {}), **kw)
        cache = output_cache(first)
        ids2 = torch.cat([first.sequences, more], 1)
        del first
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model.generate(input_ids=ids2, attention_mask=torch.ones_like(ids2), **{cache_kwarg(model): cache}, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ttft = time.perf_counter() - t0
    return {"method": method, "length": length, "batch": batch, "followup": followup, "ttft_s": ttft, "status": "ok"}


# ----------------------------------------------------------------------------- speculative decoding
def repetitive_prompt(vocab: int, length: int, period: int, seed: int):
    """int64 ``[1, length]``: one random block of ``period`` tokens repeated (prompt lookup finds n-grams)."""
    import torch

    block = torch.randint(100, vocab, (period,), generator=torch.Generator().manual_seed(seed))
    return block.repeat(length // period + 1)[:length][None]


def speculative(model, cfg, method: str, length: int, lookup: int, new_tokens: int, device, seed: int) -> dict:
    """Decode tokens/s of greedy ``generate`` with and without ``prompt_lookup_num_tokens=lookup``.

    The prompt repeats a 64-token block (shorter for tiny prompts), so the lookup finds candidates at every step; how many
    the model accepts depends on its weights (random here: the speed of the machinery, not of a
    trained model's acceptance). Decode time = generate time - the time of the same call with
    one new token (the prefill). The dense method uses a dynamic cache.
    """
    import torch

    ids = repetitive_prompt(cfg.vocab_size, length, max(2, min(64, length // 4)), seed).to(device)
    base = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0,
                attention_mask=torch.ones_like(ids), **({"cache_implementation": "dynamic"}
                                                          if method.startswith("dense") else {}))

    def timed(**kw) -> tuple[float, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, **base, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, out

    # warm-up: one-time costs (kernel and step compiles, plans) out of the timed calls. What each generate call
    # pays - LeanK's first decode step of a new cache runs eagerly and the next one is recorded - stays in them,
    # as a user pays it per call
    timed(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    timed(max_new_tokens=new_tokens, min_new_tokens=new_tokens, prompt_lookup_num_tokens=lookup)
    prefill_s, _ = timed(max_new_tokens=1)
    plain_s, plain = timed(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    spec_s, spec = timed(max_new_tokens=new_tokens, min_new_tokens=new_tokens, prompt_lookup_num_tokens=lookup)
    n = new_tokens - 1  # tokens after the first, which comes from the prefill
    plain_dec, spec_dec = max(plain_s - prefill_s, 1e-9), max(spec_s - prefill_s, 1e-9)
    return {"method": method, "length": length, "batch": 1, "lookup": lookup, "new_tokens": new_tokens,
            "prefill_s": prefill_s, "plain_tokens_per_s": n / plain_dec, "speculative_tokens_per_s": n / spec_dec,
            "speculative_speedup": plain_dec / spec_dec,
            "same_tokens": bool(torch.equal(plain.cpu(), spec.cpu())), "status": "ok"}


# ----------------------------------------------------------------------------- max batch
def ranks_agree(res: dict | None, keys: Sequence[str], device) -> dict | None:
    """Under tensor parallelism, one verdict for every rank: ``None`` (out of memory) if any rank
    ran out, else ``res`` with ``keys`` raised to their largest value over the ranks, so that ranks
    whose peaks straddle the budget do not step down apart (they would then wait in different
    collectives). It cannot save a run where one rank alone runs out of memory inside ``generate``:
    the other rank then waits in the model's all-reduce, and the run hangs until the process group
    times out (the ranks are symmetric, so they normally run out together). Single process: ``res``
    unchanged."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return res
    vals = [0.0 if res is None else 1.0] + [0.0 if res is None else float(res[k]) for k in keys]
    t = torch.tensor([-vals[0], *vals[1:]], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # max of -ok is 0 as soon as one rank failed
    if res is None or t[0].item() == 0.0:
        return None
    return {**res, **{k: t[1 + i].item() for i, k in enumerate(keys)}}


def max_batch_search(model, cfg, method: str, args, device, budget_gib: float, quiet: bool) -> dict:
    """Largest batch whose generate() at ``--budget-length`` stays within ``budget_gib``, and its speed.

    Peak memory (of the decode phase, or of the whole call with ``--budget-phase all``) is
    linear in the batch (weights + batch x per-sequence bytes), so two small runs (batch 1
    and 4; 2 when 4 runs out of memory, as a 70B model at 128K can) predict the largest batch.
    It is then run for real and stepped down while it exceeds the budget or runs out of memory,
    and the batch above the one found is run too (stepping up while that one fits), so the
    result is the largest batch that fits, not only one that fits: ``next_batch`` records what
    the next one measured (None: out of memory) and ``limited_by`` says which stopped it. Prefill
    as in the sweep (by default LeanK in one shot, so at large batches the prefill's activations,
    not the budget, can stop it; ``--leank-prefill-chunk`` avoids that).
    """
    import torch

    L, chunk = args.budget_length, prefill_chunk_for(method, args)
    key = "decode_peak_gib" if args.budget_phase == "decode" else "peak_gib"
    new_tokens = args.warmup + max(args.steps // 2, 8) + 1
    results: dict = {}  # batch -> run result (None: out of memory)

    def attempt(b: int):
        if b not in results:
            gen = torch.Generator().manual_seed(args.seed + b)
            ids = torch.randint(100, cfg.vocab_size, (b, L), generator=gen).to(device)
            res = oom_safe(run_generate, model, method, ids, new_tokens, device, chunk, args.synthetic_prefill)
            results[b] = ranks_agree(None if isinstance(res, str) else res, ("decode_peak_gib", "peak_gib"), device)
        return results[b]

    def fits(b: int) -> bool:
        r = attempt(b)
        return r is not None and r[key] <= budget_gib

    if attempt(1) is None:
        return {"method": method, "status": "OOM at batch 1", "length": L}
    probe = 4 if attempt(4) is not None else 2 if attempt(2) is not None else 1
    per_seq = (results[probe][key] - results[1][key]) / (probe - 1) if probe > 1 else None
    fixed = results[1][key] - per_seq if per_seq is not None else None
    predicted = max(1, int((budget_gib - fixed) / per_seq)) if per_seq else 1
    b = predicted
    for _ in range(6):  # down while it does not fit
        if fits(b) or b == 1:
            break
        b = max(1, b - max(1, b // 16))
    if not fits(b):
        return {"method": method, "status": "no batch fit", "length": L, "predicted_batch": predicted,
                "tried": _tried(results, key)}
    for _ in range(6):  # up while the next one fits too
        if not fits(b + 1):
            break
        b += 1
    nxt = results.get(b + 1)
    if nxt is not None and nxt[key] <= budget_gib:  # still fitting after six steps up: say so, do not claim a maximum
        return {"method": method, "status": "no maximum found (the batch kept fitting)", "length": L,
                "predicted_batch": predicted, "tried": _tried(results, key)}
    r = results[b]
    stats = step_stats(r["intervals_ms"], args.warmup, b)
    return {"method": method, "status": "ok", "budget_gib": budget_gib, "budget_phase": args.budget_phase,
            **({"synthetic_prefill": True} if args.synthetic_prefill else {}),
            "length": L, "predicted_batch": predicted, "max_batch": b, "decode_peak_gib": r["decode_peak_gib"],
            "prefill_peak_gib": r["prefill_peak_gib"], "kv_held_gib": r["kv_held_bytes"] / 2**30,
            "per_sequence_gib": per_seq, "fixed_gib": fixed, "tried": _tried(results, key),
            "next_batch": {"batch": b + 1, key: None if nxt is None else nxt[key]},
            "limited_by": "out of memory" if nxt is None else "budget", **stats}


def _tried(results: dict, key: str) -> list:
    """Every batch a max-batch search ran, in order, with its peak (None: out of memory)."""
    return [{"batch": b, key: None if r is None else r[key]} for b, r in results.items()]


# ----------------------------------------------------------------------------- output
def summary_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r.get("status") != "ok":
            out.append({"model": r["model"], "method": r["method"], "length": r["length"], "batch": r["batch"],
                        "status": r.get("status")})
            continue
        out.append({"model": r["model"], "method": r["method"], "length": r["length"], "batch": r["batch"],
                    "ms/token": r["latency_ms_median"], "mean ms": r["latency_ms_mean"], "tok/s": r["tokens_per_s"],
                    "floor ms": r.get("floor_ms"), "% of floor": r.get("pct_of_floor"),
                    "vs best dense": r.get("speedup"), "baseline": r.get("baseline"), "prefill s": r["prefill_s"],
                    "call extra ms": r.get("call_extra_ms"), "peak GiB": r.get("peak_gib"),
                    "KV GiB": (r["kv_held_bytes"] / 2**30) if "kv_held_bytes" in r else None,
                    "KV vs dense": r.get("kv_ratio"), "status": "ok"})
    return out


def multi_token_records(runs: list[dict], turns: list[dict], config: dict) -> list[dict]:
    """One record per multi-token measurement, LeanK against the dense dynamic cache of the same run.

    ``chunked_prefill`` (only when LeanK prefilled in chunks: ``leank_prefill_chunk`` > 0 and a prompt
    longer than one chunk): the prefill seconds of ``leank`` and ``dense-dynamic`` rows of the same model,
    length and batch.
    ``second_turn``: the seconds to the first token of the follow-up message. ``ratio`` =
    ``leank_s / dense_s`` (below 1: LeanK is faster). ``config`` is the run's resolved arguments
    (``vars(args)``, or the ``config`` of a written ``.config.json``).
    """
    records = []
    chunk = config.get("leank_prefill_chunk") or 0
    if chunk:
        ok = {(r["model"], r["method"], r["length"], r["batch"]): r for r in runs if r.get("status") == "ok"}
        for (model, method, length, batch), r in ok.items():
            dense = ok.get((model, "dense-dynamic", length, batch))
            if method == "leank" and dense is not None and length > chunk:  # one chunk is a one-shot prefill
                records.append({"measure": "chunked_prefill", "model": model, "length": length, "batch": batch,
                                "chunk": chunk, "dense_chunk": config.get("dense_prefill_chunk"),
                                "leank_s": r["prefill_s"], "dense_s": dense["prefill_s"],
                                "ratio": r["prefill_s"] / dense["prefill_s"]})
    done = {(t["model"], t["method"], t["length"], t["batch"]): t for t in turns if t.get("status") == "ok"}
    for (model, method, length, batch), t in done.items():
        dense = done.get((model, "dense-dynamic", length, batch))
        if method == "leank" and dense is not None:
            records.append({"measure": "second_turn", "model": model, "length": length, "batch": batch,
                            "followup": t["followup"], "leank_s": t["ttft_s"], "dense_s": dense["ttft_s"],
                            "ratio": t["ttft_s"] / dense["ttft_s"]})
    return records


def records_from(paths: Sequence[str], out: str | None) -> int:
    """``--records-from``: the multi-token records of runs written earlier, gathered into ``out``."""
    if out is None:
        raise SystemExit("--records-from: expected --out FILE for the records (no default: it would overwrite a run)")
    if any(Path(out).resolve() == Path(p).resolve() for p in paths):
        raise SystemExit(f"--out: expected a file other than the --records-from inputs, got {out}")
    records = []
    for path in paths:
        result = json.loads(Path(path).read_text())
        cfg_file = common.config_path_for(Path(path))  # kept beside it under its name (renamed when committed)
        if not cfg_file.is_file():
            raise SystemExit(f"--records-from: expected {cfg_file} beside {path} (written with it), not found")
        if "runs" not in result or "models" not in result:
            raise SystemExit(f"--records-from: expected an eval/e2e_decode.py result in {path}, got keys {sorted(result)}")
        config = json.loads(cfg_file.read_text())["config"]
        turns = [t for info in result["models"] for t in info.get("second_turn", [])]
        for r in multi_token_records(result["runs"], turns, config):
            records.append({**r, "device": result["device"], "source": Path(path).name})
    if not records:
        raise SystemExit(f"--records-from: no chunked-prefill or second-turn pair (leank and dense-dynamic) in {list(paths)}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    note = ("gathered by eval/e2e_decode.py --records-from from the runs named in each record's source "
            "(their .config.json beside them); nothing was re-measured")
    Path(out).write_text(json.dumps({"note": note, "records": records}, indent=2) + "\n")
    print(common.format_table(records, floatfmt=".3g"))
    print(f"wrote {out}")
    return 0


DERIVED = ("speedup", "speedup_vs_strongest_dense", "baseline", "kv_ratio", "speedup_vs_leank_dense")


def add_comparisons(rows: list[dict]) -> None:
    """Speedup of every method over the fastest dense method (``is_dense``) at the same model/length/batch,
    KV ratio, and over ``leank-dense`` when it ran (what the channel pruning itself gains, same machinery)."""
    by = {}
    for r in rows:  # derived fields are recomputed from scratch: a later, faster baseline replaces them all
        for k in DERIVED:
            r.pop(k, None)
        by.setdefault((r["model"], r["length"], r["batch"]), []).append(r)
    for group in by.values():
        own = [r for r in group if r["method"] == "leank-dense" and r.get("status") == "ok"]
        for r in group:  # LeanK rows only: what pruning gains on the same machinery
            if own and r.get("status") == "ok" and r["method"].startswith("leank"):
                r["speedup_vs_leank_dense"] = r["tokens_per_s"] / own[0]["tokens_per_s"]
        dense = [r for r in group if is_dense(r["method"]) and r.get("status") == "ok"]
        if not dense:
            continue
        best = max(dense, key=lambda r: r["tokens_per_s"])
        for r in group:
            if r.get("status") == "ok":
                r["speedup"] = r["tokens_per_s"] / best["tokens_per_s"]
                r["speedup_vs_strongest_dense"] = r["speedup"]
                r["baseline"] = best["method"]
                if "kv_held_bytes" in r and best.get("kv_held_bytes"):
                    r["kv_ratio"] = r["kv_held_bytes"] / best["kv_held_bytes"]


def plot(rows: list[dict], path: str, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written", file=sys.stderr)
        return None
    models = sorted({r["model"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(models), 2 * len(batches), figsize=(4.2 * 2 * len(batches), 3.4 * len(models)),
                             squeeze=False)
    for i, m in enumerate(models):
        for j, b in enumerate(batches):
            for method in sorted({r["method"] for r in rows}):
                pts = sorted((r["length"], r) for r in rows if r["model"] == m and r["batch"] == b
                             and r["method"] == method and r.get("status") == "ok")
                if not pts:
                    continue
                xs = [p[0] / 1024 for p in pts]
                axes[i][2 * j].plot(xs, [p[1]["tokens_per_s"] for p in pts], marker="o", label=method)
                if all("kv_held_bytes" in p[1] for p in pts):
                    line = axes[i][2 * j + 1].plot(xs, [p[1]["kv_held_bytes"] / 2**30 for p in pts], marker="o",
                                                   label=f"{method} KV")[0]
                    axes[i][2 * j + 1].plot(xs, [p[1]["peak_gib"] for p in pts], ls="--", color=line.get_color(),
                                            label=f"{method} peak")
            axes[i][2 * j].set_title(f"{m}, batch {b}: decode tokens/s")
            axes[i][2 * j + 1].set_title(f"{m}, batch {b}: KV held / peak GiB")
            for ax in axes[i][2 * j: 2 * j + 2]:
                ax.set_xscale("log", base=2)
                ax.set_xlabel("prompt length (K tokens)")
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main
def run_model(shape: str, args, device, dtype, attn: str, bar, budget_gib,
              checkpoint=None) -> tuple[list[dict], list[dict], dict]:
    """Every measurement of one model shape: ``(rows, max-batch records, info)``. ``checkpoint(rows,
    maxb, info)``, when given, is called after each measurement with what this model has so far."""
    import torch

    cfg = common.model_config(shape, layers=args.layers, tiny=args.tiny)
    family = common.MODEL_SHAPES[shape][1]
    if args.tp > 1:
        model = build_sharded_model(cfg, device, dtype, attn, args.tp, args.seed)
    else:
        model = common.build_model(cfg, device, dtype, attn)
    weight_bytes = local_weight_bytes(model)
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    mask, setups = method_setups(model, family, args, need_mask=any(m.startswith("leank") for m in args.methods))
    context = functools.partial(method_context, model, setups)  # context(method): patched as method needs

    info = {"model": shape, "tp": args.tp, "layers": cfg.num_hidden_layers, "weights_gib": weight_bytes / 2**30,
            "mask_k_sparsity": None if mask is None else 1 - mask.keep.float().mean().item(),
            "mask_v_sparsity": None if mask is None else mask.v_sparsity, "warmup_s": {},
            "leank_backend": _resolved_backend(args.backend, device), "methods": {m: METHOD_DOC[m] for m in args.methods}}
    rows, maxb, turns, specs = [], [], [], []
    info["second_turn"], info["speculative"] = turns, specs

    def saved():
        if checkpoint is not None:
            checkpoint(rows, maxb, info)

    try:
        for method in args.methods:  # warm-up (TileLang and torch.compile compile here), with a flush
            with context(method):
                ids = torch.randint(100, cfg.vocab_size, (1, min(2048, min(args.lengths))), device=device)
                t0 = time.perf_counter()
                run_generate(model, method, ids, args.flush_every + 2, device)
                info["warmup_s"][method] = time.perf_counter() - t0
                print(f"{shape} {method}: warm-up (compiles) {info['warmup_s'][method]:.1f} s", flush=True)
        for length in args.lengths:
            for batch in args.batches:
                for method in args.methods:
                    bar.set_postfix_str(f"{shape} {method} L={length} b={batch}")
                    with context(method):
                        row = sweep_one(model, cfg, method, length, batch, args, device, mask, weight_bytes, total_gib)
                    if method == "dense-static":
                        row["released_gib"] = release_compiled_state(device)
                    rows.append({"model": shape, **row})
                    bar.update(1)
                    print(_row_line(rows[-1]), flush=True)  # a run killed later still leaves its rows
                    saved()
        if args.second_turn:
            for length in args.lengths:
                for method in [m for m in ("dense-dynamic", "leank") if m in args.methods]:
                    with context(method):
                        r = oom_safe(second_turn, model, cfg, method, length, 1, args.second_turn, device, args.seed)
                    r = r if isinstance(r, dict) else {"method": method, "length": length, "batch": 1, "status": r}
                    turns.append({"model": shape, **r})
                    saved()
                    print(f"{shape} second turn {method} L={length} +{args.second_turn}: "
                          f"{r.get('ttft_s', float('nan')):.3f} s to the first new token ({r['status']})", flush=True)
        if args.speculative:
            for length in args.lengths:
                for method in [m for m in ("dense-dynamic", "leank") if m in args.methods]:
                    with context(method):
                        r = oom_safe(speculative, model, cfg, method, length, args.speculative,
                                     args.speculative_tokens, device, args.seed)
                    r = r if isinstance(r, dict) else {"method": method, "length": length, "batch": 1, "status": r}
                    specs.append({"model": shape, **r})
                    saved()
                    if r["status"] == "ok":
                        print(f"{shape} speculative {method} L={length} lookup {args.speculative}: "
                              f"{r['speculative_tokens_per_s']:.1f} tok/s vs {r['plain_tokens_per_s']:.1f} without "
                              f"({r['speculative_speedup']:.2f}x, same tokens: {r['same_tokens']})", flush=True)
                    else:
                        print(f"{shape} speculative {method} L={length}: {r['status']}", flush=True)
        if args.max_batch and budget_gib:
            for method in args.methods:
                bar.set_postfix_str(f"{shape} {method} max batch")
                with context(method):
                    maxb.append({"model": shape, "tp": args.tp,
                                 **max_batch_search(model, cfg, method, args, device, budget_gib, args.no_progress)})
                saved()
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, maxb, info


# ----------------------------------------------------------------------------- tensor parallel
def distributed_setup(args):
    """``(rank, world_size, device)``: the process group of a torchrun launch (NCCL on CUDA, gloo on CPU),
    or rank 0 of 1 on ``args.device`` without torchrun."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = common.resolve_device(args.device)
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def shard_tensor_parallel(model, tp: int):
    """``model`` sharded over ``tp`` ranks by transformers' own TP plan for its family (what
    ``from_pretrained(..., distributed_config=DistributedConfig(tp_size=tp))`` applies after loading)."""
    from transformers import PreTrainedModel
    from transformers.distributed import DistributedConfig

    if not (hasattr(PreTrainedModel, "prepare_distribute_model") and hasattr(PreTrainedModel, "maybe_distribute_model")):
        import transformers

        raise SystemExit(f"torchrun: transformers {transformers.__version__} has no PreTrainedModel."
                         "prepare_distribute_model / maybe_distribute_model (its tensor-parallel API; 5.17 and "
                         "5.24 have it, 5.13 does not)")
    cls = type(model)
    dist_config, _, mesh = cls.prepare_distribute_model(DistributedConfig(tp_size=tp))
    return cls.maybe_distribute_model(model, dist_config, mesh)


def build_sharded_model(cfg, device, dtype, attn: str, tp: int, seed: int):
    """This rank's shard of a random-weight model, never the whole model on one device.

    The model is built on the meta device, sharded by transformers' TP plan (``shard_tensor_parallel``,
    as ``from_pretrained`` does before it loads weights), then only the shards are allocated on
    ``device`` and initialised by the model's own ``init_weights`` from ``seed`` (replicated weights come
    out equal on every rank). So the Llama-3.1-70B widths at all 80 layers (131 GiB of bf16 weights)
    build on 2 x H200, where building the whole model per rank first could not. The rotary module is
    rebuilt on ``device``: its frequency buffers are not parameters and ``to_empty`` leaves them unset.
    """
    import torch

    model = shard_tensor_parallel(common.build_model(cfg, torch.device("meta"), dtype, attn), tp)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    probe = model.model.layers[0].self_attn.k_proj.weight
    local = probe.to_local() if hasattr(probe, "to_local") else probe
    if not (torch.isfinite(local).all() and local.float().std() > 0):
        raise SystemExit(f"--tp {tp}: init_weights left the sharded k_proj weight unset (transformers "
                         f"{__import__('transformers').__version__}); its initialisation changed")
    return model


def local_weight_bytes(model) -> int:
    """Bytes of the parameters this rank holds (a sharded DTensor counts its local shard)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def step_weight_bytes(model, batch: int) -> int:
    """Weight bytes one decode step reads on this rank: every parameter, except an input-embedding table
    that is not also the output head (one row per sequence is read, not the table)."""
    total = local_weight_bytes(model)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not emb:
        local = emb.to_local() if hasattr(emb, "to_local") else emb
        total -= (local.shape[0] - batch) * local[0].numel() * local.element_size()
    return total


def _row_line(r: dict) -> str:
    head = f"{r['model']} {r['method']} L={r['length']} b={r['batch']}:"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}"
    floor = f", floor {r['floor_ms']:.2f} ms ({r['pct_of_floor']:.0f}%)" if "floor_ms" in r else ""
    return (f"{head} {r['latency_ms_median']:.2f} ms/token, {r['tokens_per_s']:.1f} tok/s{floor}, "
            f"prefill {r['prefill_s']:.1f} s, the call's decode {r['call_extra_ms']:.0f} ms over its steady rate")


def _resolved_backend(backend: str, device) -> str:
    """The backend LeanK really uses for ``backend`` on ``device`` (what 'auto' becomes)."""
    try:
        from leank.attention import resolve_backend

        return resolve_backend(backend, device)
    except (ImportError, AttributeError, ValueError) as e:
        return f"{backend} (unresolved: {e})"


def assemble(rows: list[dict], maxb: list[dict], infos: list[dict], args, device, dtype, attn: str) -> dict:
    """The result JSON of the measurements so far: rows with their comparisons, max-batch records with
    their throughput gain, the summary table and the multi-token records."""
    import torch

    add_comparisons(rows)
    for m in maxb:  # throughput gain at the budget
        dense = [x for x in maxb if x["model"] == m["model"] and is_dense(x["method"]) and x["status"] == "ok"]
        if m.get("status") == "ok" and dense:
            best = max(dense, key=lambda x: x["tokens_per_s"])
            m["throughput_vs_best_dense"] = m["tokens_per_s"] / best["tokens_per_s"]
    turns = [t for info in infos for t in info["second_turn"]]
    return {"device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "copy_gbps": args.copy_gbps, "attn_implementation": attn, "dtype": str(dtype), "models": infos,
            "runs": rows, "max_batch": maxb, "table": summary_rows(rows), "tp": args.tp,
            "multi_token": multi_token_records(rows, turns, vars(args))}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.records_from:
        explicit = any(a == "--out" or a.startswith("--out=") for a in (sys.argv[1:] if argv is None else argv))
        return records_from(args.records_from, args.out if explicit else None)
    resolve_args(args)
    if "leank" in args.methods and (why := common.leank_available()):
        raise SystemExit(f"--methods leank: {why}")
    import torch

    common.allow_recompiles()
    if args.inductor_pdl:
        import torch._inductor.config as inductor_config

        if not hasattr(inductor_config.triton, "enable_pdl"):
            raise SystemExit(f"--inductor-pdl: torch {torch.__version__} has no torch._inductor.config.triton.enable_pdl")
        inductor_config.triton.enable_pdl = True
    if args.inductor_combo:
        import torch._inductor.config as inductor_config

        if not hasattr(inductor_config, "combo_kernels"):
            raise SystemExit(f"--inductor-combo: torch {torch.__version__} has no torch._inductor.config.combo_kernels")
        inductor_config.combo_kernels = True
    from leank import flush_kernel

    flush_kernel.ENABLED = args.flush_kernel
    apply_generate_args(args)
    if args.split_rule != "window" or args.pdl:  # kernel experiments: module knobs read when a plan / kernel is built
        from leank.tilelang_kernels import decode as _decode

        _decode.SPLIT_RULE = args.split_rule
        _decode.TILE_CONFIG = {"pdl": True} if args.pdl else None
    rank, args.tp, device = distributed_setup(args)
    if rank:  # every rank runs every row (collectives); rank 0 alone prints and writes
        sys.stdout = open(os.devnull, "w")
        args.no_progress = True
    dtype = common.resolve_dtype(args.dtype, device)
    attn = common.best_attention(args.attn)
    if args.backend is None:
        args.backend = "tilelang" if device.type == "cuda" else "reference"
    budget = args.budget_gib
    if device.type != "cuda" and args.max_batch:
        print("max-batch search needs CUDA memory counters: skipped on CPU", file=sys.stderr)
        args.max_batch = False
    torch.manual_seed(args.seed)
    args.copy_gbps = common.copy_bandwidth_gbps() if device.type == "cuda" else None
    total = len(args.models) * len(args.lengths) * len(args.batches) * len(args.methods)
    bar = common.progress(total=total, desc="e2e decode", disable=args.no_progress, unit="run")
    rows, maxb, infos = [], [], []
    resolved = {**vars(args), "device": str(device), "dtype": str(dtype), "attn": attn, "budget_gib": budget}

    def checkpoint(model_rows, model_maxb, info):  # rank 0: the JSON so far, so a run cut short keeps its rows
        if rank:
            return
        try:
            partial = assemble(rows + model_rows, maxb + model_maxb, infos + [info], args, device, dtype, attn)
            common.write_results(args.out, {**partial, "complete": False}, resolved)
        except Exception as e:  # noqa: BLE001 - a checkpoint must not end the measurements
            print(f"e2e_decode: could not write the partial results to {args.out}: {type(e).__name__}: {e}",
                  file=sys.stderr)

    for shape in args.models:
        r, m, info = run_model(shape, args, device, dtype, attn, bar, budget, checkpoint)
        rows += r
        maxb += m
        infos.append(info)
    bar.close()
    result = {**assemble(rows, maxb, infos, args, device, dtype, attn), "complete": True}
    table = result["table"]
    if rank:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return 0
    out, cfgp = common.write_results(args.out, result, resolved)
    png = plot(rows, args.plot, f"{result['device']}, {attn} vs LeanK ({args.backend}), random weights")
    print(common.format_table(table, floatfmt=".3g"))
    if maxb:
        print()
        print(common.format_table([{k: m.get(k) for k in ("model", "method", "status", "length", "max_batch",
                                                             "decode_peak_gib", "prefill_peak_gib", "kv_held_gib",
                                                             "tokens_per_s", "throughput_vs_best_dense")}
                                   for m in maxb], floatfmt=".3g"))
    if result["multi_token"]:
        print()
        print(common.format_table(result["multi_token"], floatfmt=".3g"))
    print(f"wrote {out}, {cfgp}" + (f", {png}" if png else ""))
    if args.tp > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
