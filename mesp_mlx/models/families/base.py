"""What the engine and MeSP's hand rule need to know about one mlx-lm family: a small description.

The engine walks a decoder as  h0 = embed(x) [x embedding scale] -> h_{i+1} = block_i(h_i, mask_i) -> final norm ->
head [/ logits divisor]. A `Family` says how each of those steps differs from Llama's; a `BlockSpec` says how a
block is built, for the hand rule (methods/mesp.py), which reads nothing else. The default is Llama's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

LLAMA_LORA_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class BlockSpec:
    """One decoder block as the hand rule sees it (attribute names of the mlx-lm block; None = absent).

        n1 = pre_attn_norm(x);  r = o_proj(attention(q, k, v));  h = x + m * post_attn_norm(r)
        n2 = pre_mlp_norm(h);   r = down(act(gate(n2)) * up(n2)); out = h + m * post_mlp_norm(r)
    with RMSNorm weights w + norm_offset (Gemma: 1 + w), m the residual multiplier (Granite), q/k norms over each
    head ("head") or over the whole projection ("full"), and fused qkv / gate_up linears (Phi-3). The attention scale
    and the RoPE (or none: SmolLM3's NoPE layers) are read from the attention module itself."""
    pre_attn_norm: str | None = "input_layernorm"
    post_attn_norm: str | None = None
    pre_mlp_norm: str | None = "post_attention_layernorm"
    post_mlp_norm: str | None = None
    norm_offset: float = 0.0
    activation: str = "silu"  # silu | gelu_tanh (the gate's activation in act(gate) * up)
    qk_norm: str | None = None  # None | head | full
    residual_multiplier: float = 1.0
    fused_qkv: bool = False
    fused_gate_up: bool = False


@dataclass(frozen=True)
class Trunk:
    """A decoder's trunk under the names the engine uses, whatever the family calls them (wte / h / ln_f, ...)."""
    embed_tokens: nn.Module
    layers: list
    norm: nn.Module
    module: nn.Module  # the trunk itself (sliding-window settings live there)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple
    hand_rule: bool = True  # MeSP's hand-written block rule applies (else: the generic tier)
    text_attr: str | None = None  # multimodal folders: the attribute holding the text model (gemma3: language_model)
    lora_keys: tuple = LLAMA_LORA_KEYS  # mlx-lm names of the projections LoRA wraps by default
    notes: str = ""
    spec: BlockSpec = field(default_factory=BlockSpec)
    # where the walk's pieces sit: the trunk on the text model, the embedding / blocks / final norm on the trunk, the
    # untied head on the text model (a dotted path); Llama's names by default (walks.py: InternLM2, EXAONE, GPT-NeoX)
    trunk_attr: str = "model"
    embed_attr: str = "embed_tokens"
    layers_attr: str = "layers"
    norm_attr: str = "norm"
    head_attr: str = "lm_head"

    # --- the model-level walk -----------------------------------------------------------------------------------------
    def text_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.text_attr) if self.text_attr else model

    @property
    def weight_prefix(self) -> str:
        """Prefix of the text model's tensors in the model's safetensors ('' or 'language_model.')."""
        return f"{self.text_attr}." if self.text_attr else ""

    def scale_embedding(self, text_model: nn.Module, h: mx.array) -> mx.array:
        """h0 from the embedding rows (Llama: unchanged)."""
        return h

    def window(self, inner: nn.Module, index: int, layer: nn.Module) -> int | None:
        """Block `index`'s sliding window in tokens, or None for full causal attention (Llama's `use_sliding`)."""
        if getattr(layer, "use_sliding", False):
            return getattr(inner, "sliding_window", None)
        return None

    @property
    def layers_path(self) -> str:
        """The blocks' tensor prefix under the text model ('model.layers'; EXAONE: 'transformer.h')."""
        return f"{self.trunk_attr}.{self.layers_attr}"

    def missing(self, text_model: nn.Module) -> list[str]:
        """The walk's pieces (trunk.embed / layers / norm) the text model lacks under this layout."""
        trunk = getattr(text_model, self.trunk_attr, None)
        names = (self.embed_attr, self.layers_attr, self.norm_attr)
        return [f"{self.trunk_attr}.{a}" for a in names if trunk is None or not hasattr(trunk, a)]

    def trunk(self, text_model: nn.Module) -> Trunk:
        """The trunk's pieces under the engine's names, and the trunk itself (what `window` reads)."""
        module = getattr(text_model, self.trunk_attr)
        return Trunk(getattr(module, self.embed_attr), getattr(module, self.layers_attr),
                     getattr(module, self.norm_attr), module)

    def embedding(self, text_model: nn.Module) -> nn.Module:
        return getattr(getattr(text_model, self.trunk_attr), self.embed_attr)

    def head(self, text_model: nn.Module) -> nn.Module:
        """The LM head: the untied head when the model has one, else the tied embedding (used as_linear)."""
        head = text_model
        for name in self.head_attr.split("."):
            head = getattr(head, name, None)
        return self.embedding(text_model) if head is None else head

    def logits_divisor(self, text_model: nn.Module) -> float | None:
        """logits = head(norm(h)) / divisor (Granite's logits_scaling), or None."""
        return None

    def block_spec(self, block: nn.Module) -> BlockSpec | None:
        """The hand rule's view of `block`, or None when the hand rule does not apply to this family."""
        return self.spec if self.hand_rule else None


def cache_optional(block_cls: type) -> None:
    """Give a block class whose __call__(x, mask, cache) requires the cache (StableLM, Phi) the default cache=None,
    which is what its model passes without a cache: the engine's block(h, mask) is then the model's own call."""
    call = block_cls.__call__
    names = list(inspect.signature(call).parameters)
    if names[-1] == "cache" and not call.__defaults__:
        call.__defaults__ = (None,)
