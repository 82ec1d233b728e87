"""Bytes held by the LeanK cache vs a dense cache, after prefill and after N decode steps, per layer.

    python eval/memory.py                              # GPU: Llama-3.1-8B and Qwen2.5-7B shapes, 8K and 32K
    python eval/memory.py --device cpu --tiny          # CPU smoke run

For each model shape and prompt length, the prompt is prefilled with ``generate``
(1 new token) and then continued for ``--steps`` tokens by a second ``generate`` on the
returned cache, once unpatched (transformers' DynamicCache, which holds exactly the
tokens) and once after ``leank.patch`` with the published kept-count mix. At both points:

- measured: the bytes of the cache's tensors, found by walking the cache object (storages
  counted once; K = ``keys``/``win_k`` tensors, V = ``values``/``win_v``), and on CUDA the
  allocator's ``memory_allocated`` delta while the cache is alive and the
  ``max_memory_allocated`` peak of each phase;
- reported: ``past_key_values.memory_report()`` (LeanK: used and allocated bytes, per layer).

Checks (printed PASS/FAIL, exit status 1 on a FAIL): the tensor walk equals the report's
allocated bytes per layer; on CUDA, every walked storage is an allocator block, and both
the allocator delta (taken after a warm-up generate, so process-lifetime workspaces are
not counted) and the bytes released when the cache is deleted equal the sizes of those
blocks, so the cache holds nothing the walk missed. Blocks exceed tensors by the
allocator's rounding (up to 1 MiB for an odd-sized large buffer), shown per run. Writes JSON and ``*.config.json``.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `python eval/memory.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import common  # noqa: E402

K_NAMES = ("keys", "win_k", "key_cache")
V_NAMES = ("values", "win_v", "value_cache")
# --tiny: both shapes, prefill + decode past several flushes, in seconds on a CPU
TINY_SIZES = dict(lengths=[128], steps=12, sink=8, recent=16, flush_every=4)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/memory.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", type=common.str_list, default=list(common.DEFAULT_SHAPES),
                   help=f"model shapes from {list(common.MODEL_SHAPES)} (default: {','.join(common.DEFAULT_SHAPES)})")
    p.add_argument("--lengths", type=common.int_list, default=[8192, 32768], help="prompt lengths (default: 8K,32K)")
    p.add_argument("--batch", type=int, default=1, help="sequences (default: %(default)s)")
    p.add_argument("--steps", type=int, default=128, help="decode steps after the prefill (default: %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="use only this many decoder layers (default: all)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke test: tiny widths (2 layers, head_dim 128) and, for options left at their "
                        f"defaults, {TINY_SIZES}")
    p.add_argument("--attn", default="auto", help="dense attention (default: auto)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="relative tolerance of the byte checks, plus 64 KiB per layer of allocator rounding "
                        "(default: %(default)s)")
    common.add_common_args(p, default_out=common.scratch_out("e2e_memory.json"))
    common.add_leank_args(p)
    return p


# ----------------------------------------------------------------------------- measuring
def tensor_bytes(obj, device=None, depth: int = 4, _seen: set | None = None, _path: str = "") -> dict:
    """Bytes of the tensors reachable from ``obj`` (attributes, lists, dicts), by kind.

    Returns ``{"k": int, "v": int, "other": int}``; each storage is counted once, with its
    full size (spare capacity included). Only tensors on ``device`` count when it is given.
    """
    import torch

    seen = set() if _seen is None else _seen
    out = {"k": 0, "v": 0, "other": 0}

    def add(sub: dict) -> None:
        for k in out:
            out[k] += sub[k]

    if isinstance(obj, torch.Tensor):
        if device is not None and not _same_device(obj.device, device):
            return out
        st = obj.untyped_storage()
        key = (st.data_ptr(), obj.device)
        if key in seen or st.nbytes() == 0:
            return out
        seen.add(key)
        leaf = _path.rsplit(".", 1)[-1].split("[")[0]
        kind = "k" if leaf in K_NAMES else "v" if leaf in V_NAMES else "other"
        out[kind] += st.nbytes()
        return out
    if depth < 0:
        return out
    if isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            add(tensor_bytes(x, device, depth - 1, seen, f"{_path}[{i}]" if _path else f"[{i}]"))
    elif isinstance(obj, dict):
        for k, x in obj.items():
            add(tensor_bytes(x, device, depth - 1, seen, f"{_path}.{k}"))
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for k, x in vars(obj).items():
            if k in ("keep", "mask", "config"):  # mask metadata lives on the host, not cache storage
                continue
            add(tensor_bytes(x, device, depth - 1, seen, f"{_path}.{k}" if _path else k))
    return out


def _same_device(a, b) -> bool:
    """``cuda:0`` matches ``cuda`` (no index = any index of that type)."""
    return a.type == b.type and (b.index is None or a.index is None or a.index == b.index)


def measure(cache, device) -> dict:
    """Tensor-walk bytes of a cache, in total and per layer (``cache.layers``); on CUDA also
    ``block_bytes``: the caching allocator's blocks under those storages (its rounding included)."""
    seen: set = set()
    layers = [tensor_bytes(layer, device, _seen=seen) for layer in getattr(cache, "layers", [])]
    tot = {k: sum(layer[k] for layer in layers) for k in ("k", "v", "other")}
    res = {"k_bytes": tot["k"], "v_bytes": tot["v"], "other_bytes": tot["other"],
           "total_bytes": tot["k"] + tot["v"] + tot["other"], "layers": layers}
    if device.type == "cuda":
        res["block_bytes"], res["storages_without_block"] = allocator_blocks([p for p, _ in seen], device)
    return res


def allocator_blocks(ptrs, device) -> tuple[int, int]:
    """(sum of the sizes of the allocator blocks starting at ``ptrs``, how many had none).

    A block can exceed its tensor: requests are rounded to 512 bytes, and a large segment is
    not split when the remainder would be under 1 MiB, so an odd-sized buffer may occupy up
    to 1 MiB more than it asked for. ``memory_allocated`` counts blocks, not requests.
    """
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    sizes = {}
    for seg in torch.cuda.memory_snapshot():
        if seg.get("device", index) != index:
            continue
        for blk in seg["blocks"]:
            if blk["state"] == "active_allocated":
                sizes[blk["address"]] = blk["size"]
    return sum(sizes.get(p, 0) for p in ptrs), sum(p not in sizes for p in ptrs)


def generate(model, ids, attention, new_tokens: int, cache=None):
    import torch

    from leank.patching import cache_kwarg, output_cache

    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=attention, **{cache_kwarg(model): cache},
                             max_new_tokens=new_tokens, do_sample=False, temperature=None,
                             top_p=None, top_k=None, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, output_cache(out)


def phase(model, ids, new_tokens: int, device, cache=None, prior: int = 0) -> tuple:
    """One generate call; returns (sequences, cache, {allocated delta, peak delta}) with the cache alive.

    ``prior``: bytes the allocator attributed to ``cache`` before this call (0 for a new cache).
    """
    import torch

    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    seqs, cache = generate(model, ids, torch.ones_like(ids), new_tokens, cache)
    info = {}
    if cuda:
        torch.cuda.synchronize(device)
        gc.collect()
        # bytes now held by the cache = what it held before + the growth seen by the allocator
        info["allocated_delta_bytes"] = prior + torch.cuda.memory_allocated(device) - base - seqs.nbytes
        info["peak_delta_bytes"] = torch.cuda.max_memory_allocated(device) - base
    return seqs, cache, info


def run_method(model, method: str, length: int, args, device, cfg) -> dict:
    """Prefill + ``--steps`` decode steps; measurements after each."""
    import torch

    gen = torch.Generator().manual_seed(args.seed + length)
    ids = torch.randint(100, cfg.vocab_size, (args.batch, length), generator=gen).to(device)
    seqs, cache, after_prefill = phase(model, ids, 1, device)
    res = {"after_prefill": {**after_prefill, "measured": measure(cache, device)}}
    if hasattr(cache, "memory_report"):
        res["after_prefill"]["report"] = cache.memory_report()
    seqs, cache, after_decode = phase(model, seqs, args.steps, device, cache,
                                      after_prefill.get("allocated_delta_bytes", 0))
    res["after_decode"] = {**after_decode, "measured": measure(cache, device)}
    if hasattr(cache, "memory_report"):
        res["after_decode"]["report"] = cache.memory_report()
    res["tokens_per_sequence"] = int(seqs.shape[1]) - 1  # the last sampled token is not in the cache yet
    del seqs
    if device.type == "cuda":  # what dropping the cache gives back: the most direct reading of what it held
        gc.collect()
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device)
        del cache
        gc.collect()
        torch.cuda.synchronize(device)
        res["after_decode"]["released_bytes"] = held - torch.cuda.memory_allocated(device)
    else:
        del cache
    gc.collect()
    return res


def warm_up(model, cfg, args, device) -> None:
    """One short generate that crosses a flush, so that workspaces kept for the process's life
    (cuBLAS, LeanK decode plans) exist before any allocator reading."""
    import torch

    ids = torch.randint(100, cfg.vocab_size, (args.batch, 2048), device=device)
    generate(model, ids, torch.ones_like(ids), args.flush_every + 2)
    gc.collect()


# ----------------------------------------------------------------------------- checks
def close(a: float, b: float, rel: float, slack: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b)) + slack


def checks(result: dict, method: str, num_layers: int, tol: float) -> list[dict]:
    """PASS/FAIL rows: tensor walk vs report (per layer), allocator vs tensor walk (total)."""
    rows = []
    for when in ("after_prefill", "after_decode"):
        r = result[when]
        m = r["measured"]
        rep_layers = r.get("report", {}).get("layers") or []
        if rep_layers and "allocated_bytes" in rep_layers[0]:
            # the walk also counts small index tensors (lengths, head/channel tables): 4 KiB slack
            bad = [i for i, (w, rep) in enumerate(zip(m["layers"], rep_layers))
                   if not close(w["k"] + w["v"] + w["other"], rep["allocated_bytes"], tol, 4096)]
            rows.append({"method": method, "when": when, "check": "tensor walk == report allocated (per layer)",
                         "ok": not bad, "detail": f"layers off: {bad[:8]}" if bad else f"{num_layers} layers"})
        if "block_bytes" in m:  # every storage found by the walk sits in an allocator block of its own
            rows.append({"method": method, "when": when, "check": "walked storages are allocator blocks",
                         "ok": m["storages_without_block"] == 0,
                         "detail": f"{m['storages_without_block']} without a block; rounding "
                                   f"{(m['block_bytes'] - m['total_bytes']) / 2**20:.2f} MiB"})
        for name, label in (("allocated_delta_bytes", "allocator delta"), ("released_bytes", "released on delete")):
            if name in r and "block_bytes" in m:  # the cache holds nothing the walk missed
                ok = close(r[name], m["block_bytes"], tol, 4096 * num_layers)
                rows.append({"method": method, "when": when, "check": f"{label} == blocks of walked tensors",
                             "ok": ok, "detail": f"{r[name] / 2**20:.2f} vs {m['block_bytes'] / 2**20:.2f} MiB"})
    return rows


def summary(shape: str, length: int, runs: dict) -> list[dict]:
    rows = []
    dense = runs.get("dense")
    for when in ("after_prefill", "after_decode"):
        for method, r in runs.items():
            m = r[when]["measured"]
            row = {"model": shape, "length": length, "when": when, "method": method,
                   "K MiB": m["k_bytes"] / 2**20, "V MiB": m["v_bytes"] / 2**20,
                   "alloc delta MiB": r[when].get("allocated_delta_bytes", 0) / 2**20 or None,
                   "blocks MiB": m.get("block_bytes", 0) / 2**20 or None,
                   "peak delta MiB": r[when].get("peak_delta_bytes", 0) / 2**20 or None}
            if dense is not None and method != "dense":
                d = dense[when]["measured"]
                row["K saved"] = 1 - m["k_bytes"] / d["k_bytes"]
                row["V saved"] = 1 - m["v_bytes"] / d["v_bytes"]
            rep = r[when].get("report")
            if rep and rep.get("dense_k_bytes"):
                row["K saved (report, used)"] = 1 - rep["k_bytes"] / rep["dense_k_bytes"]
                row["V saved (report, used)"] = 1 - rep["v_bytes"] / rep["dense_v_bytes"]
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny:
        common.apply_smoke_sizes(args, parser, TINY_SIZES)
    if (why := common.leank_available()):
        raise SystemExit(f"eval/memory.py needs leank: {why}")
    import torch

    import leank

    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    attn = common.best_attention(args.attn)
    lcfg = leank.LeanKConfig(sink=args.sink, recent=args.recent, flush_every=args.flush_every, backend=args.backend)
    torch.manual_seed(args.seed)
    all_rows, all_checks, results = [], [], {}
    bar = common.progress(total=len(args.models) * len(args.lengths) * 2, desc="memory", disable=args.no_progress,
                          unit="run")
    for shape in args.models:
        cfg = common.model_config(shape, layers=args.layers, tiny=args.tiny)
        model = common.build_model(cfg, device, dtype, attn)
        mask = common.build_mask(args.mask if args.mask != "mix" else f"mix:{common.MODEL_SHAPES[shape][1]}", model,
                                 args.seed)
        if device.type == "cuda":
            warm_up(model, cfg, args, device)
            with common.patched(model, mask, lcfg):
                warm_up(model, cfg, args, device)
        for length in args.lengths:
            runs = {}
            bar.set_postfix_str(f"{shape} L={length} dense")
            runs["dense"] = run_method(model, "dense", length, args, device, cfg)
            bar.update(1)
            bar.set_postfix_str(f"{shape} L={length} leank")
            with common.patched(model, mask, lcfg):
                runs["leank"] = run_method(model, "leank", length, args, device, cfg)
            bar.update(1)
            results[f"{shape}/{length}"] = runs
            all_rows += summary(shape, length, runs)
            for method, r in runs.items():
                all_checks += [{"model": shape, "length": length, **c}
                               for c in checks(r, method, cfg.num_hidden_layers, args.tolerance)]
        mask_info = {"k_sparsity": 1 - mask.keep.float().mean().item(), "v_sparsity": mask.v_sparsity}
        results[f"{shape}/mask"] = mask_info
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "runs": results, "table": all_rows, "checks": all_checks}
    resolved = {**vars(args), "device": str(device), "dtype": str(dtype), "attn": attn, "leank_config": lcfg}
    out, cfgp = common.write_results(args.out, result, resolved)
    print(common.format_table(all_rows, floatfmt=".3f"))
    print()
    print(common.format_table([{**c, "ok": "PASS" if c["ok"] else "FAIL"} for c in all_checks]))
    print(f"wrote {out}, {cfgp}")
    return 0 if all(c["ok"] for c in all_checks) else 1


if __name__ == "__main__":
    sys.exit(main())
