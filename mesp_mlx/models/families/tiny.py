"""Tiny configs of each described family (hidden 64, 3 blocks, vocabulary 384; every matrix divisible by group 32),
for the tests and the support-table sweep. Where a family has sliding windows they are 5 tokens, so any test
sequence longer than 5 exercises the window masks."""

from __future__ import annotations

from ..synthetic import model_config

WINDOW = 5


def tiny_config(model_type: str) -> dict:
    if model_type == "gemma3":  # the multimodal folder's config: the text model's config inside
        return {"model_type": "gemma3", "vocab_size": 384, "text_config": tiny_config("gemma3_text")}
    base = model_config("llama", 64, 3, 128, 4, 2, 384)
    base["model_type"] = model_type
    if model_type == "mistral":  # Llama blocks with per-layer sliding windows (layer_types)
        base.update(layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=WINDOW)
    elif model_type == "qwen3":
        base["head_dim"] = 32
    elif model_type == "smollm3":
        base["no_rope_layer_interval"] = 2  # layer 1 has no RoPE
    elif model_type == "gemma3_text":
        base.update(head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW, sliding_window_pattern=2,
                    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
        base.pop("tie_word_embeddings")  # tied: mlx-lm's sanitize drops lm_head when the files have none
    elif model_type == "gemma":
        base["head_dim"] = 16
    elif model_type == "phi3":
        base["tie_word_embeddings"] = False  # a separate LM head
    elif model_type == "olmo2":
        pass
    elif model_type == "granite":
        base.update(logits_scaling=4.0, attention_multiplier=0.1, embedding_multiplier=3.0, residual_multiplier=0.5,
                    attention_bias=False, mlp_bias=False)
    return base


TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "smollm3", "olmo2", "granite")
