"""patches/ owns what differs between model families: dims, mask set, decoder accessor.

A new family is one ``ModelFamily`` plus one entry in ``patches.FAMILIES``; the library
(mask validation, baselines, training, compaction) then reads the model through it.
"""

import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config

from leank import patches
from leank.baselines import from_rope_frequency
from leank.compaction.queries import base_model
from leank.masks import ChannelMask, context_set_from_config, model_dims
from leank.train.attention import decoder_of


def _dims(config):  # a family that stores its attention shape under other names
    return config.n_layers, config.n_kv, config.kv_dim


def _set(config):
    return "long" if getattr(config, "long_context", False) else "default"


TOY = patches.ModelFamily(model_type="toy", dims=_dims, context_set=_set, decoder=lambda m: m.trunk)


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(patches.FAMILIES, "toy", TOY)  # the "one line" of a new family
    return TOY


def test_test_only_family_is_asked(toy_family):
    cfg = types.SimpleNamespace(model_type="toy", n_layers=3, n_kv=2, kv_dim=64, long_context=True, name_or_path="")
    assert patches.family_for(cfg) is toy_family
    assert model_dims(cfg) == patches.model_dims(cfg) == (3, 2, 64)
    assert context_set_from_config(cfg) == "long"
    mask = from_rope_frequency(cfg, 0.5, align=32)
    assert mask.keep.shape == (3, 2, 64) and mask.context_set == "long"
    with pytest.warns(UserWarning, match="context set 'default' but the model config implies 'long'"):
        ChannelMask.full(3, 2, 64).validate(cfg)
    model = types.SimpleNamespace(config=cfg, trunk="the decoder")
    assert decoder_of(model) == base_model(model) == "the decoder"


def test_unknown_family_uses_the_standard_readers():
    cfg = types.SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    assert patches.family_or_generic(cfg) is patches.GENERIC
    assert model_dims(cfg) == (2, 4, 16)
    with pytest.raises(ValueError, match="unsupported architecture"):
        patches.family_for(cfg)


def test_builtin_families():
    llama = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    qwen = Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=64,
                       rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                            original_max_position_embeddings=32768))
    assert patches.model_dims(llama) == (2, 2, 16) and patches.context_set_of(llama) == "default"
    assert patches.model_dims(qwen) == (2, 1, 16) and patches.context_set_of(qwen) == "yarn"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, hidden_size=16, intermediate_size=16))
    assert patches.decoder_of(model) is model.model is base_model(model) is decoder_of(model)
    assert patches.decoder_of(model.model) is model.model
    assert torch.is_tensor(from_rope_frequency(llama, 0.5, align=16).keep)
