"""Training recipe: one flat dataclass, validated in ``__post_init__``, loaded from YAML.

Unknown YAML keys raise ``ValueError`` naming them (a typo must not silently fall back to a
default). Window sizes default to :class:`leank.config.LeanKConfig`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import LeanKConfig
from .data import STYLES, TASKS

DTYPES = ("float32", "bfloat16", "float16")
_DEFAULT_WINDOW = LeanKConfig()


@dataclass
class TrainRecipe:
    """Everything a ``leank train`` run needs.

    Attributes:
        model: HF model id or local directory of the frozen model.
        output: path of the ``.safetensors`` mask written at the end.
        model_id: model id stored in the mask ("" = ``model``).
        context_set: mask set name stored in the mask (``"default"``, ``"yarn"``).
        ratio: target K sparsity in [0, 1) (fraction of channels pruned).
        align: per-head kept counts are multiples of this; must divide head_dim.
        lr: stage-1 AdamW learning rate (stage 2 uses ``lr / 2``).
        reg: weight of the L1 (mean) penalty on the factors.
        stage1_steps, stage2_steps: optimizer steps of each stage.
        batch_size: samples per optimizer step (split over ranks under torchrun).
        min_len, max_len: sample length range (tokens) for stage 1.
        stage2_min_len, stage2_max_len: stage-2 length range (None = stage 1's).
        same_length_per_step: all samples of a step share one length (batched forward).
        tasks: synthetic tasks to cycle through (see :mod:`leank.train.data`).
        n_pairs: (min, max) needles of a multikey sample.
        task_style: text style of the tasks (``"natural"``; ``"compact"`` for the tiny model).
        sink, recent: full-K window sizes (deployment's ``LeanKConfig`` defaults).
        warmup_frac, decay_frac: fraction of each stage's steps with linear warm-up from 0
            and with linear decay to 0 at the end; flat in between.
        rope_scaling: dict merged into the model's rope parameters (e.g. YaRN), or None.
        dtype: model dtype; factors and the loss are float32.
        gradient_checkpointing: activation checkpointing of the decoder layers.
        chat_template: wrap prompts with the tokenizer's chat template when it has one.
        checkpoint_dir: where ``checkpoint.pt`` is written ("" = next to ``output``).
        checkpoint_every: steps between checkpoints (0 = only at stage ends).
        log_every: steps between progress log lines.
        seed: data seed.
    """

    model: str
    output: str
    model_id: str = ""
    context_set: str = "default"
    ratio: float = 0.7
    align: int = 32
    lr: float = 0.02
    reg: float = 0.06
    stage1_steps: int = 200
    stage2_steps: int = 100
    batch_size: int = 8
    min_len: int = 4096
    max_len: int = 32768
    stage2_min_len: int | None = None
    stage2_max_len: int | None = None
    same_length_per_step: bool = False
    tasks: list = field(default_factory=lambda: list(TASKS))
    n_pairs: list = field(default_factory=lambda: [4, 16])
    task_style: str = "natural"
    sink: int = _DEFAULT_WINDOW.sink
    recent: int = _DEFAULT_WINDOW.recent
    warmup_frac: float = 0.1
    decay_frac: float = 0.2
    rope_scaling: dict | None = None
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = True
    chat_template: bool = True
    checkpoint_dir: str = ""
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("model", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name}: expected a non-empty str, got {getattr(self, name)!r}")
        if not self.output.lower().endswith(".safetensors"):  # checked now, not when the mask is written at the end
            raise ValueError(f"output: expected a path ending in .safetensors (the mask format), got {self.output!r}")
        _check_float(self, "ratio", 0.0, 1.0, hi_open=True)
        for name in ("lr", "reg"):
            _check_float(self, name, 0.0, float("inf"))
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr!r}")
        _check_int(self, "align", 1)
        for name in ("stage1_steps", "stage2_steps", "checkpoint_every", "sink", "recent", "seed"):
            _check_int(self, name, 0)
        for name in ("batch_size", "min_len", "max_len", "log_every"):
            _check_int(self, name, 1)
        if self.stage1_steps + self.stage2_steps < 1:
            raise ValueError("stage1_steps + stage2_steps: expected >= 1, got 0")
        if self.min_len > self.max_len:
            raise ValueError(f"min_len, max_len: expected min_len <= max_len, got {self.min_len} > {self.max_len}")
        for name in ("stage2_min_len", "stage2_max_len"):
            if getattr(self, name) is not None:
                _check_int(self, name, 1)
        if self.s2_range[0] > self.s2_range[1]:
            raise ValueError(f"stage2_min_len, stage2_max_len: expected min <= max, got {self.s2_range}")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"tasks: expected a non-empty list from {TASKS}, got {self.tasks!r}")
        self.tasks = list(self.tasks)
        if (not isinstance(self.n_pairs, (list, tuple)) or len(self.n_pairs) != 2
                or not all(isinstance(x, int) and x >= 1 for x in self.n_pairs) or self.n_pairs[0] > self.n_pairs[1]):
            raise ValueError(f"n_pairs: expected [min, max] ints with 1 <= min <= max, got {self.n_pairs!r}")
        self.n_pairs = list(self.n_pairs)
        if self.task_style not in STYLES:
            raise ValueError(f"task_style: expected one of {STYLES}, got {self.task_style!r}")
        _check_float(self, "warmup_frac", 0.0, 1.0)
        _check_float(self, "decay_frac", 0.0, 1.0)
        if self.warmup_frac + self.decay_frac > 1.0:
            raise ValueError(f"warmup_frac + decay_frac: expected <= 1, got {self.warmup_frac + self.decay_frac}")
        if self.rope_scaling is not None and (not isinstance(self.rope_scaling, dict)
                                              or not (self.rope_scaling.get("rope_type") or self.rope_scaling.get("type"))):
            raise ValueError(f"rope_scaling: expected None or a dict with 'rope_type', got {self.rope_scaling!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        for name in ("same_length_per_step", "gradient_checkpointing", "chat_template"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if not isinstance(self.context_set, str) or not self.context_set:
            raise ValueError(f"context_set: expected a non-empty str, got {self.context_set!r}")

    @property
    def s2_range(self) -> tuple[int, int]:
        """Stage-2 ``(min_len, max_len)``."""
        return (self.stage2_min_len or self.min_len, self.stage2_max_len or self.max_len)

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    @property
    def checkpoint_path(self) -> Path:
        base = Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.output).with_suffix("").parent
        return base / (Path(self.output).stem + ".checkpoint.pt")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_float(obj: Any, name: str, lo: float, hi: float, hi_open: bool = False) -> None:
    v = getattr(obj, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v and (v < hi if hi_open else v <= hi)
    if not ok:
        raise ValueError(f"{name}: expected a number in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")
    setattr(obj, name, float(v))


def _check_int(obj: Any, name: str, lo: int) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")


def recipe_from_dict(d: dict, **overrides: Any) -> TrainRecipe:
    """Build a recipe; keys that are not fields raise ``ValueError`` naming them."""
    if not isinstance(d, dict):
        raise ValueError(f"recipe: expected a mapping, got {type(d).__name__}")
    merged = {**d, **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in dataclasses.fields(TrainRecipe)}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ValueError(f"recipe: unknown keys {unknown}; expected a subset of {sorted(names)}")
    missing = sorted(n for n in ("model", "output") if n not in merged)
    if missing:
        raise ValueError(f"recipe: missing required keys {missing}")
    return TrainRecipe(**merged)


def load_recipe(path: str | Path, **overrides: Any) -> TrainRecipe:
    """Read a YAML recipe; ``overrides`` (not None) replace its values."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe: expected an existing YAML file, got {str(path)!r}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    try:
        return recipe_from_dict(data, **overrides)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
