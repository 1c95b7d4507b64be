"""Phi-3: Llama's block with fused projections, qkv_proj -> (q, k, v) split and gate_up_proj -> (gate, up) halves.
LoRA wraps the fused linears, as mlx-lm's does."""

from .base import BlockSpec, Family

PHI3 = Family("phi3", ("phi3",), spec=BlockSpec(fused_qkv=True, fused_gate_up=True),
              lora_keys=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
              notes="fused qkv_proj and gate_up_proj")
