"""Gemma (1): h0 = embed(x) * sqrt(hidden) (a Python float, no bfloat16 rounding), (1 + w) RMSNorms, MLP
down(gelu(gate) * up) with the exact (erf) GELU. Generic tier: the walk needs only the embedding scale; the hand rule
has no erf-GELU gate, so its blocks get MeBP's autodiff rule (MeSP's LoRA VJP inside under --method mesp)."""

from .base import Family


class Gemma(Family):
    def scale_embedding(self, text_model, h):
        return h * (text_model.args.hidden_size ** 0.5)


GEMMA = Gemma("gemma", ("gemma",), hand_rule=False, notes="x sqrt(d) embedding; (1 + w) norms and erf-GELU gate "
                                                          "(no hand rule: generic tier)")
