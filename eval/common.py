"""Shared pieces of the eval scripts: argument helpers, result/config writing, tables,
progress bars, the published kept-count mixes and model shapes (the one definition the
eval scripts share), the ``patched`` context manager.

Nothing here touches CUDA, seeds a generator or imports TileLang at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "eval" / "results"  # committed results: written only with an explicit --out
SCRATCH_DIR = REPO_ROOT / "runs"  # git-ignored: where the scripts write by default

# Families of the published LeanK kept-count mixes (leank.mixes: LLAMA_MIX, QWEN_MIX).
MIX_FAMILIES = ("llama", "qwen")

# Model shapes (random weights are enough for speed and memory).
LLAMA31_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128009,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
QWEN25_7B = dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=131072,  # with YaRN x4 from 32K, as Qwen documents for long inputs
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_id=151645,
    rope_parameters=dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=32768),
)
# Llama-3.1-70B widths (80 layers; pass --layers to build fewer on a machine that cannot hold them all)
LLAMA31_70B = dict(LLAMA31_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8)
MODEL_SHAPES = {"llama3.1-8b": (LLAMA31_8B, "llama"), "qwen2.5-7b": (QWEN25_7B, "qwen"),
                "llama3.1-70b": (LLAMA31_70B, "llama")}
DEFAULT_SHAPES = ["llama3.1-8b", "qwen2.5-7b"]  # what the scripts run when --models is not given
# Tiny variants keep head_dim 128 (so the 32-aligned kept counts are the published ones)
# and the GQA group sizes; only widths and depth shrink.
TINY_OVERRIDES = {
    "llama3.1-8b": dict(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, bos_token_id=1, eos_token_id=2),
    "qwen2.5-7b": dict(vocab_size=512, hidden_size=896, intermediate_size=1024, num_hidden_layers=2,
                       num_attention_heads=7, num_key_value_heads=1, bos_token_id=1, eos_token_id=2),
    "llama3.1-70b": dict(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, bos_token_id=1, eos_token_id=2),
}


# ----------------------------------------------------------------------------- arguments
def int_list(text: str) -> list[int]:
    """Parse ``"8192,32K,64k"`` into ``[8192, 32768, 65536]`` (K = 1024)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        try:
            out.append(int(part[:-1] if mult > 1 else part) * mult)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers (K suffix allowed), got {text!r}")
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return out


def int_k(text: str) -> int:
    """Parse one length, ``"16K"`` -> 16384 (K = 1024)."""
    values = int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer (K suffix allowed), got {text!r}")
    return values[0]


def str_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def scratch_out(name: str) -> str:
    """Default output path of a script: ``runs/<name>`` (git-ignored), never a committed result."""
    return str(SCRATCH_DIR / name)


def apply_smoke_sizes(args: argparse.Namespace, parser: argparse.ArgumentParser, sizes: dict[str, Any]) -> list[str]:
    """Shrink a run for a smoke mode (``--tiny``): every option named in ``sizes`` that is
    still at the parser's default takes the smoke value; options the user set are kept.
    Returns the names that changed."""
    changed = []
    for name, value in sizes.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
            changed.append(name)
    return changed


def add_common_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    """--out, --seed, --device, --dtype, --no-progress. ``default_out`` should be a
    :func:`scratch_out` path: defaults never point at committed results."""
    parser.add_argument("--out", default=default_out,
                        help="result JSON path; the resolved config is written next to it as *.config.json "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="model dtype; auto = bfloat16 on CUDA, float32 on CPU (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_leank_args(parser: argparse.ArgumentParser, sink: int | None = None, recent: int | None = None) -> None:
    """LeanKConfig fields and the mask choice (defaults from ``LeanKConfig``, the one home of them)."""
    from leank.config import LeanKConfig

    defaults = LeanKConfig()
    sink = defaults.sink if sink is None else sink
    recent = defaults.recent if recent is None else recent
    g = parser.add_argument_group("LeanK")
    g.add_argument("--mask", default="mix",
                   help="'mix' (published kept-count mix placed at random with --seed), 'mix:llama' / 'mix:qwen', "
                        "'rope:SPARSITY' (data-free RoPE-frequency mask), or a mask file / model id that "
                        "leank.patch resolves (default: %(default)s)")
    g.add_argument("--sink", type=int, default=sink, help="full-precision sink tokens (default: %(default)s)")
    g.add_argument("--recent", type=int, default=recent, help="full-precision recent tokens (default: %(default)s)")
    g.add_argument("--flush-every", type=int, default=defaults.flush_every,
                   help="decode steps between flushes (default: %(default)s)")
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "tilelang"],
                   help="LeanK attention backend (default: %(default)s)")


def allow_recompiles(limit: int = 64) -> None:
    """Raise torch.compile's per-function recompile limit for a benchmark process (default 8).

    Every patched model (method, shape, dtype) compiles LeanK's decode step once more in the same
    process; past the limit the step would run uncompiled and the rows would not measure the
    compiled path. A script's global setting, never done by the library."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


def copy_bandwidth_gbps(rep_ms: float = 200) -> float:
    """Device-to-device copy GB/s of a 1 GiB buffer on the current CUDA device, counting bytes
    read + written (the bandwidth the benchmarks' byte floors use); median of ``do_bench``."""
    import torch
    from triton.testing import do_bench

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=25, rep=rep_ms, return_mode="median") * 1e-3
    del a, b
    return 2 * (1 << 30) / t / 1e9


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# ----------------------------------------------------------------------------- output
def environment() -> dict:
    """Versions, device and commit: what a reader needs to reproduce a result."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    import importlib
    import importlib.util

    for mod in ("torch", "transformers"):
        env[mod] = importlib.import_module(mod).__version__
    for mod in ("tilelang", "flash_attn"):  # never imported here: report only what the run loaded
        loaded = sys.modules.get(mod)
        env[mod] = getattr(loaded, "__version__", "loaded") if loaded else None
        env[mod + "_installed"] = importlib.util.find_spec(mod) is not None
    try:
        import torch

        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name()
            env["cuda_total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
            env["cuda_version"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                           text=True, timeout=5).stdout.strip() or None
        env["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=5).stdout.strip())
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def config_path_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".config.json")


def write_results(out: str | Path, results: dict, config: dict) -> tuple[Path, Path]:
    """Write ``results`` to ``out`` and ``config`` (+ environment) to ``<stem>.config.json``.

    Returns both paths. Parent folders are created.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = config_path_for(out)
    full_cfg = {"config": _jsonable(config), "environment": environment()}
    write_atomic(cfg_path, json.dumps(full_cfg, indent=2) + "\n")
    payload = {"config_file": cfg_path.name, **_jsonable(results)}
    write_atomic(out, json.dumps(payload, indent=2) + "\n")
    return out, cfg_path


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename, so a process killed
    mid-write (a run cut by its time limit) leaves the previous complete file, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".2f") -> str:
    """Render dict rows as a GitHub markdown table (floats with ``floatfmt``)."""
    if not rows:
        return "(no rows)"
    if columns is None:  # union of the rows' keys, in first-seen order
        columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return format(v, floatfmt) if math.isfinite(v) else str(v)
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(b) for b in body)])


def progress(iterable: Iterable | None = None, disable: bool = False, **kw):
    """A tqdm bar on stderr (hidden with ``disable=True``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=disable, file=sys.stderr, dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------- models
def model_config(shape: str, layers: int | None = None, tiny: bool = False):
    """A transformers config of a published model shape (``MODEL_SHAPES``), optionally shallower or tiny."""
    from transformers import AutoConfig

    if shape not in MODEL_SHAPES:
        raise ValueError(f"shape: expected one of {sorted(MODEL_SHAPES)}, got {shape!r}")
    fields = dict(MODEL_SHAPES[shape][0])
    if tiny:
        fields.update(TINY_OVERRIDES[shape])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers: expected >= 1, got {layers}")
        fields["num_hidden_layers"] = layers
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def build_model(config, device, dtype, attn: str):
    """Random-weight ``AutoModelForCausalLM`` of ``config``, created directly on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


def best_attention(requested: str = "auto") -> str:
    """flash_attention_2 when flash_attn is importable, else sdpa (unless ``requested`` names one)."""
    if requested != "auto":
        return requested
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


# ----------------------------------------------------------------------------- masks
@contextlib.contextmanager
def patched(model, mask, config):
    """``with patched(model, mask, config):`` — ``leank.patch`` on entry, ``leank.unpatch`` in
    ``finally``; yields the model."""
    import leank

    leank.patch(model, masks=mask, config=config)
    try:
        yield model
    finally:
        leank.unpatch(model)


def build_mask(spec: str, model, seed: int, family: str | None = None):
    """Turn ``--mask`` into what ``leank.patch(masks=...)`` accepts.

    ``mix`` / ``mix:llama`` / ``mix:qwen`` -> ``leank.mixes.mix_mask`` (the published kept-count
    mix at random heads, lowest-frequency RoPE pairs kept) for the model's shape;
    ``rope:S`` -> ``leank.masks.from_rope_frequency(config, S, align=32)``; anything else is
    passed through (a mask file or a model id the registry resolves).
    """
    cfg = model.config
    if spec.startswith("mix"):
        fam = spec.split(":", 1)[1] if ":" in spec else (family or ("qwen" if cfg.model_type == "qwen2" else "llama"))
        if fam not in MIX_FAMILIES:
            raise ValueError(f"--mask: expected mix, mix:llama or mix:qwen, got {spec!r}")
        from leank.masks import context_set_from_config, model_dims
        from leank.mixes import LLAMA_MIX, QWEN_MIX, mix_mask

        layers, kv_heads, head_dim = model_dims(cfg)
        mask = mix_mask(layers, kv_heads, head_dim, mix=LLAMA_MIX if fam == "llama" else QWEN_MIX, seed=seed,
                        model_id=getattr(cfg, "name_or_path", "") or "")
        return dataclasses.replace(mask, context_set=context_set_from_config(cfg))
    if spec.startswith("rope:"):
        from leank.masks import from_rope_frequency

        try:
            sparsity = float(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--mask: expected rope:SPARSITY with a number in [0, 1), got {spec!r}") from None
        return from_rope_frequency(cfg, sparsity, align=32)
    return spec


def leank_available() -> str | None:
    """None when ``leank.patch`` and ``leank.masks`` can be imported, else the reason."""
    import importlib

    for mod in ("leank.patching", "leank.masks"):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            return f"{mod} is not importable ({e})"
    return None

