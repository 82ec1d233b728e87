"""Static K-channel masks: the ``ChannelMask`` type, its file formats, baselines and registry.

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

Registry: ``masks/manifest.json`` (installed as ``leank/registry/manifest.json``) lists models (with case-insensitive aliases), their mask
sets (``default``; Qwen2.5 also ``yarn``), source URLs and sha256. Files are fetched into
the user cache dir (``$LEANK_CACHE_DIR`` or ``~/.cache/leank/masks``) by
``leank masks fetch NAME`` / :func:`fetch_mask`, and loaded by :func:`resolve_mask`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT_NAME = "leank.channel_mask"
FORMAT_VERSION = "1"
CONTEXT_SETS_DEFAULT = "default"
MANIFEST_ENV = "LEANK_MASK_MANIFEST"
CACHE_ENV = "LEANK_CACHE_DIR"
PTH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIXES = (".safetensors",)


class MaskFetchError(RuntimeError):
    """A registry mask could not be downloaded (network); the message says where to put it."""


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
            _check_model_id(self.model_id, getattr(config, "name_or_path", "") or "")
        wanted = context_set_from_config(config)
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
        gen = torch.Generator().manual_seed(int(seed))
        counts = kept_counts_for(num_layers, num_kv_heads, head_dim, sparsity, align, generator=gen)
        scores = torch.rand(num_layers, num_kv_heads, head_dim, generator=gen)
        ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
        keep = ranks < counts[..., None]
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


def model_dims(config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers config."""
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
    except AttributeError as e:
        raise ValueError(f"config: expected a decoder config with num_hidden_layers and "
                         f"num_attention_heads, got {type(config).__name__}") from e
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return layers, int(kv), int(head_dim)


def rope_scaling_of(config: Any) -> dict:
    """The rope scaling dict of a config: ``rope_parameters`` (transformers 5) or
    ``rope_scaling`` (4.x); ``{}`` when absent. A per-layer-type dict of dicts is flattened
    to the first entry that names a non-default rope type."""
    for name in ("rope_parameters", "rope_scaling"):
        d = getattr(config, name, None)
        if not isinstance(d, dict) or not d:
            continue
        if all(isinstance(v, dict) for v in d.values()):
            typed = [v for v in d.values() if _rope_type(v) not in ("", "default")]
            return typed[0] if typed else next(iter(d.values()))
        return d
    return {}


def _rope_type(d: dict) -> str:
    return str(d.get("rope_type") or d.get("type") or "").lower()


def context_set_from_config(config: Any) -> str:
    """Mask set implied by the config's rope scaling: ``"yarn"`` for YaRN, else ``"default"``."""
    return "yarn" if _rope_type(rope_scaling_of(config)) == "yarn" else CONTEXT_SETS_DEFAULT


def kept_counts_for(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    sparsity: float,
    align: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Kept channels per head for a target ``sparsity`` over the whole model: int64
    ``[num_layers, num_kv_heads]``, multiples of ``align``.

    As stage 2 of training does with its global quantile, the budget is model-wide: the
    total kept is ``(1 - sparsity) * num_layers * num_kv_heads * head_dim`` rounded to the
    nearest multiple of ``align`` (ties keep more), and the aligned blocks are distributed
    over the heads, every head getting ``floor`` of the share and the remainder one more
    block (evenly spread over the heads, or at heads drawn with ``generator``). So the
    achieved sparsity is within half a block over the whole model of the request even when
    one head's share is less than one block (head_dim 64, align 32, sparsity 0.8 keeps 32
    channels in 40% of the heads instead of pruning everything). A request whose budget
    rounds to 0 channels raises ``ValueError`` (use a smaller ``align`` or a lower sparsity).
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity: expected a float in [0, 1), got {sparsity!r}")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1 or head_dim % align:
        raise ValueError(f"align: expected an int >= 1 dividing head_dim={head_dim}, got {align!r}")
    for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    heads = num_layers * num_kv_heads
    total = heads * head_dim
    exact_units = (1.0 - float(sparsity)) * total / align
    units = int(math.floor(exact_units + 0.5 + 1e-9))
    if units == 0:
        raise ValueError(
            f"sparsity: expected at most {1 - align / (2 * total):.6f} for {num_layers} layers x {num_kv_heads} KV "
            f"heads of head_dim {head_dim} with align={align} (a higher sparsity keeps less than half of one "
            f"{align}-channel block in the whole model, i.e. prunes every channel), got {sparsity!r}; "
            f"lower the sparsity or the align"
        )
    base, extra = divmod(units, heads)
    counts = torch.full((heads,), base, dtype=torch.int64)
    if extra:
        if generator is not None:
            chosen = torch.randperm(heads, generator=generator)[:extra]
        else:  # evenly spread over layers and heads
            chosen = torch.tensor([int((i + 0.5) * heads / extra) for i in range(extra)])
        counts[chosen] += 1
    counts = (counts * align).view(num_layers, num_kv_heads)
    achieved = _achieved(counts, head_dim)
    logger.info("sparsity %.4f requested, %.4f achieved (align=%d, %d heads of head_dim %d, kept counts %s)",
                sparsity, achieved, align, heads, head_dim, sorted(set(counts.flatten().tolist())))
    if abs(achieved - float(sparsity)) > SPARSITY_WARN_TOLERANCE:
        _warn(f"sparsity {float(sparsity):.4f} was requested but {achieved:.4f} is the nearest this model allows "
              f"with align={align} ({heads} KV heads x head_dim {head_dim}: steps of "
              f"{align / total:.4f} over the whole model)")
    return counts


# a baseline whose achieved sparsity differs from the request by more than this warns
SPARSITY_WARN_TOLERANCE = 0.01


def _achieved(counts: torch.Tensor, head_dim: int) -> float:
    return 1.0 - float(counts.sum()) / (counts.numel() * head_dim)


def from_rope_frequency(config: Any, sparsity: float, align: int = 32) -> ChannelMask:
    """Data-free baseline: every KV head keeps its lowest-frequency RoPE channel pairs.

    HF ``rotate_half`` layout: channel ``i`` pairs with ``i + head_dim/2`` and both rotate
    at frequency index ``i mod head_dim/2``; a higher index is a lower frequency. Head
    ``(l, h)`` keeps ``k = counts[l, h]`` channels, the pairs with frequency index
    ``>= head_dim/2 - k/2``, where ``counts = kept_counts_for(...)`` spreads the model-wide
    budget over the heads (see there: the achieved sparsity is within half an aligned block
    over the whole model of the request; it is logged, stored in
    ``metadata["achieved_sparsity"]``, and warned about when it differs by more than
    ``SPARSITY_WARN_TOLERANCE``). ``align`` must be even so that whole pairs are kept.
    """
    layers, kv_heads, head_dim = model_dims(config)
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise ValueError(f"config.partial_rotary_factor: expected 1.0, got {config.partial_rotary_factor}")
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even RoPE head dim, got {head_dim}")
    if isinstance(align, int) and not isinstance(align, bool) and align % 2:
        raise ValueError(f"align: expected an even value so whole RoPE pairs are kept, got {align}")
    counts = kept_counts_for(layers, kv_heads, head_dim, sparsity, align)
    half = head_dim // 2
    freq_index = torch.arange(head_dim) % half
    keep = freq_index >= half - counts[..., None] // 2
    return ChannelMask(
        keep,
        model_id=getattr(config, "name_or_path", "") or "",
        align=align,
        context_set=context_set_from_config(config),
        source="rope-frequency baseline",
        metadata={"method": "rope_frequency", "requested_sparsity": float(sparsity),
                  "achieved_sparsity": _achieved(counts, head_dim)},
    )


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


# ----------------------------------------------------------------------------- registry


def registry_dirs() -> list[Path]:
    """Folders the registry is looked up in, in order: ``leank/registry/`` (an installed
    wheel; ``masks/`` is packaged there) and ``<checkout>/masks/`` (a checkout, ``PYTHONPATH=.``
    or ``pip install -e .``)."""
    here = Path(_PACKAGE_DIR).resolve()
    return [here / "registry", here.parent / "masks"]


def manifest_path() -> Path:
    """``$LEANK_MASK_MANIFEST``, else the first ``manifest.json`` of :func:`registry_dirs`
    (the checkout's path when there is none, for the error message)."""
    env = os.environ.get(MANIFEST_ENV)
    if env:
        return Path(env).expanduser()
    candidates = [d / "manifest.json" for d in registry_dirs()]
    return next((c for c in candidates if c.is_file()), candidates[-1])


def load_manifest(path: str | os.PathLike | None = None) -> dict:
    """Read and check the mask registry (see ``masks/manifest.json``)."""
    path = Path(path) if path is not None else manifest_path()
    if not path.is_file():
        looked = "" if os.environ.get(MANIFEST_ENV) else f" (looked in {', '.join(map(str, registry_dirs()))})"
        raise ValueError(f"mask registry not found at {path}{looked}; set {MANIFEST_ENV} to a manifest.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable mask registry ({e})") from e
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"{path}: expected a JSON object with a 'models' object")
    for mid, entry in models.items():
        sets = entry.get("sets") if isinstance(entry, dict) else None
        if not isinstance(sets, dict) or not sets:
            raise ValueError(f"{path}: model {mid!r} needs a non-empty 'sets' object")
    return data


def _norm(name: str) -> str:
    return name.strip().lower()


def lookup_model(name: str, manifest: dict | None = None) -> tuple[str, dict]:
    """Canonical model id and registry entry for an id or alias (case-insensitive).

    A name with a path prefix (``/models/Llama-3.1-8B-Instruct``) also matches by its last
    component. Unknown names raise ``ValueError`` listing the known ids.
    """
    manifest = manifest if manifest is not None else load_manifest()
    models = manifest["models"]
    table = {}
    for mid, entry in models.items():
        for alias in [mid, *entry.get("aliases", [])]:
            table[_norm(alias)] = mid
    key = _norm(str(name))
    mid = table.get(key) or table.get(_norm(key.rstrip("/").rsplit("/", 1)[-1]))
    if mid is None:
        raise ValueError(f"unknown model {name!r} for the mask registry; known ids: {sorted(models)} "
                         f"(aliases are case-insensitive; pass a mask file path for other models)")
    return mid, models[mid]


def canonical_model_id(name: str) -> str | None:
    """Registry id of ``name`` or None when the registry does not know it (or is absent)."""
    try:
        return lookup_model(name)[0]
    except ValueError:
        return None


def _check_model_id(mask_id: str, config_id: str) -> None:
    if not mask_id or not config_id:
        return
    a, b = canonical_model_id(mask_id), canonical_model_id(config_id)
    if a and b:
        same = a == b
    elif a or b:
        _warn(f"cannot tell whether mask model {mask_id!r} matches model {config_id!r} (one is not in the "
              f"registry); shape checks passed")
        return
    else:
        same = _norm(mask_id).rstrip("/").rsplit("/", 1)[-1] == _norm(config_id).rstrip("/").rsplit("/", 1)[-1]
    if not same:
        raise ValueError(f"mask was made for model {mask_id!r} but the model is {config_id!r} "
                         f"(pass check_model_id=False to override)")


def mask_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where fetched masks live: ``cache_dir``, else ``$LEANK_CACHE_DIR``, else
    ``~/.cache/leank/masks``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "leank" / "masks"


def select_set(
    model_id: str, entry: dict, context_set: str | None, config: Any = None, allow_fallback: bool = False
) -> tuple[str, dict]:
    """Pick a mask set of a registry entry: explicit ``context_set`` wins, else the one the
    config's rope scaling implies, else the entry's ``default_set``. A set that is missing or
    has no published file raises ``ValueError``, or with ``allow_fallback=True`` falls back to
    the default set with a logged warning."""
    sets = entry["sets"]
    default = entry.get("default_set", CONTEXT_SETS_DEFAULT)
    if context_set is not None:
        wanted, why = context_set, "requested"
    elif config is not None:
        wanted, why = context_set_from_config(config), "implied by the config's rope scaling"
    else:
        wanted, why = default, "default"
    info = sets.get(wanted)
    problem = None
    if info is None:
        problem = f"has no mask set {wanted!r} ({why}); available sets: {sorted(sets)}"
    elif not info.get("file"):
        note = info.get("note", "")
        problem = f"mask set {wanted!r} ({why}) is not published" + (f": {note}" if note else "")
    if problem is None:
        return wanted, info
    can_fall_back = wanted != default and bool(sets.get(default, {}).get("file"))
    if not (allow_fallback and can_fall_back):
        hint = (f"; pass context_set={default!r} or allow_fallback=True to use the {default!r} set"
                if can_fall_back and not allow_fallback else "")
        raise ValueError(f"model {model_id!r} {problem}{hint}")
    _warn(f"model {model_id!r} {problem}; FALLING BACK to mask set {default!r} (allow_fallback=True)")
    return default, sets[default]


def _registry_target(name: str, context_set: str | None, config: Any, allow_fallback: bool,
                     cache_dir: str | os.PathLike | None) -> tuple[str, str, dict, Path]:
    mid, entry = lookup_model(name)
    set_name, info = select_set(mid, entry, context_set, config, allow_fallback)
    return mid, set_name, info, mask_cache_dir(cache_dir) / info["file"]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_mask(
    name: str,
    context_set: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download a registry mask into the cache dir, check its sha256, return its path.

    Already present with the right checksum: nothing is downloaded. A checksum mismatch
    raises ``ValueError`` (the download is discarded). A network failure raises
    :class:`MaskFetchError` naming the URL and the path to put the file at by hand.
    """
    mid, set_name, info, target = _registry_target(name, context_set, None, False, cache_dir)
    url = url or info.get("url")
    want = info.get("sha256")
    if not url:
        raise ValueError(f"model {mid!r} mask set {set_name!r} has no source URL in the registry")
    if target.is_file() and want and file_sha256(target) == want:
        logger.info("%s (set %s) already in %s", mid, set_name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s -> %s", url, target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-", suffix=target.suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        out.write(chunk)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                raise MaskFetchError(
                    f"could not download the {set_name!r} mask of {mid!r} from {url} ({e}). "
                    f"If this machine is offline, download that URL elsewhere and copy the file to "
                    f"{target}" + (f" (sha256 {want})" if want else "")
                    + ", or pass a mask file path to leank.patch(..., masks=PATH)."
                ) from e
        got = file_sha256(tmp)
        if want and got != want:
            raise ValueError(f"sha256 mismatch for {url}: expected {want}, got {got}; "
                             f"download discarded, {target} left unchanged")
        if not want:
            _warn(f"registry has no sha256 for {mid} set {set_name}; downloaded file is unchecked")
        os.replace(tmp, target)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load_registry_mask(mid: str, set_name: str, info: dict, path: Path) -> ChannelMask:
    fmt = info.get("format", "leank-pth")
    want = info.get("sha256")
    if want and file_sha256(path) != want:
        raise ValueError(f"{path}: sha256 differs from the registry ({want}) for {mid!r} set "
                         f"{set_name!r}; delete it and run `leank masks fetch {mid} --set {set_name}`")
    meta = {"registry_set": set_name}
    if fmt == "leank-pth":
        return ChannelMask.from_pth(path, model_id=mid, context_set=set_name, align=info.get("align"),
                                    source=info.get("url", str(path)), metadata=meta)
    if fmt == "safetensors":
        return ChannelMask.load(path)
    raise ValueError(f"registry entry {mid!r} set {set_name!r}: unknown format {fmt!r}")


def _looks_like_path(spec: Any) -> bool:
    if isinstance(spec, os.PathLike):
        return True
    s = str(spec)
    return s.lower().endswith(PTH_SUFFIXES + SAFETENSORS_SUFFIXES) or os.path.isfile(os.path.expanduser(s))


def resolve_mask(
    spec: Any,
    config: Any = None,
    context_set: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_fallback: bool = False,
) -> ChannelMask:
    """Turn what a user passes as ``masks=`` into a validated :class:`ChannelMask`.

    ``spec``: a ``ChannelMask``; a path to a ``.safetensors`` or published ``.pth`` file; or
    a registry model id / alias (file read from the cache dir, see :func:`mask_cache_dir`).
    Set selection for registry ids: explicit ``context_set`` wins, else YaRN rope scaling in
    ``config`` (``rope_parameters`` or ``rope_scaling``) selects ``"yarn"``, else
    ``"default"``; a missing set raises unless ``allow_fallback=True`` (logged). For masks
    given directly, an explicit ``context_set`` different from the mask's raises. When
    ``config`` is given the mask is validated against it.
    """
    if isinstance(spec, ChannelMask):
        mask = spec
    elif isinstance(spec, (str, os.PathLike)) and _looks_like_path(spec):
        mask = load_mask(spec)
    elif isinstance(spec, str):
        mid, set_name, info, path = _registry_target(spec, context_set, config, allow_fallback, cache_dir)
        if not path.is_file():
            raise ValueError(
                f"mask file for {mid!r} (set {set_name!r}) not found at {path}; run "
                f"`leank masks fetch {mid} --set {set_name}` or download {info.get('url')} to that path"
            )
        mask = _load_registry_mask(mid, set_name, info, path)
        context_set = None  # already honoured (or explicitly fallen back)
    else:
        raise ValueError(f"masks: expected a ChannelMask, a mask file path or a model id, got "
                         f"{type(spec).__name__}")
    if context_set is not None and context_set != mask.context_set:
        raise ValueError(f"mask is for context set {mask.context_set!r}, but context_set={context_set!r} "
                         f"was requested")
    if config is not None:
        mask.validate(config)
    return mask
