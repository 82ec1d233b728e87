"""Train the project's own tiny Llama-architecture model on the synthetic retrieval tasks.

No pretrained weights can be downloaded here, so LeanK's mask training is demonstrated on
a model we train ourselves: RoPE, GQA (8 query / 4 KV heads, head_dim 64), 6 layers,
hidden 256, a word-level tokenizer built from the task vocabulary (~890 tokens). It learns
multi-key and multi-value retrieval (see ``leank/train/data.py``, compact style) with a
length curriculum up to 8K tokens. Loss: cross-entropy on answer tokens only (multi-key
samples carry up to 8 question/answer turns to give more signal per sequence).

Multi-key retrieval needs an induction circuit (find the earlier occurrence of the key,
copy what followed it). It does not form when training starts on long sequences (the
first committed model never learned multi-key), so training begins with
``--induction-steps`` of the induction exercise alone (a random word sequence of 8-32
words followed by its repeat, loss on the repeat; the repeat offset varies, so only a real
induction circuit solves it), and the exercise stays in the mix afterwards
(``--task-mix``). Reproducible from ``--seed`` (data is a pure function of seed and step;
model init from ``torch.manual_seed``).

    python eval/train_tiny_model.py --out leank/data/tiny-llama   # GPU, ~5 min; replaces the shipped model
    python eval/train_tiny_model.py --device cpu --smoke          # CPU smoke test (~20 s), into runs/

Without ``--out`` the model goes to ``runs/tiny-llama`` (git-ignored); the shipped model in
``leank/data/tiny-llama`` is only written when named explicitly.

Writes ``config.json``, ``model.safetensors`` (bf16), tokenizer files and
``train_log.json`` (settings, loss curve with per-task losses, held-out full-cache
accuracy, timings).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import common  # noqa: E402
from leank.train.data import RetrievalTask, decode_words, score  # noqa: E402
from leank.train.tiny import SPECIAL, build_word_tokenizer, tiny_llama_config  # noqa: E402


def curriculum(step: int, steps: int, max_len: int, short_frac: float = 0.4, start_len: int = 64,
               min_len: int = 64) -> tuple[int, int]:
    """Length range ``(lo, hi)`` at ``step``; lengths are drawn from it.

    ``hi`` grows geometrically from ``start_len`` to 512 over the first ``short_frac`` of the
    steps, then from 512 to ``max_len`` over the next 35%; ``lo = max(min_len, hi / 4)``.
    Retrieval is learned on short sequences first, then carried to long ones.
    """
    p = step / max(1, steps)
    short_cap = min(512, max_len)
    if p < short_frac:
        hi = start_len * (short_cap / start_len) ** (p / short_frac)
    else:
        frac = min(1.0, (p - short_frac) / 0.35)
        hi = short_cap * (max_len / short_cap) ** frac
    hi = max(min_len, int(hi))
    return max(min_len, hi // 4), hi


KINDS = ("induction", "multikey", "multivalue")


class Batches(torch.utils.data.IterableDataset):
    """Step ``s`` → (input_ids [B, T], loss_mask [B, T], kind [B]) with ``B * T ≈ tokens_per_step``;
    ``kind`` indexes :data:`KINDS`."""

    def __init__(self, tok, seed: int, steps: int, tokens_per_step: int, max_len: int, start: int = 0,
                 style: str = "compact", short_frac: float = 0.4, task_mix: Sequence[float] = (1, 1, 1),
                 induction_steps: int = 0):
        self.style, self.short_frac, self.task_mix = style, short_frac, list(task_mix)
        self.induction_steps = induction_steps
        self.tok, self.seed, self.steps, self.tps, self.max_len, self.start = tok, seed, steps, tokens_per_step, max_len, start

    def batch(self, step: int):
        task = RetrievalTask(self.tok, seed=self.seed, n_pairs=(2, 16), use_chat_template=False, style=self.style)
        rng = random.Random(f"tiny:{self.seed}:{step}")
        n0 = self.induction_steps
        if step < n0:  # stage 0: induction alone on 16-64 tokens (copy offsets 8-32)
            lo, hi, weights = 16, 64, (1, 0, 0)
        else:
            lo, hi = curriculum(step - n0, self.steps - n0, self.max_len, short_frac=self.short_frac)
            weights = self.task_mix
        length = rng.randint(lo, hi)
        b = max(1, self.tps // length)
        ids, mask, kinds = [], [], []
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        for j in range(b):
            kind = rng.choices(KINDS, weights=weights)[0]
            if kind == "induction":  # induction warm-up: a random word sequence and its repeat, loss on the repeat
                half = length // 2
                first = torch.randint(len(SPECIAL), len(self.tok), (half,), generator=gen)
                seq = torch.cat([first, first, first[: length - 2 * half]])
                m = torch.zeros(length, dtype=torch.bool)
                m[half - 1:length - 1] = True
                ids.append(seq)
                mask.append(m)
                kinds.append(0)
                continue
            kinds.append(KINDS.index(kind))
            pairs = max(2, min(16, length // 32))
            nq = rng.randint(1, max(1, min(8, length // 48))) if kind == "multikey" else 1
            s = task.sample(step * 1024 + j, length, kind, n_questions=nq, n_pairs=(2, pairs))
            m = torch.zeros(length, dtype=torch.bool)
            for a, e in s.answer_spans:  # position t predicts token t + 1
                m[a - 1:e - 1] = True
            ids.append(s.input_ids)
            mask.append(m)
        return torch.stack(ids), torch.stack(mask), torch.tensor(kinds)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(self.start + wid, self.steps, nw):
            yield self.batch(step)


def _weights(text: str) -> tuple[float, float, float]:
    try:
        w = tuple(float(x) for x in text.split(","))
    except ValueError:
        w = ()
    if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative weights like 1,1,1, got {text!r}")
    return w


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def evaluate(model, tok, device, lengths, n: int, seed: int, batch: int = 16, style: str = "compact") -> dict:
    """Held-out greedy accuracy with the full cache (plain transformers generate)."""
    task = RetrievalTask(tok, seed=seed, n_pairs=(4, 16), use_chat_template=False, style=style)
    out = {}
    for length in lengths:
        pairs = (min(4, length // 32), min(16, length // 32))
        for kind in ("multikey", "multivalue"):
            samples = [task.sample(i, length, kind, n_pairs=pairs) for i in range(n)]
            ok = 0
            for i in range(0, n, batch):
                chunk = samples[i:i + batch]
                prompt = torch.stack([s.input_ids[:s.prompt_len] for s in chunk]).to(device)
                gen = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
                for s, g in zip(chunk, gen[:, prompt.shape[1]:].tolist()):
                    ok += score(kind, s.answer, decode_words(tok, g))
            out[f"{kind}@{length}"] = ok / n
    return out


SMOKE_SIZES = dict(steps=40, induction_steps=10, log_every=10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=common.scratch_out("tiny-llama"),
                   help="model folder (default: %(default)s; the shipped model is leank/data/tiny-llama)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2200)
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--induction-steps", type=int, default=400,
                   help="first steps on the induction exercise alone, 16-64 tokens, before the retrieval tasks "
                        "(default: %(default)s)")
    p.add_argument("--short-frac", type=float, default=0.4,
                   help="fraction of the steps trained at lengths <= 512 before the length curriculum (default: %(default)s)")
    p.add_argument("--task-mix", type=_weights, default=(1.0, 1.0, 1.0),
                   help="relative weights of the row kinds induction,multikey,multivalue (default: 1,1,1)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="training precision on CUDA: bf16 autocast or plain fp32 (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=50, help="log every N steps (default: %(default)s)")
    p.add_argument("--time-budget", type=float, default=0, help="stop training after this many seconds (0 = none)")
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--style", default="compact", choices=("compact", "natural"), help="task text style (leank.train.data)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny CPU run: small model, short sequences; options left at their defaults become {SMOKE_SIZES}")
    p.add_argument("--full-size", action="store_true", help="with --smoke: keep the full model size")
    args = p.parse_args(argv)
    if args.smoke:
        common.apply_smoke_sizes(args, p, SMOKE_SIZES)
        args.tokens_per_step, args.workers = 4096, 0
        args.max_len, args.eval_n = min(args.max_len, 512), min(args.eval_n, 16)

    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    tok = build_word_tokenizer()
    cfg = (tiny_llama_config(len(tok), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                             intermediate_size=128) if args.smoke and not args.full_size else tiny_llama_config(len(tok)))
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(args.device)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"model: {nparams / 1e6:.2f}M parameters, vocab {len(tok)}, device {args.device}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=args.device.startswith("cuda"))
    data = Batches(tok, args.seed, args.steps, args.tokens_per_step, args.max_len, style=args.style,
                   short_frac=args.short_frac, task_mix=args.task_mix, induction_steps=args.induction_steps)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=args.workers,
                                         prefetch_factor=4 if args.workers else None,
                                         persistent_workers=False)
    amp = args.device.startswith("cuda") and args.precision == "bf16"
    log, t0, tokens, step = [], time.time(), 0, 0
    model.train()
    for step, (ids, mask, kinds) in enumerate(loader):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        ids, mask = ids.to(args.device, non_blocking=True), mask.to(args.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            sel = hidden[:, :-1][mask[:, :-1]]
            logits = model.lm_head(sel).float()
        labels = ids[:, 1:][mask[:, :-1]]
        token_loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        loss = token_loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids.numel()
        if step % args.log_every == 0 or step == args.steps - 1:
            acc = float((logits.argmax(-1) == labels).float().mean())
            el = time.time() - t0
            rec = {"step": step, "len": ids.shape[1], "batch": ids.shape[0], "lr": opt.param_groups[0]["lr"],
                   "loss": float(loss.detach()), "tok_acc": acc}
            row_kind = kinds.to(args.device)[:, None].expand_as(mask)[:, :-1][mask[:, :-1]]
            for i, name in enumerate(KINDS):  # the loss of each task on its own (induction has the most tokens)
                sel = row_kind == i
                if sel.any():
                    rec[f"loss_{name}"] = round(float(token_loss.detach()[sel].mean()), 4)
            rec.update(elapsed_s=round(el, 1), tokens_per_s=round(tokens / max(el, 1e-9)))
            log.append(rec)
            print(json.dumps(rec), flush=True)
        if args.time_budget and time.time() - t0 > args.time_budget:
            print(f"time budget reached at step {step}", flush=True)
            break
    train_s = time.time() - t0
    model.to(torch.bfloat16).eval()  # saved in bf16; evaluating in bf16 keeps SDPA on a fused kernel
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    lengths = [args.max_len] if args.smoke else [2048, 4096, 8192]
    t1 = time.time()
    acc = evaluate(model, tok, args.device, lengths, args.eval_n, seed=args.seed + 10_000, style=args.style)
    print("held-out full-cache accuracy:", json.dumps(acc), flush=True)
    meta = {"seed": args.seed, "steps_planned": args.steps, "steps_run": step + 1, "tokens_per_step": args.tokens_per_step,
            "max_len": args.max_len, "lr": args.lr, "warmup": args.warmup, "short_frac": args.short_frac, "induction_steps": args.induction_steps,
            "task_mix": args.task_mix, "precision": args.precision, "parameters": nparams,
            "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - t1, 1),
            "device": torch.cuda.get_device_name() if amp else "cpu", "torch": torch.__version__,
            "heldout_full_cache_accuracy": acc, "eval_n_per_cell": args.eval_n, "log": log}
    (out / "train_log.json").write_text(json.dumps(meta, indent=1))
    print(f"saved to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
