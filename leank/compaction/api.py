"""``leank.compact``: attention-matching compaction of a prefilled LeanK cache, all layers.

Only the archive (tokens outside the full-precision sink + recent window) is compacted:
the window stays as it is. Attention over the archive is matched exactly in output and
log-sum-exp, so the LSE merge with the window reproduces full attention as well as the
archive part is matched.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Optional, Sequence, Union

import torch

from .core import BETA_RIDGE, CompactedHeads, compact_heads
from .queries import REPEAT_PROMPT, gaussian_like, pool_gqa, run_pass, sample_positions
from .selection import get_selection
from .timing import Stopwatch

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

QUERY_SOURCES = ("repeat", "repeat_only", "self", "gaussian")
DEFAULT_MAX_QUERIES = 4096


# ---------------------------------------------------------------------- validation
def _check_model(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"model: expected a transformers Llama/Qwen2 model, got {type(model).__name__}")
    from leank.patches import family_for

    family_for(cfg)  # ValueError naming the model for unsupported architectures
    return cfg


def _parse_queries(queries) -> Union[list, list[str]]:
    if isinstance(queries, (list, tuple)) and queries and isinstance(queries[0], Tensor):
        return list(queries)
    if not isinstance(queries, str):
        raise ValueError(f"queries: expected a str like 'repeat' or 'repeat+gaussian', or per-layer tensors, got {type(queries).__name__}")
    parts = [p.strip() for p in queries.split("+") if p.strip()]
    bad = [p for p in parts if p not in QUERY_SOURCES]
    if not parts or bad:
        raise ValueError(f"queries: expected '+'-joined parts of {QUERY_SOURCES}, got {queries!r}")
    if parts == ["gaussian"]:
        raise ValueError("queries: 'gaussian' needs another source to fit (e.g. 'repeat+gaussian'), got 'gaussian'")
    return parts


def leank_cache_from_dense(cache, config=None):
    """A ``LeanKCache`` holding the K/V of a prefilled transformers ``DynamicCache``, every
    channel kept (a copy, as if the tokens had been prefilled into it; ``cache`` is unchanged).

    Args:
        cache: a ``DynamicCache`` with every layer filled, ``[batch, num_kv_heads, T, head_dim]``.
        config: ``LeanKConfig`` (window sizes); default ``LeanKConfig()``.
    """
    from ..cache import LeanKCache
    from ..config import LeanKConfig

    layers = cache.layers
    if not len(layers) or getattr(layers[0], "keys", None) is None:
        raise ValueError("cache: expected a prefilled DynamicCache, got an empty one")
    k0 = layers[0].keys
    keep = torch.ones(len(layers), k0.shape[1], k0.shape[3], dtype=torch.bool)
    out = LeanKCache(keep, config or LeanKConfig())
    for i, src in enumerate(layers):
        layer = out.layers[i]
        layer.lazy_initialization(src.keys, src.values)
        layer.store_chunk(src.keys, src.values, None)
        layer.seen_tokens = src.keys.shape[2]
    return out


_to_leank_cache = leank_cache_from_dense  # the former private name


def _as_leank_cache(past_key_values, config):
    from transformers.cache_utils import DynamicCache

    from ..cache import LeanKCache

    if isinstance(past_key_values, LeanKCache):
        if not all(getattr(layer, "is_initialized", False) for layer in past_key_values.layers):
            raise ValueError("past_key_values: expected a prefilled LeanKCache, got an empty one")
        return past_key_values
    if isinstance(past_key_values, DynamicCache) and len(past_key_values.layers) and past_key_values.layers[0].keys is not None:
        logger.info("compact: copying a DynamicCache into a LeanKCache (all channels kept)")
        return leank_cache_from_dense(past_key_values, config)
    raise ValueError(
        f"past_key_values: expected a prefilled LeanKCache (leank.patch) or DynamicCache, got {type(past_key_values).__name__}"
    )


# ---------------------------------------------------------------------- budgets
def _budgets(arch_len: Sequence[int], num_layers: int, kvh: int, ratio, budget, per_head_budget) -> Tensor:
    """int64 ``[L, B, KVH]`` entries to keep per layer, sequence and KV head."""
    B = len(arch_len)
    longest = max(arch_len) if arch_len else 0
    lens = torch.tensor(arch_len, dtype=torch.float64)
    if per_head_budget is not None:
        ph = torch.as_tensor(per_head_budget)
        if ph.shape != (num_layers, kvh):
            raise ValueError(f"per_head_budget: expected shape [{num_layers}, {kvh}], got {tuple(ph.shape)}")
        if ph.is_floating_point():
            if bool(((ph <= 0) | (ph > 1)).any()):
                raise ValueError("per_head_budget: float entries are ratios and must lie in (0, 1]")
            out = torch.ceil(ph[:, None, :].double() * lens[None, :, None]).long()
        else:
            if bool((ph < 0).any()) or int(ph.max()) > longest:
                raise ValueError(f"per_head_budget: expected token counts in [0, {longest}] (the archived context), got max {int(ph.max())}")
            out = ph[:, None, :].long().expand(num_layers, B, kvh)
        return out.clone()
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"budget: expected an int >= 0, got {budget!r}")
        if budget > longest:
            raise ValueError(f"budget: {budget} is larger than the archived context ({longest} tokens)")
        return torch.full((num_layers, B, kvh), budget, dtype=torch.long)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
        raise ValueError(f"ratio: expected a number in (0, 1], got {ratio!r}")
    per_seq = torch.ceil(lens * ratio).long()
    return per_seq[None, :, None].expand(num_layers, B, kvh).clone()


# ---------------------------------------------------------------------- queries
def _prefix_fn(cache, b: int):
    """Per-layer window + archive of sequence ``b`` (for the repeat pass), with ``beta``."""

    def prefix(layer_idx: int):
        layer = cache.layers[layer_idx]
        wk, wv, wl = layer.get_window()
        ak, av, ab, al = layer.get_archive()
        w, a = int(wl[b]), int(al[b])
        k = torch.cat([wk[b, :, :w], ak[b, :, :a]], 1)
        v = torch.cat([wv[b, :, :w], av[b, :, :a]], 1)
        bias = torch.cat([torch.zeros(wk.shape[1], w, device=ab.device), ab[b, :, :a]], 1)
        if bool((bias == 0).all()):
            bias = None
        return k, v, bias

    return prefix


def collect_queries(
    model,
    cache,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    sources: Sequence[str] = ("repeat",),
    max_queries_per_head: int = DEFAULT_MAX_QUERIES,
    repeat_prompt_ids: Optional[Tensor] = None,
    seed: int = 0,
    context_queries: Optional[list] = None,
) -> list[Tensor]:
    """Reference queries per layer, ``[batch, num_kv_heads, n, head_dim]`` (model dtype).

    ``sources``: ``"repeat"`` (repeat pass + the context's own queries, half the budget
    each), ``"repeat_only"``, ``"self"``, ``"gaussian"`` (Gaussian vectors with the
    per-channel statistics of the other sources, a quarter of the budget).
    ``context_queries`` (per layer ``[batch, num_kv_heads, m, head_dim]``, e.g. from
    ``record_queries``) stand in for the ``"self"`` pass, which is then not run.
    """
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    KVH = cfg.num_key_value_heads
    rep = H // KVH
    gen = torch.Generator().manual_seed(seed)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, seq_len], got {tuple(input_ids.shape)}")
    B = input_ids.shape[0]
    passes = []
    if "repeat" in sources:
        passes += ["repeat", "self"]
    if "repeat_only" in sources and "repeat" not in passes:
        passes.append("repeat")
    if "self" in sources and "self" not in passes:
        passes.append("self")
    if context_queries is not None and "self" in passes:
        passes[passes.index("self")] = "recorded"
    n_gauss = max_queries_per_head // 4 if "gaussian" in sources else 0
    per_pass = max(1, -(-(max_queries_per_head - n_gauss) // (len(passes) * rep)))  # positions per pass
    prompt = repeat_prompt_ids if repeat_prompt_ids is not None else input_ids.new_zeros(0)
    out = []
    for b in range(B):
        ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
        n_ctx = ids.numel()
        got: list[dict] = []
        for kind in passes:
            if kind == "recorded":
                m = per_pass * rep
                got.append({i: _subsample(context_queries[i][b], m, gen) for i in range(L)})
                continue
            if kind == "repeat":
                toks = torch.cat([prompt.to(ids.device), ids])
                rec = sample_positions(prompt.numel(), toks.numel(), per_pass, gen)
                res = run_pass(model, toks, n_ctx, rec.to(ids.device), prefix=_prefix_fn(cache, b))
            else:
                rec = sample_positions(0, n_ctx, per_pass, gen)
                res = run_pass(model, ids, 0, rec.to(ids.device), prefix=None)
            got.append({i: pool_gqa(q, KVH) for i, q in res.items()})
        layers = []
        for i in range(L):
            q = torch.cat([g[i].to(got[0][i].dtype) for g in got], 1)
            if n_gauss:
                q = torch.cat([q, gaussian_like(q, n_gauss, gen)], 1)
            layers.append(q)
        out.append(layers)
    n = min(x[0].shape[1] for x in out)
    return [torch.stack([out[b][i][:, :n] for b in range(B)]) for i in range(L)]


def _subsample(q: Tensor, m: int, gen: torch.Generator) -> Tensor:
    """At most ``m`` of the ``q [KVH, n, D]`` rows, drawn without replacement."""
    n = q.shape[1]
    if m >= n:
        return q
    idx = torch.randperm(n, generator=gen)[:m].sort().values.to(q.device)
    return q.index_select(1, idx)


# ---------------------------------------------------------------------- driver
def _layer_groups(num_layers: int, per_layer_bytes: int, device) -> list[range]:
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(0.4 * free)
    else:
        budget = 2 << 30
    size = max(1, min(num_layers, budget // max(1, per_layer_bytes)))
    return [range(s, min(num_layers, s + size)) for s in range(0, num_layers, size)]


def _pack_rows(c: CompactedHeads) -> CompactedHeads:
    """Move used entries (finite beta) to the front of each row, keeping their order."""
    unused = ~torch.isfinite(c.bias)
    order = torch.sort(unused.to(torch.int8), dim=-1, stable=True).indices
    g = lambda x: torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]) if x.dim() == 3 else order)
    return CompactedHeads(g(c.keys), g(c.values), g(c.bias), g(c.index), c.kept)


@torch.no_grad()
def compact(
    model,
    past_key_values,
    ratio: float = 0.02,
    budget: Optional[int] = None,
    queries="repeat",
    method: str = "hak",
    per_head_budget=None,
    ridge: float = 0.0,
    max_queries_per_head: int = DEFAULT_MAX_QUERIES,
    progress: bool = True,
    *,
    input_ids: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    tokenizer=None,
    repeat_prompt: str = REPEAT_PROMPT,
    seed: int = 0,
    workspace_bytes: int = 512 << 20,
    config=None,
    context_queries: Optional[list] = None,
    beta_ridge: float = BETA_RIDGE,
    timings: Optional[dict] = None,
):
    """Compact every layer's archive to a budget by attention matching (arXiv 2602.16284).

    Args:
        model: a Llama or Qwen2 model (patched with ``leank.patch`` or plain).
        past_key_values: a prefilled ``LeanKCache`` (compacted in place and returned), or a
            ``DynamicCache`` (converted into a new ``LeanKCache`` with every channel kept
            and the default window; decode it with a patched model).
        ratio: fraction of each sequence's archived tokens to keep, in (0, 1].
        budget: entries per KV head instead of ``ratio`` (<= archived tokens).
        queries: ``"repeat"`` (repeat-the-context pass over the cache + the context's own
            queries), ``"repeat_only"``, ``"self"``, any of them ``+ "gaussian"``, or a list
            of per-layer tensors ``[batch, num_kv_heads, n, head_dim]`` (post-RoPE).
        method: a registered selection method (``leank.compaction.selection_methods()``):
            ``"hak"`` (highest attention mass) or ``"omp"`` by default.
        per_head_budget: ``[num_layers, num_kv_heads]`` token counts (int) or ratios
            (float in (0, 1]); overrides ``ratio``/``budget``.
        ridge: relative ridge of the value fit toward the original values.
        max_queries_per_head: reference queries per KV head (GQA groups pooled).
        progress: tqdm bar over layer groups (else log lines).
        input_ids: int64 ``[batch, seq_len]``, the tokens the cache holds (needed by the
            model passes); ``attention_mask`` marks left padding.
        tokenizer: encodes ``repeat_prompt`` for the repeat pass (no prompt without it).
        seed: seed of the query sampling.
        workspace_bytes: bound on the key-scoring workspace per layer group.
        config: ``LeanKConfig`` (window sizes) of the ``LeanKCache`` made from a
            ``DynamicCache``; ignored for a ``LeanKCache``.
        context_queries: the context prefill's own queries recorded with
            ``record_queries`` (per layer ``[batch, num_kv_heads, m, head_dim]``); they
            replace the ``"self"`` pass of ``"repeat"``/``"self"``, saving a prefill.
        beta_ridge: relative ridge of the mass weights toward uniform (0 = plain NNLS);
            see ``compact_heads``.
        timings: optional dict receiving seconds per phase (``queries``, ``targets``,
            ``selection``, ``solves``, ``write``, ``total``).

    Returns:
        The ``LeanKCache`` with compacted archives; ``beta`` is stored as the archive bias
        and added to the logits at decode. Raises ``ValueError`` naming the argument for
        a bad ratio/budget, an unsupported model or a cache that is not prefilled.
    """
    t_start = time.perf_counter()
    _check_model(model)
    parsed = _check_args(method, ridge, beta_ridge, max_queries_per_head, queries, ratio, budget, per_head_budget)
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes < 1:
        raise ValueError(f"workspace_bytes: expected an int >= 1, got {workspace_bytes!r}")
    if isinstance(per_head_budget, Tensor) and per_head_budget.dtype == torch.bool:
        raise ValueError("per_head_budget: expected token counts (int) or ratios (float), got a bool tensor")
    cache = _as_leank_cache(past_key_values, config)
    L = len(cache.layers)
    layer0 = cache.layers[0]
    B, KVH, D = layer0.batch_size, layer0.num_kv_heads, layer0.head_dim
    dev = layer0.device
    arch_len = [int(x) for x in layer0.arch_len.tolist()]
    if max(arch_len, default=0) == 0:
        msg = (f"leank.compact: the archive is empty (the {layer0.seen_tokens} tokens held fit the full-precision "
               f"window of sink {cache.config.sink} + recent {cache.config.recent}): nothing to compact")
        warnings.warn(msg, UserWarning, stacklevel=2)
        logger.warning(msg)
    budgets = _budgets(arch_len, L, KVH, ratio, budget, per_head_budget)
    clock = Stopwatch(dev, start=t_start)
    phases = {"convert": clock()}
    q_layers = _reference_queries(model, cache, parsed, context_queries, input_ids, attention_mask, tokenizer,
                                  repeat_prompt, max_queries_per_head, seed)
    phases["queries"] = clock()

    n = q_layers[0].shape[2]
    cap = max(1, max(int(layer.arch_len.max()) for layer in cache.layers))
    t_est = int(budgets.max())
    per_layer = B * KVH * (2 * cap * D * 2 + n * D * 4 + 6 * n * max(t_est, 1) * 4 + 3 * t_est * t_est * 4)
    groups = _layer_groups(L, per_layer, dev)
    bar = _progress_bar(progress and len(groups) > 1, L)
    for grp in groups:
        clock()
        q, k, v, bias = _group_problems(cache, grp, q_layers, cap)
        phases["prepare"] = phases.get("prepare", 0.0) + clock()
        sub: dict = {}
        res = compact_heads(q, k, v, budgets[list(grp)].reshape(-1).to(dev), bias=bias, method=method, ridge=ridge,
                            workspace_bytes=workspace_bytes, beta_ridge=beta_ridge, timings=sub)
        del q, k, v, bias
        res = _pack_rows(res)
        for name, sec in sub.items():
            phases[name] = phases.get(name, 0.0) + sec
        clock()
        _write_group(cache, grp, res)
        phases["write"] = phases.get("write", 0.0) + clock()
        if bar is not None:
            bar.update(len(grp))
        else:
            logger.info("compact: layers %d-%d of %d done (%d entries per head max)", grp[0], grp[-1], L,
                        res.keys.shape[1])
    if bar is not None:
        bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    phases["total"] = time.perf_counter() - t_start
    logger.info(
        "compact: %d layers x %d KV heads, archive %s -> budget %d (%s, %d queries/head) in %.2f s",
        L, KVH, arch_len, t_est, method, n, phases["total"],
    )
    if timings is not None:
        timings.update(phases)
    return cache


def _check_args(method, ridge, beta_ridge, max_queries_per_head, queries, ratio, budget, per_head_budget):
    """``compact``'s argument checks (``ValueError`` naming the argument); returns the parsed ``queries``."""
    get_selection(method)  # ValueError listing the registered methods
    for name, value in (("ridge", ridge), ("beta_ridge", beta_ridge)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    if isinstance(max_queries_per_head, bool) or not isinstance(max_queries_per_head, int) or max_queries_per_head < 1:
        raise ValueError(f"max_queries_per_head: expected an int >= 1, got {max_queries_per_head!r}")
    parsed = _parse_queries(queries)
    if budget is None and per_head_budget is None and (
        not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1
    ):
        raise ValueError(f"ratio: expected a number in (0, 1], got {ratio!r}")
    return parsed


def _reference_queries(model, cache, parsed, context_queries, input_ids, attention_mask, tokenizer, repeat_prompt,
                       max_queries_per_head: int, seed: int) -> list:
    """Per layer ``[batch, num_kv_heads, n, head_dim]`` queries: given ones checked, else collected."""
    layer0 = cache.layers[0]
    L, B, KVH, D, dev = len(cache.layers), layer0.batch_size, layer0.num_kv_heads, layer0.head_dim, layer0.device

    def bad(qs) -> bool:
        return len(qs) != L or any(q.dim() != 4 or q.shape[:2] != (B, KVH) or q.shape[3] != D or q.shape[2] < 1
                                   for q in qs)

    def not_finite(qs) -> bool:
        return any(not bool(torch.isfinite(q).all()) for q in qs)

    if isinstance(parsed[0], Tensor):
        if bad(parsed):
            raise ValueError(f"queries: expected {L} tensors [{B}, {KVH}, n >= 1, {D}], got "
                             f"{[tuple(q.shape) for q in parsed]}")
        if not_finite(parsed):
            raise ValueError("queries: expected finite values, got NaN or inf")
        return parsed
    if context_queries is not None and bad(context_queries):
        raise ValueError(f"context_queries: expected {L} tensors [{B}, {KVH}, m >= 1, {D}] (record_queries), got "
                         f"{[tuple(q.shape) for q in context_queries]}")
    if context_queries is not None and not_finite(context_queries):
        raise ValueError("context_queries: expected finite values, got NaN or inf")
    if input_ids is None:
        raise ValueError(f"input_ids: the {'+'.join(parsed)!r} queries re-read the context; pass the tokens the cache holds")
    held = layer0.seen_tokens
    if (not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != B
            or input_ids.shape[1] != held or input_ids.dtype.is_floating_point):
        got = (f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor)
               else type(input_ids).__name__)
        raise ValueError(f"input_ids: expected the integer tokens the cache holds, [{B}, {held}], got {got}")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                       or tuple(attention_mask.shape) != tuple(input_ids.shape)):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, got {got}")
    prompt_ids = None
    if tokenizer is not None and repeat_prompt:
        prompt_ids = torch.tensor(tokenizer(repeat_prompt, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return collect_queries(
        model, cache, input_ids.to(dev), None if attention_mask is None else attention_mask.to(dev), parsed,
        max_queries_per_head, prompt_ids, seed, context_queries,
    )


def _progress_bar(enabled: bool, total: int):
    """A tqdm bar over layers, or None (disabled, or tqdm missing: log lines instead)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="compact", unit="layer")


def _group_problems(cache, grp: range, q_layers: list, cap: int):
    """The compaction problems of layers ``grp``, one per (layer, sequence, KV head).

    Returns ``(q [P, n, D], k [P, cap, D], v [P, cap, D], bias [P, cap] or None)`` with
    ``P = len(grp) * batch * num_kv_heads``; rows past a sequence's archive get ``-inf`` bias.
    """
    layer0 = cache.layers[0]
    B, KVH, D, dev = layer0.batch_size, layer0.num_kv_heads, layer0.head_dim, layer0.device
    n = q_layers[0].shape[2]
    ks, vs, bs, qs = [], [], [], []
    for i in grp:
        k, v, bias, al = cache.layers[i].get_archive()
        k, v, bias = k[:, :, :cap], v[:, :, :cap], bias[:, :, :cap]
        valid = torch.arange(k.shape[2], device=dev)[None, :] < al.to(dev).long()[:, None]
        bias = bias.masked_fill(~valid[:, None, :], float("-inf"))
        pad = cap - k.shape[2]
        if pad:
            k, v = torch.nn.functional.pad(k, (0, 0, 0, pad)), torch.nn.functional.pad(v, (0, 0, 0, pad))
            bias = torch.nn.functional.pad(bias, (0, pad), value=float("-inf"))
        ks.append(k.reshape(B * KVH, cap, D))
        vs.append(v.reshape(B * KVH, cap, D))
        bs.append(bias.reshape(B * KVH, cap))
        qs.append(q_layers[i].to(k.dtype).reshape(B * KVH, n, D))
    has_bias = any(bool(((b != 0) & torch.isfinite(b)).any()) or not bool(torch.isfinite(b).all()) for b in bs)
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), (torch.cat(bs) if has_bias else None)


def _write_group(cache, grp: range, res: CompactedHeads) -> None:
    """Store the compacted archives of layers ``grp`` (``res`` rows in ``_group_problems`` order)."""
    layer0 = cache.layers[0]
    B, KVH, D = layer0.batch_size, layer0.num_kv_heads, layer0.head_dim
    t = res.keys.shape[1]
    for j, i in enumerate(grp):
        sl = slice(j * B * KVH, (j + 1) * B * KVH)
        kept = res.kept[sl].reshape(B, KVH)
        cache.layers[i].set_archive(
            res.keys[sl].reshape(B, KVH, t, D), res.values[sl].reshape(B, KVH, t, D),
            res.bias[sl].reshape(B, KVH, t), kept.amax(-1).to(torch.int32),
        )
