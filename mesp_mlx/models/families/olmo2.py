"""OLMo 2: norms after attention and MLP (h = x + n_post_attn(attn(x)); out = h + n_post_ff(mlp(h))), no pre-norms,
q/k RMSNorm over the full projection width (before the head split)."""

from .base import BlockSpec, Family

OLMO2 = Family("olmo2", ("olmo2",), spec=BlockSpec(pre_attn_norm=None, post_attn_norm="post_attention_layernorm",
                                                   pre_mlp_norm=None, post_mlp_norm="post_feedforward_layernorm",
                                                   qk_norm="full"),
               notes="post-norm residuals, full-width q/k norms")
