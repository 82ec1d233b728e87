"""The project's own tiny Llama-architecture model: word-level tokenizer and config.

The tokenizer's vocabulary is exactly the words of :mod:`leank.train.data` (plus special
tokens), so every synthetic sample tokenizes one word per token. Weights trained by
``eval/train_tiny_model.py`` live in ``leank/data/tiny-llama/``.
"""

from __future__ import annotations

from pathlib import Path

TINY_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "tiny-llama"
SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")


def build_word_tokenizer():
    """A ``PreTrainedTokenizerFast`` (word level, whitespace split, punctuation isolated)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .data import vocabulary

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def tiny_llama_config(vocab_size: int, hidden_size: int = 256, num_layers: int = 6,
                      num_heads: int = 8, num_kv_heads: int = 4, head_dim: int = 64,
                      intermediate_size: int = 768, max_positions: int = 16384,
                      rope_theta: float = 10000.0):
    """A ``LlamaConfig`` for the tiny model (RoPE, GQA); defaults are the committed model's."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=max_positions, rope_theta=rope_theta,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        attention_dropout=0.0,
    )
