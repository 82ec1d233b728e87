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

Balancing (``LeanKConfig.tp_balance``, on by default): a LeanK mask keeps different channel
counts per head, so the contiguous split can hand one rank much more K/V to read than the
other, and every layer's all-reduce then waits for the heavier rank (the published Llama mix
at tp=2: the slowest rank reads 12% more than the mean, summed over layers). ``leank.patch``
therefore reorders each layer's KV heads (with their query heads, ``o_proj``'s columns and
q/k/v biases) so the ranks' K/V bytes per token are as even as whole heads allow
(:func:`balanced_order`); the model computes the same function, only the ranks' partial sums
in ``o_proj``'s all-reduce group heads differently. ``leank.unpatch`` puts the heads back.

The all-reduces (``LeanKConfig.tp_allreduce``): by default the captured decode step keeps
transformers' (``o_proj`` and ``down_proj`` all-reduce their partial products through
``torch.distributed``: NCCL). With ``"one_shot"`` the fused step runs those two products on
the local shards itself and sums them with :class:`OneShotAllReduce` (PyTorch's
symmetric-memory one-shot all-reduce: each rank copies its partial into a buffer its peers
can read, then reads theirs over NVLink; no NCCL kernel).

Sampling: every rank computes the same (all-reduced, gathered) logits, so ranks pick the same
token iff their random generators agree. transformers does nothing about that (``generate``
draws from the default generator of each process), so a patched ``generate`` broadcasts the
generator state of the group's first rank before it runs (:func:`sync_sampling_rng`):
a rank seeded differently still samples what the first rank samples.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .fused_decode import _local  # this rank's part of a DTensor parameter, or the tensor itself

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


def slice_mask(mask, shard: TPShard, order: Optional[torch.Tensor] = None):
    """The part of a whole-model ``ChannelMask`` that ``shard``'s rank uses.

    Args:
        mask: the whole model's mask, ``keep [layers, num_kv_heads, head_dim]``.
        shard: the rank's place in the tensor-parallel group.
        order: int64 ``[layers, num_kv_heads]`` from :func:`balanced_order` (slot ``j`` of layer
            ``l`` holds original head ``order[l, j]``), or ``None`` for the model's own order.

    Returns ``keep[:, kv_start:kv_stop]`` of the (reordered) heads; its metadata's
    ``tensor_parallel`` entry names the rank and, when reordered, the original heads it holds
    per layer (``head_ids``).
    """
    if mask.num_kv_heads != shard.num_kv_heads:
        raise ValueError(f"mask: expected {shard.num_kv_heads} KV heads (the whole model's), got {mask.num_kv_heads}")
    keep = mask.keep
    info = shard.as_dict()
    if order is not None:
        if tuple(order.shape) != tuple(keep.shape[:2]):
            raise ValueError(f"order: expected shape {tuple(keep.shape[:2])} (layers, num_kv_heads), got {tuple(order.shape)}")
        keep = keep.gather(1, order[:, :, None].expand(keep.shape).to(keep.device))
        info["head_ids"] = order[:, shard.kv_start:shard.kv_stop].tolist()
    local = dataclasses.replace(mask, keep=keep[:, shard.kv_start:shard.kv_stop].clone(),
                                metadata={**mask.metadata, "tensor_parallel": info})
    setattr(local, _SHARD_ATTR, shard)
    return local


def shard_mask_for(model, mask, balance: bool = False):
    """``mask`` (validated against the whole model) as this rank needs it, and the head order applied.

    Returns ``(mask, order)``: ``mask`` unchanged and ``order=None`` when ``model`` is not
    tensor-parallel; else the rank's slice. With ``balance``, each layer's KV heads are first
    reordered across the ranks (:func:`balanced_order`) and the model's attention weights
    permuted to match (:func:`permute_heads`, a collective); ``order`` is what
    :func:`restore_heads` needs to undo it (``None`` when no layer was reordered).
    """
    shard = detect(model)
    if shard is None:
        return mask, None
    order = balanced_order(mask, shard.size) if balance else None
    if order is not None:
        problem = _layout_problem(model, shard)
        if problem is not None:
            from .diagnostics import warn_once

            warn_once(__name__, f"leank: KV heads not balanced across tensor-parallel ranks: {problem}; each rank keeps "
                      "its contiguous heads (exact, but the rank with more K/V sets every layer's pace)")
            order = None
    _check_same_on_all_ranks(mask, order, shard)
    if order is not None:
        permute_heads(model, order, shard)
    return slice_mask(mask, shard, order), order


def head_costs(mask) -> torch.Tensor:
    """int64 ``[layers, num_kv_heads]``: channels a head stores per token in a LeanK cache
    (its kept K channels, plus V's ``head_dim`` unless every K channel is pruned)."""
    kept = mask.keep.sum(-1).long().cpu()
    return kept + mask.head_dim * (kept > 0).long()


def _partition(costs: list, size: int) -> list:
    """Heads in rank order (``len(costs) / size`` per rank, ascending within a rank) whose heaviest
    rank is as light as a greedy fill and pairwise swaps find; the contiguous order when that
    is not lighter than it already is."""
    n = len(costs) // size
    identity = list(range(len(costs)))
    contiguous_max = max(sum(costs[r * n:(r + 1) * n]) for r in range(size))
    bins: list = [[] for _ in range(size)]
    loads = [0] * size
    for h in sorted(identity, key=lambda h: (-costs[h], h)):  # heaviest first, into the lightest open rank
        r = min((r for r in range(size) if len(bins[r]) < n), key=lambda r: (loads[r], r))
        bins[r].append(h)
        loads[r] += costs[h]
    while True:  # swap a head of the heaviest rank with a lighter head elsewhere while the maximum falls
        hi = max(range(size), key=lambda r: (loads[r], -r))
        best = None
        for lo in (r for r in range(size) if r != hi):
            others = max([loads[r] for r in range(size) if r not in (hi, lo)], default=0)
            for a in bins[hi]:
                for b in bins[lo]:
                    d = costs[a] - costs[b]
                    peak = max(loads[hi] - d, loads[lo] + d, others)
                    if d > 0 and peak < loads[hi] and (best is None or peak < best[0]):
                        best = (peak, lo, a, b)
        if best is None:
            break
        _, lo, a, b = best
        bins[hi][bins[hi].index(a)], bins[lo][bins[lo].index(b)] = b, a
        d = costs[a] - costs[b]
        loads[hi] -= d
        loads[lo] += d
    if max(loads) >= contiguous_max:
        return identity
    return [h for b in bins for h in sorted(b)]


def balanced_order(mask, size: int) -> Optional[torch.Tensor]:
    """Per layer, an order of the KV heads that evens the ranks' K/V bytes under ``size``-way TP.

    Rank ``r`` holds slots ``[r*n, (r+1)*n)`` (``n = num_kv_heads / size``) of each layer;
    slot ``j`` of layer ``l`` holds original head ``order[l, j]``. A layer keeps its own order
    unless reordering lowers its heaviest rank's bytes (:func:`head_costs`).

    Returns int64 ``[layers, num_kv_heads]``, or ``None`` when no layer is reordered (every
    channel kept, ``size == 1``, or the contiguous split already as even as it gets).
    """
    if size < 1 or mask.num_kv_heads % size:
        raise ValueError(f"size: expected a divisor of num_kv_heads={mask.num_kv_heads}, got {size}")
    costs = head_costs(mask).tolist()
    order = torch.tensor([_partition(c, size) for c in costs], dtype=torch.long)
    if torch.equal(order, torch.arange(mask.num_kv_heads).expand_as(order)):
        return None
    return order


def rank_loads(mask, size: int, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 ``[layers, size]``: channels per token each rank's heads store, in ``order``."""
    costs = head_costs(mask)
    if order is not None:
        costs = costs.gather(1, order)
    return costs.view(costs.shape[0], size, -1).sum(-1)


def _check_same_on_all_ranks(mask, order: Optional[torch.Tensor], shard: TPShard) -> None:
    """Every rank must slice the same mask (and reorder alike): a rank given another mask would
    attend with the wrong channels, and a reorder would scramble the weights."""
    import torch.distributed as dist

    mine = torch.cat([mask.keep.reshape(-1).long().cpu(),
                      (order if order is not None else torch.full((1,), -1)).reshape(-1)])
    sig = torch.tensor([mine.numel(), int((mine * torch.arange(1, mine.numel() + 1)).sum() % (2**61 - 1))])
    device = _comm_device(shard.group, mask.keep.device)
    parts = [torch.empty_like(sig, device=device) for _ in range(shard.size)]
    dist.all_gather(parts, sig.to(device), group=shard.group)
    if any(not torch.equal(p.cpu(), sig) for p in parts):
        raise ValueError("masks: expected the same mask on every tensor-parallel rank (each rank slices its heads from "
                         "it), got different masks on different ranks")


def _attention_projections(model) -> list:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError(f"model: expected decoder layers at model.model.layers to reorder heads, got a "
                         f"{type(model).__name__} without them")
    return [layer.self_attn for layer in layers]


def _layout_problem(model, shard: TPShard) -> Optional[str]:
    """Why :func:`permute_heads` cannot move heads between this model's shards, or None: q/k/v
    must hold an even share of their output rows and ``o_proj`` of its input columns."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    want = {"q_proj": (0, heads * head_dim), "k_proj": (0, shard.num_kv_heads * head_dim),
            "v_proj": (0, shard.num_kv_heads * head_dim), "o_proj": (1, heads * head_dim)}
    for i, attn in enumerate(_attention_projections(model)):
        for name, (dim, total) in want.items():
            w = getattr(getattr(attn, name, None), "weight", None)
            if not isinstance(w, torch.Tensor):
                return f"layer {i} has no {name}.weight"
            got = _local(w).shape[dim]
            if got * shard.size != total:
                return (f"layer {i} {name}.weight holds {got} of {total} {'rows' if dim == 0 else 'columns'} on this "
                        f"rank, expected {total // shard.size} (an even share over tp={shard.size})")
    return None


def _permuted_shard(param: torch.Tensor, dim: int, blocks: int, order: torch.Tensor, shard: TPShard) -> torch.Tensor:
    """This rank's shard of ``param`` (split over the ranks along ``dim``; ``blocks`` equal blocks along
    ``dim`` globally) as it would be with the global blocks in ``order``: a new tensor. A collective:
    every rank gathers the whole tensor."""
    import torch.distributed as dist

    local = _local(param)
    with torch.no_grad():
        src = local.detach().contiguous()
        parts = [torch.empty_like(src) for _ in range(shard.size)]
        dist.all_gather(parts, src, group=shard.group)
        whole = torch.cat(parts, dim)
        shape = list(whole.shape)
        grouped = whole.reshape(*shape[:dim], blocks, shape[dim] // blocks, *shape[dim + 1:])
        whole = grouped.index_select(dim, order.to(whole.device)).reshape(shape)
        return whole.narrow(dim, shard.rank * local.shape[dim], local.shape[dim]).clone()


def _permute_layer(attn, order: torch.Tensor, shard: TPShard) -> None:
    """One layer's q/k/v rows (and biases) and ``o_proj`` columns in ``order``: every new shard is
    gathered and built before any is written, so a failed collective leaves the layer as it was."""
    new = []
    for name, dim in (("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1)):
        lin = getattr(attn, name)
        params = [(lin.weight, dim)] + ([(lin.bias, 0)] if dim == 0 and lin.bias is not None else [])
        new += [(p, _permuted_shard(p, d, shard.num_kv_heads, order, shard)) for p, d in params]
    with torch.no_grad():
        for p, value in new:
            _local(p).copy_(value)  # in place: the parameter (and a fused buffer it is a view of) keeps its storage


def permute_heads(model, order: torch.Tensor, shard: TPShard) -> None:
    """Reorder each layer's KV heads across the ranks: slot ``j`` of layer ``l`` gets head ``order[l, j]``.

    Moves, per reordered layer, ``k_proj``/``v_proj`` rows (and biases) by KV head, ``q_proj``
    rows (and bias) by the KV head's query group and ``o_proj`` columns by the same group, so
    the model computes the same function. A collective (each rank gathers the layer's
    projections once); every rank must call it with the same ``order``. If a layer fails, the
    layers already reordered are put back before the error propagates.
    """
    attns = _attention_projections(model)
    if len(attns) != order.shape[0]:
        raise ValueError(f"order: expected {len(attns)} layers (the model's), got {order.shape[0]}")
    identity = torch.arange(shard.num_kv_heads)
    done = []
    try:
        for attn, o in zip(attns, order):
            if not torch.equal(o, identity):
                _permute_layer(attn, o, shard)
                done.append((attn, o))
    except BaseException:
        for attn, o in reversed(done):
            _permute_layer(attn, torch.argsort(o), shard)
        raise
    logger.info("leank.tp: reordered the KV heads of %d of %d layers across %d ranks", len(done), len(attns), shard.size)


def restore_heads(model, order: torch.Tensor, shard: TPShard) -> None:
    """Undo :func:`permute_heads` (a collective)."""
    permute_heads(model, torch.argsort(order, dim=1), shard)


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


# ----------------------------------------------------------------------------- one-shot all-reduce
_ONE_SHOT_OP = None  # torch.ops.leank.tp_one_shot_all_reduce, registered on first use (nothing at import)
_SYMMETRIC: dict = {}  # (owner, group name, shape, dtype, device) -> symmetric-memory buffer of that shape
_OWNERS = itertools.count(1)


def _group_name(group) -> str:
    import torch.distributed as dist

    return (group if group is not None else dist.group.WORLD).group_name


def one_shot_reason(shard: Optional[TPShard], device) -> Optional[str]:
    """Why :class:`OneShotAllReduce` cannot sum this rank's partials, or None when it can."""
    if shard is None or shard.size == 1:
        return "the model is not tensor parallel"
    if torch.device(device).type != "cuda":
        return f"the model is on {torch.device(device).type}: the one-shot all-reduce needs CUDA"
    try:
        import torch.distributed._symmetric_memory as symm_mem

        missing = [n for n in ("empty", "rendezvous") if not hasattr(symm_mem, n)]
        if missing or not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
            return f"torch {torch.__version__} lacks symmetric memory's {missing or 'one_shot_all_reduce_copy'}"
    except (ImportError, AttributeError, RuntimeError) as e:
        return f"torch {torch.__version__} has no symmetric memory ({type(e).__name__}: {e})"
    return None


def _symmetric_buffer(x: torch.Tensor, group_name: str, owner: int) -> torch.Tensor:
    """``owner``'s symmetric-memory buffer shaped like ``x`` for ``group_name``, allocated (a collective: every
    rank reaches it at the same step) the first time, never while a CUDA graph is being recorded."""
    key = (owner, group_name, tuple(x.shape), x.dtype, x.device)
    buf = _SYMMETRIC.get(key)
    if buf is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"leank: no one-shot all-reduce buffer of shape {tuple(x.shape)} {x.dtype} was made "
                               "before the CUDA graph recording (a step of that batch runs uncaptured first)")
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(tuple(x.shape), dtype=x.dtype, device=x.device)
        symm_mem.rendezvous(buf, group_name)
        _SYMMETRIC[key] = buf
        logger.info("leank: one-shot all-reduce buffer %s %s on %s for group %s", tuple(x.shape), x.dtype, x.device,
                    group_name)
    return buf


def _one_shot_op():
    """``torch.ops.leank.tp_one_shot_all_reduce(x, group_name, owner) -> the sum of x over the group`` (a new
    contiguous tensor shaped like ``x``): ``x`` copied into ``owner``'s symmetric buffer of its shape and summed
    with the peers' by ``torch.ops.symm_mem.one_shot_all_reduce_copy``. Opaque to ``torch.compile`` (its fake
    returns the shape), so the compiled step calls it as it is and the buffer is looked up when it runs."""
    global _ONE_SHOT_OP
    if _ONE_SHOT_OP is None:
        @torch.library.custom_op("leank::tp_one_shot_all_reduce", mutates_args=(),
                                 schema="(Tensor x, str group_name, int owner) -> Tensor")
        def tp_one_shot_all_reduce(x, group_name, owner):
            x = x.contiguous()
            buf = _symmetric_buffer(x, group_name, owner)
            return torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x, "sum", group_name)

        @tp_one_shot_all_reduce.register_fake
        def _(x, group_name, owner):
            return torch.empty_like(x, memory_format=torch.contiguous_format)

        _ONE_SHOT_OP = tp_one_shot_all_reduce
    return _ONE_SHOT_OP


class OneShotAllReduce:
    """``partial -> its sum over the tensor-parallel group``, by the symmetric-memory one-shot all-reduce.

    For ``leank.fused_decode.decode_logits(..., row_reduce=...)``: ``partial`` is a rank's ``o_proj`` or
    ``down_proj`` product of its shards, ``[batch, 1, hidden]``. Its buffers (one per shape, made on first use:
    a step of each batch runs before it is recorded) live until :meth:`release`, which ``leank.unpatch`` calls
    after releasing the graphs that read them.
    """

    def __init__(self, shard: TPShard):
        self.group_name = _group_name(shard.group)
        self.owner = next(_OWNERS)
        _one_shot_op()  # registered here, never while torch.compile traces __call__

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        return _one_shot_op()(partial, self.group_name, self.owner)

    def release(self) -> None:
        for key in [k for k in _SYMMETRIC if k[0] == self.owner]:
            del _SYMMETRIC[key]


_SUMMED = ("k_bytes", "v_bytes", "dense_k_bytes", "dense_v_bytes", "allocated_bytes")


def rank_report(report: dict, mask, all_ranks: bool) -> dict:
    """Add ``tp_rank``, ``tp_size``, ``kv_heads``, ``all_ranks`` (and ``kv_head_ids`` when the heads
    were reordered) to a ``LeanKCache.memory_report``.

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
    head_ids = getattr(mask, "metadata", {}).get("tensor_parallel", {}).get("head_ids")
    if head_ids is not None and not report["all_ranks"]:  # heads reordered across the ranks: which ones it holds
        report["kv_head_ids"] = head_ids
    return report
