"""Granite: Llama's block with residual_multiplier on both residual adds and attention_multiplier as the attention
scale (read from the module); h0 = embed(x) * embedding_multiplier; logits = head(norm(h)) / logits_scaling."""

from .base import BlockSpec, Family


class Granite(Family):
    def scale_embedding(self, text_model, h):
        return h * text_model.model.embedding_multiplier

    def logits_divisor(self, text_model):
        return text_model.logits_scaling

    def block_spec(self, block):
        return BlockSpec(residual_multiplier=block.residual_multiplier)


GRANITE = Granite("granite", ("granite",), notes="embedding / attention / residual multipliers, logits scaling")
