"""Static K-channel masks: the ``ChannelMask`` type and its file formats.

A channel mask is ``keep[num_layers, num_kv_heads, head_dim]`` (torch.bool, CPU), True =
the channel of post-RoPE K is kept for archived tokens. Every query head of a GQA group uses
its KV head's row. Kept counts per head are multiples of ``align`` so kernels get aligned
tiles; a head with 0 kept channels has no archive at all (its V is dropped too).

Files:
  * ``.safetensors`` (native): one uint8 tensor ``keep`` plus the mask's fields in the
    safetensors header (string metadata; no pickle). A sha256 of the tensor bytes is stored
    in the header and checked on load.
  * ``.pth`` (published LeanK format, read only): a float 0/1 tensor
    ``[layers, kv_heads, head_dim]``, loaded with ``torch.load(weights_only=True)``.

The other mask concerns live next door and are re-exported here, so ``from leank.masks
import X`` keeps working for all of them:
  * :mod:`leank.baselines`: RoPE-frequency, random and published-mix baselines
    (``from_rope_frequency``, ``kept_counts_for``, ``mix_mask``);
  * :mod:`leank.mask_registry`: the manifest, ``fetch_mask``, ``resolve_mask``;
  * :mod:`patches`: reading a model config (``model_dims``, ``context_set_from_config``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error  # noqa: F401  (leank.masks.urllib: kept for callers and tests)
import urllib.request  # noqa: F401
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leank.patches import DEFAULT_SET, context_set_of, model_dims, rope_scaling_of

logger = logging.getLogger(__name__)

FORMAT_NAME = "leank.channel_mask"
FORMAT_VERSION = "1"
CONTEXT_SETS_DEFAULT = DEFAULT_SET
PTH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIXES = (".safetensors",)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _warn(message: str) -> None:
    """A surprise the user must see even with logging unconfigured: a WARNING log record
    and a ``UserWarning`` (the package logger only has a ``NullHandler``), attributed to
    the first caller outside the ``leank`` package."""
    logger.warning(message)
    import sys

    level, frame = 2, sys._getframe(1)  # stacklevel 2 = the caller of _warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)


# ----------------------------------------------------------------------------- ChannelMask


@dataclass(eq=False)
class ChannelMask:
    """Per-layer, per-KV-head set of kept K channels.

    Attributes:
        keep: torch.bool ``[num_layers, num_kv_heads, head_dim]`` on CPU (0/1 integer or
            float tensors are converted; other values raise ``ValueError``).
        model_id: Hugging Face id of the model the mask was made for ("" = unknown).
        align: kept counts per head are multiples of this (kernels tile by it).
        context_set: which context regime the mask targets, e.g. ``"default"`` or ``"yarn"``.
        source: where the mask came from (URL, file, method).
        metadata: free JSON-serialisable dict (training recipe, notes).
    """

    keep: torch.Tensor
    model_id: str = ""
    align: int = 16
    context_set: str = CONTEXT_SETS_DEFAULT
    source: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keep = _as_bool_mask(self.keep)
        for name in ("model_id", "context_set", "source"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a str, got {getattr(self, name)!r}")
        if not self.context_set:
            raise ValueError("context_set: expected a non-empty str, got ''")
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise ValueError(f"align: expected an int >= 1, got {self.align!r}")
        if self.head_dim % self.align:
            raise ValueError(f"align: expected a divisor of head_dim={self.head_dim}, got {self.align}")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"metadata: expected a dict, got {type(self.metadata).__name__}")
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata: expected JSON-serialisable values ({e})") from e
        _check_aligned(self.kept_counts(), self.align)

    # -- shape and statistics
    @property
    def num_layers(self) -> int:
        return int(self.keep.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.keep.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.keep.shape[2])

    def kept_counts(self) -> torch.Tensor:
        """Kept channels per head: int64 ``[num_layers, num_kv_heads]``."""
        return self.keep.sum(dim=-1, dtype=torch.int64)

    @property
    def sparsity(self) -> float:
        """Fraction of K channels pruned over all layers and KV heads (0 = dense)."""
        return 1.0 - float(self.keep.sum()) / self.keep.numel()

    @property
    def v_sparsity(self) -> float:
        """Fraction of (layer, KV head) pairs with 0 kept channels, whose archived V is dropped."""
        return float((self.kept_counts() == 0).sum()) / (self.num_layers * self.num_kv_heads)

    def kept_channels(self, layer: int, head: int) -> torch.Tensor:
        """Sorted kept channel indices of one KV head: int64 ``[kept_count]``."""
        return self.keep[layer, head].nonzero().flatten()

    def layer_groups(self, layer: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """KV heads of ``layer`` grouped by kept count, ascending.

        Returns a list of ``(count, heads, channels)``: ``heads`` int64 ``[n]`` (KV head
        indices, ascending), ``channels`` int64 ``[n, count]`` (sorted kept channel indices
        of each head; ``[n, 0]`` for the 0-count group).
        """
        counts = self.kept_counts()[layer]
        groups = []
        for c in torch.unique(counts).tolist():
            heads = (counts == c).nonzero().flatten()
            chans = self.keep[layer, heads].nonzero()[:, 1].reshape(len(heads), c)
            groups.append((int(c), heads, chans))
        return groups

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChannelMask):
            return NotImplemented
        return (
            self.keep.shape == other.keep.shape
            and torch.equal(self.keep, other.keep)
            and (self.model_id, self.align, self.context_set, self.source, self.metadata)
            == (other.model_id, other.align, other.context_set, other.source, other.metadata)
        )

    __hash__ = None  # mutable, compared by value

    def __repr__(self) -> str:
        return (
            f"ChannelMask(model_id={self.model_id!r}, context_set={self.context_set!r}, "
            f"shape={tuple(self.keep.shape)}, align={self.align}, sparsity={self.sparsity:.4f}, "
            f"v_sparsity={self.v_sparsity:.4f}, source={self.source!r})"
        )

    # -- validation against a model
    def validate(self, config: Any, check_model_id: bool = True) -> "ChannelMask":
        """Check the mask fits a transformers ``config``; return ``self``.

        Checks ``num_hidden_layers``, ``num_key_value_heads`` and the head dim
        (``config.head_dim`` or ``hidden_size // num_attention_heads``). When both the mask's
        ``model_id`` and ``config.name_or_path`` are known, they must name the same model
        (aliases of the registry count as the same; a local path is compared by its last
        component). Raises ``ValueError`` saying what does not match.
        """
        expected = model_dims(config)
        got = (self.num_layers, self.num_kv_heads, self.head_dim)
        names = ("num_layers", "num_kv_heads", "head_dim")
        diffs = [f"{n}: model has {e}, mask has {g}" for n, e, g in zip(names, expected, got) if e != g]
        if diffs:
            raise ValueError(
                f"mask{_for_model(self.model_id)} does not fit the model config "
                f"(expected keep shape {list(expected)}, got {list(got)}; " + "; ".join(diffs) + ")"
            )
        if check_model_id:
            from .mask_registry import _check_model_id

            _check_model_id(self.model_id, getattr(config, "name_or_path", "") or "")
        wanted = context_set_of(config)
        if wanted != self.context_set:
            _warn(f"mask{_for_model(self.model_id)} is for context set {self.context_set!r} but the model config "
                  f"implies {wanted!r}")
        return self

    # -- constructors
    @classmethod
    def full(cls, num_layers: int, num_kv_heads: int, head_dim: int, **fields: Any) -> "ChannelMask":
        """All channels kept (a LeanK cache with this mask equals a dense cache)."""
        fields.setdefault("align", _largest_align(head_dim))
        fields.setdefault("source", "full")
        return cls(torch.ones(num_layers, num_kv_heads, head_dim, dtype=torch.bool), **fields)

    @classmethod
    def random(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        sparsity: float,
        align: int = 16,
        seed: int = 0,
        **fields: Any,
    ) -> "ChannelMask":
        """Baseline: kept counts per head from :func:`kept_counts_for` (the heads that get one
        more aligned block are drawn at random), channels drawn uniformly at random
        (individual channels, not RoPE pairs), all from a private ``torch.Generator`` seeded
        with ``seed`` (global RNG untouched). The achieved sparsity is within
        ``align / (2 * num_layers * num_kv_heads * head_dim)`` of ``sparsity`` and stored in
        ``metadata["achieved_sparsity"]``; requests that would prune every channel raise
        ``ValueError``."""
        from .baselines import _achieved, kept_counts_for, random_keep

        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        gen = torch.Generator().manual_seed(seed)
        counts = kept_counts_for(num_layers, num_kv_heads, head_dim, sparsity, align, generator=gen)
        keep = random_keep(counts, head_dim, gen)
        fields.setdefault("source", "random")
        meta = {"method": "random", "requested_sparsity": float(sparsity),
                "achieved_sparsity": _achieved(counts, head_dim), "seed": int(seed)}
        meta.update(fields.pop("metadata", {}))
        return cls(keep, align=align, metadata=meta, **fields)

    # -- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.safetensors`` file (tensor ``keep`` as uint8, fields in the header)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
            raise ValueError(f"path: expected a file name ending in .safetensors (the format written), got {str(path)!r}")
        data = self.keep.to(torch.uint8).contiguous()
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "align": str(self.align),
            "context_set": self.context_set,
            "source": self.source,
            "metadata": json.dumps(self.metadata, sort_keys=True),
            "sparsity": f"{self.sparsity:.6f}",
            "keep_sha256": _tensor_sha256(data),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"keep": data}, str(path), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ChannelMask":
        """Read a file written by :meth:`save`. Unreadable, truncated or corrupted files and
        files that are not LeanK masks raise ``ValueError`` naming the file."""
        path = _existing_file(path)
        header, tensors = _read_safetensors(path)
        if header.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: not a LeanK channel mask (header format={header.get('format')!r}, "
                             f"expected {FORMAT_NAME!r})")
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported mask format_version {header.get('format_version')!r} "
                             f"(this leank reads {FORMAT_VERSION!r})")
        if set(tensors) != {"keep"}:
            raise ValueError(f"{path}: expected exactly one tensor 'keep', found {sorted(tensors)}")
        keep = tensors["keep"]
        if keep.dtype != torch.uint8:
            raise ValueError(f"{path}: tensor 'keep' has dtype {keep.dtype}, expected torch.uint8")
        if _tensor_sha256(keep.contiguous()) != header.get("keep_sha256"):
            raise ValueError(f"{path}: corrupted mask (sha256 of 'keep' does not match the header)")
        try:
            meta = json.loads(header.get("metadata", "{}"))
            return cls(
                keep,
                model_id=header.get("model_id", ""),
                align=int(header.get("align", "16")),
                context_set=header.get("context_set", CONTEXT_SETS_DEFAULT),
                source=header.get("source", ""),
                metadata=meta,
            )
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}: invalid mask: {e}") from e

    @classmethod
    def from_pth(
        cls,
        path: str | os.PathLike,
        model_id: str = "",
        context_set: str = CONTEXT_SETS_DEFAULT,
        align: int | None = None,
        source: str | None = None,
        metadata: dict | None = None,
    ) -> "ChannelMask":
        """Import the published LeanK format: a float 0/1 tensor ``[layers, kv_heads,
        head_dim]`` saved with ``torch.save``, read with ``weights_only=True`` (no code runs).

        ``align=None`` takes the largest of 32 and 16 that divides every kept count.
        Non-binary values, wrong rank or unaligned counts raise ``ValueError`` naming the file.
        """
        path = _existing_file(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip/EOF errors differ by torch version
            raise ValueError(f"{path}: not a readable .pth mask ({type(e).__name__}: {e})") from e
        if not torch.is_tensor(obj):
            keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
            raise ValueError(f"{path}: expected a tensor [layers, kv_heads, head_dim], got "
                             f"{type(obj).__name__}{keys}")
        try:
            keep = _as_bool_mask(obj)
            if align is None:
                align = _infer_align(keep)
            meta = {"imported_from": path.name, "original_dtype": str(obj.dtype).replace("torch.", "")}
            meta.update(metadata or {})
            return cls(keep, model_id=model_id, align=align, context_set=context_set,
                       source=str(path) if source is None else source, metadata=meta)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def describe(self) -> str:
        """Human-readable table: per layer, kept counts per KV head and K sparsity."""
        counts = self.kept_counts()
        width = max(3, len(str(self.head_dim)))
        lines = [
            repr(self),
            f"K channels kept: {int(self.keep.sum())}/{self.keep.numel()} "
            f"(K sparsity {self.sparsity:.4f}); heads with 0 kept (V dropped): "
            f"{int((counts == 0).sum())}/{counts.numel()} ({self.v_sparsity:.4f})",
            "layer  sparsity  kept per KV head",
        ]
        for layer in range(self.num_layers):
            row = counts[layer]
            sp = 1.0 - float(row.sum()) / (self.num_kv_heads * self.head_dim)
            lines.append(f"{layer:5d}  {sp:8.4f}  " + " ".join(f"{int(c):{width}d}" for c in row))
        hist = torch.unique(counts, return_counts=True)
        lines.append("kept-count histogram: " + ", ".join(f"{int(c)}: {int(n)}" for c, n in zip(*hist)))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers


def _as_bool_mask(keep: Any) -> torch.Tensor:
    """Convert to a contiguous CPU bool tensor ``[L, KVH, D]``; 0/1 only."""
    if not torch.is_tensor(keep):
        try:
            keep = torch.as_tensor(keep)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"keep: expected a tensor [num_layers, num_kv_heads, head_dim], got "
                             f"{type(keep).__name__}") from e
    keep = keep.detach().cpu()
    if keep.dim() != 3:
        raise ValueError(f"keep: expected 3 dims [num_layers, num_kv_heads, head_dim], got shape "
                         f"{list(keep.shape)}")
    if min(keep.shape) == 0:
        raise ValueError(f"keep: expected non-empty dims, got shape {list(keep.shape)}")
    if keep.dtype == torch.bool:
        return keep.contiguous()
    if keep.is_complex():
        raise ValueError(f"keep: expected bool or 0/1 values, got dtype {keep.dtype}")
    bad = ~((keep == 0) | (keep == 1))  # NaN compares False -> bad
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise ValueError(
            f"keep: expected binary 0/1 values, found {int(bad.sum())} non-binary value(s), e.g. "
            f"{keep[tuple(idx)].item()!r} at [layer={idx[0]}, kv_head={idx[1]}, channel={idx[2]}]"
        )
    return (keep == 1).contiguous()


def _check_aligned(counts: torch.Tensor, align: int) -> None:
    bad = (counts % align) != 0
    if bad.any():
        layer, head = bad.nonzero()[0].tolist()
        raise ValueError(
            f"keep: kept channel count of layer {layer}, KV head {head} is {int(counts[layer, head])}, "
            f"not a multiple of align={align} ({int(bad.sum())} unaligned head(s) in total)"
        )


def _infer_align(keep: torch.Tensor) -> int:
    counts = keep.sum(-1)
    for a in (32, 16):
        if keep.shape[-1] % a == 0 and bool((counts % a == 0).all()):
            return a
    _check_aligned(counts, 16)  # raises naming the first unaligned head
    raise ValueError(f"keep: head_dim={keep.shape[-1]} is not a multiple of 16")


def _largest_align(head_dim: int) -> int:
    for a in (32, 16):
        if head_dim % a == 0:
            return a
    return head_dim


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    return path


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, header JSON errors
        raise ValueError(f"{path}: not a readable safetensors file, possibly truncated or corrupted "
                         f"({type(e).__name__}: {e})") from e
    return header, tensors


def _for_model(model_id: str) -> str:
    return f" for {model_id!r}" if model_id else ""


def load_mask(path: str | os.PathLike, **pth_kwargs: Any) -> ChannelMask:
    """Load a ``.safetensors`` mask, or import a published ``.pth`` (``pth_kwargs`` go to
    :meth:`ChannelMask.from_pth`)."""
    suffix = Path(path).suffix.lower()
    if suffix in PTH_SUFFIXES:
        return ChannelMask.from_pth(path, **pth_kwargs)
    if suffix in SAFETENSORS_SUFFIXES:
        if pth_kwargs:
            raise ValueError(f"{path}: options {sorted(pth_kwargs)} only apply to .pth imports")
        return ChannelMask.load(path)
    raise ValueError(f"{path}: expected a .safetensors or .pth mask file, got suffix {suffix!r}")


context_set_from_config = context_set_of  # the mask set a config's rope scaling calls for (patches)

# ----------------------------------------------------------------------------- re-exports
# Resolved on first access (PEP 562), so that leank.baselines / leank.mask_registry, which
# import ChannelMask from here, can be imported first without an import cycle.
_REEXPORTS = {
    "leank.baselines": ("SPARSITY_WARN_TOLERANCE", "_achieved", "from_rope_frequency", "kept_counts_for",
                        "mix_mask", "random_keep", "rope_keep"),
    "leank.mask_registry": ("CACHE_ENV", "MANIFEST_ENV", "MaskFetchError", "_check_model_id", "_load_registry_mask",
                            "_looks_like_path", "_norm", "_registry_target", "canonical_model_id", "fetch_mask",
                            "file_sha256", "load_manifest", "lookup_model", "manifest_path", "mask_cache_dir",
                            "registry_dirs", "resolve_mask", "select_set"),
}
_HOME = {name: module for module, names in _REEXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


__all__ = [
    "CACHE_ENV", "CONTEXT_SETS_DEFAULT", "ChannelMask", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_ENV",
    "MaskFetchError", "PTH_SUFFIXES", "SAFETENSORS_SUFFIXES", "SPARSITY_WARN_TOLERANCE", "canonical_model_id",
    "context_set_from_config", "fetch_mask", "file_sha256", "from_rope_frequency", "kept_counts_for", "load_manifest",
    "load_mask", "lookup_model", "manifest_path", "mask_cache_dir", "mix_mask", "model_dims", "random_keep",
    "registry_dirs", "resolve_mask", "rope_keep", "rope_scaling_of", "select_set",
]
