"""An independent, dense float64 implementation of the LeanK function (for tests and the demo).

The model runs with a plain ``DynamicCache`` (full K/V of every token). At each step this
attention function decides from the schedule formula alone which tokens are archived,
zeroes their pruned K channels (or hides them for 0-channel heads) and computes
attention in float64. It shares no code with ``leank.cache`` / ``leank.attention`` / ``leank.window`` (only the
generic ``use_attention`` switch).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .attention_switch import use_attention
from .patching import cache_kwarg

ORACLE = "leank_dense_oracle"


class Oracle:
    """Attention function of the LeanK function over a full ``DynamicCache`` (batch 1)."""

    def __init__(self, keep: torch.Tensor, sink: int, recent: int, flush_every: int):
        self.keep = keep.bool()
        self.sink, self.recent, self.flush_every = sink, recent, flush_every
        self.num_layers = keep.shape[0]
        self.archived = 0  # tokens in [sink, sink + archived) are archived

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        b, h, L, d = query.shape
        if b != 1:
            raise ValueError(f"query: the oracle runs one sequence at a time, got batch {b}")
        T = key.shape[2]
        kvh = key.shape[1]
        rep = h // kvh
        q = query.double()[0]
        k = key.double()[0].clone()
        v = value.double()[0]
        keep = self.keep[module.layer_idx].to(q.device)
        old = T - L  # tokens held before this step
        hidden = torch.zeros(kvh, T, dtype=torch.bool, device=q.device)
        if old > 0 and self.archived > 0:
            arch = slice(self.sink, self.sink + self.archived)
            for g in range(kvh):
                k[g, arch, ~keep[g]] = 0.0
                if not keep[g].any():
                    hidden[g, arch] = True
        logits = torch.einsum("hld,htd->hlt", q, k.repeat_interleave(rep, 0)) * scaling
        causal = torch.arange(T, device=q.device)[None, :] <= torch.arange(old, T, device=q.device)[:, None]
        allowed = causal[None] & ~hidden.repeat_interleave(rep, 0)[:, None, :]
        logits = logits.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(logits, -1) @ v.repeat_interleave(rep, 0)
        if module.layer_idx == self.num_layers - 1:
            self._advance(T, L)
        return out.transpose(0, 1)[None].to(query.dtype), None

    def _advance(self, total: int, step_len: int) -> None:
        if step_len > 1 or total == step_len:
            self.archived = max(self.archived, total - self.sink - self.recent)
            return
        non_sink = total - min(self.sink, total) - self.archived
        if non_sink >= self.recent + self.flush_every:
            self.archived = total - self.sink - self.recent


def oracle_logits(model, keep, sink, recent, flush_every, prompt_ids, continuation_ids, chunks=()):
    """Logits ``[len(continuation), vocab]`` (the model's dtype) the LeanK function gives, feeding ``continuation``.

    Args:
        model: a Llama / Qwen2 ``*ForCausalLM`` (not patched).
        keep: bool (or 0/1) ``[num_layers, num_kv_heads, head_dim]`` kept K channels, or a ``ChannelMask``.
        sink, recent, flush_every: the window (as ``LeanKConfig``).
        prompt_ids, continuation_ids: int64 ``[n]`` (one sequence: batch 1), ``n >= 1``.
        chunks: ``(start, end)`` ranges of ``continuation`` fed as one multi-token step.

    Row ``i`` is the prediction made after seeing ``prompt + continuation[:i]``.
    """
    from .masks import _as_bool_mask
    from .patches import model_dims
    from .window import WindowPolicy

    keep = keep.keep if hasattr(keep, "keep") else _as_bool_mask(keep)  # ValueError for non-binary values
    dims = tuple(model_dims(model.config))
    if tuple(keep.shape) != dims:
        raise ValueError(f"keep: expected [layers, kv_heads, head_dim] = {list(dims)} for this model, got "
                         f"{tuple(keep.shape)}")
    WindowPolicy(sink=sink, recent=recent, flush_every=flush_every)  # ValueError naming a bad size
    for name, ids in (("prompt_ids", prompt_ids), ("continuation_ids", continuation_ids)):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() < 1 or ids.is_floating_point():
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name}: expected integer token ids [n >= 1] (one sequence), got {got}")
    oracle = Oracle(keep, sink, recent, flush_every)
    with use_attention(model, ORACLE, oracle.attention):
        cache = DynamicCache(config=model.config)
        kw = {cache_kwarg(model): cache}
        rows = []
        with torch.no_grad():
            out = model(prompt_ids[None], use_cache=True, **kw)
            rows.append(out.logits[0, -1])
            i = 0
            starts = {s: e for s, e in chunks}
            while i < len(continuation_ids) - 1:
                j = starts.get(i, i + 1)
                out = model(continuation_ids[None, i:j], use_cache=True, **kw)
                rows.extend(out.logits[0])
                i = j
        return torch.stack(rows[: len(continuation_ids)])
