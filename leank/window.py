"""The window/archive rule of LeanK, named once: which tokens stay at full head_dim.

Per layer and sequence, a LeanK cache keeps

* the first ``sink`` tokens (attention sinks) and the most recent ``recent`` tokens at
  full head_dim, plus up to ``flush_every`` pending tokens that arrived since the last
  flush: the *window*, ``sink + recent + flush_every`` rows at most;
* every other token in the *archive*: K compacted to the kept channels, V in full except
  for heads with 0 kept channels.

After a prefill (or any multi-token chunk) the window holds ``recent`` non-sink tokens;
during decoding it grows by one row per step and, once it holds ``recent + flush_every``
non-sink tokens, the oldest ones beyond the most recent ``recent`` move to the archive.

:class:`WindowPolicy` is pure Python (no torch; its defaults are ``LeanKConfig``'s): the cache, training, the eval scripts and
benchmarks ask it for token ranges and byte counts instead of re-deriving them.
(``leank.verify`` keeps its own copy of the rule on purpose: it is the oracle.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import LeanKConfig

# defaults live in leank.config (LeanKConfig's field defaults), nowhere else
DEFAULT_SINK: int = LeanKConfig.sink
DEFAULT_RECENT: int = LeanKConfig.recent
DEFAULT_FLUSH_EVERY: int = LeanKConfig.flush_every


@dataclass(frozen=True)
class WindowPolicy:
    """Sizes of the full-precision window (see the module docstring).

    Attributes:
        sink: leading tokens of each sequence kept at full head_dim (>= 0).
        recent: most recent tokens kept at full head_dim (>= 0; ``sink + recent >= 1``).
        flush_every: decode steps between flushes, i.e. pending rows the window may hold
            beyond ``sink + recent`` (>= 1).
    """

    sink: int = DEFAULT_SINK
    recent: int = DEFAULT_RECENT
    flush_every: int = DEFAULT_FLUSH_EVERY

    def __post_init__(self) -> None:
        for name, low in (("sink", 0), ("recent", 0), ("flush_every", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
        if self.sink + self.recent < 1:
            raise ValueError(f"sink + recent: expected >= 1, got sink={self.sink}, recent={self.recent}")

    @classmethod
    def of(cls, config: Any) -> "WindowPolicy":
        """The policy of anything with ``sink``, ``recent`` (and optionally ``flush_every``)
        attributes, e.g. a ``LeanKConfig`` or a training state."""
        return cls(int(config.sink), int(config.recent), int(getattr(config, "flush_every", DEFAULT_FLUSH_EVERY)))

    # -- token ranges
    @property
    def capacity(self) -> int:
        """Rows of a window buffer: ``sink + recent + flush_every``."""
        return self.sink + self.recent + self.flush_every

    @property
    def full_rows(self) -> int:
        """Window rows right after a flush or a prefill of a long context: ``sink + recent``."""
        return self.sink + self.recent

    def sink_rows(self, n_tokens: int) -> int:
        """Sink rows of a sequence of ``n_tokens`` tokens: ``min(sink, n_tokens)``."""
        return min(self.sink, max(0, n_tokens))

    def archive_range(self, n_tokens: int) -> tuple[int, int]:
        """``(lo, hi)``: token indices ``[lo, hi)`` archived after prefilling ``n_tokens``
        tokens (empty, ``lo == hi``, for short sequences)."""
        lo = self.sink_rows(n_tokens)
        return lo, max(lo, n_tokens - self.recent)

    def split(self, n_tokens: int) -> tuple[int, int, int]:
        """``(sink_rows, archive_rows, window_rows)`` after prefilling ``n_tokens`` tokens;
        ``window_rows`` includes the sink rows, ``archive_rows + window_rows == n_tokens``."""
        lo, hi = self.archive_range(n_tokens)
        arch = hi - lo
        return lo, arch, max(0, n_tokens) - arch

    def window_indices(self, n_tokens: int) -> list[int]:
        """Token indices held in the window after prefilling ``n_tokens`` tokens, in window order."""
        lo, hi = self.archive_range(n_tokens)
        return list(range(lo)) + list(range(hi, n_tokens))

    def flush_due(self, non_sink_rows: int) -> bool:
        """Whether a window holding ``non_sink_rows`` non-sink tokens flushes now
        (``>= recent + flush_every``)."""
        return non_sink_rows >= self.recent + self.flush_every

    def flush_rows(self, non_sink_rows: int) -> int:
        """Rows a flush moves to the archive from a window with ``non_sink_rows`` non-sink
        tokens (0 when not due): all but the most recent ``recent``."""
        return non_sink_rows - self.recent if self.flush_due(non_sink_rows) else 0

    # -- bytes
    def cache_bytes(self, n_tokens: int, kept_counts: Any, head_dim: int, elem_bytes: int = 2) -> tuple[int, int]:
        """``(k_bytes, v_bytes)`` one sequence's cache holds after prefilling ``n_tokens``
        tokens, for ``kept_counts`` (kept channels of every (layer, KV head); an iterable of
        ints or a tensor): window at full width, archive K at the kept width, archive V in
        full except for heads with 0 kept channels."""
        counts = [int(c) for c in _flat(kept_counts)]
        _, arch, win = self.split(n_tokens)
        heads = len(counts)
        k = heads * win * head_dim + sum(counts) * arch
        v = heads * win * head_dim + sum(1 for c in counts if c > 0) * arch * head_dim
        return k * elem_bytes, v * elem_bytes

    @staticmethod
    def archive_bytes_per_token(kept_counts: Any, head_dim: int, elem_bytes: int = 2) -> int:
        """Bytes one archived token costs over ``kept_counts``' heads: K at the kept width plus
        V for heads that keep any channel."""
        return sum((int(c) + head_dim) * elem_bytes for c in _flat(kept_counts) if int(c) > 0)


def _flat(x: Any):
    if hasattr(x, "flatten") and hasattr(x, "tolist"):
        return x.flatten().tolist()
    out = []
    for item in x:
        if isinstance(item, (list, tuple)):
            out.extend(_flat(item))
        else:
            out.append(item)
    return out
