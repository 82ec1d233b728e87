"""Phase timing of compaction: one stopwatch that synchronises CUDA before reading the clock."""

from __future__ import annotations

import time
from typing import Optional

import torch


class Stopwatch:
    """Seconds between calls, synchronising CUDA first (so GPU work is attributed to its phase).

    ``Stopwatch(device)()`` returns the seconds since the previous call (or construction);
    ``Stopwatch(device, sink=d)("phase")`` adds them to ``d["phase"]`` and is a no-op (no
    synchronisation) when ``sink`` is None.
    """

    def __init__(self, device, sink: Optional[dict] = None, start: Optional[float] = None):
        self.cuda = torch.device(device).type == "cuda"
        self.sink = sink
        self.t = time.perf_counter() if start is None else start

    def lap(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt

    def __call__(self, name: Optional[str] = None) -> Optional[float]:
        if name is None:
            return self.lap()
        if self.sink is not None:
            self.sink[name] = self.sink.get(name, 0.0) + self.lap()
        return None
