"""The captured decode step as one function of the model's modules, with fused projections.

At batch 1-8 a decode step is a chain of matrix-vector products, and cuBLAS runs the small
ones (k/v: 8 MB of weights each on an 8B model) at a third of the memory bandwidth plus a
split-K reduction launch each. One product over ``[W_q; W_k; W_v]`` and one over
``[W_gate; W_up]`` read the same bytes in two launches instead of five (the layout of
gpt-fast's ``wqkv`` / ``w1``-``w3``). The weights are fused without a second copy: the
projections' parameters become views of one contiguous buffer per layer, so the model's
memory, its ``state_dict`` and its eager forward are unchanged.

``decode_logits`` is the decode forward of a Llama / Qwen2 ``*ForCausalLM`` written with
those fused products: embedding, the rotary embedding from the model's own rotary module, each
layer's RoPE and attention as ``torch.ops.leank.decode_step_rope`` (RoPE in the append's launch:
one kernel instead of Inductor's two RoPE kernels plus the append; for a model whose
``apply_rotary_pos_emb`` is not the standard rotate-half one, that function and
``torch.ops.leank.decode_step``), the
model's norms, activation, ``o_proj``, ``down_proj`` and ``lm_head`` called as modules (up to batch
``gemv.MAX_BATCH``, 8 by default, every product, the fused ones included, runs through ``leank.gemv``'s
split-K-free kernels instead of cuBLAS; under
tensor parallelism with ``LeanKConfig.tp_allreduce="one_shot"``, ``o_proj`` and ``down_proj``
as local products summed by ``leank.tp.OneShotAllReduce`` instead).
``leank.capture.DecodeGraphRunner`` compiles and records it in place of
``model(input_ids, position_ids, use_cache=False).logits`` when ``unsupported_reason``
finds nothing in the way (``LeanKConfig.fuse_projections`` turns it off).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from . import append_kernel, gemv
from .append_kernel import is_standard_rope

Tensor = torch.Tensor

FAMILIES = ("llama", "qwen2")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj")
MLP_PROJ = ("gate_proj", "up_proj")
_FUSED = "_leank_fused"  # (weight [sum(out), in], bias [sum(out)] or None, out sizes) on the attention / MLP module
_ROPE = "_leank_rope"  # the attention module's apply_rotary_pos_emb, looked up once (not while tracing); None: fused
_ROW = "_leank_row"  # (local weight, local bias or None) of o_proj on the attention / down_proj on the MLP module


def unsupported_reason(model) -> Optional[str]:
    """Why ``decode_logits`` cannot stand in for this model's forward, or None when it can.

    It needs a Llama / Qwen2 decoder whose layers, attention and MLP modules are the plain
    transformers ones: ``nn.Linear`` projections without hooks (not quantized, not LoRA), one
    device. Under transformers' tensor parallelism the fused products are this rank's shards:
    q/k/v and gate/up must be column-sharded (their weights and biases ``Shard(0)`` DTensors, as
    transformers' ``colwise`` plan makes them; their forward is then a local product, which
    ``decode_logits`` does on the fused local rows), and ``o_proj`` / ``down_proj`` /
    ``lm_head`` keep their own forward and collectives (``o_proj`` / ``down_proj`` unless
    ``decode_logits`` is given a ``row_reduce``; ``rowwise_reason`` checks them then).
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        return f"model type {model_type!r} (fused decode knows {FAMILIES})"
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model has no embed_tokens / layers / norm / rotary_emb"
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        return f"parameters on {len(devices)} devices"
    if len(base.layers) != model.config.num_hidden_layers:
        return f"{len(base.layers)} layers built for num_hidden_layers={model.config.num_hidden_layers}"
    for i, layer in enumerate(base.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not hasattr(mlp, "act_fn"):
            return f"layer {i} has no self_attn / mlp.act_fn"
        linears = [getattr(attn, n, None) for n in ATTN_PROJ + ("o_proj",)]
        linears += [getattr(mlp, n, None) for n in MLP_PROJ + ("down_proj",)]
        if any(type(m) is not nn.Linear for m in linears):
            kinds = sorted({type(m).__name__ for m in linears if type(m) is not nn.Linear})
            return f"layer {i} has projections that are not plain nn.Linear ({', '.join(kinds)})"
        for m in (layer, attn, mlp, *linears):
            if _has_hooks(m):
                return f"layer {i}: {type(m).__name__} has forward hooks (they would be bypassed)"
        for name, m in zip(ATTN_PROJ + MLP_PROJ, linears[:3] + linears[4:6]):  # the products decode_logits replaces
            why = _bypass_reason(m)
            if why is not None:
                return f"layer {i}: {name} {why}"
        for group in (linears[:3], linears[4:6]):
            if len({m.bias is None for m in group}) > 1:
                return f"layer {i}: some fused projections have a bias and some do not"
    return None


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t: Optional[Tensor]) -> Optional[Tensor]:
    """This rank's part of a tensor-parallel (DTensor) parameter, or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _bypass_reason(m: nn.Module) -> Optional[str]:
    """Why ``F.linear`` on ``m``'s (local) weight would not equal ``m(x)``, or None.

    A plain ``nn.Linear`` keeps its class forward. A tensor-parallel one must be column-sharded:
    weight (and bias) a one-dimensional-mesh DTensor placed ``Shard(0)``, whose forward at inference
    is the product of the replicated input with the local rows (transformers' ``colwise`` style).
    """
    params = [p for p in (m.weight, m.bias) if p is not None]
    if not any(_is_dtensor(p) for p in params):
        return "has its forward replaced" if "forward" in m.__dict__ else None
    for p in params:
        placements = getattr(p, "placements", None)
        if not _is_dtensor(p) or placements is None or len(placements) != 1 \
                or type(placements[0]).__name__ != "Shard" or placements[0].dim != 0:
            return f"is tensor-parallel but not column-sharded (placements {placements}; fused decode needs Shard(0))"
        if not isinstance(getattr(p, "_local_tensor", None), Tensor):  # what _point re-points (a torch internal)
            return "is a DTensor without a local tensor to re-point (this torch version)"
    return None


def rowwise_reason(m: nn.Module) -> Optional[str]:
    """Why ``F.linear`` on ``m``'s local weight, summed over the ranks, plus its bias would not equal ``m(x)``
    for this rank's slice ``x`` of the input, or None: ``m`` must be a plain ``nn.Linear`` whose weight is a
    one-dimensional-mesh DTensor placed ``Shard(1)`` (transformers' ``rowwise`` style) and whose bias, if
    any, is replicated."""
    if type(m) is not nn.Linear:  # (its forward is transformers' TP one, installed on the instance: bypassed)
        return f"{type(m).__name__} is not an nn.Linear"
    placements = getattr(m.weight, "placements", None)
    if not _is_dtensor(m.weight) or placements is None or len(placements) != 1 \
            or type(placements[0]).__name__ != "Shard" or placements[0].dim not in (1, -1):
        return f"its weight is not row-sharded (placements {placements}; needs Shard(1))"
    if m.bias is not None and _is_dtensor(m.bias) and type(m.bias.placements[0]).__name__ != "Replicate":
        return f"its bias is not replicated (placements {m.bias.placements})"
    return None


def row_parallel_reason(model) -> Optional[str]:
    """Why some layer's ``o_proj`` or ``down_proj`` cannot run as a local product plus ``row_reduce``
    (``rowwise_reason``), or None."""
    for i, layer in enumerate(model.model.layers):
        for name, m in (("o_proj", layer.self_attn.o_proj), ("down_proj", layer.mlp.down_proj)):
            why = rowwise_reason(m)
            if why is not None:
                return f"layer {i}: {name}: {why}"
    return None


def _row_parallel(owner: nn.Module, name: str, x: Tensor, row_reduce, linear=F.linear) -> Tensor:
    """``owner.<name>(x)`` for a row-sharded projection (``rowwise_reason`` is None): the product with the local
    weight ``fuse_projections`` noted (a DTensor's local part cannot be taken while tracing), summed over the
    ranks by ``row_reduce``, plus the bias once; the module's own forward (transformers' all-reduce) when
    ``row_reduce`` is None, or ``linear`` on its weight when that is ``gemv.linear`` and the module a plain
    ``nn.Linear`` (``_plain_linear``)."""
    if row_reduce is None:
        m = getattr(owner, name)
        if linear is gemv.linear and _plain_linear(m):
            return linear(x, m.weight, m.bias)
        return m(x)
    weight, bias = getattr(owner, _ROW)
    out = row_reduce(F.linear(x, weight))
    return out if bias is None else out + bias


def _adjacent_view(tensors: list) -> Optional[Tensor]:
    """The tensors as one ``[sum(rows), ...]`` view when they are consecutive rows of one storage, else None."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.device != first.device
                or t.shape[1:] != first.shape[1:] or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]),
                                   first.stride())


@torch.no_grad()
def _fuse(owner: nn.Module, names: tuple) -> bool:
    """Make ``owner``'s projections ``names`` views of one buffer and note it on ``owner``; True when it
    had to copy (first time, or the parameters have their own storage again)."""
    linears = [getattr(owner, n) for n in names]
    weights = [_local(m.weight) for m in linears]  # this rank's rows under tensor parallelism
    sizes = [w.shape[0] for w in weights]
    has_bias = linears[0].bias is not None
    with torch.inference_mode(False):  # parameters and views stay ordinary tensors inside an inference-mode generate
        weight = _adjacent_view(weights)
        bias = _adjacent_view([_local(m.bias) for m in linears]) if has_bias else None
        copied = weight is None or (has_bias and bias is None)
        if copied:
            weight = torch.cat([w.detach() for w in weights])
            for m, w in zip(linears, weight.split(sizes)):
                _point(m, "weight", w)
            if has_bias:
                bias = torch.cat([_local(m.bias).detach() for m in linears])
                for m, b in zip(linears, bias.split(sizes)):
                    _point(m, "bias", b)
    owner.__dict__[_FUSED] = (weight, bias, sizes)
    return copied


def _point(m: nn.Module, name: str, rows: Tensor) -> None:
    """Make parameter ``name`` of ``m`` (its local shard under tensor parallelism) a view of ``rows``: the same
    Parameter object, so optimizers, hooks, tying and the DTensor wrapper see no change."""
    p = getattr(m, name)
    if _is_dtensor(p):
        p._local_tensor.set_(rows)  # the DTensor's local shard now lives in the fused buffer
        if _local(p).data_ptr() != rows.data_ptr():
            raise RuntimeError(f"{type(m).__name__}.{name}: the DTensor's local shard did not take the fused rows")
    else:
        p.data = rows


def fuse_projections(model) -> int:
    """Fuse each layer's q/k/v and gate/up weights; returns how many groups had to be copied.

    The first call copies each group into one buffer and points the parameters at their rows;
    later calls only check that they still are (a pointer comparison per projection) and
    rebuild the views, so a model moved or cast since (``.to()`` gives each parameter its own
    storage again) is fused again. Peak memory grows by one layer's q/k/v or gate/up weights
    while a group is copied. The views are noted on the modules for ``decode_logits`` until
    ``release``: the buffers themselves belong to the parameters, so nothing outlives them.
    """
    copied = 0
    for layer in model.model.layers:
        rope = inspect.getmodule(type(layer.self_attn)).apply_rotary_pos_emb
        # None: the decode step's append kernel applies the (standard) RoPE itself
        layer.self_attn.__dict__[_ROPE] = None if append_kernel.FUSE_ROPE and is_standard_rope(rope) else rope
        copied += _fuse(layer.self_attn, ATTN_PROJ)
        copied += _fuse(layer.mlp, MLP_PROJ)
        for owner, m in ((layer.self_attn, layer.self_attn.o_proj), (layer.mlp, layer.mlp.down_proj)):
            owner.__dict__[_ROW] = (_local(m.weight), _local(m.bias))  # for row_reduce (decode_logits)
    return copied


def release(model) -> None:
    """Drop the views ``fuse_projections`` noted (after the step was traced or recorded): a model moved
    or offloaded later keeps no reference to its old buffers (a recorded graph reads them by address,
    and the parameters keep them alive for as long as they hold them)."""
    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            owner.__dict__.pop(_FUSED, None)
            owner.__dict__.pop(_ROW, None)


def decode_logits(model, decode_step_attention, input_ids: Tensor, position_ids: Tensor, row_reduce=None) -> Tensor:
    """Logits ``[batch, 1, vocab]`` of one decode step of the fused model.

    Args:
        model: a Llama / Qwen2 ``*ForCausalLM`` after ``fuse_projections``.
        decode_step_attention: ``(attn_module, q, k, v, scale[, cos, sin]) -> [batch, 1, heads, head_dim]``
            (``leank.capture.decode_step_attention``: appends k/v to the active cache, attends; given
            ``cos, sin``, it applies standard RoPE to q and k first, which ``fuse_projections`` arranges
            when the model's ``apply_rotary_pos_emb`` is the standard one and ``append_kernel.FUSE_ROPE``).
        input_ids, position_ids: int64 ``[batch, 1]``.
        row_reduce: under tensor parallelism, ``partial [batch, 1, hidden] -> its sum over the ranks``
            (``leank.tp.OneShotAllReduce``): ``o_proj`` and ``down_proj`` then run as local products summed
            by it (their weights row-sharded: ``rowwise_reason``) instead of through their modules, whose
            forward all-reduces with ``torch.distributed``. None: the modules' forward.
    """
    base = model.model
    hidden = base.embed_tokens(input_ids)  # [batch, 1, hidden]
    cos, sin = base.rotary_emb(hidden, position_ids)
    batch = input_ids.shape[0]
    # batches up to gemv.MAX_BATCH (8 by default): split-K-free products (leank.gemv); not under tensor
    # parallelism, where its GPU tests (2 GPUs) do not run these kernels yet: there every product stays as before
    tensor_parallel = _is_dtensor(base.layers[0].self_attn.o_proj.weight)
    linear = gemv.linear if batch <= gemv.MAX_BATCH and not tensor_parallel else F.linear
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        x = layer.input_layernorm(hidden)
        weight, bias, sizes = getattr(attn, _FUSED)
        q, k, v = linear(x, weight, bias).split(sizes, dim=-1)
        q = q.view(batch, 1, -1, attn.head_dim).transpose(1, 2)  # [batch, heads, 1, head_dim]
        k = k.view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        v = v.view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        rope = getattr(attn, _ROPE)
        if rope is None:  # RoPE inside the step's append kernel: one launch instead of three
            out = decode_step_attention(attn, q, k, v, attn.scaling, cos, sin)
        else:
            q, k = rope(q, k, cos, sin)
            out = decode_step_attention(attn, q, k, v, attn.scaling)
        hidden = hidden + _row_parallel(attn, "o_proj", out.reshape(batch, 1, -1), row_reduce, linear)
        x = layer.post_attention_layernorm(hidden)
        weight, bias, sizes = getattr(mlp, _FUSED)
        gate, up = linear(x, weight, bias).split(sizes, dim=-1)
        hidden = hidden + _row_parallel(mlp, "down_proj", mlp.act_fn(gate) * up, row_reduce, linear)
    head = model.lm_head
    if linear is gemv.linear and _plain_linear(head):
        return gemv.linear(base.norm(hidden), head.weight, head.bias)
    return head(base.norm(hidden))


def _plain_linear(m: nn.Module) -> bool:
    """Whether ``F.linear`` on ``m``'s weight and bias is exactly ``m(x)``: an ``nn.Linear`` (not tensor-parallel)
    with its class forward and no hooks."""
    return type(m) is nn.Linear and not _is_dtensor(m.weight) and "forward" not in m.__dict__ and not _has_hooks(m)


def _has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward (pre-)hooks or an accelerate hook, which a bypassed forward would skip."""
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_hf_hook", None) is not None)

