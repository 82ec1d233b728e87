"""The LeanK KV cache: a full-precision window plus a channel-compacted archive per layer.

Per layer and sequence (see DESIGN.md):

* window ``[batch, num_kv_heads, sink + recent + flush_every, head_dim]``: rows
  ``[0, win_len)`` hold the first ``sink`` tokens, then the most recent tokens;
* archive, grouped by kept-channel count ``d``: K ``[batch, heads_d, capacity, d]``
  (only the kept channels are stored), V ``[batch, heads_d, capacity, head_dim]``; KV heads
  with 0 kept channels store nothing; rows ``[0, arch_len)`` are valid;
* after a chunk (prefill) step, and after a decode step once the window holds
  ``recent + flush_every`` non-sink tokens, the oldest non-sink tokens beyond the most
  recent ``recent`` move to the archive.

Left padding is never stored: each sequence has its own lengths. The cache does not
compute attention; ``leank.attention`` does, right after ``update`` hands it the step.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .append_kernel import append_rows_, rope_append_rows_
from .flush_kernel import flush_rows_
from .config import MAX_ROWS, LeanKConfig
from .diagnostics import warn_once
from .window import WindowPolicy

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

_CACHE_UIDS = itertools.count()
ROLLBACK_ROWS = 64  # full-width rows per sequence and layer kept to undo the last step's flush (crop)
_DECODE_NO_FLUSH = {"kind": "decode", "tokens": 1, "moved": 0}  # the common record: shared, never mutated

# The cache whose ``update`` ran last in this context; the attention function consumes it.
_PENDING: contextvars.ContextVar = contextvars.ContextVar("leank_pending_step", default=None)


@dataclass
class PendingStep:
    """New keys/values handed from ``LeanKCache.update`` to the attention function."""

    layer: "LeanKLayer"
    layer_idx: int
    key: Tensor
    value: Tensor


def take_pending(layer_idx: int, key: Tensor) -> Optional[PendingStep]:
    """Return (and clear) the pending step if it belongs to ``layer_idx`` and ``key``."""
    step = _PENDING.get()
    if step is None or step.layer_idx != layer_idx or step.key is not key:
        return None
    _PENDING.set(None)
    return step


def _is_leank_attention(impl: Optional[str]) -> bool:
    """Whether attention implementation ``impl`` is LeanK's (or wraps it, e.g. compaction's query recorder)."""
    if impl == "leank":
        return True
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from .attention import leank_mask

    return ALL_MASK_ATTENTION_FUNCTIONS.get(impl) is leank_mask


@dataclass
class ArchiveGroup:
    """KV heads of one layer that keep the same number ``d > 0`` of K channels."""

    heads: Tensor  # int64 [heads_d]
    chan: Tensor  # int64 [heads_d, d], sorted kept channel indices
    heads_host: tuple = ()  # the same KV head indices as Python ints
    heads_cpu: Optional[Tensor] = None  # the same, int64 on the CPU (kernels read it on the host: no sync)
    keys: Optional[Tensor] = None  # [batch, heads_d, capacity, d]
    values: Optional[Tensor] = None  # [batch, heads_d, capacity, head_dim]
    bias: Optional[Tensor] = None  # float32 [batch, heads_d, capacity] (attention matching beta)

    @property
    def d(self) -> int:
        return int(self.chan.shape[1])


def groups_from_keep(keep: Tensor) -> list[ArchiveGroup]:
    """Group the KV heads of one layer by kept count (ascending), skipping 0-channel heads.

    Args:
        keep: bool ``[num_kv_heads, head_dim]``.
    """
    counts = keep.sum(-1).tolist()
    groups = []
    for d in sorted({c for c in counts if c > 0}):
        heads = [h for h, c in enumerate(counts) if c == d]
        chan = torch.stack([keep[h].nonzero().flatten() for h in heads])
        groups.append(ArchiveGroup(heads=torch.tensor(heads, dtype=torch.long), chan=chan.long(), heads_host=tuple(heads),
                                   heads_cpu=torch.tensor(heads, dtype=torch.long)))
    return groups


class LeanKLayer(CacheLayerMixin):
    """One layer's window and compacted archive (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True  # crop() after a step restores archived rows exactly (speculative decoding)
    supports_early_init = False

    def __init__(self, keep: Tensor, config: LeanKConfig):
        super().__init__()
        if keep.dim() != 2 or keep.dtype != torch.bool:
            raise ValueError(f"keep: expected bool [num_kv_heads, head_dim], got {keep.dtype} {tuple(keep.shape)}")
        self.keep = keep
        self.config = config
        self.policy = WindowPolicy.of(config)  # which rows are sink, window and archive (leank.window)
        self.groups = groups_from_keep(keep)
        self.seen_tokens = 0  # columns processed, left padding included (what generate() counts)
        self.batch_size = 0
        self.reserve = 0  # rows to add at the next growth (expected new tokens per sequence)
        self.decode_reserve = 0  # archive room the first decode step makes sure of (LeanKCache.reserve)
        self.version = 0  # bumped whenever a storage tensor is replaced (captured graphs must be rebuilt)
        self.resolved_backend: Optional[str] = None  # set by leank.attention on the first decode step
        self.capturing = False  # a CUDA graph is being recorded: device work only, no host bookkeeping
        self._flush_index_cache: dict = {}  # device index tensors of batched flushes, by due set
        self._rollback: dict = {}  # per sequence: what the last step moved to the archive (see crop)

    # ------------------------------------------------------------------ storage
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, kvh, _, d = key_states.shape
        if kvh != self.keep.shape[0] or d != self.keep.shape[1]:
            raise ValueError(
                f"key_states: expected [batch, {self.keep.shape[0]}, len, {self.keep.shape[1]}] to match the mask, "
                f"got {tuple(key_states.shape)}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_kv_heads, self.head_dim = b, kvh, d
        # the window holds at most sink + recent + flush_every rows, and never more than the call's tokens
        wcap = min(self.policy.capacity, key_states.shape[2] + max(self.reserve, 1))
        self.win_k = key_states.new_zeros(b, kvh, wcap, d)
        self.win_v = value_states.new_zeros(b, kvh, wcap, d)
        self.version += 1
        self.win_len = torch.zeros(b, dtype=torch.int32, device=self.device)
        self.arch_len = torch.zeros(b, dtype=torch.int32, device=self.device)
        self.win_len_host = [0] * b
        self.arch_len_host = [0] * b
        self.capacity = 0
        for g in self.groups:
            g.heads, g.chan = g.heads.to(self.device), g.chan.to(self.device)
        # what the call needs if its prompt comes in one piece: the prompt's rows past the window plus
        # the reserved new tokens (``LeanKCache.reserve``), so that decoding never grows the archive
        # (a growth replaces storage: a captured decode step is then recorded again); a chunked prompt
        # grows it once more, by its later chunks plus the reservation, which is kept for that growth
        expected = max(0, key_states.shape[2] - self.policy.sink - self.policy.recent) + self.reserve
        reserve, self.reserve = self.reserve, 0
        self._grow_archive(max(self.config.initial_archive_capacity, expected))
        self.reserve = reserve
        self.is_initialized = True

    def ensure_decode_room(self) -> None:
        """Before the first decode step of a call: archive room for the ``decode_reserve`` tokens the
        call may still add, so that decoding never grows the archive (a growth replaces storage, and
        a captured decode step must then be recorded again). Host values only; grows at most once."""
        if not self.decode_reserve:
            return
        # rows the archive holds, plus the window rows past sink + recent (a flush moves them), plus the call's tokens
        needed = max((a + max(0, w - self._sink_rows(b) - self.policy.recent)
                      for b, (w, a) in enumerate(zip(self.win_len_host, self.arch_len_host))), default=0)
        needed += self.decode_reserve
        self.decode_reserve = self.reserve = 0  # sized for the whole call: a later growth adds no reservation
        if needed > self.capacity:
            self._grow_archive(needed, exact=True)

    def _grow_archive(self, needed: int, exact: bool = False) -> None:
        """Grow the archive capacity geometrically (all groups share it); ``exact``: to ``needed`` rows.

        Growth by 1/8 (at least ``initial_archive_capacity`` rows) keeps the spare
        memory small for long contexts while each row is still copied O(1) times on average.
        """
        if needed <= self.capacity:
            return
        step = max(self.capacity // 8, self.config.initial_archive_capacity)
        new_cap = needed if exact else max(needed + self.reserve, self.capacity + step)
        self.reserve = 0
        self.version += 1
        for g in self.groups:
            hg = len(g.heads)
            k = self.win_k.new_zeros(self.batch_size, hg, new_cap, g.d)
            v = self.win_v.new_zeros(self.batch_size, hg, new_cap, self.head_dim)
            if g.keys is not None and self.capacity:
                k[:, :, : self.capacity] = g.keys
                v[:, :, : self.capacity] = g.values
            g.keys, g.values = k, v
            if g.bias is not None:
                bias = g.bias.new_zeros(self.batch_size, hg, new_cap)
                bias[:, :, : self.capacity] = g.bias
                g.bias = bias
        self.capacity = new_cap

    @property
    def window_rows(self) -> int:
        """Rows allocated for the window (at most ``config.window_capacity``)."""
        return self.win_k.shape[2]

    def _ensure_window(self, rows: int) -> None:
        """Grow the window buffer to hold ``rows`` rows (doubling, capped at ``window_capacity``)."""
        if rows <= self.window_rows:
            return
        cap = self.policy.capacity
        if rows > cap:
            raise RuntimeError(f"window overflow: {rows} rows > capacity {cap}")
        new = min(cap, max(rows, 2 * self.window_rows))
        old = self.window_rows
        k = self.win_k.new_zeros(self.batch_size, self.num_kv_heads, new, self.head_dim)
        v = self.win_v.new_zeros(self.batch_size, self.num_kv_heads, new, self.head_dim)
        k[:, :, :old] = self.win_k
        v[:, :, :old] = self.win_v
        self.win_k, self.win_v = k, v
        self.version += 1

    def _sink_rows(self, b: int) -> int:
        return self.policy.sink_rows(self.win_len_host[b] + self.arch_len_host[b])

    def _archive_append(self, b: int, k: Tensor, v: Tensor) -> None:
        """Append full-width rows ``k, v [num_kv_heads, n, head_dim]`` to sequence ``b``'s archive.

        Copies head by head so no group-sized temporary is allocated (long prefills).
        """
        n = k.shape[1]
        if n == 0:
            return
        start = self.arch_len_host[b]
        self._grow_archive(start + n)
        for g in self.groups:
            for i, (h, chan) in enumerate(zip(g.heads_host, g.chan)):
                g.keys[b, i, start : start + n] = k[h].index_select(-1, chan)
                g.values[b, i, start : start + n] = v[h]
            if g.bias is not None:
                g.bias[b, :, start : start + n] = 0.0
        self.arch_len_host[b] = start + n
        self.arch_len[b] = start + n

    def _set_window(self, b: int, k: Tensor, v: Tensor, sink: int, tail_start: int) -> None:
        """Window of sequence ``b`` := rows ``[0, sink)`` and ``[tail_start, n)`` of ``k, v [kvh, n, d]``."""
        n = sink + k.shape[1] - tail_start
        self._ensure_window(n)
        # k, v are the new chunk or a fresh concatenation: they never alias the window buffer
        self.win_k[b, :, :sink] = k[:, :sink]
        self.win_v[b, :, :sink] = v[:, :sink]
        self.win_k[b, :, sink:n] = k[:, tail_start:]
        self.win_v[b, :, sink:n] = v[:, tail_start:]
        self.win_len_host[b] = n
        self.win_len[b] = n

    def store_chunk(self, key: Tensor, value: Tensor, valid: Optional[Tensor]) -> None:
        """Store a chunk of new tokens and flush the window down to ``recent`` non-sink rows.

        Args:
            key, value: ``[batch, num_kv_heads, q_len, head_dim]``, post-RoPE.
            valid: bool ``[batch, q_len]`` (False = padding, never stored) or None.
        """
        if valid is not None:
            valid_host = valid.cpu()
        for b in range(self.batch_size):
            if valid is None:
                nk, nv = key[b], value[b]
            else:
                idx = valid_host[b].nonzero().flatten().to(key.device)
                nk, nv = key[b].index_select(1, idx), value[b].index_select(1, idx)
            w = self.win_len_host[b]
            if w == 0:  # prefill: no copy of the prompt's K/V
                stream_k, stream_v = nk, nv
            else:
                stream_k = torch.cat([self.win_k[b, :, :w], nk], dim=1)
                stream_v = torch.cat([self.win_v[b, :, :w], nv], dim=1)
            n = stream_k.shape[1]
            sink, move, _ = self.policy.split(n)  # a non-empty archive implies a full sink
            keep = min(move, nk.shape[1], ROLLBACK_ROWS)  # a crop of this step's tokens restores at most these
            self._rollback[b] = dict(kind="chunk", tokens=nk.shape[1], stream=n, sink=sink, moved=move,
                                     k=stream_k[:, sink + move - keep : sink + move].clone(),
                                     v=stream_v[:, sink + move - keep : sink + move].clone())
            self._archive_append(b, stream_k[:, sink : sink + move], stream_v[:, sink : sink + move])
            self._set_window(b, stream_k, stream_v, sink, sink + move)

    def append_decode(self, key: Tensor, value: Tensor) -> None:
        """Append one token per sequence (``[batch, num_kv_heads, 1, head_dim]``) to the window.

        The device part (write at each sequence's ``win_len``, ``win_len += 1``) reads no
        host value, so it can be recorded in a CUDA graph; while ``capturing`` the host
        lengths are left to the caller (``advance_host``, once per replay).
        """
        self._before_append()
        append_rows_(self.win_k, self.win_v, self.win_len, key, value)  # one launch on CUDA
        self._after_append()

    def append_decode_rope(self, query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``append_decode`` of the step's key after standard RoPE (``leank.append_kernel.rope_reference``),
        which is applied to the query too, in the same launch on CUDA.

        Args:
            query: ``[batch, heads, 1, head_dim]``; key, value: ``[batch, num_kv_heads, 1, head_dim]``.
            cos, sin: ``[batch, 1, head_dim]``, the model's rotary embedding of the step's positions.
        Returns:
            the rotated query, ``[batch, heads, head_dim]``.
        """
        self._before_append()
        query = rope_append_rows_(self.win_k, self.win_v, self.win_len, query, key, value, cos, sin)
        self._after_append()
        return query

    def _before_append(self) -> None:
        if not self.capturing:
            self._ensure_window(max(self.win_len_host) + 1)
            self.ensure_decode_room()

    def _after_append(self) -> None:
        if not self.capturing:
            self.advance_host()

    def advance_host(self) -> None:
        """Host bookkeeping of one decode token per sequence (the device part ran already)."""
        self.win_len_host = [w + 1 for w in self.win_len_host]
        self._rollback = dict.fromkeys(range(self.batch_size), _DECODE_NO_FLUSH)

    def decode_ready(self) -> bool:
        """Whether the next decode token fits the allocated window (a captured step cannot grow it)."""
        return self.is_initialized and max(self.win_len_host, default=0) < self.window_rows

    def flush_due(self) -> list:
        """``[(seq, sink_rows, move)]``: the sequences whose window must flush now (host state only)."""
        due = []
        for b in range(self.batch_size):
            sink = self._sink_rows(b)
            w = self.win_len_host[b]
            if self.policy.flush_due(w - sink):
                due.append((b, sink, self.policy.flush_rows(w - sink)))
        return due

    def flush_if_due(self) -> None:
        """Move the oldest non-sink rows to the archive where ``recent + flush_every`` are held.

        Sequences due in the same step move the same number of rows (``flush_every``, as
        decode adds one row per step), so they are flushed together with a few batched
        gathers and scatters driven by device index tensors; other cases (after ``crop``)
        go sequence by sequence.
        """
        due = self.flush_due()
        if not due:
            return
        if len({m for _, _, m in due}) == 1:
            self._flush_batched(due)
            return
        for b, sink, move in due:
            w = self.win_len_host[b]
            self._record_decode_flush(b, self.win_k[b, :, sink : sink + move], self.win_v[b, :, sink : sink + move])
            self._archive_append(b, self.win_k[b, :, sink : sink + move], self.win_v[b, :, sink : sink + move])
            tail_k = self.win_k[b, :, sink + move : w].clone()
            tail_v = self.win_v[b, :, sink + move : w].clone()
            self.win_k[b, :, sink : sink + tail_k.shape[1]] = tail_k
            self.win_v[b, :, sink : sink + tail_v.shape[1]] = tail_v
            self.win_len_host[b] = sink + tail_k.shape[1]
            self.win_len[b] = self.win_len_host[b]

    def _record_decode_flush(self, b: int, k: Tensor, v: Tensor) -> None:
        """Remember the rows ``k, v [kvh, move, head_dim]`` a decode step's flush archives (for crop)."""
        keep = min(k.shape[1], ROLLBACK_ROWS)
        self._rollback[b] = dict(kind="decode", tokens=1, moved=k.shape[1], k=k[:, -keep:].clone(),
                                 v=v[:, -keep:].clone())

    def flush_index(self, due: list) -> tuple:
        """Device ``(seq [n], sink [n])`` int64 of ``due``: one async copy per due set, shared by the layers
        and kept while the set recurs (a recorded flush reads them by address). Both start on a 16-byte
        boundary whatever ``n`` (the rows of one buffer, padded to an even width): Triton specialises a
        kernel on its pointers' 16-byte alignment, so the flush kernels compile once for every batch."""
        key = (self.device, tuple((b, s) for b, s, _ in due))  # layers may sit on different GPUs
        hit = self._flush_index_cache.get(key)
        n = len(key[1])
        if hit is None:
            host = torch.zeros(2, n + n % 2, dtype=torch.long)
            host[:, :n] = torch.tensor(list(zip(*key[1])), dtype=torch.long)
            if self.device.type == "cuda":
                host = host.pin_memory()
            hit = host.to(self.device, non_blocking=True)
            self._flush_index_cache[key] = hit
        return hit[0, :n], hit[1, :n]

    def prepare_flush(self, due: list) -> None:
        """Host part before a batched flush's device work: the archive holds the moved rows."""
        self._grow_archive(max(self.arch_len_host[b] for b, _, _ in due) + due[0][2])

    def flush_device(self, seq: Tensor, sink: Tensor, move: int) -> tuple:
        """Device part of a batched flush of ``move`` rows of the sequences ``seq`` (sink rows ``sink``).

        Reads lengths from the device (``arch_len``), reads and writes no host value and
        allocates only temporaries, so a CUDA graph can record it once and replay it at
        every flush of the same sequences. Returns the full-width rows that left the
        window, last ``ROLLBACK_ROWS`` of them, ``k, v [n, rows, kvh, head_dim]`` (for crop).
        """
        return flush_rows_(self.win_k, self.win_v, self.win_len, self.arch_len, self.groups, seq, sink, move,
                           self.policy.recent, min(move, ROLLBACK_ROWS))

    def finish_flush(self, due: list, rollback_k: Tensor, rollback_v: Tensor) -> None:
        """Host part after a batched flush's device work: rollback records and host lengths."""
        move = due[0][2]
        for i, (b, _, _) in enumerate(due):
            self._rollback[b] = dict(kind="decode", tokens=1, moved=move, k=rollback_k[i].transpose(0, 1),
                                     v=rollback_v[i].transpose(0, 1))
            self.win_len_host[b] -= move
            self.arch_len_host[b] += move

    def _flush_batched(self, due: list) -> None:
        """Flush ``due = [(seq, sink_rows, move)]`` (one ``move`` for all) with batched indexing."""
        self.prepare_flush(due)
        seq, sink = self.flush_index(due)
        self.finish_flush(due, *self.flush_device(seq, sink, due[0][2]))

    # ------------------------------------------------------------------ kernel view
    def kernel_args(self, host_heads: bool = False) -> dict:
        """Arguments of ``decode_attention_reference`` (and the kernels) for this layer.

        ``host_heads=True`` passes ``arch_heads`` as CPU tensors (the TileLang backend reads
        them on the host: no device sync, which also keeps a step capturable).
        """
        has_bias = any(g.bias is not None for g in self.groups)
        return dict(
            win_k=self.win_k,
            win_v=self.win_v,
            win_len=self.win_len,
            arch_k=[g.keys for g in self.groups],
            arch_v=[g.values for g in self.groups],
            arch_heads=[g.heads_cpu if host_heads else g.heads for g in self.groups],
            arch_chan=[g.chan for g in self.groups],
            arch_len=self.arch_len,
            arch_bias=[g.bias for g in self.groups] if has_bias else None,
        )

    # ------------------------------------------------------------------ compaction API
    def get_window(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(keys, values [batch, num_kv_heads, window_cap, head_dim], win_len int32 [batch])``."""
        return self.win_k, self.win_v, self.win_len

    def get_archive(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The archive as dense tensors.

        Returns:
            keys ``[batch, num_kv_heads, capacity, head_dim]`` with pruned channels zero,
            values of the same shape (zeros for 0-channel heads), bias float32
            ``[batch, num_kv_heads, capacity]`` (0 where none; ``-inf`` for 0-channel heads),
            arch_len int32 ``[batch]``.
        """
        b, kvh, d, cap = self.batch_size, self.num_kv_heads, self.head_dim, self.capacity
        keys = self.win_k.new_zeros(b, kvh, cap, d)
        values = self.win_v.new_zeros(b, kvh, cap, d)
        bias = torch.full((b, kvh, cap), float("-inf"), device=self.device)
        for g in self.groups:
            kh = keys[:, g.heads]
            kh.scatter_(3, g.chan[None, :, None, :].expand(b, -1, cap, -1), g.keys)
            keys[:, g.heads] = kh
            values[:, g.heads] = g.values
            bias[:, g.heads] = g.bias if g.bias is not None else 0.0
        return keys, values, bias, self.arch_len.clone()

    def set_archive(self, keys: Tensor, values: Tensor, bias: Optional[Tensor], arch_len: Tensor) -> None:
        """Replace the archive (attention-matching compaction).

        Args:
            keys, values: ``[batch, num_kv_heads, n, head_dim]``; K is re-compacted to the
                kept channels, V is dropped for 0-channel heads.
            bias: float32 ``[batch, num_kv_heads, n]`` added to the logits, ``-inf``
                disables an entry; None for no bias.
            arch_len: int ``[batch]``, valid rows per sequence (``<= n``).
        """
        b, kvh, n, d = keys.shape
        if (b, kvh, d) != (self.batch_size, self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"keys: expected [{self.batch_size}, {self.num_kv_heads}, n, {self.head_dim}], got {tuple(keys.shape)}"
            )
        if values.shape != keys.shape:
            raise ValueError(f"values: expected {tuple(keys.shape)}, got {tuple(values.shape)}")
        if bias is not None and bias.shape != (b, kvh, n):
            raise ValueError(f"bias: expected {(b, kvh, n)}, got {tuple(bias.shape)}")
        lens = [int(x) for x in arch_len.tolist()]
        if len(lens) != b or any(not 0 <= x <= n for x in lens):
            raise ValueError(f"arch_len: expected {b} values in [0, {n}], got {lens}")
        cap = max(n, 1)
        for g in self.groups:
            g.keys = torch.gather(keys[:, g.heads], 3, g.chan[None, :, None, :].expand(b, -1, n, -1)).to(self.dtype)
            g.values = values[:, g.heads].to(self.dtype).contiguous()
            g.bias = None if bias is None else bias[:, g.heads].float().contiguous()
            if n == 0:
                g.keys = g.keys.new_zeros(b, len(g.heads), cap, g.d)
                g.values = g.values.new_zeros(b, len(g.heads), cap, d)
                g.bias = None if g.bias is None else g.bias.new_zeros(b, len(g.heads), cap)
        self.capacity = cap if n == 0 else n
        self._rollback = {}
        self.arch_len_host = lens
        self.arch_len.copy_(torch.tensor(lens, dtype=torch.int32))
        self.version += 1

    # ------------------------------------------------------------------ transformers API
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """Not used directly: ``LeanKCache.update`` hands the step to the attention function."""
        raise RuntimeError("LeanKLayer.update is driven by leank.attention; call LeanKCache.update")

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        if self.is_initialized:
            self.win_len.zero_()
            self.arch_len.zero_()
            self.win_len_host = [0] * self.batch_size
            self.arch_len_host = [0] * self.batch_size
            for g in self.groups:
                g.bias = None
            self.version += 1
        self._rollback = {}
        self.seen_tokens = 0

    def _select_batch(self, index: Tensor) -> None:
        """Keep the sequences ``index`` (int64 ``[new_batch]``, repeats allowed).

        Same batch size (beam search reorders every step): rows are rewritten in place, so
        captured graphs stay valid. Another size replaces the tensors (``version`` bumped).
        """
        index = index.to(self.device)
        host = index.tolist()
        tensors = [self.win_k, self.win_v, self.win_len, self.arch_len]
        for g in self.groups:
            tensors += [g.keys, g.values] + ([g.bias] if g.bias is not None else [])
        if len(host) == self.batch_size:
            for t in tensors:
                t.copy_(t.index_select(0, index))
        else:
            self.win_k, self.win_v = self.win_k.index_select(0, index), self.win_v.index_select(0, index)
            self.win_len, self.arch_len = self.win_len.index_select(0, index), self.arch_len.index_select(0, index)
            for g in self.groups:
                g.keys, g.values = g.keys.index_select(0, index), g.values.index_select(0, index)
                if g.bias is not None:
                    g.bias = g.bias.index_select(0, index)
            self.version += 1
        self.win_len_host = [self.win_len_host[i] for i in host]
        self.arch_len_host = [self.arch_len_host[i] for i in host]
        self._rollback = {}  # rows were reordered: the last step can no longer be undone exactly
        self.batch_size = len(host)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self._select_batch(torch.as_tensor(indices, dtype=torch.long))

    def crop(self, max_length: int) -> None:
        """Drop the most recent tokens: ``max_length < 0`` drops that many (current transformers),
        ``max_length > 0`` keeps that many (older transformers), ``0`` does nothing.

        Exact rollback of the last step (what speculative decoding needs): when at most that
        step's tokens are dropped, the cache becomes what storing only the kept part of the
        step would have given, including rows the step's flush had already moved into the
        archive (their full-width K/V is kept until the next step; at most
        ``ROLLBACK_ROWS`` of them). Deeper crops remove tokens from the window's non-sink
        rows, then from the end of the archive, then from the sink; tokens already archived
        then stay compacted (warned once).
        """
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise ValueError(f"max_length: expected an int (< 0: tokens to drop, > 0: tokens to keep), got {max_length!r}")
        if max_length == 0:  # current transformers: "remove 0 tokens" (older ones never pass 0 while decoding)
            return
        remove = -max_length if max_length < 0 else self.seen_tokens - max_length
        if remove <= 0:
            return
        self.seen_tokens -= remove
        if not self.is_initialized:
            return
        inexact = False
        for b in range(self.batch_size):
            if self._rollback_exact(b, remove):
                continue
            inexact |= self.arch_len_host[b] > 0
            r = remove
            sink = self._sink_rows(b)
            take = min(r, self.win_len_host[b] - sink)
            self.win_len_host[b] -= take
            r -= take
            take = min(r, self.arch_len_host[b])
            self.arch_len_host[b] -= take
            r -= take
            self.win_len_host[b] = max(0, self.win_len_host[b] - r)
        self._rollback = {}
        self.win_len.copy_(torch.tensor(self.win_len_host, dtype=torch.int32))
        self.arch_len.copy_(torch.tensor(self.arch_len_host, dtype=torch.int32))
        if inexact:
            warn_once(__name__, "leank: crop() removed more than the last step's tokens; tokens the archive already "
                             "holds stay channel-compacted (only the last step is rolled back exactly)")

    def _rollback_exact(self, b: int, r: int) -> bool:
        """Undo the last ``r`` tokens of sequence ``b`` exactly from ``_rollback``; False if it cannot."""
        rec = self._rollback.get(b)
        if rec is None or r > rec["tokens"]:
            return False
        if rec["kind"] == "chunk":
            n = rec["stream"] - r
            sink, moved, _ = self.policy.split(n)
            if sink != rec["sink"]:
                return False
        else:  # a decode step stored one token: without it, its flush never happened
            moved = 0
        if r > self.win_len_host[b] - self._sink_rows(b):
            return False  # the crop reaches past the window's non-sink rows: not a rollback of the last step
        d = rec["moved"] - moved  # rows to bring back from the end of the archive
        if d > (rec["k"].shape[1] if d else 0) or d > self.arch_len_host[b]:
            return False
        sink = self._sink_rows(b)
        w = self.win_len_host[b]
        kept = w - r  # window rows that stay; non-sink ones shift right by d
        if d:
            self._ensure_window(kept + d)
            tail_k = self.win_k[b, :, sink:kept].clone()
            tail_v = self.win_v[b, :, sink:kept].clone()
            self.win_k[b, :, sink + d : kept + d] = tail_k
            self.win_v[b, :, sink + d : kept + d] = tail_v
            m = rec["k"].shape[1]
            self.win_k[b, :, sink : sink + d] = rec["k"][:, m - d :]
            self.win_v[b, :, sink : sink + d] = rec["v"][:, m - d :]
            rec["k"], rec["v"] = rec["k"][:, : m - d], rec["v"][:, : m - d]
        self.arch_len_host[b] -= d
        self.win_len_host[b] = kept + d
        return True

    # ------------------------------------------------------------------ accounting
    def memory_report(self) -> dict:
        """Bytes of this layer: held (allocated tensors), used (valid rows) and dense equivalents."""
        if not self.is_initialized:
            return dict(k_bytes=0, v_bytes=0, allocated_bytes=0, dense_k_bytes=0, dense_v_bytes=0, tokens=[])
        es = self.win_k.element_size()
        row = self.num_kv_heads * self.head_dim * es
        tokens = [w + a for w, a in zip(self.win_len_host, self.arch_len_host)]
        k_used = sum(self.win_len_host) * row + sum(
            a * len(g.heads) * g.d * es for a in self.arch_len_host for g in self.groups
        )
        v_used = sum(self.win_len_host) * row + sum(
            a * len(g.heads) * self.head_dim * es for a in self.arch_len_host for g in self.groups
        )
        allocated = self.win_k.nbytes + self.win_v.nbytes
        for rec in self._rollback.values():  # full-width rows kept to undo the last step (crop)
            allocated += sum(rec[x].nbytes for x in ("k", "v") if x in rec)
        for g in self.groups:
            allocated += g.keys.nbytes + g.values.nbytes + (g.bias.nbytes if g.bias is not None else 0)
        return dict(
            k_bytes=k_used,
            v_bytes=v_used,
            allocated_bytes=allocated,
            dense_k_bytes=sum(tokens) * row,
            dense_v_bytes=sum(tokens) * row,
            tokens=tokens,
        )


class LeanKCache(Cache):
    """A transformers ``Cache`` that stores the K cache channel-compacted (LeanK).

    Args:
        mask: a ``ChannelMask`` (``keep [num_layers, num_kv_heads, head_dim]``).
        config: window sizes and backend; ``LeanKConfig()`` by default.

    ``generate()`` uses it automatically after ``leank.patch(model, ...)``; it can also be
    built by hand (``leank.new_cache(model)``) and passed as ``past_key_values``.
    """

    def __init__(self, mask, config: Optional[LeanKConfig] = None):
        from .masks import _as_bool_mask

        if not hasattr(mask, "keep") and not isinstance(mask, Tensor):
            raise ValueError(f"mask: expected a ChannelMask or bool [layers, kv_heads, head_dim], got {type(mask)}")
        keep = mask.keep if hasattr(mask, "keep") else _as_bool_mask(mask)  # ValueError for non-binary values
        if config is not None and not isinstance(config, LeanKConfig):
            raise ValueError(f"config: expected a LeanKConfig or None, got {type(config).__name__}")
        self.mask = mask
        self.config = config or LeanKConfig()
        # with id(), names the cache of a recorded graph: a freed cache's id can be reused, its uid never
        self.uid = next(_CACHE_UIDS)
        self.decode_room_pending = False  # reserve() asked for archive room the next decode step makes sure of
        super().__init__(layers=[LeanKLayer(keep[i].bool(), self.config) for i in range(keep.shape[0])])
        shared: dict = {}
        for layer in self.layers:
            layer._flush_index_cache = shared
        self._model_config = None

    def __deepcopy__(self, memo):
        """A deep copy is a new cache with its own ``uid`` (captured graphs are keyed by it: a copy must never
        replay the graph recorded for the original, whose tensors it does not share)."""
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            setattr(new, k, copy.deepcopy(v, memo))
        new.uid = next(_CACHE_UIDS)
        return new

    def bind(self, model_config) -> None:
        """Remember the model this cache serves, so ``update`` can refuse an unpatched one."""
        self._model_config = model_config

    @property
    def storage_version(self) -> tuple:
        """Changes whenever a layer replaces a storage tensor (a captured decode graph is then stale)."""
        return tuple(layer.version for layer in self.layers)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        """Hand the new keys/values to the attention function, which stores them after attending.

        Returns the new ``key_states, value_states`` unchanged; the attention function
        reads the layer's window and archive itself.
        """
        if layer_idx >= len(self.layers):
            raise ValueError(f"layer_idx: expected < {len(self.layers)} (mask layers), got {layer_idx}")
        impl = getattr(self._model_config, "_attn_implementation", "leank")
        if not _is_leank_attention(impl) or _PENDING.get() is not None:
            # the previous update was never consumed: the model's attention is not LeanK's
            _PENDING.set(None)
            raise ValueError(
                "past_key_values: a LeanKCache needs a model patched with leank.patch(model, masks=...); this model's "
                f"attention ({impl!r}) would ignore the cache and attend to the new "
                "tokens only"
            )
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != layer.batch_size:
            raise ValueError(f"key_states: this cache holds {layer.batch_size} sequence(s), the input has "
                             f"{key_states.shape[0]}; use a new cache (leank.new_cache(model)) for another batch")
        _PENDING.set(PendingStep(layer, layer_idx, key_states, value_states))
        return key_states, value_states

    def reserve(self, new_tokens: int) -> None:
        """Size the next archive growth for ``new_tokens`` more tokens per sequence.

        ``generate()`` after ``leank.patch`` calls this with ``max_new_tokens`` (or
        ``max_length`` minus the prompt), so the archive is allocated at prefill (once for a
        prompt in one piece) and never grows (or over-allocates) while decoding.
        """
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or not 0 <= new_tokens <= MAX_ROWS:
            raise ValueError(f"new_tokens: expected an int in [0, {MAX_ROWS}] (lengths are int32), got {new_tokens!r}")
        for layer in self.layers:
            layer.reserve = new_tokens
            layer.decode_reserve = new_tokens
        self.decode_room_pending = new_tokens > 0

    def ensure_decode_room(self) -> None:
        """Every layer's ``LeanKLayer.ensure_decode_room`` (the capture runner calls this before its
        first decode step of a call; an eager decode step does it per layer)."""
        for layer in self.layers:
            layer.ensure_decode_room()
        self.decode_room_pending = False

    def memory_report(self, all_ranks: bool = False) -> dict:
        """Bytes held vs a dense bf16/fp16 cache of the same tokens, in total and per layer.

        Keys: ``leank_bytes`` (K+V of the tokens held, window + archive), ``dense_bytes``
        (the same tokens at full head_dim), ``k_bytes``, ``v_bytes``, ``dense_k_bytes``,
        ``dense_v_bytes``, ``allocated_bytes`` (tensor storage incl. spare capacity),
        ``layers`` (per-layer dicts); ``tp_rank``, ``tp_size``, ``kv_heads`` (``[start, stop)``
        of the KV heads counted) and ``all_ranks``. Under tensor parallelism the bytes are this
        rank's (its KV heads only); ``all_ranks=True`` sums them over the tensor-parallel group
        (a collective: call it on every rank). When ``leank.patch`` reordered the heads across
        the ranks (``LeanKConfig.tp_balance``), ``kv_heads`` counts positions in that order and
        ``kv_head_ids`` lists, per layer, the model's own heads this rank holds. See ``leank.tp``.
        """
        if not isinstance(all_ranks, bool):
            raise ValueError(f"all_ranks: expected True or False, got {all_ranks!r}")
        layers = [layer.memory_report() for layer in self.layers]
        tot = {k: sum(r[k] for r in layers) for k in ("k_bytes", "v_bytes", "dense_k_bytes", "dense_v_bytes", "allocated_bytes")}
        tot["leank_bytes"] = tot["k_bytes"] + tot["v_bytes"]
        tot["dense_bytes"] = tot["dense_k_bytes"] + tot["dense_v_bytes"]
        tot["layers"] = layers
        from .tp import rank_report

        return rank_report(tot, self.mask, all_ranks)
