"""What one decode step's all-reduces cost under tensor parallelism, with nothing else running.

A TP decode step of a Llama-shaped model all-reduces ``batch x hidden`` activations twice per
layer (after ``o_proj`` and after ``down_proj``: transformers' rowwise TP plan). This script
times exactly that message on its own, so a profile's all-reduce time can be split into the
collective itself and the wait for the slower rank:

- ``nccl`` (``gloo`` on CPU): ``torch.distributed.all_reduce`` (what transformers' TP plan calls), ``--calls``
  back to back, recorded in one CUDA graph and replayed (as LeanK's captured decode step
  replays them); on CPU (gloo) timed eagerly.
- ``one_shot``: PyTorch's symmetric-memory one-shot all-reduce
  (``torch.ops.symm_mem.one_shot_all_reduce``: every rank reads every peer's buffer over
  NVLink, no NCCL), where this PyTorch and machine have it; the row says why not otherwise.
  It is a measurement of what a lighter collective would save, not a path LeanK uses.

Run under torchrun, one process per GPU::

    torchrun --standalone --nproc-per-node 2 eval/allreduce_latency.py --out eval/results/allreduce_h200x2.json

Prints a table (µs per all-reduce, median over ``--repeats`` replays; the step's total for
``2 x layers`` of them) and writes JSON plus ``*.config.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval import common


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, common.scratch_out("allreduce_latency.json"))
    p.add_argument("--hidden", type=common.int_list, default=[4096, 8192],
                   help="hidden sizes (Llama-3.1-8B: 4096, 70B: 8192) (default: 4096,8192)")
    p.add_argument("--batches", type=common.int_list, default=[1, 4, 8, 16], help="batch sizes (default: 1,4,8,16)")
    p.add_argument("--calls", type=int, default=64,
                   help="all-reduces per replay: a decode step's (2 per layer; 8B: 64) (default: %(default)s)")
    p.add_argument("--layers", type=int, default=32, help="layers of the step total column (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=50, help="timed replays per row (default: %(default)s)")
    return p


def _timed(fn, repeats: int, device) -> list[float]:
    """Wall times in ms of ``repeats`` calls of ``fn`` (synchronised; every rank in step by a barrier)."""
    import torch
    import torch.distributed as dist

    out = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _replayer(body, calls: int, device):
    """``body`` called ``calls`` times, recorded in one CUDA graph on CUDA (returns the replay), eager on CPU."""
    import torch

    def eager():
        for _ in range(calls):
            body()

    if device.type != "cuda":
        return eager
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        eager()  # warm-up outside the graph (NCCL communicator set-up)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager()
    return graph.replay


def one_shot_body(x, group):
    """``(body, result)``: a body running PyTorch's symmetric-memory one-shot all-reduce of ``x`` (copied into a
    symmetric buffer) and a function returning its sum, or ``(reason, None)`` where there is none here."""
    import torch

    try:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device)
        symm_mem.rendezvous(buf, group.group_name)
        op = torch.ops.symm_mem.one_shot_all_reduce
    except Exception as e:  # noqa: BLE001 - any failure means: not available here, and the row says why
        return f"unavailable: {type(e).__name__}: {e}"[:300], None
    buf.copy_(x)
    name = group.group_name
    return (lambda: op(buf, "sum", name)), (lambda: op(buf, "sum", name))


def in_place_body(x):
    """``(body, result)`` for ``torch.distributed.all_reduce`` (what transformers' rowwise TP plan calls) on ``x``."""
    import torch.distributed as dist

    def result():
        y = x.clone()
        dist.all_reduce(y)
        return y

    return (lambda: dist.all_reduce(x)), result


def measure(hidden: int, batch: int, args, device, dtype) -> list[dict]:
    """Rows for one message size: ``{collective, hidden, batch, bytes, us_per_call, step_ms, status}``.

    Each collective is first checked: rank r contributes ``r + 1`` everywhere, and the result must be
    ``world (world + 1) / 2`` everywhere (a collective that does not sum is not timed). The timed calls
    then reduce zeros, so back-to-back replays stay finite."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    probe = torch.full((batch, hidden), float(rank + 1), device=device, dtype=dtype)
    expected = world * (world + 1) / 2
    x = torch.zeros(batch, hidden, device=device, dtype=dtype)
    collectives = {dist.get_backend(): in_place_body}  # nccl on CUDA, gloo on CPU
    if device.type == "cuda":
        collectives["one_shot"] = lambda t: one_shot_body(t, dist.group.WORLD)
    rows = []
    for name, make in collectives.items():
        row = {"collective": name, "hidden": hidden, "batch": batch, "bytes": x.numel() * x.element_size(),
               "calls": args.calls}
        try:
            body, result = make(probe)
            if result is None:  # body is the reason
                rows.append({**row, "status": body})
                continue
            got = result()
            if not bool((got == expected).all()):
                rows.append({**row, "status": f"wrong sum: expected {expected} everywhere, got values in "
                                              f"[{got.min().item()}, {got.max().item()}]"})
                continue
            body, _ = make(x)
            replay = _replayer(body, args.calls, device)
            replay()
            ms = _timed(replay, args.repeats, device)
        except Exception as e:  # noqa: BLE001 - a collective this machine cannot run or capture: recorded, not fatal
            rows.append({**row, "status": f"failed: {type(e).__name__}: {e}"[:300]})
            continue
        per_call_us = 1e3 * statistics.median(ms) / args.calls
        rows.append({**row, "status": "ok", "us_per_call": per_call_us,
                     "step_ms": 2 * args.layers * per_call_us / 1e3})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.calls < 1 or args.repeats < 1 or args.layers < 1:
        raise SystemExit(f"--calls, --repeats and --layers: expected >= 1, got {args.calls}, {args.repeats}, "
                         f"{args.layers}")
    import torch.distributed as dist

    from eval import e2e_decode

    rank, world, device = e2e_decode.distributed_setup(args)
    if not dist.is_initialized():  # one process: a group of one, so the same code path runs (a test, a smoke run)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if rank:
        sys.stdout = open(os.devnull, "w")
    dtype = common.resolve_dtype(args.dtype, device)
    rows = []
    sizes = [(h, b) for h in args.hidden for b in args.batches]
    for hidden, batch in common.progress(sizes, disable=args.no_progress or rank != 0, desc="message sizes"):
        rows += measure(hidden, batch, args, device, dtype)
    print(common.format_table(rows, ["collective", "hidden", "batch", "bytes", "us_per_call", "step_ms", "status"]))
    if rank == 0:
        res, cfg = common.write_results(args.out, {"world_size": world, "device": str(device), "rows": rows},
                                        {**vars(args), "dtype": str(dtype)})
        print(f"wrote {res}, {cfg}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
