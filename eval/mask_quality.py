"""Held-out retrieval accuracy of learned masks vs RoPE-frequency and random masks.

On the project's tiny model (``leank/data/tiny-llama``, trained by
``eval/train_tiny_model.py``), for each target sparsity compares

* full cache (plain transformers ``generate``),
* the learned mask (``leank train`` output),
* the RoPE-frequency mask and a random mask with the *same total kept channels and align*
  (kept counts spread as evenly as ``align`` allows over the heads),

on held-out samples (a data seed never used in training) of the multi-key and multi-value
tasks at several context lengths. Masked models decode through ``leank.patch`` (exact
prefill, sink + recent window at full K, archive with pruned K; ``--engine patch``) or,
when the library patch is unavailable, through the training attention with the same
semantics (``--engine train-attention``). Also reports K and V bytes saved.

    python eval/mask_quality.py --mask 0.5=leank/data/tiny-llama/mask-k50.safetensors \\
        --mask 0.7=leank/data/tiny-llama/mask-k70.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import common  # noqa: E402
from leank.baselines import same_budget_baselines  # noqa: E402
from leank.config import LeanKConfig  # noqa: E402
from leank.masks import ChannelMask  # noqa: E402
from leank.train.data import RetrievalTask, decode_words, score  # noqa: E402
from leank.window import WindowPolicy  # noqa: E402

SCRATCH = Path(__file__).resolve().parents[1] / "runs"  # git-ignored; committed results live in eval/results/
TASK_NAMES = ("multikey", "multivalue")


def baselines(learned: ChannelMask, seed: int) -> dict[str, ChannelMask]:
    """RoPE-frequency and random masks with the learned mask's total kept channels and align."""
    return same_budget_baselines(learned, seed)


@torch.no_grad()
def accuracy(model, tok, samples, gen_fn, batch: int) -> float:
    ok = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        prompt = torch.stack([s.input_ids[:s.prompt_len] for s in chunk]).to(model.device)
        gen = gen_fn(prompt)
        for s, g in zip(chunk, gen.tolist()):
            ok += score(s.task, s.answer, decode_words(tok, g))
    return ok / len(samples)


def make_gen(model, tok, mask: ChannelMask | None, window: LeanKConfig, engine: str, max_new: int = 10):
    """A function prompt ``[B, P]`` → generated ids ``[B, n]`` for one condition."""
    def plain(prompt):
        out = model.generate(prompt, max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        return out[:, prompt.shape[1]:]

    if mask is None:
        return plain
    if engine == "patch":
        def patched(prompt):
            with common.patched(model, mask, window):
                return plain(prompt)
        return patched

    from leank.train.attention import AnswerAttentionState, greedy_answer, training_attention

    def train_attn(prompt):
        st = AnswerAttentionState(sink=window.sink, recent=window.recent)
        st.scale = mask.keep.float().to(model.device)
        st.dropped = (mask.kept_counts() == 0).to(model.device)
        with training_attention(model):
            return greedy_answer(model, prompt, st, max_new, tok.eos_token_id)
    return train_attn


def bytes_saved(mask: ChannelMask, length: int, window: LeanKConfig, elem_bytes: int = 2) -> dict:
    """K and V bytes of one sequence's cache at ``length`` tokens, dense vs LeanK (window at
    full width right after prefill; archive K compacted, V dropped for 0-kept heads)."""
    L, H, D = mask.num_layers, mask.num_kv_heads, mask.head_dim
    k_dense = L * H * length * D * elem_bytes
    k_leank, v_leank = WindowPolicy.of(window).cache_bytes(length, mask.kept_counts(), D, elem_bytes)
    return {"k_saved_frac": 1 - k_leank / k_dense, "v_saved_frac": 1 - v_leank / k_dense,
            "k_saved_archive_frac": mask.sparsity, "v_saved_archive_frac": mask.v_sparsity}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="leank/data/tiny-llama")
    p.add_argument("--mask", action="append", default=[], metavar="SPARSITY=PATH", help="learned mask per sparsity")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--n", type=int, default=100, help="held-out samples per task and length")
    p.add_argument("--seed", type=int, default=12345, help="held-out data seed (training used 0 / 10000)")
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--backend", default="reference")
    p.add_argument("--engine", choices=("patch", "train-attention"), default="patch")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--style", default="compact", choices=("compact", "natural"), help="task style the model was trained on")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=str(SCRATCH / "mask_quality"),
                   help="output stem (.json, .md); default: %(default)s (the committed run is eval/results/mask_quality)")
    p.add_argument("--from-json", help="only re-render the markdown table of a results JSON")
    args = p.parse_args(argv)
    if args.from_json:
        d = json.loads(Path(args.from_json).read_text())
        md = table(d["rows"], d["meta"])
        Path(args.from_json).with_suffix(".md").write_text(md)
        print(md)
        return 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    window = LeanKConfig(sink=args.sink, recent=args.recent, backend=args.backend)
    task = RetrievalTask(tok, seed=args.seed, n_pairs=(4, 16), use_chat_template=False, style=args.style)
    samples = {(t, n): [task.sample(i, n, t) for i in range(args.n)] for n in args.lengths for t in TASK_NAMES}

    conditions: list[tuple[str, float | None, ChannelMask | None]] = [("full", None, None)]
    for spec in args.mask:
        sp, path = spec.split("=", 1)
        learned = ChannelMask.load(path)
        conditions.append(("learned", float(sp), learned))
        for name, m in baselines(learned, seed=int(float(sp) * 1000)).items():
            conditions.append((name, float(sp), m))

    rows = []
    for name, target, mask in conditions:
        t0 = time.time()
        gen = make_gen(model, tok, mask, window, args.engine)
        acc = {f"{t}@{n}": accuracy(model, tok, samples[(t, n)], gen, args.batch) for n in args.lengths for t in TASK_NAMES}
        row = {"condition": name, "target_sparsity": target, "accuracy": acc,
               "mean_accuracy": sum(acc.values()) / len(acc), "seconds": round(time.time() - t0, 1)}
        if mask is not None:
            row.update(k_sparsity=mask.sparsity, v_sparsity=mask.v_sparsity, align=mask.align,
                       kept_histogram={int(c): int(k) for c, k in zip(*torch.unique(mask.kept_counts(), return_counts=True))},
                       bytes=bytes_saved(mask, max(args.lengths), window))
        rows.append(row)
        print(json.dumps(row), flush=True)

    meta = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "engine": args.engine, "backend": args.backend, "dtype": args.dtype, "sink": args.sink,
            "recent": args.recent, "style": args.style, "lengths": args.lengths, "n_per_cell": args.n, "heldout_seed": args.seed,
            "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = table(rows, meta)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def table(rows, meta) -> str:
    cells = [f"{t}@{n}" for n in meta["lengths"] for t in TASK_NAMES]
    head = ("| condition | K sparsity | " + " | ".join(c.replace("multikey", "MK").replace("multivalue", "MV") for c in cells)
            + " | MK mean | MV mean | mean | K bytes saved | V bytes saved |")
    lines = [f"Held-out retrieval accuracy (%), tiny Llama, {meta['n_per_cell']} samples per cell, "
             f"sink={meta['sink']} recent={meta['recent']}, engine={meta['engine']}, device={meta['device']}; "
             f"bytes saved at {max(meta['lengths'])} tokens.", "", head, "|" + "---|" * (len(cells) + 7)]
    for r in rows:
        sp = "0" if r["target_sparsity"] is None else f"{r['k_sparsity']:.3f}"
        b = r.get("bytes")
        ks = f"{100 * b['k_saved_frac']:.1f}%" if b else "0"
        vs = f"{100 * b['v_saved_frac']:.1f}%" if b else "0"
        per_task = [sum(r["accuracy"][c] for c in cells if c.startswith(t)) / len(meta["lengths"]) for t in TASK_NAMES]
        lines.append(f"| {r['condition']} | {sp} | " + " | ".join(f"{100 * r['accuracy'][c]:.1f}" for c in cells)
                     + "".join(f" | {100 * m:.1f}" for m in per_task)
                     + f" | {100 * r['mean_accuracy']:.1f} | {ks} | {vs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
