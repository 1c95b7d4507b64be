"""Llama and its close kin: one SwiGLU pre-norm block, causal (or per-layer sliding) masks, tied or separate head.

llama / mistral (mlx-lm maps mistral to llama), qwen2, qwen3 (q/k RMSNorm over each head), smollm3 (Llama with RoPE
skipped on every no_rope_layer_interval-th layer: its NoPE module has the identity as VJP, handled by the rule)."""

from .base import BlockSpec, Family

LLAMA = Family("llama", ("llama", "mistral"), notes="SwiGLU, pre-norm, per-layer sliding window when layer_types say")
QWEN2 = Family("qwen2", ("qwen2",), notes="Llama with q/k/v biases")
QWEN3 = Family("qwen3", ("qwen3",), spec=BlockSpec(qk_norm="head"), notes="q/k RMSNorm over head_dim")
SMOLLM3 = Family("smollm3", ("smollm3",), notes="Llama; no RoPE on every no_rope_layer_interval-th layer")
