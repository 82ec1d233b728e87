"""Training-time attention: exact prefill, answer queries see a scaled (or masked) archive K.

At deployment the prompt is prefilled with exact attention; queries that come after it see
the sink tokens and the recent window at full K and every other ("archive") token with
pruned K. Training reproduces this in two forward passes of the frozen model:

1. ``capture``: the whole sequence (prompt + answer) runs with exact causal attention
   (``torch.nn.functional.scaled_dot_product_attention``); each layer's post-RoPE K and V
   of the first ``split`` tokens are stored; the final hidden states are the teacher.
2. ``answer``: only the tokens from ``split`` on run (positions ``split..T-1``); their
   queries attend to the stored K/V plus their own (causal), with the archive keys
   ``[sink, split - recent)`` multiplied per channel by the layer's factors, and the archive
   removed for heads marked ``dropped``. Because the prompt hidden states of every layer
   are exactly those of the full model (prefill is exact), this equals running the whole
   sequence with answer-position queries seeing the scaled archive.

Since ``q · (f ⊙ k) = (f ⊙ q) · k``, the archive scores are computed by scaling the query,
never by copying K. The attention function is registered with transformers'
``AttentionInterface`` under :data:`ATTENTION_NAME` and switched on only inside
:func:`training_attention` (``leank.attention_switch.use_attention``, restored in ``finally``);
nothing happens at import.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from ..window import WindowPolicy

ATTENTION_NAME = "leank_train"
STATE_KWARG = "leank_train_state"


@dataclass
class AnswerAttentionState:
    """What the attention function needs; passed through the model's ``**kwargs``.

    Attributes:
        sink: leading tokens kept at full K.
        recent: tokens before ``split`` kept at full K.
        mode: ``"capture"`` or ``"answer"``.
        split: index of the first answer query; tokens ``< split`` form the context.
        keys, values: per layer index, ``[B, num_kv_heads, split, head_dim]`` (captured, no grad).
        scale: ``[num_layers, num_kv_heads, head_dim]`` multiplier on archive K (None = 1).
        dropped: bool ``[num_layers, num_kv_heads]``: heads whose archive is removed (None = none).
    """

    sink: int
    recent: int
    mode: str = "capture"
    split: int = 0
    keys: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    scale: torch.Tensor | None = None
    dropped: torch.Tensor | None = None

    def archive_range(self, context_len: int) -> tuple[int, int]:
        """``(lo, hi)``: archive token indices ``[lo, hi)`` of a context of ``context_len`` tokens
        (the cache's rule, :meth:`leank.window.WindowPolicy.archive_range`)."""
        return WindowPolicy(self.sink, self.recent).archive_range(context_len)


def answer_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_ctx: torch.Tensor,
                     v_ctx: torch.Tensor, scaling: float, archive: tuple[int, int],
                     scale: torch.Tensor | None = None, dropped: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of answer queries over context + answer keys with a scaled archive.

    Args:
        q: ``[B, H, A, D]`` answer queries (post-RoPE); query head ``h`` uses KV head ``h // (H / KVH)``.
        k_new, v_new: ``[B, KVH, A, D]``: the answer tokens' own K/V (causal among themselves).
        k_ctx, v_ctx: ``[B, KVH, S, D]``: context K/V (post-RoPE).
        scaling: softmax scale (``1/sqrt(D)``).
        archive: ``(lo, hi)`` context indices whose K is scaled.
        scale: ``[KVH, D]`` per-channel multiplier of archive K, or None (exact attention).
        dropped: bool ``[KVH]``: heads whose archive is removed entirely, or None.

    Returns ``[B, A, H, D]`` in ``v_ctx.dtype``; softmax is computed in float32.
    """
    b, h, a, d = q.shape
    kvh, s = k_ctx.shape[1], k_ctx.shape[2]
    if h % kvh:
        raise ValueError(f"q: expected num_heads divisible by num_kv_heads={kvh}, got {h}")
    g = h // kvh
    lo, hi = archive
    qg = q.reshape(b, kvh, g * a, d)
    parts = [qg @ k_ctx[:, :, :lo].transpose(-1, -2)]
    if hi > lo:
        qs = qg if scale is None else qg * scale.to(qg.dtype)[None, :, None, :]
        s_arch = qs @ k_ctx[:, :, lo:hi].transpose(-1, -2)
        if dropped is not None:
            s_arch = s_arch.masked_fill(dropped.to(s_arch.device)[None, :, None, None], float("-inf"))
        parts.append(s_arch)
    parts.append(qg @ k_ctx[:, :, hi:].transpose(-1, -2))
    s_new = qg @ k_new.transpose(-1, -2)  # [b, kvh, g*a, a]
    causal = torch.ones(a, a, dtype=torch.bool, device=q.device).tril()
    parts.append(s_new.masked_fill(~causal.repeat(g, 1)[None, None], float("-inf")))
    scores = torch.cat([p.float() for p in parts], dim=-1) * scaling
    probs = torch.softmax(scores, dim=-1).to(v_ctx.dtype)
    out = probs[..., :s] @ v_ctx + probs[..., s:] @ v_new  # [b, kvh, g*a, d]
    return out.reshape(b, h, a, d).transpose(1, 2)


def leank_train_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (see module docstring); ``query`` ``[B, H, Q, D]``,
    ``key``/``value`` ``[B, KVH, Q, D]``; returns ``([B, Q, H, D], None)``."""
    state: AnswerAttentionState | None = kwargs.get(STATE_KWARG)
    if state is None:
        raise ValueError(f"{STATE_KWARG}: expected an AnswerAttentionState passed to the model's forward, got None")
    layer = module.layer_idx
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if state.mode == "capture":
        state.keys[layer] = key[:, :, : state.split].detach()
        state.values[layer] = value[:, :, : state.split].detach()
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None
    if state.mode != "answer":
        raise ValueError(f"state.mode: expected 'capture' or 'answer', got {state.mode!r}")
    k_ctx, v_ctx = state.keys[layer], state.values[layer]
    scale = None if state.scale is None else state.scale[layer]
    dropped = None if state.dropped is None else state.dropped[layer]
    out = answer_attention(query, key, value, k_ctx, v_ctx, scaling, state.archive_range(k_ctx.shape[2]),
                           scale, dropped)
    return out, None


@contextlib.contextmanager
def training_attention(model) -> Iterator[None]:
    """Switch ``model`` to the training attention; the previous implementation is restored."""
    from ..attention_switch import use_attention

    with use_attention(model, ATTENTION_NAME, leank_train_attention):
        yield


def decoder_of(model):
    """The decoder stack returning ``last_hidden_state`` (``model.model`` for *ForCausalLM),
    as the model's family (``patches``) knows it."""
    from leank.patches import decoder_of as family_decoder

    return family_decoder(model)


def capture(decoder, input_ids: torch.Tensor, state: AnswerAttentionState, split: int) -> torch.Tensor:
    """Exact forward of ``input_ids`` ``[B, T]``; stores context K/V of tokens ``< split`` in
    ``state``; returns the final hidden states of all tokens ``[B, T, hidden]`` (no grad)."""
    state.mode, state.split = "capture", split
    state.keys.clear()
    state.values.clear()
    with torch.no_grad():
        out = decoder(input_ids=input_ids, use_cache=False, **{STATE_KWARG: state})
    return out.last_hidden_state


def answer_forward(decoder, input_ids: torch.Tensor, state: AnswerAttentionState) -> torch.Tensor:
    """Forward of the tokens ``input_ids[:, state.split:]`` against the captured context;
    returns their final hidden states ``[B, T - split, hidden]`` (differentiable in ``state.scale``)."""
    state.mode = "answer"
    b, t = input_ids.shape
    pos = torch.arange(state.split, t, device=input_ids.device)[None].expand(b, -1)
    out = decoder(input_ids=input_ids[:, state.split:], position_ids=pos, use_cache=False, **{STATE_KWARG: state})
    return out.last_hidden_state


@torch.no_grad()
def greedy_answer(model, prompt_ids: torch.Tensor, state: AnswerAttentionState, max_new_tokens: int,
                  eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding with exact prefill and the answer attention afterwards.

    ``prompt_ids`` ``[B, P]`` (no padding); returns generated ids ``[B, <= max_new_tokens]``.
    The first token comes from the exact prefill (as at deployment); each later step reruns
    the answer tokens against the captured context (answers are short).
    """
    dec = decoder_of(model)
    head = model.get_output_embeddings()
    p = prompt_ids.shape[1]
    last = capture(dec, prompt_ids, state, p)  # the whole prompt is context
    tokens = head(last[:, -1]).argmax(-1, keepdim=True)
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    while tokens.shape[1] < max_new_tokens:
        if eos_token_id is not None:
            done |= tokens[:, -1] == eos_token_id
            if bool(done.all()):
                break
        hid = answer_forward(dec, torch.cat([prompt_ids, tokens], dim=1), state)
        tokens = torch.cat([tokens, head(hid[:, -1]).argmax(-1, keepdim=True)], dim=1)
    return tokens

