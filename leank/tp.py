"""LeanK under transformers' tensor parallelism: which KV heads this rank holds.

transformers shards Llama / Qwen2 attention by heads (``base_model_tp_plan``: q/k/v
``colwise``, o ``rowwise``), so rank ``r`` of a ``tp``-way group computes attention for the
contiguous KV heads ``[r*KVH/tp, (r+1)*KVH/tp)`` and LeanK's attention function receives
those heads only. ``leank.patch`` validates the mask whole against the model config, then
keeps the rank's slice of it (:func:`shard_mask_for`); caches made by ``leank.new_cache`` /
``generate`` hold only those heads.

The rank's heads are read from the model itself, never from a private mesh attribute:

* the ``k_proj`` weight is a ``DTensor`` (transformers >= 5.x): its ``Shard(0)`` placement
  names the mesh dimension, whose size and local rank give ``tp`` and ``r``; the local shard's
  rows must be ``num_key_value_heads * head_dim / tp``;
* the ``k_proj`` weight is a plain tensor with fewer rows than
  ``num_key_value_heads * head_dim`` (a model sharded by hand or by another engine):
  ``tp = rows_expected / rows_local`` and ``r`` is the ``torch.distributed`` rank, which is only
  unambiguous when the world is the tensor-parallel group (otherwise ``ValueError``).

Sampling: every rank computes the same (all-reduced, gathered) logits, so ranks pick the same
token iff their random generators agree. transformers does nothing about that (``generate``
draws from the default generator of each process), so a patched ``generate`` broadcasts the
generator state of the group's first rank before it runs (:func:`sync_sampling_rng`):
a rank seeded differently still samples what the first rank samples.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

# a sliced ChannelMask keeps its TPShard (with the process group, not serialisable) under this
# attribute; its metadata carries a JSON copy of the same facts
_SHARD_ATTR = "_leank_tp_shard"


@dataclass(frozen=True)
class TPShard:
    """The KV heads one tensor-parallel rank holds.

    Attributes:
        rank: this process's rank within the tensor-parallel group (0-based).
        size: the tensor-parallel group size (``tp``).
        num_kv_heads: KV heads of the whole model (``config.num_key_value_heads``).
        group: the ``torch.distributed`` process group of the tensor-parallel ranks
            (``None`` = the default group).
    """

    rank: int
    size: int
    num_kv_heads: int
    group: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"rank: expected 0 <= rank < size={self.size}, got rank={self.rank}")
        if self.num_kv_heads % self.size:
            raise ValueError(
                f"num_key_value_heads: LeanK under tensor parallelism needs a multiple of the tensor-parallel size "
                f"tp={self.size} (every rank must hold whole KV heads to slice the channel mask by head), got "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def local_kv_heads(self) -> int:
        return self.num_kv_heads // self.size

    @property
    def kv_start(self) -> int:
        return self.rank * self.local_kv_heads

    @property
    def kv_stop(self) -> int:
        return self.kv_start + self.local_kv_heads

    def as_dict(self) -> dict:
        return dict(rank=self.rank, size=self.size, num_kv_heads=self.num_kv_heads, kv_heads=[self.kv_start, self.kv_stop])


def shard_from_rows(local_rows: int, num_kv_heads: int, head_dim: int, rank: int, size: int, group: Any = None) -> Optional[TPShard]:
    """The shard of a ``k_proj`` that holds ``local_rows`` of ``num_kv_heads * head_dim`` output rows.

    Returns ``None`` when the rank holds every KV head (``size == 1`` and all rows local).
    Raises ``ValueError`` naming the numbers when the rows are not ``num_kv_heads * head_dim / size``
    or ``num_kv_heads`` is not a multiple of ``size``.
    """
    rows = num_kv_heads * head_dim
    if size == 1 and local_rows == rows:
        return None
    shard = TPShard(rank=rank, size=size, num_kv_heads=num_kv_heads, group=group)  # refuses num_kv_heads % size
    if size * local_rows != rows:
        raise ValueError(
            f"k_proj.weight: expected {rows} // tp={size} = {rows // size} local output rows "
            f"(num_key_value_heads={num_kv_heads} x head_dim={head_dim} split over {size} ranks), got {local_rows}"
        )
    return shard


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed, or before DTensor was public
        return None
    return DTensor


def _shard_of_weight(weight: torch.Tensor, num_kv_heads: int, head_dim: int, name: str) -> Optional[TPShard]:
    rows = num_kv_heads * head_dim
    DTensor = _dtensor_type()
    if DTensor is not None and isinstance(weight, DTensor):
        if weight.shape[0] != rows:
            raise ValueError(f"{name}: expected {rows} output rows (num_key_value_heads={num_kv_heads} x "
                             f"head_dim={head_dim}), got a DTensor of global shape {tuple(weight.shape)}")
        dims = [i for i, p in enumerate(weight.placements) if p.is_shard() and p.dim % weight.ndim == 0]
        if not dims:  # replicated (or sharded along the input): every rank holds every head
            return None
        if len(dims) > 1:
            raise ValueError(f"{name}: expected the output rows sharded over one mesh dimension, got placements "
                             f"{weight.placements}")
        mesh = weight.device_mesh
        size, rank = mesh.size(dims[0]), mesh.get_local_rank(dims[0])
        group = mesh.get_group(dims[0])
        return shard_from_rows(weight.to_local().shape[0], num_kv_heads, head_dim, rank, size, group)
    local_rows = int(weight.shape[0])
    if local_rows == rows:
        return None
    if local_rows <= 0 or local_rows > rows or rows % local_rows:
        raise ValueError(f"{name}: expected {rows} output rows or an even share of them (num_key_value_heads="
                         f"{num_kv_heads} x head_dim={head_dim}), got {local_rows}")
    size = rows // local_rows
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world != size:
        raise ValueError(
            f"{name}: a plain (non-DTensor) weight holds {local_rows} of {rows} rows, i.e. tp={size}, but the "
            f"torch.distributed world size is {world}; the rank within the tensor-parallel group cannot be told "
            "(load the model with transformers' tensor parallelism, whose DTensor weights say it)"
        )
    return shard_from_rows(local_rows, num_kv_heads, head_dim, dist.get_rank(), size)


def detect(model) -> Optional[TPShard]:
    """This rank's KV heads if ``model`` is tensor-parallel along heads, else ``None``.

    Reads every attention layer's ``k_proj`` weight (see the module docstring); all layers
    must agree. Raises ``ValueError`` for shardings LeanK cannot serve.
    """
    from .masks import model_dims

    _, kv_heads, head_dim = model_dims(model.config)
    shards = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "k_proj" and isinstance(getattr(module, "weight", None), torch.Tensor):
            shards[name] = _shard_of_weight(module.weight, kv_heads, head_dim, f"{name}.weight")
    if not shards:
        logger.debug("leank.tp: %s has no k_proj modules; assuming it holds all KV heads", type(model).__name__)
        return None
    found = set(shards.values())
    if len(found) > 1:
        raise ValueError(f"k_proj: expected every layer sharded alike, got {sorted(map(repr, found))}")
    shard = found.pop()
    if shard is not None:
        logger.info("leank.tp: tensor-parallel rank %d of %d holds KV heads [%d, %d) of %d", shard.rank,
                    shard.size, shard.kv_start, shard.kv_stop, shard.num_kv_heads)
    return shard


def slice_mask(mask, shard: TPShard):
    """The part of a whole-model ``ChannelMask`` that ``shard``'s rank uses: ``keep[:, kv_start:kv_stop]``."""
    if mask.num_kv_heads != shard.num_kv_heads:
        raise ValueError(f"mask: expected {shard.num_kv_heads} KV heads (the whole model's), got {mask.num_kv_heads}")
    keep = mask.keep[:, shard.kv_start:shard.kv_stop].clone()
    local = dataclasses.replace(mask, keep=keep, metadata={**mask.metadata, "tensor_parallel": shard.as_dict()})
    setattr(local, _SHARD_ATTR, shard)
    return local


def shard_mask_for(model, mask):
    """``mask`` (validated against the whole model) as this rank needs it: sliced when ``model`` is TP."""
    shard = detect(model)
    return mask if shard is None else slice_mask(mask, shard)


def shard_of(mask) -> Optional[TPShard]:
    """The ``TPShard`` a mask was sliced for by this process, or ``None``."""
    return getattr(mask, _SHARD_ATTR, None)


def _comm_device(group, device: torch.device) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def sync_sampling_rng(mask, device) -> None:
    """Give every rank of ``mask``'s tensor-parallel group the generator state of the group's first rank.

    ``device``: where ``generate`` samples (the model's device); that device's default
    generator is synchronised. A collective: every rank must call it (a patched ``generate``
    does, before decoding). No-op without tensor parallelism.
    """
    shard = shard_of(mask)
    if shard is None or shard.size == 1:
        return
    import torch.distributed as dist

    device = torch.device(device)
    cuda = device.type == "cuda"
    state = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
    src = dist.get_global_rank(shard.group, 0) if shard.group is not None else 0
    buf = state.to(_comm_device(shard.group, device))
    dist.broadcast(buf, src=src, group=shard.group)
    buf = buf.cpu()
    if cuda:
        torch.cuda.set_rng_state(buf, device)
    else:
        torch.set_rng_state(buf)


_SUMMED = ("k_bytes", "v_bytes", "dense_k_bytes", "dense_v_bytes", "allocated_bytes")


def rank_report(report: dict, mask, all_ranks: bool) -> dict:
    """Add ``tp_rank``, ``tp_size``, ``kv_heads`` and ``all_ranks`` to a ``LeanKCache.memory_report``.

    With ``all_ranks`` the byte counts (totals and per layer) are summed over the
    tensor-parallel group (a collective: every rank must call it); otherwise they are this
    rank's. ``tokens`` are the same on every rank and are not summed.
    """
    shard = shard_of(mask)
    num_kv = int((mask.keep if hasattr(mask, "keep") else mask).shape[1])
    rank, size = (0, 1) if shard is None else (shard.rank, shard.size)
    kv_heads = [0, num_kv] if shard is None else [shard.kv_start, shard.kv_stop]
    if all_ranks and size > 1:
        import torch.distributed as dist

        layers = report["layers"]
        flat = [report[k] for k in _SUMMED] + [layer[k] for layer in layers for k in _SUMMED]
        buf = torch.tensor(flat, dtype=torch.int64, device=_comm_device(shard.group, torch.device("cpu")))
        dist.all_reduce(buf, group=shard.group)
        vals = iter(buf.cpu().tolist())
        report = {**report, **{k: next(vals) for k in _SUMMED}}
        report["layers"] = [{**layer, **{k: next(vals) for k in _SUMMED}} for layer in layers]
        report["leank_bytes"] = report["k_bytes"] + report["v_bytes"]
        report["dense_bytes"] = report["dense_k_bytes"] + report["dense_v_bytes"]
        kv_heads = [0, shard.num_kv_heads]
    report.update(tp_rank=rank, tp_size=size, kv_heads=kv_heads, all_ranks=bool(all_ranks) or size == 1)
    return report
