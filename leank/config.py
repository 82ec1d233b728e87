"""Configuration of the LeanK cache and attention. Defaults live here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "reference", "tilelang")


@dataclass(frozen=True)
class LeanKConfig:
    """Sizes of the full-precision window and the attention backend.

    Attributes:
        sink: first tokens of each sequence kept at full head_dim (attention sinks).
        recent: most recent tokens kept at full head_dim.
        flush_every: decode steps between flushes; the window holds up to
            ``sink + recent + flush_every`` tokens (paper: 32).
        backend: ``"reference"`` (PyTorch, CPU and GPU), ``"tilelang"`` (CUDA kernels)
            or ``"auto"`` (TileLang on CUDA when importable, else reference).
        initial_archive_capacity: archive rows preallocated per sequence, and the
            smallest growth step (growth is geometric by 1/8, never a per-step concat).
    """

    sink: int = 128
    recent: int = 1024
    flush_every: int = 32
    backend: str = "auto"
    initial_archive_capacity: int = 512

    def __post_init__(self) -> None:
        for name in ("sink", "recent"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        if not isinstance(self.flush_every, int) or self.flush_every < 1:
            raise ValueError(f"flush_every: expected an int >= 1, got {self.flush_every!r}")
        if self.sink + self.recent < 1:
            raise ValueError(f"sink + recent: expected >= 1, got sink={self.sink}, recent={self.recent}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.initial_archive_capacity, int) or self.initial_archive_capacity < 1:
            raise ValueError(
                f"initial_archive_capacity: expected an int >= 1, got {self.initial_archive_capacity!r}"
            )

    @property
    def window_capacity(self) -> int:
        """Rows of the full-precision window buffer: sink + recent + flush_every."""
        return self.sink + self.recent + self.flush_every
