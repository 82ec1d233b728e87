"""Tiny models and masks for tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from leank.verify import oracle_logits  # noqa: F401  (re-exported for tests)


def tiny_model(kind: str = "llama", seed: int = 0, layers: int = 2, kv_heads: int = 4, heads: int = 8, head_dim: int = 32, init: float = 0.15):
    """A tiny fp32 model with peaky attention (large init) so pruning changes the logits."""
    common = dict(
        vocab_size=96,
        hidden_size=heads * head_dim,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        initializer_range=init,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(kind)
    model.set_attn_implementation("sdpa")
    return model.eval()


def with_biases(model, seed: int = 7):
    """``model`` with non-zero biases on every projection that has one. A Llama is rebuilt (from ``seed``) with
    attention and MLP biases; Qwen2 has them on q/k/v. transformers starts biases at 0, so without this a bias
    dropped, or added once per tensor-parallel rank, would not show."""
    if model.config.model_type == "llama":
        model.config.attention_bias = model.config.mlp_bias = True
        torch.manual_seed(seed)
        model = type(model)(model.config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


def sparse_keep(layers: int, kv_heads: int, head_dim: int, align: int = 8, seed: int = 1) -> torch.Tensor:
    """~70%-sparse random keep mask with some 0-channel heads in every layer."""
    g = torch.Generator().manual_seed(seed)
    choices = [0, align, align, 2 * align]
    keep = torch.zeros(layers, kv_heads, head_dim, dtype=torch.bool)
    for l in range(layers):
        for h in range(kv_heads):
            n = 0 if h == l % kv_heads else choices[int(torch.randint(len(choices), (1,), generator=g))]
            idx = torch.randperm(head_dim, generator=g)[:n]
            keep[l, h, idx] = True
    return keep
