"""CPU tests of leank.train: recipes, answer attention, stage 2 rounding, training, resume,
the saved mask through leank.patch, and FSDP2 with two gloo processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leank.train.attention import (AnswerAttentionState, answer_attention, answer_forward, capture,
                                   decoder_of, greedy_answer, training_attention)
from leank.train.data import RetrievalTask, decode_words, score
from leank.train.recipe import TrainRecipe, load_recipe, recipe_from_dict
from leank.train.stages import kept_units, lr_at, ste_scale, topk_mask

REPO = Path(__file__).resolve().parents[1]


def _tiny(seed: int = 0):
    from transformers import LlamaForCausalLM

    from leank.train.tiny import build_word_tokenizer, tiny_llama_config

    tok = build_word_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_llama_config(len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                            intermediate_size=64)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).float().eval(), tok


def _recipe(out: Path, **kw) -> TrainRecipe:
    base = dict(model="tiny", output=str(out), ratio=0.5, align=4, lr=0.05, reg=0.01, stage1_steps=3,
                stage2_steps=2, batch_size=2, min_len=160, max_len=200, n_pairs=[1, 3], sink=4, recent=16,
                dtype="float32", gradient_checkpointing=True, chat_template=False, checkpoint_every=0, log_every=1)
    base.update(kw)
    return TrainRecipe(**base)


# ----------------------------------------------------------------------------- recipes
def test_shipped_recipes_load():
    files = sorted((REPO / "masks" / "recipes").glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "qwen2.5-7b-instruct-yarn", "tiny-llama"} <= names
    r = {f.stem: load_recipe(f) for f in files}
    llama = r["llama-3.1-8b-instruct"]
    assert (llama.lr, llama.reg, llama.ratio, llama.align, llama.min_len, llama.max_len) == (0.02, 0.06, 0.7, 32, 4096, 98304)
    qwen = r["qwen2.5-7b-instruct"]
    assert (qwen.lr, qwen.reg, qwen.ratio, qwen.min_len, qwen.max_len) == (0.04, 0.06, 0.6, 4096, 32768)
    yarn = r["qwen2.5-7b-instruct-yarn"]
    assert yarn.rope_scaling["rope_type"] == "yarn" and yarn.rope_scaling["factor"] == 4.0
    assert yarn.rope_scaling["original_max_position_embeddings"] == 32768
    assert (yarn.min_len, yarn.max_len, yarn.context_set) == (65536, 98304, "yarn")


def test_recipe_unknown_key_and_bad_values(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: m\noutput: o.safetensors\nlearning_rate: 0.1\nratoi: 0.5\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rate', 'ratoi'\]"):
        load_recipe(p)
    with pytest.raises(ValueError, match="missing required keys"):
        recipe_from_dict({"model": "m"})
    for bad in ({"ratio": 1.0}, {"align": 0}, {"min_len": 10, "max_len": 5}, {"tasks": ["nope"]},
                {"lr": 0.0}, {"dtype": "int8"}, {"rope_scaling": {"factor": 4}}, {"warmup_frac": 0.9, "decay_frac": 0.2}):
        with pytest.raises(ValueError):
            recipe_from_dict({"model": "m", "output": "o", **bad})


def test_yarn_rope_override_keeps_theta():
    from transformers import Qwen2Config

    from leank.masks import context_set_from_config
    from leank.train.loop import apply_rope_scaling

    cfg = Qwen2Config(rope_theta=1e6)
    apply_rope_scaling(cfg, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    params = cfg.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0 and params["rope_theta"] == 1e6
    assert context_set_from_config(cfg) == "yarn"


def test_schedule_warmup_flat_decay():
    lrs = [lr_at(s, 20, 1.0, 0.1, 0.2) for s in range(20)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[10] == 1.0
    assert all(a > b for a, b in zip(lrs[16:], lrs[17:])) and 0 < lrs[-1] < 0.25


# ----------------------------------------------------------------------------- data
def test_data_exact_lengths_and_scoring():
    _, tok = _tiny()
    task = RetrievalTask(tok, seed=3, n_pairs=(2, 5), use_chat_template=False)
    for i, (kind, n) in enumerate([("multikey", 173), ("multivalue", 301), ("multikey", 997)]):
        s = task.sample(i, n, kind)
        assert s.input_ids.numel() == n and (s.input_ids != tok.unk_token_id).all()
        words = decode_words(tok, s.input_ids[s.prompt_len:].tolist())
        assert score(kind, s.answer, words)
        assert torch.equal(s.input_ids, task.sample(i, n, kind).input_ids)  # pure function of (seed, index)
    assert not score("multikey", ["a", "b", "c"], ["a", "c", "b"]) and score("multivalue", ["a", "b"], ["b", "a"])
    with pytest.raises(ValueError, match="length"):
        task.sample(0, 20, "multikey")


# ----------------------------------------------------------------------------- attention
def _dense_reference(q, k_new, v_new, k_ctx, v_ctx, scaling, archive, scale, dropped):
    """float64 attention over concatenated keys with archive K scaled; dropped heads lose the archive."""
    b, h, a, d = q.shape
    kvh = k_ctx.shape[1]
    g = h // kvh
    lo, hi = archive
    k = torch.cat([k_ctx, k_new], 2).double().clone()
    v = torch.cat([v_ctx, v_new], 2).double()
    k[:, :, lo:hi] *= scale.double()[None, :, None, :]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scaling
    s_len = k_ctx.shape[2]
    allowed = torch.ones(a, s_len + a, dtype=torch.bool)
    allowed[:, s_len:] = torch.ones(a, a, dtype=torch.bool).tril()
    allowed = allowed[None, None].repeat(b, h, 1, 1)
    head_dropped = dropped.repeat_interleave(g)
    allowed[:, head_dropped, :, lo:hi] = False
    s = s.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("s_len,a,archive", [(97, 5, (4, 81)), (17, 1, (3, 3)), (33, 3, (0, 33))])
def test_answer_attention_matches_float64_reference(s_len, a, archive):
    gen = torch.Generator().manual_seed(s_len)
    b, h, kvh, d = 2, 6, 3, 16
    q = torch.randn(b, h, a, d, generator=gen)
    k_new, v_new = torch.randn(b, kvh, a, d, generator=gen), torch.randn(b, kvh, a, d, generator=gen)
    k_ctx, v_ctx = torch.randn(b, kvh, s_len, d, generator=gen), torch.randn(b, kvh, s_len, d, generator=gen)
    scale = torch.rand(kvh, d, generator=gen)
    dropped = torch.tensor([False, True, False])
    out = answer_attention(q, k_new, v_new, k_ctx, v_ctx, d ** -0.5, archive, scale, dropped)
    ref = _dense_reference(q, k_new, v_new, k_ctx, v_ctx, d ** -0.5, archive, scale, dropped)
    assert out.shape == (b, a, h, d)
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()


def test_unit_factors_reproduce_the_full_model():
    model, tok = _tiny()
    s = RetrievalTask(tok, seed=1, n_pairs=(1, 3), use_chat_template=False).sample(0, 150, "multikey")
    ids, split = s.input_ids[None], s.prompt_len - 1
    state = AnswerAttentionState(sink=4, recent=16)
    dec = decoder_of(model)
    with training_attention(model):
        teacher = capture(dec, ids, state, split)[:, split:]
        state.scale = torch.ones(2, 2, 16)
        student = answer_forward(dec, ids, state)
        state.scale = torch.zeros(2, 2, 16)
        pruned = answer_forward(dec, ids, state)
    assert model.config._attn_implementation == "sdpa"  # restored
    with torch.no_grad():
        full = dec(input_ids=ids).last_hidden_state[:, split:]
    assert torch.allclose(teacher, full, atol=1e-5)
    assert torch.allclose(student, teacher, atol=1e-5)
    assert (pruned - teacher).abs().max() > 1e-3  # the archive matters


# ----------------------------------------------------------------------------- stage 2
@pytest.mark.parametrize("ratio,align", [(0.7, 16), (0.5, 32), (0.3, 8), (0.9, 16)])
def test_stage2_counts_meet_sparsity_and_alignment(ratio, align):
    gen = torch.Generator().manual_seed(7)
    f = torch.rand(5, 3, 64, generator=gen) ** 3
    f[0, 0] = 1.0  # a head that matters everywhere
    f[4, 2] = 0.0  # a head that never matters
    counts = kept_units(f, ratio, align)
    total = int(round((1 - ratio) * f.numel() / align)) * align
    assert int(counts.sum()) == total
    assert bool((counts % align == 0).all()) and int(counts.max()) <= 64 and int(counts.min()) >= 0
    keep = topk_mask(f, counts)
    assert torch.equal(keep.sum(-1), counts)
    assert counts[0, 0] == 64 and counts[4, 2] == 0
    # kept channels are each head's largest factors
    for l, h in [(1, 1), (2, 0)]:
        c = int(counts[l, h])
        if 0 < c < 64:
            assert f[l, h][keep[l, h]].min() >= f[l, h][~keep[l, h]].max()
    scale = ste_scale(f.clone().requires_grad_(True), counts)
    assert torch.equal(scale.detach(), keep.float())


def test_ties_broken_by_accumulated_distillation_pressure():
    f = torch.zeros(1, 2, 8)
    f[0, 0, 7] = 0.5
    importance = torch.arange(16.0).view(1, 2, 8)
    importance[0, 1] = importance[0, 1].flip(-1)
    counts = kept_units(f, 0.75, 2, importance)
    assert counts.tolist() == [[2, 2]]
    keep = topk_mask(f, counts, importance)
    assert keep[0, 0].nonzero().flatten().tolist() == [6, 7]  # 0.5 first, then the larger importance
    assert keep[0, 1].nonzero().flatten().tolist() == [0, 1]


# ----------------------------------------------------------------------------- training
def test_training_reduces_loss_meets_sparsity_and_loads_through_patch(tmp_path):
    import leank
    from leank.config import LeanKConfig
    from leank.masks import ChannelMask
    from leank.train.loop import train

    model, tok = _tiny()
    out = tmp_path / "mask.safetensors"
    mask = train(_recipe(out, model_id=""), model, tok, device="cpu", resume=False)
    from leank.train.loop import Trainer  # noqa: F401  (public)

    hist = torch.load(_recipe(out).checkpoint_path, weights_only=True)["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert abs(mask.sparsity - 0.5) < 1e-9 and bool((mask.kept_counts() % 4 == 0).all())
    loaded = ChannelMask.load(out)
    assert loaded == mask and loaded.metadata["recipe"]["ratio"] == 0.5
    s = RetrievalTask(tok, seed=9, n_pairs=(1, 3), use_chat_template=False).sample(0, 170, "multikey")
    prompt = s.input_ids[None, : s.prompt_len]
    leank.patch(model, masks=str(out), config=LeanKConfig(sink=4, recent=16, backend="reference"))
    try:
        got = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]
    finally:
        leank.unpatch(model)
    # the same function through the training attention (exact prefill, masked archive after)
    state = AnswerAttentionState(sink=4, recent=16, scale=mask.keep.float(), dropped=mask.kept_counts() == 0)
    with training_attention(model):
        ours = greedy_answer(model, prompt, state, 4)
    assert torch.equal(got, ours)


def test_resume_continues_identically(tmp_path):
    from leank.train.loop import Trainer

    model, tok = _tiny()
    a = Trainer(_recipe(tmp_path / "a" / "m.safetensors", model_id=""), model, tok, device="cpu")
    a.run(resume=False)
    r = _recipe(tmp_path / "b" / "m.safetensors", model_id="")
    first = Trainer(r, model, tok, device="cpu")
    for bad in (0, -1, 2.5, True):  # -1 or 0 would have returned at once, as if training had stopped there
        with pytest.raises(ValueError, match="max_steps: expected a positive int"):
            first.run(max_steps=bad, resume=False)
    assert first.run(max_steps=4, resume=False) is None  # stops inside stage 2 with a checkpoint
    second = Trainer(r, model, tok, device="cpu")
    second.run(resume=True)
    assert second.step == a.step == 5
    assert torch.equal(second.factors, a.factors)
    assert torch.equal(second.counts, a.counts)
    changed = _recipe(tmp_path / "b" / "m.safetensors", model_id="", lr=0.1)
    with pytest.raises(ValueError, match=r"different recipe \(fields \['lr'\]\)"):
        Trainer(changed, model, tok, device="cpu").load_checkpoint(changed.checkpoint_path)


def _fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from leank.train.loop import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, tok = _tiny()
        t = Trainer(_recipe(Path(out) / "mask.safetensors", model_id="", stage1_steps=2, stage2_steps=1), model, tok,
                    device="cpu")
        t.run(resume=False)
        if rank == 0:
            torch.save(t.factors.detach(), Path(out) / "factors.pt")
        dist.barrier()  # no rank leaves while its peer's last gloo collective is in flight (aborts the peer)
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_gloo_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    from leank.train.loop import Trainer

    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    sharded = torch.load(tmp_path / "factors.pt", weights_only=True)
    model, tok = _tiny()
    single = Trainer(_recipe(tmp_path / "single" / "mask.safetensors", model_id="", stage1_steps=2, stage2_steps=1),
                     model, tok, device="cpu")
    single.run(resume=False)
    assert (sharded - single.factors.detach()).abs().max() < 1e-6
    assert not torch.equal(sharded, torch.ones_like(sharded))


def test_cli_parser_has_train():
    from leank.cli import build_parser

    args = build_parser().parse_args(["train", "r.yaml", "--ratio", "0.5", "--max-steps", "3"])
    assert args.recipe == "r.yaml" and args.ratio == 0.5 and args.max_steps == 3 and callable(args.func)


def test_recipe_output_must_be_safetensors(tmp_path):
    """Checked when the recipe is read, not when the mask is written at the end of training."""
    with pytest.raises(ValueError, match="output: expected a path ending in .safetensors"):
        _recipe(tmp_path / "mask.pth")
