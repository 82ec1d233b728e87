"""Configuration of the LeanK cache and attention. Defaults live here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "reference", "tilelang")
# torch.compile modes of the captured decode step: the modes that record CUDA graphs of their own
# ("reduce-overhead", "max-autotune") cannot run inside LeanK's graph
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# who sums the row-sharded products (o_proj, down_proj) of a tensor-parallel captured decode step
TP_ALLREDUCES = ("transformers", "one_shot")
MAX_ROWS = 2**30  # window sizes and lengths are int32 on the device


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
        capture: on CUDA, run every decode step of a patched ``generate()`` after the
            first as one CUDA graph (``leank.capture``); False runs each step eagerly.
            Steps that cannot be captured run eagerly and say why once.
        compile_decode: compile the captured decode step with ``torch.compile`` first
            (Inductor fuses the norms, RoPE, activations and residual adds around
            LeanK's attention op; the first decode step of a process pays the compile,
            tens of seconds for an 8B model). False records the plain forward. A failed
            compile falls back to the plain forward and says so once.
        compile_mode: the ``torch.compile`` mode of that step, one of ``COMPILE_MODES``:
            ``"default"``, or ``"max-autotune-no-cudagraphs"`` (Inductor benchmarks Triton
            matrix-product templates against cuBLAS for the step's small-batch products;
            minutes of compile instead of tens of seconds).
        fuse_projections: in the captured decode step of a Llama / Qwen2 model, run each
            layer's q/k/v and gate/up projections as one matrix product each over weights
            made views of one buffer (``leank.fused_decode``; memory and ``state_dict``
            unchanged). Under tensor parallelism each rank fuses its own column shards (and
            ``o_proj`` / ``down_proj`` keep their all-reduce). False records transformers'
            forward with its separate products.
        tp_balance: under tensor parallelism, reorder each layer's KV heads across the
            ranks (with their query heads and ``o_proj`` columns: the same function) so
            that every rank stores and reads about the same K/V bytes; without it the rank
            holding more kept channels sets each layer's pace at the all-reduce
            (``leank.tp``). ``leank.unpatch`` restores the order; save checkpoints after it
            (while patched the weights are in the new order). False keeps transformers'
            contiguous split.
        tp_allreduce: under tensor parallelism, who sums each layer's ``o_proj`` and
            ``down_proj`` partial products in the captured, fused decode step:
            ``"transformers"`` (its TP plan's ``torch.distributed.all_reduce``: NCCL on CUDA)
            or ``"one_shot"`` (experimental: the step runs those two products on the local
            shards itself and sums them with PyTorch's symmetric-memory one-shot all-reduce,
            ``leank.tp.OneShotAllReduce``: each rank reads its peers' buffers over NVLink;
            alone on 2 x H200 6.7 us against NCCL's 12.7-14.1 us for a batch-8 8B step's
            64 KB, ``eval/results/allreduce_h200x2.json``; not yet timed in ``generate()``).
            Where ``"one_shot"`` cannot run (no tensor parallelism, not CUDA, no symmetric
            memory in this PyTorch, the step not fused) the step keeps transformers'
            all-reduce and says why once.

    Buffers are sized by what a call needs (prompt + ``max_new_tokens``), never by these
    maxima alone, so a large ``recent`` costs nothing for short prompts.
    """

    sink: int = 128
    recent: int = 1024
    flush_every: int = 32
    backend: str = "auto"
    initial_archive_capacity: int = 512
    capture: bool = True
    compile_decode: bool = True
    compile_mode: str = "default"
    fuse_projections: bool = True
    tp_balance: bool = True
    tp_allreduce: str = "transformers"

    def __post_init__(self) -> None:
        for name in ("sink", "recent"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_ROWS:
                raise ValueError(f"{name}: expected an int in [0, {MAX_ROWS}] (lengths are int32), got {v!r}")
        if not isinstance(self.flush_every, int) or isinstance(self.flush_every, bool) or not 1 <= self.flush_every <= MAX_ROWS:
            raise ValueError(f"flush_every: expected an int in [1, {MAX_ROWS}], got {self.flush_every!r}")
        for name in ("capture", "compile_decode", "fuse_projections", "tp_balance"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.sink + self.recent < 1:
            raise ValueError(f"sink + recent: expected >= 1, got sink={self.sink}, recent={self.recent}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode: expected one of {COMPILE_MODES}, got {self.compile_mode!r} "
                             "('reduce-overhead' and 'max-autotune' record CUDA graphs of their own, which cannot "
                             "run inside LeanK's captured step)")
        if self.tp_allreduce not in TP_ALLREDUCES:
            raise ValueError(f"tp_allreduce: expected one of {TP_ALLREDUCES}, got {self.tp_allreduce!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        cap = self.initial_archive_capacity
        if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_ROWS:
            raise ValueError(f"initial_archive_capacity: expected an int in [1, {MAX_ROWS}] (lengths are int32), "
                             f"got {cap!r}")

    @property
    def window_capacity(self) -> int:
        """Rows of the full-precision window buffer: sink + recent + flush_every."""
        return self.sink + self.recent + self.flush_every
