"""``leank demo``: LeanK decoding end to end on a small Llama-architecture model.

By default it loads the project's own tiny retrieval model (``leank/data/tiny-llama``,
trained by ``eval/train_tiny_model.py``) with the mask learned for it at 70% K sparsity
(``leank train``), asks it a multi-value retrieval question hidden in a 4K-token prompt,
and reports the answer, the K/V bytes saved, the largest deviation of LeanK logits from
the dense float64 implementation of the same function (``leank.verify``), and tokens/s
with and without LeanK. ``--random-weights`` uses a random Llama-architecture model and a
mask with the published kept-count mix instead.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from pathlib import Path

import torch

from .config import LeanKConfig

logger = logging.getLogger(__name__)

TINY_MODEL_DIR = Path(__file__).parent / "data" / "tiny-llama"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run LeanK on a small model and report bytes saved, exactness and speed")
    p.add_argument("--prompt-tokens", type=int, default=4096, help="synthetic prompt length (default 4096)")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens to generate (default 48)")
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--flush-every", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="model dtype (default auto: bfloat16 on CUDA, where the TileLang kernels and the captured "
                        "decode step run, float32 on the CPU)")
    p.add_argument("--timed-calls", type=int, choices=[1, 2], default=None,
                   help="generate calls timed per method: 2 also times a second call, after the first has done "
                        "the one-time work (TileLang kernels, torch.compile of LeanK's decode step, CUDA graph "
                        "recording, CUDA warm-up) (default: 2 on CUDA, 1 on the CPU)")
    p.add_argument("--random-weights", action="store_true", help="ignore the bundled tiny model")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _random_model(device: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=32768,
        initializer_range=0.05,
    )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    from leank.mixes import mix_mask

    c = model.config
    mask = mix_mask(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, seed=seed)
    return model.to(device).eval(), None, mask


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def _load_model(device: str, random_weights: bool, seed: int, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer or None, ChannelMask)``."""
    if random_weights:
        model, tok, mask = _random_model(device, seed)
        return model.to(dtype), tok, mask
    if not (TINY_MODEL_DIR / "model.safetensors").exists():
        raise ValueError(f"--random-weights: the bundled model is missing from {TINY_MODEL_DIR}; pass --random-weights")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .masks import ChannelMask

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(TINY_MODEL_DIR), ChannelMask.load(TINY_MODEL_DIR / "mask-k70.safetensors")


def _prompt(model, tokenizer, n: int, seed: int):
    """``(input_ids [1, n], task sample or None)``: a multi-value question for the tiny model."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(1, model.config.vocab_size, (1, n), generator=gen), None
    from leank.train.data import RetrievalTask

    sample = RetrievalTask(tokenizer, seed=10_000 + seed, use_chat_template=False, style="compact").sample(0, n, "multivalue")
    return sample.input_ids[: sample.prompt_len][None], sample


def _timed_generate(model, ids, n):
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _timed_calls(model, ids, n, calls):
    """``(output of the first call, seconds of each call)``: ``calls`` identical greedy generate calls."""
    out, seconds = _timed_generate(model, ids, n)
    times = [seconds]
    for _ in range(calls - 1):
        times.append(_timed_generate(model, ids, n)[1])
    return (out, *times)


class _Progress:
    """Numbered steps with their wall time on stderr, so the ~30 s run is never silent."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, None

    def step(self, what: str) -> None:
        self.done()
        self.n += 1
        print(f"[{self.n}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        self.t0 = time.perf_counter()

    def done(self) -> None:
        if self.t0 is not None:
            print(f"[{self.n}/{self.total}] done in {time.perf_counter() - self.t0:.1f} s", file=sys.stderr, flush=True)
            self.t0 = None


def run(args) -> int:
    import leank
    from leank.patching import output_cache
    from leank.verify import oracle_logits

    progress = _Progress(4)
    progress.step("loading the model and its mask")
    dtype = _dtype(args.dtype, args.device)
    model, tokenizer, mask = _load_model(args.device, args.random_weights, args.seed, dtype)
    c = model.config
    cfg = LeanKConfig(sink=args.sink, recent=args.recent, flush_every=args.flush_every)
    ids, sample = _prompt(model, tokenizer, args.prompt_tokens, args.seed)
    ids = ids.to(args.device)
    progress.done()
    print(f"model: {c.num_hidden_layers} layers, {c.num_attention_heads} q / {c.num_key_value_heads} kv heads, "
          f"head_dim {c.head_dim}; prompt {ids.shape[1]} tokens, {args.new_tokens} new; device {args.device}, "
          f"{str(dtype).replace('torch.', '')}")
    print(f"mask: {100 * mask.sparsity:.1f}% of K channels pruned ({mask.source or 'in memory'}); "
          f"kept counts {sorted(set(mask.kept_counts().flatten().tolist()))}; window sink={cfg.sink} recent={cfg.recent}")

    calls = args.timed_calls or (2 if ids.is_cuda else 1)
    times = f", {calls} calls" if calls > 1 else ""
    progress.step(f"dense generate ({args.new_tokens} tokens{times})")
    dense_out, *dense_s = _timed_calls(model, ids, args.new_tokens, calls)
    progress.step(f"LeanK generate ({args.new_tokens} tokens{times})")
    leank.patch(model, masks=mask, config=cfg)
    try:
        out, *leank_s = _timed_calls(model, ids, args.new_tokens, calls)
    finally:
        leank.unpatch(model)
    progress.step("checking LeanK logits against the dense float64 implementation")
    logits = torch.stack(out.logits, 1)[0].float().cpu()
    cont = out.sequences[0, ids.shape[1]:]
    # the function in float64 throughout (attention and the model's products): a float64 copy of the model
    ref_model = model if dtype == torch.float64 else copy.deepcopy(model).double()
    ref = oracle_logits(ref_model, mask.keep, cfg.sink, cfg.recent, cfg.flush_every, ids[0], cont).float().cpu()
    del ref_model
    dev = (logits - ref).abs().max().item()
    progress.done()
    cache = output_cache(out)
    backend = cache.layers[0].resolved_backend or cfg.backend
    print(f"LeanK decode backend: {backend} (backend={cfg.backend!r})")
    mem = cache.memory_report()
    k_saved = 1 - mem["k_bytes"] / mem["dense_k_bytes"]
    v_saved = 1 - mem["v_bytes"] / mem["dense_v_bytes"]
    print()
    print(f"{'':28}{'dense':>14}{'LeanK':>14}")
    print(f"{'K cache bytes':28}{mem['dense_k_bytes']:>14,}{mem['k_bytes']:>14,}   (-{100 * k_saved:.1f}%)")
    print(f"{'V cache bytes':28}{mem['dense_v_bytes']:>14,}{mem['v_bytes']:>14,}   (-{100 * v_saved:.1f}%)")
    labels = ["tokens/s (generate)"] if calls == 1 else ["tokens/s, 1st generate", "tokens/s, 2nd generate"]
    for label, d_s, l_s in zip(labels, dense_s, leank_s):
        print(f"{label:28}{args.new_tokens / d_s:>14.1f}{args.new_tokens / l_s:>14.1f}")
    print("   (wall time of generate(), prefill included, on a toy model: kernel launches and Python decide it, not")
    print("   memory traffic. On CUDA the 1st LeanK call compiles and records its decode step, later calls replay")
    print("   it from a CUDA graph while dense decodes eagerly. At scale: eval/e2e_decode.py, README)")
    scale = ref.abs().max().item()
    note = f" ({str(dtype).replace('torch.', '')} model; logits up to {scale:.1f})" if dtype != torch.float32 else ""
    print(f"max |LeanK logits - dense float64 LeanK function| = {dev:.2e}{note}")
    if sample is not None:
        from leank.train.data import decode_words, score

        for name, seq in (("dense", dense_out.sequences), ("LeanK", out.sequences)):
            words = decode_words(tokenizer, seq[0, ids.shape[1]:].tolist())[: len(sample.answer)]
            ok = score(sample.task, sample.answer, words)
            print(f"retrieval ({name}): expected {sample.answer}, answered {words} -> {'correct' if ok else 'wrong'}")
    return 0
