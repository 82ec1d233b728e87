"""The training loop: two stages, checkpoint/resume, one GPU or FSDP2 under ``torchrun``.

Stage 1 (``recipe.stage1_steps``): factors ``f ∈ [0,1]^{L×KVH×D}`` scale archive K seen by
answer queries; loss = MSE(final hidden states of scaled vs full model at the answer
positions) + ``reg · mean(f)``; AdamW at ``lr`` with a warm-up/flat/decay schedule.
Stage 2 (``recipe.stage2_steps``): per-head kept counts from the global quantile of ``f``
at ``recipe.ratio`` rounded to ``align``; the forward uses the binary per-head top-k mask
(kept = 1, heads with 0 kept lose their archive) with a straight-through gradient; AdamW
at ``lr / 2``. The result is a :class:`leank.masks.ChannelMask` with the recipe in its
metadata.

Answer positions are the last prompt token and the answer tokens (teacher-forced): the
last prompt token is included so the mask also preserves the first answer token when the
prompt itself is decoded against a pruned cache (e.g. a later turn).

Data of step ``s`` is a pure function of ``(recipe.seed, s)``, so resuming from a
checkpoint (factors, optimizer state, step, stage-2 counts) continues identically.

Distributed: when ``torch.distributed`` is initialised (or ``WORLD_SIZE > 1``, e.g.
``torchrun``), the decoder layers and the decoder are sharded with FSDP2
(``torch.distributed.fsdp.fully_shard``); each rank runs ``batch_size / world_size``
samples of the step and the factor gradients are all-reduced (the factors are replicated).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from .attention import AnswerAttentionState, answer_forward, capture, decoder_of, training_attention
from .data import RetrievalTask, batch_for_step
from .recipe import TrainRecipe
from .stages import hidden_mse, kept_units, lr_at, soft_sparsity, ste_scale, topk_mask

logger = logging.getLogger(__name__)

CKPT_VERSION = 1
# recipe fields that may change between a checkpoint and its resumption
_RESUMABLE_CHANGES = {"output", "checkpoint_dir", "checkpoint_every", "log_every"}


def apply_rope_scaling(config, scaling: dict) -> None:
    """Merge ``scaling`` (e.g. ``{"rope_type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 32768}``) into ``config``'s rope parameters,
    keeping its ``rope_theta``."""
    extra = dict(scaling)
    if "type" in extra:
        extra.setdefault("rope_type", extra.pop("type"))
    base = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in base and getattr(config, "rope_theta", None) is not None:
        base["rope_theta"] = config.rope_theta
    base.update(extra)
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = base
    else:  # transformers 4.x
        config.rope_scaling = base


def load_model(recipe: TrainRecipe):
    """(model, tokenizer) from ``recipe.model`` with the recipe's dtype and rope scaling."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(recipe.model)
    if recipe.rope_scaling:
        apply_rope_scaling(cfg, recipe.rope_scaling)
    model = AutoModelForCausalLM.from_pretrained(recipe.model, config=cfg, dtype=getattr(torch, recipe.dtype),
                                                 attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(recipe.model)


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(decoder, device: torch.device, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(decoder, mesh=mesh)


def _set_checkpointing(model, on: bool) -> None:
    """HF activation checkpointing of the decoder layers (name changed in transformers 5.2x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _make_opt(factors: torch.Tensor, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW([factors], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)


def _groups(samples, batched: bool):
    """Samples grouped by (length, prompt_len) when batching, else one per group."""
    if not batched:
        return [[s] for s in samples]
    out: dict[tuple[int, int], list] = {}
    for s in samples:
        out.setdefault((s.input_ids.numel(), s.prompt_len), []).append(s)
    return list(out.values())


class Trainer:
    """Holds the model, factors, optimizer and step; :meth:`run` trains to the end or ``max_steps``."""

    def __init__(self, recipe: TrainRecipe, model=None, tokenizer=None, device: str | torch.device | None = None):
        self.recipe = recipe
        self.rank, self.world = _dist_info()
        if recipe.batch_size % self.world:
            raise ValueError(f"batch_size: expected a multiple of the world size {self.world}, got {recipe.batch_size}")
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if model is None:
            model, tokenizer = load_model(recipe)
        elif tokenizer is None:
            raise ValueError("tokenizer: expected a tokenizer when a model is given, got None")
        from leank.patches import model_dims

        self.model, self.tokenizer = model, tokenizer
        self.dims = model_dims(model.config)
        if self.dims[2] % recipe.align:
            raise ValueError(f"align: expected a divisor of head_dim={self.dims[2]}, got {recipe.align}")
        model.requires_grad_(False)
        self.decoder = decoder_of(model)
        if self.world > 1:
            _shard(self.decoder, self.device, self.world)
        else:
            model.to(self.device)
        self.task = RetrievalTask(tokenizer, seed=recipe.seed, n_pairs=tuple(recipe.n_pairs),
                                  use_chat_template=recipe.chat_template, style=recipe.task_style)
        self.factors = torch.ones(self.dims, dtype=torch.float32, device=self.device, requires_grad=True)
        self.opt = _make_opt(self.factors, recipe.lr)
        self.step = 0
        self.counts: torch.Tensor | None = None
        # accumulated distillation pressure -dMSE/df (breaks ties among equal factors, e.g. all at 0)
        self.importance = torch.zeros(self.dims, dtype=torch.float32, device=self.device)
        self.history: list[dict] = []
        self.state = AnswerAttentionState(sink=recipe.sink, recent=recipe.recent)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        path = self.recipe.checkpoint_path
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "version": CKPT_VERSION, "step": self.step, "factors": self.factors.detach().cpu(),
            "optimizer": self.opt.state_dict(), "importance": self.importance.detach().cpu(),
            "counts": None if self.counts is None else self.counts.cpu(),
            "recipe": self.recipe.to_dict(), "history": self.history,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, path)
        logger.info("checkpoint: step %d -> %s", self.step, path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        blob = torch.load(path, map_location=self.device, weights_only=True)
        if blob.get("version") != CKPT_VERSION:
            raise ValueError(f"{path}: checkpoint version {blob.get('version')!r}, expected {CKPT_VERSION}")
        old, new = blob["recipe"], self.recipe.to_dict()
        diff = sorted(k for k in new if k not in _RESUMABLE_CHANGES and old.get(k) != new[k])
        if diff:
            raise ValueError(f"{path}: checkpoint was made with a different recipe (fields {diff}); "
                             "delete it or restore those values")
        self.step = int(blob["step"])
        with torch.no_grad():
            self.factors.copy_(blob["factors"].to(self.device))
            self.importance.copy_(blob["importance"].to(self.device))
        self.counts = None if blob["counts"] is None else blob["counts"].to(torch.int64)
        stage2 = self.step > self.recipe.stage1_steps or (self.step == self.recipe.stage1_steps and self.counts is not None)
        self.opt = _make_opt(self.factors, self.recipe.lr / (2 if stage2 else 1))
        self.opt.load_state_dict(blob["optimizer"])
        self.history = list(blob.get("history", []))
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ steps
    def _stage_of(self, step: int) -> int:
        return 1 if step < self.recipe.stage1_steps else 2

    def _enter_stage2(self) -> None:
        self.counts = kept_units(self.factors, self.recipe.ratio, self.recipe.align, self.importance)
        self.opt = _make_opt(self.factors, self.recipe.lr / 2)
        logger.info("stage 2: kept counts per head fixed (total %d of %d channels)",
                    int(self.counts.sum()), self.factors.numel())

    def _scale(self):
        if self.counts is None:
            return self.factors, None
        return ste_scale(self.factors, self.counts.to(self.device), self.importance), (self.counts == 0).to(self.device)

    def train_step(self) -> dict:
        r = self.recipe
        stage = self._stage_of(self.step)
        if stage == 2 and self.counts is None:
            self._enter_stage2()
        s_step = self.step if stage == 1 else self.step - r.stage1_steps
        s_total = r.stage1_steps if stage == 1 else r.stage2_steps
        lr = lr_at(s_step, s_total, r.lr if stage == 1 else r.lr / 2, r.warmup_frac, r.decay_frac)
        for g in self.opt.param_groups:
            g["lr"] = lr
        lo, hi = (r.min_len, r.max_len) if stage == 1 else r.s2_range
        indices = range(self.rank, r.batch_size, self.world)
        if r.same_length_per_step:
            import random

            length = random.Random(f"steplen:{r.seed}:{self.step}").randint(lo, hi)
            lo = hi = length
        samples = batch_for_step(self.task, self.step, r.batch_size, lo, hi, r.tasks, indices)
        self.opt.zero_grad(set_to_none=False)
        mse_sum = torch.zeros((), device=self.device)
        for group in _groups(samples, batched=r.same_length_per_step and self.world == 1):
            ids = torch.stack([s.input_ids for s in group]).to(self.device)
            split = group[0].prompt_len - 1
            teacher = capture(self.decoder, ids, self.state, split)[:, split:]
            self.state.scale, self.state.dropped = self._scale()
            mse = hidden_mse(answer_forward(self.decoder, ids, self.state), teacher)
            (mse * len(group) / r.batch_size).backward()
            mse_sum += mse.detach() * len(group)
            self.state.scale = self.state.dropped = None
        self.state.keys.clear()
        self.state.values.clear()
        if self.factors.grad is None:  # no sample of this step had an archive
            self.factors.grad = torch.zeros_like(self.factors)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(self.factors.grad)
        self.importance -= self.factors.grad  # distillation part only (reg is added below)
        reg = r.reg * self.factors.mean()
        reg.backward()
        if self.world > 1:
            dist.all_reduce(mse_sum)
        self.opt.step()
        with torch.no_grad():
            self.factors.clamp_(0.0, 1.0)
        self.step += 1
        mse_val = float(mse_sum) / r.batch_size
        rec = {"step": self.step, "stage": stage, "lr": lr, "mse": mse_val, "reg": float(reg.detach()),
               "loss": mse_val + float(reg.detach()), "mean_factor": float(self.factors.detach().mean())}
        if stage == 1:
            rec["sparsity"] = soft_sparsity(self.factors)
        else:
            rec["sparsity"] = 1.0 - float(self.counts.sum()) / self.factors.numel()
        self.history.append(rec)
        return rec

    def run(self, max_steps: int | None = None, resume: bool = True):
        """Train until the end (returns the ``ChannelMask``) or until global step
        ``max_steps`` (checkpoint written, returns None)."""
        r = self.recipe
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps: expected a positive int or None, got {max_steps!r}")
        if resume and r.checkpoint_path.is_file():
            self.load_checkpoint(r.checkpoint_path)
        end = r.total_steps if max_steps is None else min(max_steps, r.total_steps)
        bar = None
        if self.rank == 0 and end > self.step:
            from tqdm.auto import tqdm

            bar = tqdm(total=end - self.step, desc="leank train", disable=not logger.isEnabledFor(logging.INFO))
        model = self.model
        was_training = model.training
        gc_enabled = r.gradient_checkpointing
        if gc_enabled:
            _set_checkpointing(model, True)
            model.train()  # HF checkpoints layers only in training mode; Llama/Qwen2 attention dropout is 0
        t0 = time.time()
        try:
            with training_attention(model):
                while self.step < end:
                    if self.step == r.stage1_steps and r.stage1_steps > 0 and self.step > 0 and self.counts is None:
                        self.save_checkpoint()  # end of stage 1
                    rec = self.train_step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(stage=rec["stage"], loss=f"{rec['loss']:.4g}", sparsity=f"{rec['sparsity']:.3f}")
                    if self.rank == 0 and (self.step % r.log_every == 0 or self.step == end):
                        logger.info("step %d/%d stage %d lr %.3g loss %.5g (mse %.5g reg %.4g) mean factor %.3f sparsity %.3f",
                                    self.step, r.total_steps, rec["stage"], rec["lr"], rec["loss"], rec["mse"],
                                    rec["reg"], rec["mean_factor"], rec["sparsity"])
                    if r.checkpoint_every and self.step % r.checkpoint_every == 0 and self.step < end:
                        self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if gc_enabled:
                _set_checkpointing(model, False)
            model.train(was_training)
        logger.info("trained steps up to %d in %.1f s", self.step, time.time() - t0)
        if self.step < r.total_steps:
            self.save_checkpoint()
            return None
        mask = self.final_mask()
        if self.rank == 0:
            mask.save(r.output)
            self.save_checkpoint()
            logger.info("wrote %s: %r", r.output, mask)
        return mask

    def final_mask(self):
        """The binary ``ChannelMask`` of the current factors (stage-2 counts, or computed now)."""
        from ..masks import ChannelMask

        counts = (self.counts if self.counts is not None
                  else kept_units(self.factors, self.recipe.ratio, self.recipe.align, self.importance))
        keep = topk_mask(self.factors.detach().cpu(), counts.cpu(), self.importance.cpu())
        last = self.history[-1] if self.history else {}
        meta = {"method": "leank-two-stage", "recipe": self.recipe.to_dict(), "steps": self.step,
                "final_mse": last.get("mse"), "final_loss": last.get("loss")}
        return ChannelMask(keep, model_id=self.recipe.model_id or self.recipe.model, align=self.recipe.align,
                           context_set=self.recipe.context_set, source="leank.train", metadata=meta)


def train(recipe: TrainRecipe, model=None, tokenizer=None, *, device=None, max_steps: int | None = None,
          resume: bool = True):
    """Run the two-stage training of ``recipe``; returns the ``ChannelMask`` (None if stopped
    early at ``max_steps``). ``model``/``tokenizer`` default to loading ``recipe.model``."""
    return Trainer(recipe, model, tokenizer, device=device).run(max_steps=max_steps, resume=resume)
