"""Gemma 3 (gemma3_text, and the text model inside gemma3 folders).

    h0 = embed(x) * sqrt(hidden)   (the factor rounded through bfloat16, then cast to h's dtype, as mlx-lm does)
    block: r = attn(n_in(x)); h = x + n_post_attn(r); r = mlp(n_pre_ff(h)); out = h + n_post_ff(r)
           every norm RMSNorm with weight 1 + w; q/k RMSNorm over head_dim; scale query_pre_attn_scalar^-1/2;
           MLP down(gelu_tanh(gate) * up)
    masks: layer i is global when i % sliding_window_pattern == pattern - 1, else a sliding window of
           `sliding_window` tokens (create_attention_mask's window mask: exact at every length)
The float16 residual clipping of mlx-lm is the identity in fp32/bf16; the hand rule refuses float16 blocks."""

import mlx.core as mx

from .base import BlockSpec, Family

SPEC = BlockSpec(pre_attn_norm="input_layernorm", post_attn_norm="post_attention_layernorm",
                 pre_mlp_norm="pre_feedforward_layernorm", post_mlp_norm="post_feedforward_layernorm",
                 norm_offset=1.0, activation="gelu_tanh", qk_norm="head")


class Gemma3(Family):
    def scale_embedding(self, text_model, h):
        return h * mx.array(text_model.args.hidden_size ** 0.5, mx.bfloat16).astype(h.dtype)

    def window(self, inner, index, layer):
        pattern = inner.sliding_window_pattern
        return None if index % pattern == pattern - 1 else inner.window_size

    def block_spec(self, block):
        return SPEC


GEMMA3_TEXT = Gemma3("gemma3_text", ("gemma3_text",), spec=SPEC,
                     notes="(1 + w) norms x4, q/k norms, GELU-tanh, query_pre_attn_scalar, x sqrt(d) embedding, "
                           "sliding-window layers")
GEMMA3 = Gemma3("gemma3", ("gemma3",), text_attr="language_model", spec=SPEC,
                notes="the text model of a gemma3 folder (the vision tower is not loaded by mlx-lm's text path)")
