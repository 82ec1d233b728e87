"""Where a decode step of ``generate()`` spends its time: GPU kernels by kind, GPU idle, host.

    python eval/decode_profile.py                         # Llama-3.1-8B shape, 32K, batch 1: leank vs dense-static
    python eval/decode_profile.py --methods leank --lengths 128K
    python eval/decode_profile.py --device cpu --tiny     # CPU smoke run of the code path
    torchrun --nproc-per-node 2 eval/decode_profile.py --methods leank,leank-dense --lengths 128K --batches 8
    python eval/decode_profile.py --methods leank --call-profile 64   # + host time of a later call, by function

For each method (the ones of ``eval/e2e_decode.py``) it runs one greedy ``generate`` and traces
``--steps`` decode steps after ``--warmup`` with ``torch.profiler``: a logits processor inside
the generate loop advances the profiler schedule, so exactly those steps are recorded (CUDA
graph replays included: CUPTI reports every kernel node of a replayed graph). Per decode step
it reports

- ``step_ms``: the time between two logits-processor calls (median, host clock; the
  processor synchronises the device so that each traced step holds exactly its own
  kernels, which also removes host/device overlap: ``eval/e2e_decode.py`` measures speed);
- ``gpu_busy_ms``: the union of kernel intervals, and ``gpu_idle_ms`` = step - busy (launch
  gaps, host work the GPU waits for);
- kernel time and kernel count by kind (``gemm``: cuBLAS/CUTLASS/nvjet matmuls,
  ``attention``: LeanK's TileLang split/combine or flash/cuDNN attention, ``norm-elementwise``:
  PyTorch elementwise and reduction kernels, ``triton``: kernels torch.compile generated,
  ``copy``: memcpy/memset/copy kernels, ``comm``: NCCL collectives, ``other``);
- the byte floor (weights read + K/V read) / copy bandwidth measured in the same run (the
  input-embedding table counts one row per sequence, not whole: ``e2e_decode.step_weight_bytes``).

It also lists the kernels that take the most time per step. With ``--call-profile N`` it then runs
one more call of N new tokens per method under ``cProfile``, from the first decode step to the
call's end, and lists the Python functions by self and cumulative host time (``call_profile``): what
every call after the first pays on the host (a new cache's first decode steps and flushes).
Writes JSON (and ``*.config.json``).

Under ``torchrun --nproc-per-node N`` the model is sharded by transformers' TP plan as in
``eval/e2e_decode.py`` (each rank builds only its shards); every rank runs the same generate
calls and rank 0 traces, prints and writes its own kernels: the rows carry ``tp``, and
``kv_bytes`` and the floor count one rank's bytes (for LeanK, per layer the archived bytes of the
rank whose heads keep the most channels, in the order ``leank.patch`` gave the heads; the window
counted at the same fraction).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `python eval/decode_profile.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import common  # noqa: E402
from eval import e2e_decode  # noqa: E402

KINDS = ("gemm", "attention", "norm-elementwise", "triton", "copy", "comm", "other")


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, from its (demangled) name."""
    n = name.lower()
    if "nccl" in n or "all_reduce" in n or "allreduce" in n:  # NCCL, PyTorch's symmetric-memory all-reduces
        return "comm"
    if n.startswith(("split", "combine")) or any(s in n for s in ("flash", "fmha", "attention", "cudnn")):
        return "attention"
    if n.startswith("triton"):
        return "triton"
    if any(s in n for s in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk")):
        return "gemm"
    if any(s in n for s in ("memcpy", "memset", "copy")):
        return "copy"
    if any(s in n for s in ("elementwise", "reduce", "vectorized", "unrolled", "index", "scatter", "gather", "cat")):
        return "norm-elementwise"
    return "other"


def busy_union(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``[start, end)`` intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


class ProfilerStepper:
    """Logits processor: host timestamp per generate step, and ``prof.step()`` to advance the schedule."""

    def __init__(self, prof, device):
        self.prof, self.device, self.marks = prof, device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":  # the step's kernels end before the next profiler step starts
            import torch

            torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter())
        self.prof.step()
        return scores


def profile_method(model, method: str, ids, args, device) -> dict:
    """One greedy generate with ``args.warmup`` untraced and ``args.steps`` traced decode steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import LogitsProcessorList

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # step 0 of the schedule is the prefill (the first logits-processor call comes after it)
    sched = schedule(wait=1 + args.warmup, warmup=1, active=args.steps, repeat=1)
    new_tokens = 1 + args.warmup + 1 + args.steps + 1
    kwargs = e2e_decode.generate_kwargs(model, method, ids, new_tokens, e2e_decode.prefill_chunk_for(method, args))
    with profile(activities=acts, schedule=sched) as prof:
        stepper = ProfilerStepper(prof, device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 logits_processor=LogitsProcessorList([stepper]), **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    del out
    first = 1 + args.warmup + 1  # marks[first] opens the first traced step
    steps_ms = [1e3 * (b - a) for a, b in zip(stepper.marks[first:first + args.steps],
                                              stepper.marks[first + 1:first + 1 + args.steps])]
    events = prof.events()
    # the profiler's own step annotations are not kernels; the traced steps are the ProfilerStep#N ranges
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("ProfilerStep")]
    traced = {e.name for e in events if e.name.startswith("ProfilerStep#") and e.device_type == torch.autograd.DeviceType.CPU}
    per_kind = {k: {"ms": 0.0, "count": 0} for k in KINDS}
    per_name: dict[str, list] = {}
    for e in gpu:
        dur = (e.time_range.end - e.time_range.start) / 1e3  # us -> ms
        kind = kernel_kind(e.name)
        per_kind[kind]["ms"] += dur
        per_kind[kind]["count"] += 1
        agg = per_name.setdefault(e.name, [kind, 0.0, 0])
        agg[1] += dur
        agg[2] += 1
    n = len(traced) or args.steps
    busy = busy_union([(e.time_range.start, e.time_range.end) for e in gpu]) / 1e3 / n
    step = statistics.median(steps_ms) if steps_ms else float("nan")
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:args.top]
    return {
        "method": method, "steps_traced": n, "step_ms_median": step, "step_ms_mean": statistics.fmean(steps_ms),
        "gpu_busy_ms": busy, "gpu_idle_ms": max(0.0, step - busy),
        "kernels_per_step": len(gpu) / n,
        **{f"{k}_ms": v["ms"] / n for k, v in per_kind.items()},
        **{f"{k}_count": v["count"] / n for k, v in per_kind.items()},
        "top_kernels": [{"name": name[:160], "kind": kind, "ms_per_step": ms / n, "per_step": cnt / n}
                        for name, (kind, ms, cnt) in top],
    }


class CallProfiler:
    """Logits processor: starts ``cProfile`` at its first call (the prefill has run) and marks each step on
    the host clock, without synchronising (what a user's call does)."""

    def __init__(self):
        import cProfile

        self.prof, self.marks = cProfile.Profile(), []

    def __call__(self, input_ids, scores):
        if not self.marks:
            self.prof.enable()
        self.marks.append(time.perf_counter())
        return scores


def _function_name(key: tuple) -> str:
    """``pstats`` key ``(file, line, function)`` as ``path/tail.py:line(function)`` (built-ins: ``{name}``)."""
    path, line, func = key
    if path == "~":
        return func
    return f"{'/'.join(Path(path).parts[-2:])}:{line}({func})"


def profile_call(model, method: str, ids, args, device) -> dict:
    """Host time of one more ``generate`` call's decode (``args.call_profile`` new tokens), by Python function.

    The method has run a call before (compiled, kernels loaded), so this is what every later call pays:
    the first decode steps of a new cache (LeanK: run unrecorded, then recorded in a CUDA graph), the
    first flushes, the steady steps. ``cProfile`` runs from the first decode step to the call's end and
    slows Python down (the steps' own times are in ``step_ms`` of the other measurements); the
    functions' shares show where the host time of a call's first steps goes."""
    import pstats

    import torch
    from transformers import LogitsProcessorList

    kwargs = e2e_decode.generate_kwargs(model, method, ids, args.call_profile,
                                        e2e_decode.prefill_chunk_for(method, args))
    prof = CallProfiler()
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 logits_processor=LogitsProcessorList([prof]), **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        prof.prof.disable()
        end = time.perf_counter()
    del out
    # {(file, line, function): (primitive calls, calls, self s, cumulative s, callers)}
    stats = pstats.Stats(prof.prof).stats

    def top(index: int) -> list:
        rows = sorted(stats.items(), key=lambda kv: -kv[1][index])[:args.top]
        return [{"function": _function_name(k), "calls": v[1], "self_ms": 1e3 * v[2], "cum_ms": 1e3 * v[3]}
                for k, v in rows]

    marks = prof.marks + [end]
    return {"new_tokens": args.call_profile, "decode_s": end - prof.marks[0] if prof.marks else 0.0,
            "step_ms": [1e3 * (b - a) for a, b in zip(marks, marks[1:])],  # the last: to the call's end
            "top_self": top(2), "top_cumulative": top(3)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/decode_profile.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="llama3.1-8b", choices=list(common.MODEL_SHAPES), help="model shape (default: %(default)s)")
    p.add_argument("--lengths", type=common.int_list, default=[32768], help="prompt lengths, K suffix allowed (default: 32K)")
    p.add_argument("--batches", type=common.int_list, default=[1], help="batch sizes (default: 1)")
    p.add_argument("--methods", type=common.str_list, default=["leank", "dense-static"],
                   help=f"subset of {list(e2e_decode.METHODS + e2e_decode.EXTRA_METHODS)} (default: leank,dense-static)")
    p.add_argument("--layers", type=int, default=None, help="use only this many decoder layers (default: all)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny widths, 96-token prompt, small window")
    p.add_argument("--warmup", type=int, default=6, help="untraced decode steps first (default: %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="traced decode steps (default: %(default)s)")
    p.add_argument("--top", type=int, default=25, help="kernels listed per method (default: %(default)s)")
    e2e_decode.add_generate_args(p)
    p.add_argument("--attn", default="auto", help="dense attention (default: auto = flash_attention_2 if importable, else sdpa)")
    p.add_argument("--call-profile", type=int, default=0, metavar="N",
                   help="after tracing, one more generate call of N new tokens per method under cProfile, from its "
                        "first decode step to its end: host time by Python function of what every call after the "
                        "first pays (a new cache's first steps and flushes; JSON field call_profile; default: off)")
    common.add_common_args(p, default_out=common.scratch_out("decode_profile.json"))
    common.add_leank_args(p)
    p.set_defaults(backend=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [m for m in args.methods if m not in e2e_decode.METHODS + e2e_decode.EXTRA_METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; expected a subset of "
                         f"{list(e2e_decode.METHODS + e2e_decode.EXTRA_METHODS)}")
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit(f"--steps and --warmup: expected >= 1, got {args.steps} and {args.warmup}")
    if args.call_profile < 0:
        raise SystemExit(f"--call-profile: expected 0 (off) or a number of new tokens >= 1, got {args.call_profile}")
    import torch

    common.allow_recompiles()
    e2e_decode.apply_generate_args(args)
    rank, tp, device = e2e_decode.distributed_setup(args)
    if rank:  # every rank runs every generate call (collectives); rank 0 alone prints and writes
        sys.stdout = open(os.devnull, "w")
    dtype = common.resolve_dtype(args.dtype, device)
    attn = common.best_attention(args.attn)
    if args.backend is None:
        args.backend = "tilelang" if device.type == "cuda" else "reference"
    if args.tiny:
        args.lengths, args.sink, args.recent, args.flush_every = [96], 8, 16, 4
    cfg = common.model_config(args.model, layers=args.layers, tiny=args.tiny)
    family = common.MODEL_SHAPES[args.model][1]
    if tp > 1:
        model = e2e_decode.build_sharded_model(cfg, device, dtype, attn, tp, args.seed)
    else:
        model = common.build_model(cfg, device, dtype, attn)
    weight_bytes = e2e_decode.local_weight_bytes(model)  # this rank's
    copy_gbps = common.copy_bandwidth_gbps() if device.type == "cuda" else None
    mask, setups = e2e_decode.method_setups(model, family, args)
    rows = []
    for length in args.lengths:
        for batch in args.batches:
            gen = torch.Generator().manual_seed(args.seed + length + batch)
            ids = torch.randint(100, cfg.vocab_size, (batch, length), generator=gen).to(device)
            for method in args.methods:
                with e2e_decode.method_context(model, setups, method):
                    row = {"model": args.model, "tp": tp, "length": length, "batch": batch,
                           **profile_method(model, method, ids, args, device)}
                    if args.call_profile:
                        row["call_profile"] = profile_call(model, method, ids, args, device)
                    order = getattr(getattr(model, "_leank", None), "head_order", None)  # TP: heads as balanced
                mid = length + args.warmup + args.steps
                # per layer the rank with the most K/V (every layer's all-reduce waits for it); one rank: all heads
                row["kv_bytes"] = int(batch * mid * e2e_decode.kv_bytes_per_token(cfg, dtype.itemsize)
                                      * e2e_decode.slowest_rank_fraction(method, mask, tp, order) / tp)
                if copy_gbps:
                    read = e2e_decode.step_weight_bytes(model, batch)
                    row["floor_ms"] = (read + row["kv_bytes"]) / (copy_gbps * 1e9) * 1e3
                rows.append(row)
                print(f"{args.model} {method} L={length} b={batch}: step {row['step_ms_median']:.2f} ms, "
                      f"GPU busy {row['gpu_busy_ms']:.2f} ms, {row['kernels_per_step']:.0f} kernels/step"
                      + (f", floor {row['floor_ms']:.2f} ms" if copy_gbps else ""), flush=True)
                for k in row["top_kernels"]:
                    print(f"    {k['ms_per_step']:7.3f} ms  x{k['per_step']:<5.0f} {k['kind']:<16} {k['name'][:100]}")
                if "call_profile" in row:
                    cp = row["call_profile"]
                    print(f"  host profile of a {cp['new_tokens']}-token call's decode: {1e3 * cp['decode_s']:.1f} ms, "
                          f"steps (ms) {[round(x, 1) for x in cp['step_ms'][:6]]}...; by self time:")
                    for f in cp["top_self"][:12]:
                        print(f"    {f['self_ms']:8.2f} ms self {f['cum_ms']:8.2f} ms cum  x{f['calls']:<6} "
                              f"{f['function'][:100]}")
    cols = ["method", "tp", "length", "batch", "step_ms_median", "gpu_busy_ms", "gpu_idle_ms", "floor_ms",
            "kernels_per_step"] + [f"{k}_ms" for k in KINDS]
    print(common.format_table([{c: r.get(c) for c in cols} for r in rows], floatfmt=".3g"))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "copy_gbps": copy_gbps, "weight_bytes": weight_bytes, "attn_implementation": attn,
              "dtype": str(dtype), "tp": tp, "defer_stop": args.defer_stop, "rope_append": args.rope_append,
              "gemv": args.gemv, "gemv_max_batch": args.gemv_max_batch,
              "methods": {m: e2e_decode.METHOD_DOC[m] for m in args.methods}, "runs": rows}
    if rank == 0:
        out, cfgp = common.write_results(args.out, result, {**vars(args), "device": str(device), "dtype": str(dtype)})
        print(f"wrote {out}, {cfgp}")
    if tp > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0



if __name__ == "__main__":
    sys.exit(main())
