"""use_attention: switch a model's attention function and restore everything in finally."""

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def test_switch_restore_and_nesting():
    from leank.attention_switch import use_attention

    model = _model()
    ids = torch.randint(0, 32, (1, 7))
    ref = model(ids).logits
    sdpa = AttentionInterface()["sdpa"]
    calls = []

    def outer(module, *args, **kwargs):
        calls.append(("outer", module.layer_idx))
        return sdpa(module, *args, **kwargs)

    def inner(module, *args, **kwargs):
        calls.append(("inner", module.layer_idx))
        return sdpa(module, *args, **kwargs)

    with use_attention(model, "leank_test_switch", outer):
        assert model.config._attn_implementation == "leank_test_switch"
        with use_attention(model, "leank_test_switch", inner):
            torch.testing.assert_close(model(ids).logits, ref)
        model(ids)
    assert calls == [("inner", 0), ("inner", 1), ("outer", 0), ("outer", 1)]
    assert all(c._attn_implementation == "sdpa" for c in [model.config, model.model.config])
    torch.testing.assert_close(model(ids).logits, ref)
    # the name no longer reaches the closures (nothing they hold outlives the block)
    with pytest.raises(RuntimeError, match="only valid inside"):
        AttentionInterface()["leank_test_switch"](None)


def test_restored_after_an_error():
    from leank.attention_switch import use_attention

    model = _model()

    def broken(*args, **kwargs):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        with use_attention(model, "leank_test_broken", broken):
            model(torch.zeros(1, 3, dtype=torch.long))
    assert model.config._attn_implementation == "sdpa"
