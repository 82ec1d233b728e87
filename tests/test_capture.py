"""The captured decode path's host/device split, exercised on the CPU.

``DecodeGraphRunner(emulate=True)`` records nothing: each "replay" re-runs the forward
with the layers in capture mode (device work only: window append at the device-side
length, attention over device lengths) and then does the runner's host part (lengths,
seen tokens, batched flush). On CUDA the same code is recorded once and replayed; the
GPU test (tests/test_gpu_patch.py) compares that against the eager path.
"""

import pytest
import torch

import leank
from leank import LeanKConfig
from leank.masks import ChannelMask
from tests.oracle import oracle_logits, sparse_keep, tiny_model, with_biases

CFG = LeanKConfig(sink=4, recent=8, flush_every=4, backend="reference")


def _ragged(lens, seed=0, vocab=96):
    g = torch.Generator().manual_seed(seed)
    width = max(lens)
    ids = torch.zeros(len(lens), width, dtype=torch.long)
    am = torch.zeros(len(lens), width, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, width - n:] = torch.randint(1, vocab, (n,), generator=g)
        am[i, width - n:] = 1
    return ids, am


def _run(model, keep, ids, am, n, capture, cfg=CFG, compile_decode=False, **kw):
    leank.patch(model, masks=ChannelMask(keep=keep, align=8),
                config=LeanKConfig(**{**cfg.__dict__, "capture": capture, "compile_decode": compile_decode}))
    model._leank.emulate_capture = True
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=0, **kw)
        runner = model._leank.runner
    finally:
        leank.unpatch(model)
    return out, runner


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_emulated_capture_equals_eager_on_ragged_batch(kind):
    model = tiny_model(kind)
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged([3, 30, 17])  # shorter than the window, longer, in between
    n = 21  # several flushes of flush_every=4 at different steps per sequence
    eager, _ = _run(model, keep, ids, am, n, capture=False)
    cap, runner = _run(model, keep, ids, am, n, capture=True)
    assert runner.replays >= n - 3, "the decode steps must be served by the runner"
    assert runner.eager_steps == 0, "no decode step runs the model's own forward (not even a cache's first)"
    assert runner.compiled_steps == 0, "compile_decode=False: no step may count as compiled"
    _assert_same_run(eager, cap)
    assert runner.fused, "the tiny Llama / Qwen2 decode step runs leank.fused_decode"
    assert runner.flushes >= 3, "the flushes of all layers ran through the runner (device part, then host part)"
    for a, b in zip(eager.past_key_values.layers, cap.past_key_values.layers):
        assert a.win_len.tolist() == b.win_len_host and a.arch_len.tolist() == b.arch_len_host
        assert b.arch_len_host[1] > 0, "the archive must be in use"


def test_backend_is_decided_once_per_cache_not_per_step(monkeypatch):
    """The runner decides each layer's backend before a cache's first decode step and keeps the answer: over
    a 12-token generate of a 2-layer model, one decision per layer, not one per layer and step."""
    import leank.attention as attention

    real, calls = attention.resolve_layer_backend, []
    monkeypatch.setattr(attention, "resolve_layer_backend", lambda *a: calls.append(1) or real(*a))
    # the attention's own per-call lookup is not the runner's: it goes straight to the real function
    monkeypatch.setattr(attention, "layer_backend", lambda layer, q: real(layer, q.shape[1], q.dtype, q.device))
    model = tiny_model("llama")
    ids, am = _ragged([9, 20])
    _, runner = _run(model, sparse_keep(2, 4, 32), ids, am, 12, capture=True)
    assert runner.replays >= 9 and len(calls) == len(model.model.layers)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_compiled_decode_step_matches_eager(kind):
    """LeanKConfig.compile_decode: the step torch.compile builds around torch.ops.leank.decode_step
    (Inductor on the CPU here) gives the eager logits up to float32 reordering, with flushes and a
    ragged batch, and no fallback warning."""
    import warnings

    model = tiny_model(kind)
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged([5, 26, 13], seed=3)
    n = 12
    eager, _ = _run(model, keep, ids, am, n, capture=False)
    from leank.diagnostics import warn_once

    warn_once.cache_clear()  # a warning another test raised first must still show here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cap, runner = _run(model, keep, ids, am, n, capture=True, compile_decode=True)
    assert not [w for w in caught if "leank" in str(w.message)], [str(w.message) for w in caught]
    assert runner.compiled_steps == n - 1 and not runner._compile_failed, "every decode step runs the compiled forward"
    assert runner.eager_steps == 0
    _assert_same_run(eager, cap, tol=1e-4)
    assert all(layer.arch_len_host[1] > 0 for layer in cap.past_key_values.layers), "the archive must be in use"


def test_emulated_capture_matches_float64_oracle():
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged([30])
    out, runner = _run(model, keep, ids, am, 14, capture=True)
    assert runner.replays > 0
    cont = out.sequences[0, ids.shape[1]:]
    ref = oracle_logits(model, keep, CFG.sink, CFG.recent, CFG.flush_every, ids[0], cont)  # [14, vocab]
    got = torch.stack(out.logits, 1)[0]
    assert (got - ref.to(got.dtype)).abs().max() <= 1e-4


def test_beam_search_with_capture_on_equals_eager():
    """transformers' beam search calls the model directly (never captured); reorders stay in place."""
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged([20, 26])
    eager, _ = _run(model, keep, ids, am, 9, capture=False, num_beams=2)
    cap, _ = _run(model, keep, ids, am, 9, capture=True, num_beams=2)
    assert torch.equal(cap.sequences, eager.sequences)


def _continue_both_ways(lens, first_tokens, prepare):
    """Generate, let ``prepare(first_output) -> (ids2, cache)`` shape the follow-up, generate 8 more
    from that cache; eager vs emulated capture. Returns (eager output, captured output, runner)."""
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged(lens)
    outs = {}
    for capture in (False, True):
        first, _ = _run(model, keep, ids, am, first_tokens, capture=capture)
        ids2, cache = prepare(first)
        am2 = torch.cat([am, torch.ones(len(lens), ids2.shape[1] - am.shape[1], dtype=am.dtype)], 1)
        outs[capture] = _run(model, keep, ids2, am2, 8, capture=capture, past_key_values=cache)
    return outs[False][0], outs[True][0], outs[True][1]


def _assert_same_run(eager, cap, tol=1e-6):
    """Same tokens, logits within ``tol`` (and not trivially small), same host lengths per layer."""
    assert torch.equal(cap.sequences, eager.sequences)
    le, lc = torch.stack(eager.logits, 1), torch.stack(cap.logits, 1)
    assert le.abs().max() > 1.0
    assert (le - lc).abs().max() <= tol
    for a, b in zip(eager.past_key_values.layers, cap.past_key_values.layers):
        assert a.win_len_host == b.win_len_host and a.arch_len_host == b.arch_len_host


def test_second_generate_continues_captured_cache():
    more = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    eager, cap, runner = _continue_both_ways(
        [18, 25], 7, lambda first: (torch.cat([first.sequences, more], 1), first.past_key_values))
    assert runner.replays >= 5
    _assert_same_run(eager, cap)


def test_flush_batched_equals_per_sequence():
    """Sequences due together are flushed by one batched scatter; the result equals one by one."""
    keep = sparse_keep(1, 4, 32)
    cache_a = leank.LeanKCache(ChannelMask(keep=keep, align=8), CFG)
    cache_b = leank.LeanKCache(ChannelMask(keep=keep, align=8), CFG)
    torch.manual_seed(0)
    k = torch.randn(3, 4, 20, 32)
    v = torch.randn(3, 4, 20, 32)
    for c in (cache_a, cache_b):
        layer = c.layers[0]
        layer.reserve = 16
        layer.lazy_initialization(k, v)
        layer.store_chunk(k, v, None)
    la, lb = cache_a.layers[0], cache_b.layers[0]
    for step in range(6):
        kk, vv = torch.randn(3, 4, 1, 32), torch.randn(3, 4, 1, 32)
        for layer in (la, lb):
            layer.append_decode(kk, vv)
        la.flush_if_due()  # batched (all three due at the same step)
        for b in range(3):  # one sequence at a time through the same method
            if any(d[0] == b for d in _due(lb)):
                lb._flush_batched([d for d in _due(lb) if d[0] == b])
    assert la.win_len_host == lb.win_len_host and la.arch_len_host == lb.arch_len_host
    assert la.arch_len_host[0] > 20 - CFG.sink - CFG.recent, "a decode flush must have happened"
    for ga, gb in zip(la.groups, lb.groups):
        n = la.arch_len_host[0]
        assert torch.equal(ga.keys[:, :, :n], gb.keys[:, :, :n]) and torch.equal(ga.values[:, :, :n], gb.values[:, :, :n])
    w = la.win_len_host[0]
    assert torch.equal(la.win_k[:, :, :w], lb.win_k[:, :, :w])


def test_flush_index_follows_each_layers_device():
    """The layers of a cache share the flush-index store; a model split over devices gets each layer's
    indices on that layer's device (here a second device is the meta device)."""
    cache = leank.LeanKCache(ChannelMask(keep=sparse_keep(2, 4, 32), align=8), CFG)
    first, second = cache.layers
    first.device, second.device = torch.device("cpu"), torch.device("meta")
    due = [(0, 4, 4), (2, 4, 4)]
    assert all(t.device.type == "cpu" for t in first.flush_index(due))
    seq, sink = second.flush_index(due)
    assert seq.device.type == "meta" and sink.device.type == "meta"
    assert first.flush_index(due)[0].tolist() == [0, 2]


def test_flush_index_rows_start_16_byte_aligned_for_every_count():
    """seq and sink of any number of flushing sequences start on a 16-byte boundary (Triton compiles a
    kernel variant per pointer alignment: with sink at offset 8 * n, odd n compiled the flush kernels
    anew) and hold exactly the due sequences and their sinks."""
    cache = leank.LeanKCache(ChannelMask(keep=sparse_keep(2, 4, 32), align=8), CFG)
    layer = cache.layers[0]
    layer.device = torch.device("cpu")
    for n in (1, 2, 3, 8):
        due = [(b, 4 + b, 4) for b in range(n)]
        seq, sink = layer.flush_index(due)
        assert seq.tolist() == list(range(n)) and sink.tolist() == [4 + b for b in range(n)], n
        assert seq.data_ptr() % 16 == 0 and sink.data_ptr() % 16 == 0, n


def _due(layer):
    out = []
    for b in range(layer.batch_size):
        s = layer._sink_rows(b)
        w = layer.win_len_host[b]
        if w - s >= layer.config.recent + layer.config.flush_every:
            out.append((b, s, w - s - layer.config.recent))
    return out


def test_window_sized_by_the_call_not_the_config():
    """A huge window config costs nothing for a short call (issue 11 item 7)."""
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged([10])
    cfg = LeanKConfig(sink=10**6, recent=10**8, flush_every=10**6, backend="reference")
    out, _ = _run(model, keep, ids, am, 5, capture=True, cfg=cfg)
    layer = out.past_key_values.layers[0]
    assert layer.window_rows <= 10 + 6 + 1
    with pytest.raises(ValueError, match="sink"):
        LeanKConfig(sink=2**40)


def test_crop_then_continue_under_capture_equals_eager():
    """crop() rewrites lengths in place (no new tensors), so the runner's graph key stays right."""
    def crop3(first):
        first.past_key_values.crop(-3)
        return first.sequences[:, :-3], first.past_key_values

    eager, cap, runner = _continue_both_ways([22, 28], 10, crop3)
    assert runner.replays > 0
    _assert_same_run(eager, cap)


@pytest.mark.parametrize("fused,rope", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decode_step_traces_as_one_graph_without_breaks(kind, fused, rope, monkeypatch):
    """The function the runner compiles (fused decode forward, or the model's forward, with LeanK's attention
    as one custom op per layer) is a single graph with no graph break (issue 16: patched, model.forward
    gave 34 breaks). The fused forward applies RoPE inside the op (``decode_step_rope``) unless
    ``append_kernel.FUSE_ROPE`` is off; the model's forward rotates q/k itself (``decode_step``)."""
    from leank import append_kernel
    from leank.capture import DecodeGraphRunner, _ACTIVE, _decode_op

    monkeypatch.setattr(append_kernel, "FUSE_ROPE", rope)
    model = tiny_model(kind)
    ids, am = _ragged([9, 30], seed=2)
    leank.patch(model, masks=ChannelMask(keep=sparse_keep(2, 4, 32), align=8), config=CFG)
    try:
        cache = leank.new_cache(model)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=am, use_cache=True, **{leank.patching.cache_kwarg(model): cache})
            runner = DecodeGraphRunner(model, emulate=True)
            if fused:
                runner._prepare_fused()
                assert runner.fused
            _decode_op()
            _ACTIVE.append(cache)
            try:
                explained = torch._dynamo.explain(runner._forward_logits)(ids[:, -1:], am.sum(1, keepdim=True))
            finally:
                _ACTIVE.pop()
    finally:
        leank.unpatch(model)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    layers = model.config.num_hidden_layers
    expected = torch.ops.leank.decode_step_rope if fused and rope else torch.ops.leank.decode_step
    other = torch.ops.leank.decode_step if fused and rope else torch.ops.leank.decode_step_rope
    assert sum(op is expected.default or op is expected for op in ops) == layers
    assert not any(op is other.default or op is other for op in ops)


def test_compiled_step_serves_another_batch_size():
    """A second generate with another batch size recompiles (dynamic batch) and stays equal to eager."""
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32)
    cfg = LeanKConfig(**{**CFG.__dict__, "compile_decode": True})
    leank.patch(model, masks=ChannelMask(keep=keep, align=8), config=cfg)
    model._leank.emulate_capture = True
    outs = []
    try:
        for lens in ([11], [7, 25, 16], [19, 4]):
            ids, am = _ragged(lens, seed=len(lens))
            with torch.no_grad():
                outs.append(model.generate(input_ids=ids, attention_mask=am, max_new_tokens=9, min_new_tokens=9,
                                           do_sample=False, output_logits=True, return_dict_in_generate=True,
                                           pad_token_id=0))
        runner = model._leank.runner
        assert runner.compiled_steps >= 3 * (9 - 3) and not runner._compile_failed
    finally:
        leank.unpatch(model)
    for lens, cap in zip(([11], [7, 25, 16], [19, 4]), outs):
        ids, am = _ragged(lens, seed=len(lens))
        eager, _ = _run(model, keep, ids, am, 9, capture=False)
        _assert_same_run(eager, cap, tol=1e-4)


# ----------------------------------------------------------------------------- fused projections
def _views_of_one_buffer(*linears) -> bool:
    ptrs = {m.weight.untyped_storage().data_ptr() for m in linears}
    return len(ptrs) == 1


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_projections_equal_unfused_and_keep_the_weights(kind, tmp_path):
    """q/k/v and gate/up as one product each: the same logits as transformers' forward in the runner,
    the parameters become views of one buffer (no second copy), the state_dict and a saved checkpoint are
    unchanged. Biases are made non-zero (transformers starts them at 0), so a dropped fused bias shows."""
    model = with_biases(tiny_model(kind))  # Llama: biases on every projection; Qwen2: on q/k/v
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged([5, 26, 13], seed=3)
    unfused, r0 = _run(model, keep, ids, am, 13, capture=True,
                       cfg=LeanKConfig(**{**CFG.__dict__, "fuse_projections": False}))
    assert not r0.fused and not _views_of_one_buffer(*[getattr(model.model.layers[0].self_attn, n)
                                                        for n in ("q_proj", "k_proj", "v_proj")])
    fused, r1 = _run(model, keep, ids, am, 13, capture=True)
    assert r1.fused and r1.replays >= 10
    _assert_same_run(unfused, fused, tol=1e-5)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert _views_of_one_buffer(attn.q_proj, attn.k_proj, attn.v_proj)
        assert _views_of_one_buffer(mlp.gate_proj, mlp.up_proj)
        assert isinstance(attn.q_proj.weight, torch.nn.Parameter)
        assert len({m.bias.untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj, attn.v_proj)}) == 1
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fused_buffers_follow_a_moved_model():
    """After ``model.to(float64)`` each parameter has its own storage again: the runner fuses anew
    (never reads the stale float32 buffers) and stays equal to eager."""
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged([7, 21], seed=4)
    _, r = _run(model, keep, ids, am, 6, capture=True)
    assert r.fused
    model.to(torch.float64)
    attn = model.model.layers[1].self_attn
    assert not _views_of_one_buffer(attn.q_proj, attn.k_proj, attn.v_proj)
    eager, _ = _run(model, keep, ids, am, 9, capture=False)
    cap, r = _run(model, keep, ids, am, 9, capture=True)
    assert r.fused and r.replays > 0
    assert _views_of_one_buffer(attn.q_proj, attn.k_proj, attn.v_proj) and attn.q_proj.weight.dtype == torch.float64
    _assert_same_run(eager, cap, tol=1e-10)


def _storage_ptr(t):
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(t, FakeTensor):  # left by torch.compile's tracing: no real storage
        return None
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # other tensors without a storage (e.g. functional wrappers)
        return None


def test_fused_views_are_not_kept_after_the_step():
    """The fused views are noted on the modules only while a step is traced or recorded: afterwards the
    parameters alone hold the buffers, so moving or offloading the model frees them."""
    import gc
    import warnings

    model = tiny_model("llama")
    ids, am = _ragged([9, 14], seed=6)
    _, r = _run(model, sparse_keep(2, 4, 32), ids, am, 6, capture=True, compile_decode=True)
    assert r.fused and r.replays > 0 and r.compiled_steps > 0
    params = {id(p) for p in model.parameters()}
    for layer in model.model.layers:
        assert "_leank_fused" not in layer.self_attn.__dict__ and "_leank_fused" not in layer.mlp.__dict__
        for m in (layer.self_attn.q_proj, layer.mlp.gate_proj):
            ptr = m.weight.untyped_storage().data_ptr()
            gc.collect()
            with warnings.catch_warnings():  # isinstance on every live object touches deprecated module aliases
                warnings.simplefilter("ignore")
                holders = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and id(t) not in params
                           and _storage_ptr(t) == ptr]
            assert not holders, f"{len(holders)} tensors besides the parameters hold a fused buffer"


def test_fused_decode_refuses_models_it_would_change():
    """Hooks, non-Linear projections (quantized, LoRA) and other model types keep transformers' forward."""
    from leank.fused_decode import unsupported_reason

    model = tiny_model("llama")
    assert unsupported_reason(model) is None
    handle = model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda *a: None)
    assert "hooks" in unsupported_reason(model)
    handle.remove()
    gate = model.model.layers[1].mlp.gate_proj
    gate.forward = lambda x: torch.nn.functional.linear(x, gate.weight) * 2  # a patched forward would be bypassed
    assert "gate_proj has its forward replaced" in unsupported_reason(model)
    del gate.forward
    assert unsupported_reason(model) is None
    model.model.layers[0].mlp.up_proj = torch.nn.Sequential(model.model.layers[0].mlp.up_proj)
    assert "not plain nn.Linear (Sequential)" in unsupported_reason(model)
    ids, am = _ragged([6, 17], seed=5)
    keep = sparse_keep(2, 4, 32)
    eager, _ = _run(model, keep, ids, am, 7, capture=False)
    cap, r = _run(model, keep, ids, am, 7, capture=True)
    assert not r.fused and r.replays > 0
    _assert_same_run(eager, cap)


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """LeanKConfig.compile_mode is the mode the decode step is compiled with; modes that record CUDA
    graphs of their own (they cannot run inside LeanK's graph) are refused by name."""
    import leank.capture as capture_mod

    seen = []

    def fake_compile(fn, **kw):  # records the call; runs the step uncompiled (no minutes of autotuning)
        seen.append(kw)
        return fn

    monkeypatch.setattr(capture_mod.torch, "compile", fake_compile)
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged([5, 12], seed=3)
    cfg = LeanKConfig(**{**CFG.__dict__, "compile_mode": "max-autotune-no-cudagraphs"})
    eager, _ = _run(model, keep, ids, am, 7, capture=False)
    cap, runner = _run(model, keep, ids, am, 7, capture=True, cfg=cfg, compile_decode=True)
    assert seen == [{"fullgraph": True, "mode": "max-autotune-no-cudagraphs"}]
    assert runner.compiled_steps > 0
    _assert_same_run(eager, cap)
    for mode in ("reduce-overhead", "max-autotune", "fast"):
        with pytest.raises(ValueError, match=f"compile_mode: expected one of .* got '{mode}'"):
            LeanKConfig(compile_mode=mode)


def test_compile_failure_is_told_for_every_model_with_the_recompile_hint(monkeypatch):
    """A step that cannot compile runs uncompiled (same tokens) and says so for every patched model, not
    once per process; torch's recompile limit (8 per function: one per model shape/dtype in a process)
    gets a hint how to raise it."""
    import warnings

    import leank.capture as capture_mod

    from torch._dynamo.exc import FailOnRecompileLimitHit  # what torch._dynamo raises past recompile_limit

    def fake_compile(fn, **kw):
        def compiled(*a, **k):
            raise FailOnRecompileLimitHit("Hard failure due to fullgraph=True")  # torch's own message
        return compiled

    monkeypatch.setattr(capture_mod.torch, "compile", fake_compile)
    ids, am = _ragged([5, 12], seed=4)
    eager, _ = _run(tiny_model("llama"), sparse_keep(2, 4, 32), ids, am, 6, capture=False)
    for _ in range(2):  # two models, each told
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            cap, runner = _run(tiny_model("llama"), sparse_keep(2, 4, 32), ids, am, 6, capture=True,
                               compile_decode=True)
        told = [str(w.message) for w in seen if "torch.compile of the decode step failed" in str(w.message)]
        assert len(told) == 1 and "recompile_limit" in told[0] and "FailOnRecompileLimitHit" in told[0], told
        assert runner._compile_failed and runner.compiled_steps == 0 and runner.replays > 0
        _assert_same_run(eager, cap)


def test_deepcopy_of_a_patched_model_after_generate_compiles_its_own_step():
    """A copy made after a compiled generate gets a fresh runner (no graphs or compiled step of the original)
    and decodes compiled, equal to the original."""
    import copy
    import warnings

    model = tiny_model("qwen2")
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged([7, 11], seed=5)
    leank.patch(model, masks=ChannelMask(keep=keep, align=8),
                config=LeanKConfig(**{**CFG.__dict__, "capture": True, "compile_decode": True}))
    model._leank.emulate_capture = True
    try:
        def gen(m):
            with torch.no_grad():
                return m.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, min_new_tokens=6,
                                  do_sample=False, pad_token_id=0)
        first = gen(model)
        twin = copy.deepcopy(model)
        assert twin._leank.runner is not model._leank.runner and twin._leank.runner.model is twin
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            again = gen(twin)
        assert not [w for w in seen if "torch.compile of the decode step failed" in str(w.message)]
        assert twin._leank.runner.compiled_steps > 0 and not twin._leank.runner._compile_failed
        assert torch.equal(first, again)
    finally:
        leank.unpatch(model)


def test_graph_keys_of_copies_and_split_caches():
    """A deep copy of a cache is a new cache for the runner (a fresh uid: with a reused id() and a copied uid,
    the graph recorded for a freed copy replayed on the new one); a cache whose layers sit on several
    devices is not captured."""
    import copy

    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged([9, 14], seed=8)
    leank.patch(model, masks=ChannelMask(keep=keep, align=8), config=LeanKConfig(**{**CFG.__dict__, "capture": True}))
    model._leank.emulate_capture = True
    try:
        with torch.no_grad():
            base = leank.new_cache(model)
            model(input_ids=ids, attention_mask=am, use_cache=True, **{leank.patching.cache_kwarg(model): base})
            outs = []
            for _ in range(3):  # each copy dies before the next is made: CPython may reuse its id()
                twin = copy.deepcopy(base)
                assert twin.uid != base.uid
                out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=4, min_new_tokens=4,
                                     do_sample=False, pad_token_id=0, **{leank.patching.cache_kwarg(model): twin})
                outs.append(out)
                del twin
            runner = model._leank.runner
        assert runner.captures == 3, "every copy must be recorded for itself"
        assert all(torch.equal(o, outs[0]) for o in outs)
        cache = output_cache_of(model, ids, am)
        kw = dict(input_ids=ids[:, -1:], position_ids=torch.zeros(2, 1, dtype=torch.long), use_cache=True,
                  **{leank.patching.cache_kwarg(model): cache})
        assert runner._why_not((), kw)[0] is None
        cache.layers[1].device = torch.device("meta")
        assert "several devices" in runner._why_not((), kw)[0]
    finally:
        leank.unpatch(model)


def output_cache_of(model, ids, am):
    """A cache that has prefilled ``ids`` and decoded one step (backend resolved)."""
    from leank.patching import output_cache

    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=2, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    return output_cache(out)


def test_unpatch_releases_recorded_graphs_and_a_repatch_records_again():
    """``leank.unpatch`` drops the runner's recorded decode and flush graphs and its compiled step (under
    tensor parallelism they hold NCCL collectives, and ``destroy_process_group`` waits on them forever);
    patching again records anew and gives the same tokens."""
    model = tiny_model("llama")
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged([6, 19], seed=11)
    cfg = LeanKConfig(**{**CFG.__dict__, "capture": True, "compile_decode": True})

    def run():
        leank.patch(model, masks=ChannelMask(keep=keep, align=8), config=cfg)
        model._leank.emulate_capture = True
        with torch.no_grad():  # 10 tokens: past flush_every=4, so flushes are recorded too
            out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=10, min_new_tokens=10,
                                 do_sample=False, pad_token_id=0)
        return out, model._leank.runner

    first, runner = run()
    # (the CPU emulation records no flush graph; a flush set run once is noted in _flush_warm)
    assert runner._graph is not None and runner._flush_warm and runner._compiled is not None
    leank.unpatch(model)
    assert runner._graph is None and not runner._flush_graphs and not runner._flush_warm
    assert runner._compiled is None and runner._warm_key is None
    assert not hasattr(model, "_leank") and "__call__" not in model.__dict__
    try:
        again, runner2 = run()
        assert runner2 is not runner and runner2.captures >= 1 and runner2._graph is not None
    finally:
        leank.unpatch(model)
    assert torch.equal(first, again)


# ----------------------------------------------------------------------------- LeanKConfig.tp_allreduce
def test_one_shot_all_reduce_without_tensor_parallelism_says_so_and_changes_nothing():
    """``tp_allreduce="one_shot"`` on a one-process model: one RuntimeWarning naming the reason, no reducer, and
    the run equals the default's; an unknown value is a ValueError naming the argument."""
    import warnings

    from leank.diagnostics import warn_once
    from leank.tp import TPShard, one_shot_reason

    with pytest.raises(ValueError, match=r"tp_allreduce: expected one of \('transformers', 'one_shot'\), got 'nccl'"):
        LeanKConfig(tp_allreduce="nccl")
    assert one_shot_reason(None, "cpu") == "the model is not tensor parallel"
    assert "needs CUDA" in one_shot_reason(TPShard(rank=0, size=2, num_kv_heads=4), "cpu")
    model = tiny_model("qwen2")
    keep = sparse_keep(2, 4, 32)
    ids, am = _ragged([4, 19], seed=5)
    plain, r0 = _run(model, keep, ids, am, 9, capture=True)
    warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        one_shot, r1 = _run(model, keep, ids, am, 9, capture=True,
                            cfg=LeanKConfig(**{**CFG.__dict__, "tp_allreduce": "one_shot"}))
    msgs = [str(w.message) for w in seen if "tp_allreduce" in str(w.message)]
    assert msgs == ["leank: LeanKConfig.tp_allreduce='one_shot' not used, the decode step keeps transformers' "
                    "all-reduce: the model is not tensor parallel"], msgs
    assert r1.fused and r1.row_reduce is None and r1.replays >= 6
    _assert_same_run(plain, one_shot, tol=0.0)
