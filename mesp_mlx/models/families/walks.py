"""Generic-tier families whose model-level walk differs from Llama's (their blocks get MeBP's autodiff rule, with
MeSP's LoRA VJP inside under --method mesp; LoRA keys are mlx-lm's default, every linear of a block).

    helium   : a tied model keeps an (unused) lm_head: the head is the embedding when tie_word_embeddings
    olmo3    : per-layer sliding windows from layer_types ("sliding_attention": `sliding_window` tokens)
    cohere   : logits = head(norm(h)) * logit_scale, i.e. a logits divisor 1 / logit_scale
    cohere2  : cohere's logit scale; layer i is global when i % sliding_window_pattern == pattern - 1, else windowed
    internlm2: Llama's walk with other names: model.tok_embeddings, and `output` for an untied head
    exaone   : transformer.{wte, h, ln_f} and lm_head
    gpt_neox : model.{embed_in, h, final_layer_norm}, the head model.embed_out (always untied)
    minicpm  : h0 = embed(x) * scale_emb; an untied head reads norm(h) / (hidden / dim_model_base)
               (the depth scaling scale_depth / sqrt(layers) is inside each block, so the walk needs nothing for it)
"""

from .base import Family

GENERIC_NOTE = "MeBP's autodiff rule; under --method mesp the same with MeSP's LoRA VJP inside"


class Helium(Family):
    def head(self, text_model):
        return self.embedding(text_model) if text_model.args.tie_word_embeddings else text_model.lm_head


class Olmo3(Family):
    def window(self, inner, index, layer):
        return inner.sliding_window if inner.layer_types[index] == "sliding_attention" else None


class Cohere(Family):
    def logits_divisor(self, text_model):
        return 1.0 / text_model.args.logit_scale  # (x W^T) * s = (x / (1 / s)) W^T


class Cohere2(Cohere):
    def window(self, inner, index, layer):
        pattern = inner.args.sliding_window_pattern
        return None if index % pattern == pattern - 1 else inner.window_size


class MiniCPM(Family):
    def scale_embedding(self, text_model, h):
        return h * text_model.args.scale_emb

    def logits_divisor(self, text_model):
        args = text_model.args
        return None if args.tie_word_embeddings else args.hidden_size / args.dim_model_base


def _generic(cls: type, name: str, notes: str, **layout) -> Family:
    return cls(name, (name,), hand_rule=False, lora_keys=(), notes=f"{notes}; {GENERIC_NOTE}", **layout)


WALKS = {f.name: f for f in (
    _generic(Helium, "helium", "tied head is the embedding (the unused lm_head is skipped)"),
    _generic(Olmo3, "olmo3", "per-layer sliding windows from layer_types"),
    _generic(Cohere, "cohere", "logits x logit_scale"),
    _generic(Cohere2, "cohere2", "logits x logit_scale; sliding-window layers by sliding_window_pattern"),
    _generic(Family, "internlm2", "embedding model.tok_embeddings, untied head output", embed_attr="tok_embeddings",
             head_attr="output"),
    _generic(Family, "exaone", "transformer.{wte, h, ln_f}", trunk_attr="transformer", embed_attr="wte",
             layers_attr="h", norm_attr="ln_f"),
    _generic(Family, "gpt_neox", "model.{embed_in, h, final_layer_norm}, head model.embed_out", embed_attr="embed_in",
             layers_attr="h", norm_attr="final_layer_norm", head_attr="model.embed_out"),
    _generic(MiniCPM, "minicpm", "x scale_emb embedding; untied head / (hidden / dim_model_base)"),
)}
