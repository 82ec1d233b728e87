"""RULER-style accuracy of a Hugging Face model with and without LeanK, side by side.

    python eval/ruler.py --model /path/to/Llama-3.1-8B-Instruct --lengths 4K,8K,16K \
        --num-samples 25 --mask meta-llama/Llama-3.1-8B-Instruct

Tasks (see ``eval/ruler_tasks.py``) are generated offline from ``--seed`` and fitted to
each length with the model's tokenizer and chat template; every prompt is run once with
the unpatched model (``dense``) and once after ``leank.patch`` (``leank``), greedy, and
scored with RULER's string match. ``--longbench DIR`` also runs LongBench sets from local
JSONL files (needs the ``datasets`` package). Writes a JSON of scores and predictions and
``<name>.config.json`` next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import string
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `python eval/ruler.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import common  # noqa: E402
from eval.ruler_tasks import METRICS, TASKS, Sample, encode, make_sample  # noqa: E402

MODES = ("dense", "leank")


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/ruler.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help="local Hugging Face model folder (or a cached id; local files only)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder if not the model's")
    p.add_argument("--tasks", type=common.str_list, default=list(TASKS),
                   help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
    p.add_argument("--lengths", type=common.int_list, default=[4096, 8192, 16384, 32768],
                   help="prompt+answer token budgets, K suffix allowed (default: 4K,8K,16K,32K)")
    p.add_argument("--num-samples", type=int, default=25, help="samples per task and length (default: %(default)s)")
    p.add_argument("--modes", type=common.str_list, default=list(MODES),
                   help="dense, leank or both (default: dense,leank)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="override every task's answer length (default: per task, 32-96)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per generate() call, left-padded (default: 1)")
    p.add_argument("--attn", default="auto", help="attention of the unpatched model: auto (flash_attention_2 "
                   "when flash_attn is importable, else sdpa), sdpa, eager, flash_attention_2 (default: auto)")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompts even if the tokenizer has a template")
    p.add_argument("--save-predictions", type=int, default=-1,
                   help="keep this many predictions per task/length/mode in the JSON; -1 = all (default: -1)")
    p.add_argument("--longbench", default=None, help="folder of LongBench JSONL files (<dataset>.jsonl), or a "
                   "dataset id already in the local Hugging Face cache; needs the `datasets` package")
    p.add_argument("--longbench-tasks", type=common.str_list, default=["hotpotqa", "2wikimqa", "qasper"],
                   help="LongBench datasets to run (default: %(default)s)")
    p.add_argument("--longbench-max-length", type=int, default=31744,
                   help="LongBench prompts longer than this are cut in the middle (default: %(default)s)")
    p.add_argument("--longbench-num-samples", type=int, default=50, help="(default: %(default)s)")
    common.add_common_args(p, default_out=common.scratch_out("ruler.json"))
    common.add_leank_args(p)
    return p


def check_args(args) -> None:
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        raise SystemExit(f"--modes: expected a subset of {MODES}, got {args.modes}")
    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"--tasks: unknown {bad}; expected names from {list(TASKS)}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise SystemExit("--num-samples and --batch-size: expected >= 1")


# ----------------------------------------------------------------------------- model
def load_model(path: str, tokenizer_path: str | None, device, dtype, attn: str):
    """AutoModelForCausalLM + AutoTokenizer from local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval(), tok


def leank_config(args):
    from leank import LeanKConfig

    return LeanKConfig(sink=args.sink, recent=args.recent, flush_every=args.flush_every, backend=args.backend)


# ----------------------------------------------------------------------------- generation
def generate(model, tokenizer, samples: Sequence[Sample], max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``samples``' prompts, left-padded as one batch."""
    import torch

    ids = [s.input_ids if s.input_ids is not None else encode(tokenizer, s.prompt, s.templated) for s in samples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = 0
    width = max(len(x) for x in ids)
    device = next(model.parameters()).device
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x)
        attention[i, width - len(x):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=pad)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]


def batches(samples: Sequence[Sample], batch_size: int):
    """Consecutive batches of samples that share a task and a length (similar prompt sizes)."""
    cur: list[Sample] = []
    for s in samples:
        if cur and (len(cur) == batch_size or (s.task, s.length) != (cur[0].task, cur[0].length)):
            yield cur
            cur = []
        cur.append(s)
    if cur:
        yield cur


def predict(model, tokenizer, samples: Sequence[Sample], batch_size: int, desc: str, quiet: bool) -> list[str]:
    preds: list[str] = []
    bar = common.progress(total=len(samples), desc=desc, disable=quiet, unit="sample")
    for batch in batches(samples, batch_size):
        preds += generate(model, tokenizer, batch, batch[0].max_new_tokens)
        bar.update(len(batch))
    bar.close()
    return preds


patched = common.patched  # ``with patched(model, mask, config):`` (eval/common.py)


def run_modes(model, tokenizer, samples: Sequence[Sample], modes: Sequence[str], mask=None, config=None,
              batch_size: int = 1, quiet: bool = False) -> dict:
    """Predictions and wall time per mode: ``{mode: {"predictions": [...], "seconds": float}}``."""
    out = {}
    for mode in modes:
        t0 = time.perf_counter()
        if mode == "leank":
            with patched(model, mask, config):
                preds = predict(model, tokenizer, samples, batch_size, "leank", quiet)
        elif mode == "dense":
            preds = predict(model, tokenizer, samples, batch_size, "dense", quiet)
        else:
            raise ValueError(f"modes: expected entries from {MODES}, got {mode!r}")
        out[mode] = {"predictions": preds, "seconds": time.perf_counter() - t0}
    return out


# ----------------------------------------------------------------------------- scoring
def score_samples(samples: Sequence[Sample], predictions: Sequence[str]) -> dict:
    """``{length: {task: score, ..., "average": mean over tasks}}``, scores in [0, 100]."""
    if len(samples) != len(predictions):
        raise ValueError(f"predictions: expected {len(samples)}, got {len(predictions)}")
    per: dict[int, dict[str, list[float]]] = {}
    for s, p in zip(samples, predictions):
        per.setdefault(s.length, {}).setdefault(s.task, []).append(METRICS[TASKS[s.task].metric](p, s.answers))
    scores = {}
    for length, tasks in per.items():
        row = {t: 100.0 * sum(v) / len(v) for t, v in tasks.items()}
        row["average"] = sum(row.values()) / len(row)
        scores[length] = row
    return scores


def side_by_side(scores: dict[str, dict], modes: Sequence[str]) -> list[dict]:
    """Table rows: length, task, one column per mode, and leank - dense when both ran."""
    first = scores[modes[0]]
    rows = []
    for length in sorted(first):
        for task in first[length]:
            row = {"length": length, "task": task}
            for m in modes:
                row[m] = scores[m][length][task]
            if "dense" in modes and "leank" in modes:
                row["delta"] = row["leank"] - row["dense"]
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- LongBench
LONGBENCH_METRIC = {
    **{k: "qa_f1" for k in ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa")},
    **{k: "rouge_l" for k in ("gov_report", "qmsum", "multi_news", "samsum")},
    **{k: "contains" for k in ("trec", "passage_retrieval_en", "passage_count")},
    **{k: "edit_sim" for k in ("lcc", "repobench-p")},
}
LONGBENCH_NEW_TOKENS = {"qa_f1": 64, "rouge_l": 256, "contains": 32, "edit_sim": 64}


def _norm_answer(s: str) -> list[str]:
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return s.split()


def qa_f1(pred: str, refs: Sequence[str]) -> float:
    """Best token F1 of ``pred`` against any reference (SQuAD-style normalisation)."""
    best = 0.0
    p = _norm_answer(pred)
    for r in refs:
        g = _norm_answer(r)
        common_ = sum((Counter(p) & Counter(g)).values())
        if common_:
            prec, rec = common_ / len(p), common_ / len(g)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def rouge_l(pred: str, refs: Sequence[str]) -> float:
    """Best ROUGE-L F1 (longest common subsequence of words) against any reference."""
    best = 0.0
    p = pred.lower().split()
    for r in refs:
        g = r.lower().split()
        if not p or not g:
            continue
        prev = [0] * (len(g) + 1)
        for a in p:
            cur = [0]
            for j, b in enumerate(g):
                cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
            prev = cur
        lcs = prev[-1]
        if lcs:
            prec, rec = lcs / len(p), lcs / len(g)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def contains(pred: str, refs: Sequence[str]) -> float:
    return float(any(r.lower() in pred.lower() for r in refs))


def edit_sim(pred: str, refs: Sequence[str]) -> float:
    line = next((x for x in pred.lstrip("\n").split("\n") if x.strip() and not x.strip().startswith(("#", "//"))), "")
    return max(difflib.SequenceMatcher(None, line, r).ratio() for r in refs)


LONGBENCH_SCORERS = {"qa_f1": qa_f1, "rouge_l": rouge_l, "contains": contains, "edit_sim": edit_sim}
DATASETS_MISSING = (
    "LongBench needs the `datasets` package, which is not installed. Install it with "
    "`pip install datasets`, put the LongBench JSONL files (from the LongBench release's data.zip) in a "
    "folder and pass --longbench FOLDER. The RULER tasks above need neither."
)


def load_longbench(source: str, task: str):
    """Rows of one LongBench dataset from a local folder of JSONL files or the local HF cache."""
    try:
        import datasets
    except ImportError as e:
        raise SystemExit(DATASETS_MISSING) from e
    folder = Path(source)
    if folder.is_dir():
        f = folder / f"{task}.jsonl"
        if not f.is_file():
            raise SystemExit(f"--longbench: {f} not found (expected one <dataset>.jsonl per LongBench dataset)")
        return datasets.load_dataset("json", data_files=str(f), split="train")
    try:
        return datasets.load_dataset(source, task, split="test", download_mode="reuse_cache_if_exists")
    except Exception as e:  # noqa: BLE001 - any offline/cache failure gets the same advice
        raise SystemExit(f"--longbench {source}: could not load {task!r} from the local cache ({e}). "
                         "Pass a folder of LongBench JSONL files instead.") from e


def longbench_prompt(row: dict, metric: str) -> str:
    ctx, q = row.get("context", ""), row.get("input", "")
    if metric == "qa_f1":
        return f"Read the text below and answer the question with a short phrase.\n\n{ctx}\n\nQuestion: {q}\nAnswer:"
    if metric == "rouge_l":
        return f"Summarise the text below.\n\n{ctx}\n\n{q}\nSummary:"
    if metric == "edit_sim":
        return f"Complete the next line of code.\n\n{ctx}{q}"
    return f"{ctx}\n\n{q}\nAnswer:"


def truncate_middle(ids: list[int], max_len: int) -> list[int]:
    if len(ids) <= max_len:
        return ids
    half = max_len // 2
    return ids[:half] + ids[len(ids) - (max_len - half):]


def run_longbench(args, model, tokenizer, mask, config) -> dict:
    from eval.ruler_tasks import apply_template

    results = {}
    for task in args.longbench_tasks:
        metric = LONGBENCH_METRIC.get(task, "qa_f1")
        rows = load_longbench(args.longbench, task)
        rows = [rows[i] for i in range(min(len(rows), args.longbench_num_samples))]
        samples = []
        for i, row in enumerate(rows):
            text, templated = apply_template(tokenizer, longbench_prompt(row, metric), not args.no_chat_template)
            ids = truncate_middle(encode(tokenizer, text, templated), args.longbench_max_length)
            samples.append(Sample(task, args.longbench_max_length, i, text, templated, list(row["answers"]),
                                  LONGBENCH_NEW_TOKENS[metric], len(ids), 0, input_ids=ids))
        runs = run_modes(model, tokenizer, samples, args.modes, mask, config, args.batch_size, args.no_progress)
        scorer = LONGBENCH_SCORERS[metric]
        results[task] = {"metric": metric, "num_samples": len(samples),
                         **{m: 100.0 * sum(scorer(p, s.answers) for p, s in zip(r["predictions"], samples)) / len(samples)
                            for m, r in runs.items()}}
    return results


# ----------------------------------------------------------------------------- main
def evaluate(model, tokenizer, args, samples: Sequence[Sample], mask=None, config=None) -> dict:
    """Run every mode on ``samples``; return the JSON-ready result dict."""
    runs = run_modes(model, tokenizer, samples, args.modes, mask, config, args.batch_size, args.no_progress)
    scores = {m: score_samples(samples, r["predictions"]) for m, r in runs.items()}
    keep = args.save_predictions
    records, seen = [], Counter()
    for i, s in enumerate(samples):
        seen[(s.task, s.length)] += 1
        if keep >= 0 and seen[(s.task, s.length)] > keep:
            continue
        records.append({"task": s.task, "length": s.length, "index": s.index, "prompt_tokens": s.num_tokens,
                        "answers": s.answers,
                        "predictions": {m: r["predictions"][i] for m, r in runs.items()},
                        "scores": {m: 100.0 * METRICS[TASKS[s.task].metric](r["predictions"][i], s.answers)
                                   for m, r in runs.items()}})
    return {"scores": scores, "seconds": {m: r["seconds"] for m, r in runs.items()},
            "table": side_by_side(scores, list(args.modes)), "samples": records}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import torch

    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    attn = common.best_attention(args.attn)
    mask = config = None
    if "leank" in args.modes:
        why = common.leank_available()
        if why:
            raise SystemExit(f"--modes leank: {why}. Run with --modes dense, or from a checkout with leank.")
    model, tokenizer = load_model(args.model, args.tokenizer, device, dtype, attn)
    if "leank" in args.modes:
        mask = common.build_mask(args.mask, model, args.seed)
        config = leank_config(args)

    samples = []
    todo = [(t, L, i) for L in args.lengths for t in args.tasks for i in range(args.num_samples)]
    for t, L, i in common.progress(todo, desc="generate tasks", disable=args.no_progress, unit="sample"):
        samples.append(make_sample(t, L, i, tokenizer, args.seed, not args.no_chat_template))
    if args.max_new_tokens is not None:
        samples = [dataclasses.replace(s, max_new_tokens=args.max_new_tokens) for s in samples]
    torch.manual_seed(args.seed)
    result = {"model": args.model, "attn_implementation": attn, "device": str(device), "dtype": str(dtype),
              "mask": getattr(mask, "source", None) or args.mask if mask is not None else None,
              **evaluate(model, tokenizer, args, samples, mask, config)}
    if args.longbench:
        result["longbench"] = run_longbench(args, model, tokenizer, mask, config)

    resolved = {**vars(args), "attn": attn, "device": str(device), "dtype": str(dtype),
                "leank_config": config, "chat_template": bool(getattr(tokenizer, "chat_template", None))}
    out, cfg = common.write_results(args.out, result, resolved)
    print(common.format_table(result["table"], floatfmt=".1f"))
    if "longbench" in result:
        print(common.format_table([{"dataset": k, **v} for k, v in result["longbench"].items()], floatfmt=".1f"))
    print(f"wrote {out} and {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
